"""Resolving ``module:attribute`` strings, the one way users plug in tasks, datasets and apps."""

from __future__ import annotations

import importlib
from typing import Any

from fedsim.errors import FedsimError


def import_object(spec: str) -> Any:
    """Import ``package.module:attr.sub`` and return the attribute, with a clear error if absent."""
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise FedsimError(f"'{spec}' is not of the form module:attribute")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise FedsimError(f"cannot import module '{module_name}' (from '{spec}'): {exc}") from exc
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise FedsimError(f"module '{module_name}' has no attribute '{attr_path}' (from '{spec}')")
        obj = getattr(obj, part)
    return obj
