"""The client side of the strategies: what local training adds for FedProx and SCAFFOLD.

The client reads what the server's message asks for (``proximal-mu`` in the config from
Flower's FedProx, a ``scaffold-control`` record from :class:`strategies.scaffold.Scaffold`)
rather than a strategy name, so any strategy that sends these gets the matching client.
Both corrections go through the shared loop's ``extra_loss`` hook:

* FedProx: ``mu/2 * ||w - w_global||^2`` over the trainable parameters;
* SCAFFOLD: ``<w, c - c_i>``, a linear term whose gradient is exactly the control correction,
  so ``w <- w - lr (g + c - c_i)`` is the usual SGD step on the corrected objective.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict
from torch import nn

from fedsim.tasks import ExtraLoss
from strategies import math as fm
from strategies.scaffold import CONTROL_KEY, DELTA_CONTROL_KEY, to_numpy, to_record

__all__ = ["ClientAlgorithm", "client_algorithm", "proximal_term", "linear_term"]


def _like(arrays: Mapping[str, np.ndarray], model: nn.Module) -> dict[str, torch.Tensor]:
    """Constant tensors on the model's device/dtype for the model's parameter names in ``arrays``."""
    params = dict(model.named_parameters())
    return {k: torch.as_tensor(v).to(device=params[k].device, dtype=params[k].dtype)
            for k, v in arrays.items() if k in params}


def proximal_term(global_params: Mapping[str, np.ndarray], mu: float, model: nn.Module) -> ExtraLoss:
    """``extra_loss`` of FedProx: ``mu/2 * sum_k ||w_k - w_global_k||^2``."""
    anchors = _like(global_params, model)

    def extra(m: nn.Module) -> torch.Tensor:
        terms = [((p - anchors[name]) ** 2).sum() for name, p in m.named_parameters() if name in anchors]
        return (mu / 2.0) * torch.stack(terms).sum()

    return extra


def linear_term(direction: Mapping[str, np.ndarray], model: nn.Module) -> ExtraLoss:
    """``extra_loss`` whose gradient is ``direction``: ``sum_k <w_k, d_k>`` (SCAFFOLD's ``c - c_i``)."""
    constants = _like(direction, model)

    def extra(m: nn.Module) -> torch.Tensor:
        terms = [(p * constants[name]).sum() for name, p in m.named_parameters() if name in constants]
        return torch.stack(terms).sum()

    return extra


@dataclass
class ClientAlgorithm:
    """What one client round adds to plain local training.

    Attributes
    ----------
    name: ``fedavg`` | ``fedprox`` | ``scaffold`` (for logs).
    extra_loss: passed to the shared loop (``None`` = plain local SGD).
    global_params: the received global arrays (numpy).
    server_control / client_control: SCAFFOLD's ``c`` and ``c_i`` (trainable keys only).
    """

    name: str
    model: nn.Module
    global_params: dict[str, np.ndarray]
    extra_loss: ExtraLoss | None = None
    server_control: dict[str, np.ndarray] = field(default_factory=dict)
    client_control: dict[str, np.ndarray] = field(default_factory=dict)

    def finish(self, steps: int, lr: float) -> tuple[dict[str, ArrayRecord], ArrayRecord | None]:
        """Extra reply records and the client's new per-partition state, after ``steps`` local steps."""
        if self.name != "scaffold":
            return {}, None
        local = {k: v.detach().cpu().numpy() for k, v in self.model.state_dict().items()}
        if steps <= 0:  # nothing trained: the control stays, its delta is zero
            new_control = dict(self.client_control)
        else:
            new_control = fm.scaffold_client_control(
                self.client_control, self.server_control, self.global_params, local, steps, lr)
        delta = fm.subtract(new_control, self.client_control)
        return {DELTA_CONTROL_KEY: to_record(delta)}, to_record(new_control)


def client_algorithm(
    content: RecordDict, model: nn.Module, global_params: dict[str, np.ndarray], client_state: ArrayRecord | None,
    config_key: str = "config",
) -> ClientAlgorithm:
    """The client algorithm a train message asks for (see module docstring)."""
    config = content[config_key] if config_key in content else {}
    if CONTROL_KEY in content:
        control = to_numpy(content[CONTROL_KEY])
        own = to_numpy(client_state) if client_state is not None and len(client_state) else fm.zeros_like(control)
        correction = fm.scaffold_correction(control, own)
        return ClientAlgorithm("scaffold", model, global_params, linear_term(correction, model), control, own)
    mu = float(config.get("proximal-mu", 0.0)) if hasattr(config, "get") else 0.0
    if mu > 0.0:
        return ClientAlgorithm("fedprox", model, global_params, proximal_term(global_params, mu, model))
    return ClientAlgorithm("fedavg", model, global_params)
