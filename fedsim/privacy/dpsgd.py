"""Central and data-parallel DP-SGD (Abadi et al. 2016) with Opacus: ``train.dp``.

Opacus does all of the privacy work; nothing here clips, adds noise or accounts by hand:

* ``PrivacyEngine(accountant=...).make_private(...)`` wraps the model in a ``GradSampleModule``
  (per-sample gradients), the task's one optimizer in a ``DPOptimizer`` (per-sample clipping to
  ``max_grad_norm``, Gaussian noise of ``noise_multiplier * max_grad_norm``) and attaches the
  accountant (RDP, Mironov 2017; or PRV, Gopi et al. 2021) to its steps;
* a target epsilon is turned into a noise multiplier by ``opacus.accountants.utils.get_noise_multiplier``
  for the run's planned steps, **before** training starts;
* batches come from Opacus' Poisson-sampling ``DPDataLoader`` (every sample joins a batch with
  probability ``q`` independently; ``int(1 / q)`` steps per epoch, an empty batch included).

The sampling rate is Opacus' ``1 / (batches of an epoch)``: ``q = 1 / ceil(N / (world * batch_size))``
(the expected batch is ``world * train.batch_size`` samples, as without DP). Random draws are keyed by
(``train.seed``, epoch) through :func:`fedsim.seeding.derive_seed` and re-keyed at every epoch, so two
runs with one seed train identical parameters and a resumed run draws what the uninterrupted one drew
(Opacus' ``secure_mode`` would use a CSPRNG instead; seeded runs are for experiments).

Data-parallel runs wrap the model in Opacus' ``DifferentiallyPrivateDistributedDataParallel``;
``make_private`` then gives the ``DistributedDPOptimizer`` (rank 0 adds the noise, the clipped sums
are all-reduced). Each rank Poisson-samples, with the same ``q``, its own strided share of a
(seed, epoch) permutation of the training set (Opacus' ``DistributedUniformWithReplacementSampler``
scheme), through a ``DPDataLoader`` over that share: every sample still joins the global batch with
probability ``q``. Unlike Opacus' distributed sampler, which skips a rank's empty batch, every rank
takes every step (an empty batch contributes nothing but the step), so ranks never disagree on the
number of all-reduces.

Checkpoints keep the accountant's history (``engine_state["dp"]``); a resumed run restores it, and
refuses a checkpoint without one (its steps would be unaccounted).
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from fedsim.config import RunConfig
from fedsim.errors import ConfigError, FedsimError, UnsupportedError
from fedsim.seeding import derive_seed, strided_shard
from fedsim.tasks import Task
from fedsim.train import Batch, StepFn, TaskContext, TrainState, move_batch

__all__ = ["check_dpsgd", "PrivateTraining", "make_private", "sample_rate", "dp_delta", "planned_steps",
           "resolve_noise_multiplier", "compute_epsilon", "ACCOUNTANTS"]

ACCOUNTANTS = ("rdp", "prv")

_BATCHNORM_FIX = ("GroupNorm, which normalises each sample on its own where BatchNorm mixes a batch's samples "
                  "(torch.nn.GroupNorm, as task 'resnet18_gn' does; opacus.validators.ModuleValidator.fix(model) "
                  "swaps it in)")


# ---- the mechanism's inputs -------------------------------------------------------------------
def sample_rate(population: int, global_batch: int) -> float:
    """Opacus' Poisson rate for an expected batch of ``global_batch``: one over the batches of an epoch."""
    return 1.0 / math.ceil(population / global_batch)


def dp_delta(run: RunConfig, population: int) -> float:
    """``train.dp.delta``, or 1 / (training samples) when left out."""
    delta = run.train.dp.delta
    return float(delta) if delta is not None else 1.0 / population


def steps_per_epoch(run: RunConfig, q: float) -> int:
    """Steps of one epoch: Opacus' Poisson sampler yields ``int(1 / q)`` batches; ``train.max_steps`` caps them."""
    steps = int(1 / q)
    return min(steps, run.train.max_steps) if run.train.max_steps > 0 else steps


def planned_steps(run: RunConfig, q: float) -> int:
    """Steps of the whole run (what a target epsilon is spent over)."""
    return run.train.epochs * steps_per_epoch(run, q)


def compute_epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                    accountant: str = "rdp", **kwargs: Any) -> float:
    """epsilon at ``delta`` of ``steps`` Poisson-subsampled Gaussian steps, by Opacus' accountant
    (``kwargs`` go to its ``get_epsilon``: ``alphas`` for RDP, ``eps_error`` for PRV)."""
    from opacus.accountants import create_accountant

    if steps <= 0:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta, **kwargs))


