"""fedsim: one task definition, many execution modes (central, DDP, pipeline, federated, ...)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

__all__ = ["run", "__version__"]
__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from fedsim.config import Experiment


def run(config: Experiment | str | dict[str, Any], overrides: Sequence[str] = (), **kwargs: Any) -> list[dict[str, Any]]:
    """Run an experiment from code: a loaded :class:`Experiment`, a TOML path, or a plain dict.

    ``overrides`` are ``KEY=VALUE`` strings as with ``fedsim run --set``; keyword arguments
    (``out``, ``resume``, ``only``, ``quiet``) are those of :func:`fedsim.experiment.run_experiment`.
    Returns the run summaries (the dicts written to ``summary.json``, plus the trained ``model``).
    """
    from fedsim.experiment import run_experiment

    return run_experiment(config, tuple(overrides), **kwargs)
