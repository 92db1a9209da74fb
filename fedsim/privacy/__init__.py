"""Differential privacy and secure aggregation: DP-SGD with Opacus (central, DDP), user-level DP-FedAvg
with Flower's DP strategy wrappers, and the privacy accounting both record."""