def resolve_noise_multiplier(run: RunConfig, population: int, world_size: int = 1) -> float:
    """sigma: ``train.dp.noise_multiplier``, or the smallest one whose epsilon after the planned steps is
    at most ``train.dp.epsilon`` (Opacus' ``get_noise_multiplier``, to 0.01 in epsilon)."""
    from opacus.accountants.utils import get_noise_multiplier

    dp = run.train.dp
    if dp.noise_multiplier is not None:
        return float(dp.noise_multiplier)
    if dp.epsilon is None:
        raise FedsimError("train.dp is off: neither epsilon nor noise_multiplier is set")
    q = sample_rate(population, world_size * run.train.batch_size)
    steps, delta = planned_steps(run, q), dp_delta(run, population)
    if steps <= 0:
        raise ConfigError(run.source, "train.epochs", run.train.epochs, "DP-SGD with a target epsilon needs steps to "
                          "spend it over")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the")
            return float(get_noise_multiplier(target_epsilon=dp.epsilon, target_delta=delta, sample_rate=q,
                                              steps=steps, accountant=dp.accountant))
    except ValueError as exc:
        raise ConfigError(run.source, "train.dp.epsilon", dp.epsilon,
                          f"unreachable: {steps} steps at sampling rate {q:.4g} exceed it at delta = {delta:.3g} "
                          f"even with noise multiplier 1e6 ({exc})") from exc


# ---- what Opacus cannot train ------------------------------------------------------------------
def _layer_fix(module: nn.Module) -> str | None:
    """What replaces ``module`` for Opacus, or None if Opacus can train it."""
    from opacus.validators import ModuleValidator

    if isinstance(module, nn.modules.batchnorm._BatchNorm):  # affine or not, subclasses too: couples samples
        return _BATCHNORM_FIX
    if isinstance(module, nn.MultiheadAttention):
        return "opacus.layers.DPMultiheadAttention"
    if isinstance(module, nn.RNNBase):  # nn.LSTM / GRU / RNN and subclasses (e.g. fedsim's SequenceLSTM)
        kind = {"LSTM": "DPLSTM", "GRU": "DPGRU"}.get(module.mode, "DPRNN")
        return f"opacus.layers.{kind}"
    validator = ModuleValidator.VALIDATORS.get(type(module))
    if validator is not None and validator(module):
        if isinstance(module, nn.modules.instancenorm._InstanceNorm):
            return "the same layer with track_running_stats=False"
        return "a layer Opacus supports"
    trainable = any(p.requires_grad for p in module.parameters(recurse=False))
    if trainable and any(True for _ in module.buffers(recurse=False)):
        return "a layer without buffers (Opacus' GradSampleModule refuses trainable layers that keep buffers)"
    return None


def _layer_problems(model: nn.Module) -> list[str]:
    """``"<Type> at <path>, <path>: use <fix>"`` per kind of layer that Opacus cannot train."""
    from opacus.grad_sample import GradSampleModule
    from opacus.validators import ModuleValidator

    found: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name, module in model.named_modules():
        fix = _layer_fix(module)
        if fix is not None:
            found[(type(module).__name__, fix)].append(name or "<model>")
    problems = [f"{kind} at {', '.join(names)}; replace it with {fix}" for (kind, fix), names in found.items()]
    if problems:
        return problems
    # Opacus' own checks, for what the scan above does not name (e.g. a parent layer whose children keep buffers).
    errors = [e for e in ModuleValidator.validate(model, strict=False) if "training mode" not in str(e)]
    errors += GradSampleModule.validate(model, strict=False)
    return [" ".join(str(errors[0]).split())] if errors else []


