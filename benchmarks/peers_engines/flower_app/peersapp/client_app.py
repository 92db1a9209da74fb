"""peersapp: the ClientApp. Trains client ``config["cid"]`` in the workload's batch order."""

import time

import peers_workload as pw
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    called = time.time()
    torch.set_num_threads(1)
    w = pw.load(context.run_config["workload"])
    config = msg.content["config"]
    server_round, cid = int(config["server-round"]), int(config["cid"])
    model = pw.DigitsCNN()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    pw.train_client(model, w, server_round, cid)
    content = RecordDict({
        "arrays": ArrayRecord(model.state_dict()),
        "metrics": MetricRecord({"num-examples": int(w.sizes[cid]), "called-epoch": called}),
    })
    return Message(content=content, reply_to=msg)
