"""fedsim_local / flower: the plain Flower app in ./flower_app on fedsim's local engine or Flower's run_simulation.

Usage (fedsim's venv): python flower_app_child.py local|flower WORKLOAD.npz OUT.json
"""

import os
import sys
from pathlib import Path

APP = Path(__file__).resolve().parent / "flower_app"


def main(engine: str, workload: str, out: str) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from fedsim.engines.federated.flower_run import flower_run

    clients = int(np.load(workload)["meta"][0])
    flower_run(APP, clients, engine=engine, run_config=[f'workload="{workload}"', f'out="{out}"'])


if __name__ == "__main__":
    main(*sys.argv[1:4])
