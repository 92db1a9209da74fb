"""Experiment reports: tables and plots (central vs federated, Part A, partitions, topologies, MAE,
few-shot). Reports read summaries and results; they never run training."""