def check_dpsgd(run: RunConfig, task: Task, model: nn.Module, *, population: int | None = None,
                world_size: int | None = None) -> None:
    """Refuse, before any run starts, a ``train.dp`` run that Opacus cannot make private.

    ``model`` is the task's model as built (on any device). With ``population`` (training samples) the
    data-dependent checks run too: a target epsilon must be reachable (its noise multiplier is resolved
    here, as the engine will). ``world_size`` defaults to the run's ranks (1 outside ``mode = "ddp"``).

    Raises
    ------
    UnsupportedError: a layer Opacus cannot compute per-sample gradients through (named with its path
        and replacement), a task with several optimizers or its own ``train_step`` (a GAN).
    ConfigError: ``ddp.launcher = "ray"``; an unreachable target epsilon.
    """
    dp = run.train.dp
    if not dp.enabled:
        return
    label = f"task '{run.task}' cannot train with DP-SGD (train.dp)"
    if type(task).train_step is not Task.train_step:
        raise UnsupportedError(f"{label}: it defines its own train_step ({type(task).__name__}.train_step); Opacus "
                               "privatises one loss.backward() followed by one optimizer.step() per batch, the "
                               "default Task.train_step")
    optimizers = task.build_optimizers(model, run.train)
    if len(optimizers) != 1:
        raise UnsupportedError(f"{label}: it has {len(optimizers)} optimizers ({', '.join(optimizers)}); DP-SGD "
                               "privatises the step of exactly one")
    problems = _layer_problems(model)
    if problems:
        raise UnsupportedError(f"{label}: Opacus cannot compute per-sample gradients through "
                               + "; ".join(problems))
    if run.mode == "ddp" and run.ddp.launcher == "ray":
        raise ConfigError(run.source, "ddp.launcher", run.ddp.launcher,
                          "DP-SGD (train.dp) runs data-parallel under torchrun only: the Ray Train driver does not "
                          "write the privacy record into summary.json")
    if population is not None:
        world = world_size if world_size is not None else (
            run.ddp.nproc * run.ddp.nnodes if run.mode == "ddp" else 1)
        resolve_noise_multiplier(run, population, world)


# ---- training ---------------------------------------------------------------------------------
@dataclass
class PrivateTraining:
    """A model, optimizer and data made private by Opacus for one run (on one rank).

    Engines use :meth:`batches_for_epoch` and :meth:`step_fn` with :func:`fedsim.train.fit`, add
    :meth:`epoch_metrics` to each epoch's record, keep :meth:`state_dict` in checkpoints and put
    :meth:`summary_metrics` / :meth:`privacy_record` into the summary.
    """

    engine: Any  # opacus.PrivacyEngine
    module: nn.Module
    """The plain model (evaluation, checkpoints); ``TrainState.model`` is its GradSampleModule."""
    dataset: Dataset
    seed: int
    population: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    accountant: str
    rank: int = 0
    world_size: int = 1
    noise_generator: torch.Generator | None = None
    _epsilon_cache: dict[int, float] = field(default_factory=dict)

    # ---- data and steps ----
    def batches_for_epoch(self, epoch: int) -> DataLoader:
        """Opacus' Poisson-sampled batches of ``epoch`` (this rank's share under DDP), drawn from a
        generator keyed by (seed, epoch, rank); the noise generator is re-keyed by (seed, epoch) too."""
        from opacus.data_loader import DPDataLoader

        if self.noise_generator is not None:
            self.noise_generator.manual_seed(derive_seed(self.seed, "dp-noise", epoch))
        generator = torch.Generator()
        generator.manual_seed(derive_seed(self.seed, "dp-sampling", epoch, self.rank))
        dataset = self.dataset
        if self.world_size > 1:
            share = strided_shard(self.population, self.world_size, self.rank, self.seed, epoch, shuffle=True)
            dataset = Subset(self.dataset, share)
        return DPDataLoader(dataset, sample_rate=self.sample_rate, generator=generator)

    def step_fn(self, task: Task, state: TrainState) -> StepFn:
        """The task's own step on the private model and optimizer. An empty Poisson batch still steps
        (Opacus adds the noise and counts it) and reports its losses as 0 with weight 0."""

        def step(batch: Batch, context: TaskContext) -> dict[str, float]:
            model = state.model
            model.train()
            with warnings.catch_warnings():
                # Opacus' hooks on a model whose inputs need no gradient: torch warns at every step.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                metrics = task.train_step(model, move_batch(batch, model), state.optimizers, context=context)
            return metrics if len(batch[0]) else {key: 0.0 for key in metrics}

        return step

    # ---- accounting ----
    @property
    def steps(self) -> int:
        """Private steps accounted so far (all epochs, resumed ones included)."""
        return int(sum(entry[2] for entry in self.engine.accountant.history))

    def epsilon(self) -> float:
        """The accountant's epsilon at the run's delta after the steps so far."""
        steps = self.steps
        if steps not in self._epsilon_cache:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Optimal order is the")
                self._epsilon_cache[steps] = float(self.engine.get_epsilon(self.delta)) if steps else 0.0
        return self._epsilon_cache[steps]

    def epoch_metrics(self) -> dict[str, float]:
        return {"dp_epsilon": self.epsilon()}

    def summary_metrics(self) -> dict[str, float]:
        return {"dp_epsilon": self.epsilon(), "dp_delta": self.delta}

    def privacy_record(self) -> dict[str, Any]:
        """The mechanism's inputs and its guarantee, for ``summary.json``'s ``privacy``."""
        return {"mechanism": "dp-sgd", "sampling": "poisson", "population": self.population,
                "sample_rate": self.sample_rate, "noise_multiplier": self.noise_multiplier,
                "max_grad_norm": self.max_grad_norm, "steps": self.steps, "delta": self.delta,
                "epsilon": self.epsilon(), "accountant": self.accountant}

    # ---- checkpoints ----
    def state_dict(self) -> dict[str, Any]:
        state = self.engine.accountant.state_dict()
        return {"accountant": {"mechanism": state["mechanism"], "history": [list(h) for h in state["history"]]},
                "privacy": self.privacy_record()}

    def restore(self, checkpoint: dict[str, Any], source: str = "<checkpoint>") -> None:
        """Continue the accountant of the run that wrote ``checkpoint`` (refused when it kept none)."""
        if checkpoint.get("step", 0) == 0:
            return
        saved = checkpoint.get("engine_state", {}).get("dp")
        if not saved:
            raise FedsimError(f"{source}: cannot resume a DP-SGD run (train.dp) from a checkpoint without a privacy "
                              f"accountant: its {checkpoint.get('step')} steps would be unaccounted; start afresh "
                              "(without --resume)")
        mechanism = saved["accountant"]["mechanism"]
        if mechanism != self.accountant:
            raise ConfigError(source, "train.dp.accountant", self.accountant,
                              f"the checkpoint's steps were accounted by '{mechanism}'; resume with the same "
                              "accountant")
        self.engine.accountant.load_state_dict({"mechanism": mechanism,
                                                "history": [tuple(h) for h in saved["accountant"]["history"]]})
        self._epsilon_cache.clear()


