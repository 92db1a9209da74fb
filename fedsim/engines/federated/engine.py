"""``mode = "federated"``: a fedsim run as a Flower App (ServerApp + ClientApp), on a chosen transport.

* ``federated.engine = "flower"`` — Flower's own simulation (``flwr.simulation.run_simulation``:
  an in-memory SuperLink and Ray actors), with client resources from the experiment
  (``federated.cpus_per_client`` / ``gpus_per_client``);
* ``federated.engine = "local"`` — fedsim's in-process grid (:mod:`fedsim.engines.federated.local.grid`),
  same apps, no Ray.

The apps and the round loop live in :mod:`fedsim.engines.federated.flower_app` and
:mod:`fedsim.engines.federated.rounds`; this module only launches them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fedsim.config import RunConfig, to_dict
from fedsim.engines.common import RunContext
from fedsim.engines.federated.flower_app import FederatedJob, clientapp, make_server_app
from fedsim.engines.federated.rounds import run_json
from fedsim.errors import FedsimError
from fedsim.results import RunDir

__all__ = ["run_federated", "plan_jobs", "CLIENT_APP_REF"]

CLIENT_APP_REF = "fedsim.engines.federated.flower_app:clientapp"


def _quiet_flower() -> None:
    """No telemetry, no Ray usage stats, and Flower's per-round INFO lines only when asked for."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if not os.environ.get("FEDSIM_FLOWER_VERBOSE"):
        logging.getLogger("flwr").setLevel(logging.WARNING)


# Results of runs that ran ahead in a shared simulation: (folder, run config JSON, resume) -> job.
_AHEAD: dict[tuple[str, str, bool], FederatedJob] = {}


def _key(run: RunConfig, out: RunDir, resume: bool) -> tuple[str, str, bool]:
    return str(out.root.resolve()), run_json(to_dict(run)), resume


def _compatible(a: RunConfig, b: RunConfig) -> bool:
    fa, fb = a.federated, b.federated
    return b.mode == "federated" and (fa.engine, fa.num_clients, fa.cpus_per_client, fa.gpus_per_client) == (
        fb.engine, fb.num_clients, fb.cpus_per_client, fb.gpus_per_client)


def plan_jobs(run: RunConfig, ctx: RunContext) -> list[FederatedJob]:
    """This run plus the later planned runs that can share its Flower simulation.

    Starting Ray and its actors costs seconds per simulation; runs of one experiment with the same
    clients and resources (e.g. strategies x partitions x seeds) run one after another in one
    ServerApp over the same SuperNodes. Each keeps its own round loop, seeds and results.
    """
    job = FederatedJob(run, ctx.out, resume=ctx.resume, stop_after_round=int(ctx.extras.get("stop_after_round", 0)))
    jobs = [job]
    planned = ctx.extras.get("planned") or []
    if run.federated.engine != "flower" or job.stop_after_round:
        return jobs
    here = [i for i, (_, path) in enumerate(planned) if Path(path).resolve() == ctx.out.root.resolve()]
    for other, path in planned[here[0] + 1:] if here else []:
        out = RunDir(path)
        if _compatible(run, other) and _key(other, out, ctx.resume) not in _AHEAD:
            jobs.append(FederatedJob(other, out, resume=ctx.resume))
    return jobs


def run_federated(run: RunConfig, ctx: RunContext) -> dict[str, Any]:
    """Run ``run`` federated; return its summary (also written to ``summary.json``).

    A run that fails while training (:class:`fedsim.errors.RunFailedError`: a round in which every
    sampled client failed, a NaN model) raises here, whichever engine ran its ServerApp; the rounds
    before keep their metrics and checkpoint.

    ``ctx.extras["stop_after_round"]`` interrupts the run after that round's checkpoint (tests);
    ``ctx.extras["planned"]`` (from :func:`fedsim.experiment.run_experiment`) lets later compatible
    runs share this run's simulation (:func:`plan_jobs`).
    """
    ahead = _AHEAD.pop(_key(run, ctx.out, ctx.resume), None)
    if ahead is not None:
        return _outcome(ahead)
    fed = run.federated
    jobs = plan_jobs(run, ctx)
    server_app = make_server_app(jobs)
    _quiet_flower()
    if fed.engine == "flower":
        from flwr.simulation import run_simulation

        resources: dict[str, Any] = {"num_cpus": fed.cpus_per_client, "num_gpus": fed.gpus_per_client}
        init_args: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if fed.ray_address:  # attach to a running cluster (`fedsim cluster up --ray`): actors on its nodes
            init_args = {"address": fed.ray_address, "log_to_driver": False}
        try:
            run_simulation(server_app, clientapp, num_supernodes=fed.num_clients,
                           backend_config={"client_resources": resources, "init_args": init_args})
        except Exception:
            # The simulation may end with an error of its own (Ray, the SuperLink state) after the
            # ServerApp recorded why the run stopped; that reason is the one the user needs.
            if jobs[0].error is None:
                raise
    elif fed.engine == "local":
        from fedsim.engines.federated.local.grid import run_local

        run_local(server_app, clientapp, fed.num_clients, seed=run.train.seed, workers=fed.worker_processes,
                  vectorise=fed.vectorise, client_threads=run.train.threads, client_app_ref=CLIENT_APP_REF)
    else:  # the config loader already restricts the value; kept for code-built configs
        raise FedsimError(f"{run.source}: federated.engine = {fed.engine!r}: expected 'flower' or 'local'")
    for other in jobs[1:]:
        if other.result is not None or other.error is not None:  # runs skipped after a failure run afresh later
            _AHEAD[_key(other.run, other.out, other.resume)] = other
    return _outcome(jobs[0])


def _outcome(job: FederatedJob) -> dict[str, Any]:
    if job.error is not None:
        raise job.error
    if job.result is None:
        raise FedsimError(f"federated run '{job.run.name}' ended without a result (see the Flower log above)")
    return job.result
