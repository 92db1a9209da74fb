"""Federated rounds: Flower ServerApp/ClientApp, the round loop, third-party Flower apps; the
in-process engine lives in :mod:`fedsim.engines.federated.local`."""
