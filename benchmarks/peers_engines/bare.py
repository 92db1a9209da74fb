"""bare: the reference FedAvg loop in plain PyTorch (sequential clients, example-weighted mean).

Usage: python bare.py WORKLOAD.npz OUT.json
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers_workload as pw  # noqa: E402


def main(workload: str, out: str) -> None:
    torch.set_num_threads(1)
    w = pw.load(workload)
    rec = pw.Recorder()
    model = w.model()
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    rec.round_start()
    for server_round in range(1, w.rounds + 1):
        sampled = w.sampled(server_round)
        total = float(sum(w.sizes[c] for c in sampled))
        new_state = {k: torch.zeros_like(v) for k, v in global_state.items()}
        for cid in sampled:
            rec.client_called()
            model.load_state_dict(global_state)
            pw.train_client(model, w, server_round, cid)
            for k, v in model.state_dict().items():
                new_state[k].add_(v, alpha=float(w.sizes[cid]) / total)
        global_state = new_state
        model.load_state_dict(global_state)
        rec.round_end(pw.accuracy(model, w))
    pw.write_result(out, rec, model)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
