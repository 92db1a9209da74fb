"""fedsim_local / flower / direct: the plain Flower app in ./flower_app on fedsim's local engine, on Flower's
run_simulation, or on no engine at all (the direct-call floor, ./direct_floor.py).

Usage (fedsim's venv): python flower_app_child.py local|pool|flower|direct WORKLOAD.npz OUT.json
"""

import os
import sys
from pathlib import Path

APP = Path(__file__).resolve().parent / "flower_app"
sys.path.insert(0, str(APP.parent))


def main(engine: str, workload: str, out: str) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from fedsim.engines.federated.flower_run import flower_run

    clients = int(np.load(workload)["meta"][0])
    if engine == "direct":
        from direct_floor import run_direct
        from flwr.clientapp import ClientApp
        from flwr.serverapp import ServerApp

        from fedsim.engines.federated.flower_run import load_component, parse_run_config, read_app_config

        spec = read_app_config(APP)
        config = parse_run_config([f'workload="{workload}"', f'out="{out}"'], spec.run_config, "pyproject.toml")
        run_direct(load_component(spec.serverapp, spec.app_dir, ServerApp),
                   load_component(spec.clientapp, spec.app_dir, ClientApp), clients, config)
        return
    workers = 2 if engine == "pool" else 0  # fedsim's local engine with its worker pool (2 processes)
    flower_run(APP, clients, engine="local" if engine == "pool" else engine, workers=workers,
               run_config=[f'workload="{workload}"', f'out="{out}"'])


if __name__ == "__main__":
    main(*sys.argv[1:4])
