"""The in-process Grid: what ClientApps see, copies, failures, seeding, and `fedsim flower-run`."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import flwr
import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedsim.engines.federated.flower_run import flower_run, parse_run_config, read_app_config
from fedsim.engines.federated.local.grid import LocalGrid, copy_records, make_node_ids, run_local
from fedsim.errors import ConfigError
from fedsim.wire import flower_private as fp

APP_DIR = Path(__file__).parent / "fixtures" / "third_party_app"


# ---- Flower's private names -------------------------------------------------------------------------
def test_private_flower_names_still_work() -> None:
    # A Flower upgrade that moves TaskIdentity, Run, _message_id or the constants fails here.
    fp.check_private_api()
    assert flwr.__version__ == fp.FLOWER_VERSION_TESTED, (
        f"flwr {flwr.__version__} is installed; fedsim/engines/flower_private.py was checked against "
        f"{fp.FLOWER_VERSION_TESTED}: re-read the names it uses and update FLOWER_VERSION_TESTED")


# ---- a recording app ------------------------------------------------------------------------------
def recording_apps(rounds: int, seen: list[dict], raise_on: set[int] | None = None):
    """A ServerApp sending one shared RecordDict to every node per round, and a ClientApp that logs
    what it sees, edits the received content in place and counts its visits in Context.state."""
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        pid = context.node_config["partition-id"]
        count = int(context.state["visits"]["n"]) + 1 if "visits" in context.state else 1
        context.state["visits"] = MetricRecord({"n": count})
        seen.append({
            "node_id": context.node_id, "dst": msg.metadata.dst_node_id, "pid": pid,
            "num": context.node_config["num-partitions"], "run_config": dict(context.run_config),
            "visits": count, "x": msg.content["arrays"]["x"].numpy().copy(),
            "tag": msg.content["config"]["tag"], "draw": torch.rand(1).item(), "np_draw": np.random.rand(),
        })
        # In-place edits that must not leak to other nodes or to the server.
        msg.content["arrays"]["x"] = ArrayRecord([np.full(3, -1.0)])["0"]
        msg.content["config"]["tag"] = f"edited by {pid}"
        if raise_on and pid in raise_on:
            raise RuntimeError(f"boom {pid}")
        reply = RecordDict({"arrays": ArrayRecord({"x": msg.content["arrays"]["x"]}),
                            "metrics": MetricRecord({"pid": pid, "num-examples": 1})})
        return Message(reply, reply_to=msg)

    server = ServerApp()
    server_seen: dict = {"replies": [], "draws": []}

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        shared = RecordDict({"arrays": ArrayRecord({"x": ArrayRecord([np.arange(3.0)])["0"]}),
                             "config": ConfigRecord({"tag": "original"})})
        server_seen["node_ids"] = list(grid.get_node_ids())
        for server_round in range(1, rounds + 1):
            server_seen["draws"].append(random.random())
            messages = [Message(shared, node, "train", group_id=str(server_round)) for node in grid.get_node_ids()]
            server_seen["replies"].append(list(grid.send_and_receive(messages)))
        server_seen["shared_after"] = (shared["arrays"]["x"].numpy().copy(), shared["config"]["tag"])

    return server, client, server_seen


def test_nodes_contexts_and_copies_behave_as_in_flower_simulation() -> None:
    seen: list[dict] = []
    server, client, server_seen = recording_apps(2, seen)
    run_local(server, client, 4, {"lr": 0.1, "name": "x"}, seed=3)
    assert len(seen) == 8
    node_ids = server_seen["node_ids"]
    assert len(set(node_ids)) == 4 and all(n > 1 for n in node_ids) and node_ids == make_node_ids(4, 3)
    assert sorted({s["pid"] for s in seen}) == [0, 1, 2, 3] and {s["num"] for s in seen} == {4}
    assert all(s["node_id"] == s["dst"] for s in seen)
    assert all(s["run_config"] == {"lr": 0.1, "name": "x"} for s in seen)
    # Context.state persists per node: second round sees visit 2 on every node.
    assert [s["visits"] for s in seen] == [1, 1, 1, 1, 2, 2, 2, 2]
    # Every node got the original content although each one edited its copy in place.
    assert all(np.array_equal(s["x"], np.arange(3.0)) and s["tag"] == "original" for s in seen)
    x_after, tag_after = server_seen["shared_after"]
    assert np.array_equal(x_after, np.arange(3.0)) and tag_after == "original"
    # Replies come back to the server, one per node, with the client's edits.
    for replies in server_seen["replies"]:
        assert sorted(int(r.content["metrics"]["pid"]) for r in replies) == [0, 1, 2, 3]
        assert all(np.array_equal(r.content["arrays"]["x"].numpy(), np.full(3, -1.0)) for r in replies)


def test_client_randomness_is_seeded_per_node_and_round_and_isolated_from_the_server() -> None:
    runs = []
    for _ in range(2):
        seen: list[dict] = []
        server, client, server_seen = recording_apps(2, seen)
        random.seed(123)  # run_local seeds the server's generator itself: this must not matter
        run_local(server, client, 3, seed=5)
        runs.append((seen, server_seen))
    (a, sa), (b, sb) = runs
    assert [s["draw"] for s in a] == [s["draw"] for s in b]
    assert [s["np_draw"] for s in a] == [s["np_draw"] for s in b]
    assert len({s["draw"] for s in a}) == 6  # different per node and per round
    assert sa["draws"] == sb["draws"]
    # The server's own random stream does not depend on what the clients drew.
    seen_quiet: list[dict] = []
    server, client, server_seen = recording_apps(2, seen_quiet)
    random.seed(0)
    run_local(server, client, 1, seed=5)
    assert server_seen["draws"] == sa["draws"]


def test_a_raising_client_becomes_an_error_reply_and_keeps_its_old_state() -> None:
    seen: list[dict] = []
    server, client, server_seen = recording_apps(2, seen, raise_on={1})
    run_local(server, client, 3)
    for replies in server_seen["replies"]:
        errors = [r for r in replies if r.has_error()]
        assert len(errors) == 1 and errors[0].error.code == fp.CLIENT_APP_RAISED_EXCEPTION
        assert "boom 1" in errors[0].error.reason
        assert sum(r.has_content() for r in replies) == 2
    # Partition 1's Context.state was rolled back after each failure: it sees visit 1 twice.
    assert [s["visits"] for s in seen if s["pid"] == 1] == [1, 1]
    assert [s["visits"] for s in seen if s["pid"] == 0] == [1, 2]


def test_grid_api_details() -> None:
    client = ClientApp()
    grid = LocalGrid(client, 2, seed=1)
    with pytest.raises(RuntimeError):
        _ = grid.run
    grid.set_run(fp.make_run(grid.run_id))
    assert grid.run.run_id == grid.run_id
    with pytest.raises(TypeError):
        grid.set_run("not a run")  # type: ignore[arg-type]
    with fp.task_identity(run_id=grid.run_id):
        unknown = Message(RecordDict(), 999, "train", group_id="1")
        assert list(grid.push_messages([unknown])) == []  # dropped like Flower's link state does
    assert [n.node_id for n in grid.get_nodes()] == list(grid.get_node_ids())


def test_copy_records_shares_only_immutable_payloads() -> None:
    original = RecordDict({"a": ArrayRecord(torch.nn.Linear(2, 2).state_dict()),
                           "m": MetricRecord({"v": [1.0, 2.0]}), "c": ConfigRecord({"s": "x", "l": [1, 2]})})
    copied = copy_records(original)
    assert copied["a"]["weight"].data is original["a"]["weight"].data  # bytes: immutable, shared
    assert copied["a"]["weight"] is not original["a"]["weight"]
    copied["m"]["v"].append(3.0)
    copied["c"]["l"][0] = 9
    assert original["m"]["v"] == [1.0, 2.0] and original["c"]["l"] == [1, 2]
    assert copied["a"].to_torch_state_dict()["weight"].equal(original["a"].to_torch_state_dict()["weight"])


# ---- third-party apps ---------------------------------------------------------------------------------
def test_read_app_config_and_overrides(tmp_path: Path) -> None:
    spec = read_app_config(APP_DIR)
    assert spec.serverapp == "tinyfed.server_app:app" and spec.clientapp == "tinyfed.client_app:app"
    assert spec.run_config["num-server-rounds"] == 3 and spec.num_supernodes == 4
    merged = parse_run_config(["lr=0.5", "output=out.pt"], spec.run_config, "pyproject.toml")
    assert merged["lr"] == 0.5 and merged["output"] == "out.pt"
    several = parse_run_config(["lr=0.5 output='a b.pt'", "seed=3"], spec.run_config, "pyproject.toml")
    assert (several["lr"], several["output"], several["seed"]) == (0.5, "a b.pt", 3)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_run_config(["lr"], spec.run_config, "pyproject.toml")
    with pytest.raises(ConfigError, match="no-such-key"):
        parse_run_config(["no-such-key=1"], spec.run_config, "pyproject.toml")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "pyproject.toml").write_text('[project]\nname = "x"\n')
    with pytest.raises(ConfigError, match=r"tool\.flwr\.app"):
        read_app_config(bad)
    nested = tmp_path / "nested"
    nested.mkdir()
    (nested / "pyproject.toml").write_text(
        '[tool.flwr.app.components]\nserverapp = "a:b"\nclientapp = "a:c"\n'
        '[tool.flwr.app.config]\nx = 1\nsub.y = "z"\n')
    assert read_app_config(nested).run_config == {"x": 1, "sub.y": "z"}


def test_third_party_app_runs_and_survives_a_failing_client(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = flower_run(APP_DIR, 3, run_config=["num-server-rounds=2", "fail-partition=2"], client_threads=1)
    saved = torch.load(tmp_path / "final_model.pt")
    assert set(saved["state_dict"]) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert saved["accuracy"] > 0.15  # it learned something in 2 rounds (chance = 0.1)
    # Context.state persisted on the two healthy nodes: the mean "times-trained" of round 2 is 2.
    assert saved["train_metrics"][2]["times-trained"] == pytest.approx(2.0)
    assert result["run_config"]["fail-partition"] == 2


@pytest.mark.slow
def test_fedsim_flower_run_cli(tmp_path: Path) -> None:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "fedsim", "flower-run", str(APP_DIR), "--engine", "local", "--num-supernodes", "5",
         "--run-config", "num-server-rounds=2", "--run-config", "output=cli_model.pt"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "5 SuperNodes on the local engine" in done.stdout
    assert (tmp_path / "cli_model.pt").is_file()
    bad = subprocess.run([sys.executable, "-m", "fedsim", "flower-run", str(tmp_path)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "pyproject.toml" in bad.stderr
