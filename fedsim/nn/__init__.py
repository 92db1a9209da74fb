"""Neural-network building blocks fedsim adds to torch.nn (global-batch BatchNorm for gloo)."""
