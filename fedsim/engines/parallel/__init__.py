"""Data and model parallelism: torchrun DDP, Ray Train, pipeline schedules and the torchrun launcher."""
