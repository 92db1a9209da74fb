"""peersapp: the ServerApp. Stock ``FedAvg`` (configure_train / aggregate_train), the workload's schedule.

Deviation from a textbook Flower app, needed to replay the same schedule on every engine: a
ServerApp cannot see the nodes' ``partition-id``, so client ``cid`` is played by the node
``sorted(node_ids)[cid]`` and the message's config carries ``cid`` (the ClientApp trains that
client's data). FedAvg samples from a grid view that lists only the scheduled nodes, so its
``sample_nodes`` picks exactly them; its per-node messages are then re-made with each one's
``cid`` (they share one RecordDict otherwise). Aggregation is FedAvg's own ``aggregate_train``
(weighted by ``num-examples``), in reply order.
"""

import time

import peers_workload as pw
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


class ScheduledGrid:
    """The grid as FedAvg's sampler sees it: only this round's scheduled nodes."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid, self._node_ids = grid, node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


@app.main()
def main(grid: Grid, context: Context) -> None:
    torch.set_num_threads(1)
    w = pw.load(context.run_config["workload"])
    rec = pw.Recorder()
    while len(nodes := sorted(grid.get_node_ids())) < w.clients:  # Flower's simulation registers nodes lazily
        time.sleep(0.05)
    cid_of = {node: cid for cid, node in enumerate(nodes)}
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1)
    model = w.model()
    arrays = ArrayRecord(model.state_dict())
    rec.round_start()
    for server_round in range(1, w.rounds + 1):
        view = ScheduledGrid(grid, [nodes[c] for c in w.sampled(server_round)])
        messages = []
        for msg in strategy.configure_train(server_round, arrays, ConfigRecord({"lr": pw.LR}), view):
            node = msg.metadata.dst_node_id
            config = ConfigRecord({**msg.content["config"], "cid": cid_of[node]})
            messages.append(Message(RecordDict({"arrays": msg.content["arrays"], "config": config}),
                                    message_type=MessageType.TRAIN, dst_node_id=node))
        replies = list(grid.send_and_receive(messages))
        if server_round == 1:  # the first client call: the earliest of round 1's (Ray actors run in parallel)
            rec.client_called(min(float(r.content["metrics"]["called-epoch"]) for r in replies if r.has_content()))
        new_arrays, _ = strategy.aggregate_train(server_round, replies)
        if new_arrays is None:
            raise RuntimeError(f"round {server_round}: no client replied")
        arrays = new_arrays
        model.load_state_dict(arrays.to_torch_state_dict())
        rec.round_end(pw.accuracy(model, w))
    pw.write_result(context.run_config["out"], rec, model)
