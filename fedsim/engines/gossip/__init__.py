"""Serverless decentralized training (D-PSGD gossip averaging) and its communication topologies."""
