"""fedsim's in-process Flower engine: a Grid that delivers messages to ClientApps in this process
(sequential, in a worker pool, or vectorised with torch.func)."""
