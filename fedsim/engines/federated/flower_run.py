"""``fedsim flower-run APP_DIR``: run any Flower app (as ``flwr run`` would find it) on the local engine.

The app directory holds a ``pyproject.toml`` with ``[tool.flwr.app.components]`` naming the
ServerApp and ClientApp as ``module:attribute`` and ``[tool.flwr.app.config]`` with run-config
defaults (nested tables flatten to dotted keys, as in Flower). ``--run-config KEY=VALUE`` overrides
a key that must already exist, as ``flwr run --run-config`` does.
"""

from __future__ import annotations

import re
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsim.errors import ConfigError, FedsimError
from fedsim.registry import import_object

__all__ = ["AppSpec", "read_app_config", "load_component", "flower_run"]

_VALUE_TYPES = (bool, int, float, str)
_PAIR = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")


@dataclass(frozen=True)
class AppSpec:
    """What a Flower app's pyproject says about it."""

    app_dir: Path
    serverapp: str
    clientapp: str
    run_config: dict[str, Any]
    num_supernodes: int | None
    """``options.num-supernodes`` of the default federation, if the file names one."""


def _flatten(table: dict[str, Any], file: str, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            flat.update(_flatten(value, file, dotted))
        elif isinstance(value, _VALUE_TYPES):
            flat[dotted] = value
        else:
            raise ConfigError(file, f"tool.flwr.app.config.{dotted}", value,
                              "run-config values must be int, float, bool or str")
    return flat


def parse_run_config(items: list[str], defaults: dict[str, Any], file: str) -> dict[str, Any]:
    """Apply ``KEY=VALUE`` overrides (TOML values, bare words as strings) to existing keys."""
    merged = dict(defaults)
    pairs: list[tuple[str, str]] = []
    for item in items:
        # As `flwr run --run-config "a=1 b='x y'"`: several space-separated pairs per argument.
        found = _PAIR.findall(item)
        if not found or "".join(f"{k}={v}" for k, v in found).replace(" ", "") != item.replace(" ", ""):
            raise ConfigError("--run-config", item, item, "expected KEY=VALUE (several separated by spaces)")
        pairs.extend(found)
    for key, raw in pairs:
        if key not in defaults:
            raise ConfigError(file, f"tool.flwr.app.config.{key}", raw,
                              f"--run-config names a key the app does not define; known: {', '.join(sorted(defaults))}")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        merged[key] = value
    return merged


def read_app_config(app_dir: str | Path) -> AppSpec:
    """Read ``[tool.flwr.app]`` from ``APP_DIR/pyproject.toml``; errors name the file and key."""
    root = Path(app_dir).resolve()
    path = root / "pyproject.toml"
    file = str(path)
    if not path.is_file():
        raise ConfigError(file, "<file>", str(app_dir), "no pyproject.toml in the app directory")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "<toml>", str(exc), "not valid TOML") from exc
    app = data.get("tool", {}).get("flwr", {}).get("app")
    if not isinstance(app, dict):
        raise ConfigError(file, "tool.flwr.app", None, "missing [tool.flwr.app] section: not a Flower app")
    components = app.get("components", {})
    refs = {}
    for name in ("serverapp", "clientapp"):
        ref = components.get(name)
        if not isinstance(ref, str) or ":" not in ref:
            raise ConfigError(file, f"tool.flwr.app.components.{name}", ref, "expected 'module:attribute'")
        refs[name] = ref
    config = app.get("config", {})
    if not isinstance(config, dict):
        raise ConfigError(file, "tool.flwr.app.config", config, "expected a table")
    federations = data.get("tool", {}).get("flwr", {}).get("federations", {})
    default = federations.get("default")
    options = federations.get(default, {}).get("options", {}) if isinstance(default, str) else {}
    nodes = options.get("num-supernodes") if isinstance(options, dict) else None
    return AppSpec(root, refs["serverapp"], refs["clientapp"], _flatten(config, file),
                   nodes if isinstance(nodes, int) else None)


def load_component(ref: str, app_dir: Path, expected: type) -> Any:
    """Import ``module:attribute`` with ``app_dir`` first on ``sys.path`` (as Flower loads apps)."""
    if str(app_dir) not in sys.path:
        sys.path.insert(0, str(app_dir))
    try:
        obj = import_object(ref)
    except FedsimError as exc:
        raise FedsimError(f"{app_dir / 'pyproject.toml'}: {exc}") from exc
    if not isinstance(obj, expected):
        raise FedsimError(f"{app_dir / 'pyproject.toml'}: '{ref}' is a {type(obj).__name__}, not a {expected.__name__}")
    return obj


def flower_run(app_dir: str | Path, num_supernodes: int | None = None, *, engine: str = "local",
               run_config: list[str] | None = None, seed: int = 0, workers: int = 0, client_threads: int = 0,
               ) -> dict[str, Any]:
    """Run the Flower app in ``app_dir``; return timings and the server's final Context."""
    spec = read_app_config(app_dir)
    nodes = num_supernodes or spec.num_supernodes
    if not nodes or nodes < 1:
        raise ConfigError(str(spec.app_dir / "pyproject.toml"), "num-supernodes", nodes,
                          "give --num-supernodes N (the app's default federation names none)")
    config = parse_run_config(list(run_config or []), spec.run_config, str(spec.app_dir / "pyproject.toml"))
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    server_app = load_component(spec.serverapp, spec.app_dir, ServerApp)
    client_app = load_component(spec.clientapp, spec.app_dir, ClientApp)
    started = time.perf_counter()
    if engine == "local":
        from fedsim.engines.federated.local.grid import run_local

        context = run_local(server_app, client_app, nodes, config, seed=seed, workers=workers,
                            client_threads=client_threads, client_app_ref=spec.clientapp,
                            app_dir=str(spec.app_dir))
    elif engine == "flower":
        context = _run_flower_simulation(spec, nodes, config, server_app, client_app)
    else:
        raise FedsimError(f"unknown engine '{engine}'; use local or flower")
    return {"engine": engine, "num_supernodes": nodes, "run_config": config, "context": context,
            "wall_time_s": time.perf_counter() - started}


def _run_flower_simulation(spec: AppSpec, nodes: int, config: dict[str, Any], server_app: Any,
                           client_app: Any) -> Any:
    """Flower's own simulation runtime, given the same run config (``run_simulation`` passes none)."""
    import os

    from fedsim.wire import flower_private as fp

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray workers import the app by name: make its folder importable there too.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(spec.app_dir), os.environ.get("PYTHONPATH")) if p)
    return fp.run_flower_simulation(server_app, client_app, nodes, config, app_dir=str(spec.app_dir),
                                    backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
