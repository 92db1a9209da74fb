"""Task definitions registered in :data:`fedsim.tasks.TASKS` (``part_a``: the exam's five tasks)."""
