"""Starting and stopping the processes fedsim owns (cluster nodes, SuperLinks, launched jobs).

Each process starts in a new session (``setsid``) so that it and everything it spawns can be
found again by session id and stopped — exactly those, never by name (no ``pkill -f``, no
``ray stop``, which would hit other users' processes).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from fedsim.errors import FedsimError


@dataclass
class ManagedProcess:
    """A process fedsim started: its role, pid (= session id) and log file."""

    role: str
    pid: int
    log: str
    address: str = ""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free on ``host`` now (the caller binds it soon after)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free ports (all held open together while choosing, so none repeats)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((host, 0))
            sockets.append(sock)
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port_range(size: int, host: str = "127.0.0.1", low: int = 12000, high: int = 30000) -> int:
    """The first port of ``size`` consecutive free ports below the kernel's ephemeral range
    (so ports the OS hands out to other sockets never fall inside it)."""
    import random

    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        start = rng.randrange(low, high - size)
        if not any(port_in_use(host, port) for port in range(start, start + size)):
            return start
    raise FedsimError(f"no {size} consecutive free ports on {host} between {low} and {high}")


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment for a child, with this interpreter's ``bin`` first on PATH.

    Ray, the SuperLink and the SuperNodes start helpers (``flower-superexec``, ``raylet``
    wrappers) by name; when fedsim runs as ``.venv/bin/fedsim`` without an activated venv,
    those names must still resolve to the same environment.
    """
    env = {**os.environ, **(extra or {})}
    bin_dir = os.path.dirname(sys.executable)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    return env


def start(role: str, cmd: Sequence[str], log: Path, env: dict[str, str] | None = None, address: str = "",
          cwd: str | Path | None = None) -> ManagedProcess:
    """Start ``cmd`` in its own session, output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as handle:
        proc = subprocess.Popen(list(cmd), stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=child_env(env), start_new_session=True, cwd=cwd)
    return ManagedProcess(role=role, pid=proc.pid, log=str(log), address=address)


def session_members(session_id: int) -> list[psutil.Process]:
    """Every live process in the session that ``session_id``'s leader started."""
    members = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getsid(proc.pid) == session_id:
                members.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


def alive(process: ManagedProcess) -> bool:
    return bool(session_members(process.pid))


def stop(processes: Sequence[ManagedProcess], timeout: float = 20.0) -> None:
    """SIGTERM each session, wait, then SIGKILL what is left. Returns when none of them is alive."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for process in processes:
            for member in session_members(process.pid):
                try:
                    member.send_signal(sig)
                except psutil.Error:
                    pass
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 10.0)
        while time.monotonic() < deadline and any(alive(p) for p in processes):
            time.sleep(0.2)
        for process in processes:  # reap our direct children so they do not linger as zombies
            try:
                os.waitpid(process.pid, os.WNOHANG)
            except ChildProcessError:
                pass
        if not any(alive(p) for p in processes):
            return


def wait_for_port(host: str, port: int, timeout: float, process: ManagedProcess | None = None) -> None:
    """Block until something accepts connections on host:port, or raise with the log's tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                return
        if process is not None and not alive(process):
            break
        time.sleep(0.2)
    tail = log_tail(process.log) if process else ""
    raise FedsimError(f"nothing listens on {host}:{port} after {timeout:.0f}s{': ' + tail if tail else ''}")


def log_tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