def make_private(run: RunConfig, task: Task, state: TrainState, dataset: Dataset, *, device: torch.device,
                 rank: int = 0, world_size: int = 1, distributed: bool = False) -> PrivateTraining:
    """Make ``state`` private in place: ``state.model`` becomes Opacus' GradSampleModule (over
    ``DPDDP(model)`` when ``distributed``) and ``state.optimizers["model"]`` its DPOptimizer.

    Call after the plain model and optimizer are built (and restored from a checkpoint), before
    training; then :meth:`PrivateTraining.restore` the accountant when resuming.
    """
    from opacus import PrivacyEngine
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

    dp = run.train.dp
    module = state.model
    check_dpsgd(run, task, module)
    population = len(dataset)  # type: ignore[arg-type]
    q = sample_rate(population, world_size * run.train.batch_size)
    sigma = resolve_noise_multiplier(run, population, world_size)
    (name, optimizer), = state.optimizers.items()
    noise_generator = torch.Generator(device=device)
    noise_generator.manual_seed(derive_seed(run.train.seed, "dp-noise", state.epoch))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")  # seeded on purpose (module docstring)
        engine = PrivacyEngine(accountant=dp.accountant)
    wrapped = DPDDP(module) if distributed else module
    # The loader only tells make_private the sampling rate (1 / its length); batches come from
    # PrivateTraining.batches_for_epoch, Poisson-sampled by DPDataLoader at that rate.
    reference = DataLoader(dataset, batch_size=world_size * run.train.batch_size)
    private_model, private_optimizer, _ = engine.make_private(
        module=wrapped, optimizer=optimizer, data_loader=reference, noise_multiplier=sigma,
        max_grad_norm=dp.max_grad_norm, poisson_sampling=False, noise_generator=noise_generator)
    private_model.forbid_grad_accumulation()  # what make_private does for Poisson sampling: one backward per step
    if not math.isclose(1.0 / len(reference), q):
        raise FedsimError(f"DP-SGD sampling rate mismatch: {1.0 / len(reference)} != {q}")
    state.model = private_model
    state.optimizers[name] = private_optimizer
    return PrivateTraining(engine=engine, module=module, dataset=dataset, seed=run.train.seed, population=population,
                           sample_rate=q, noise_multiplier=sigma, max_grad_norm=dp.max_grad_norm,
                           delta=dp_delta(run, population), accountant=dp.accountant, rank=rank,
                           world_size=world_size, noise_generator=noise_generator)
