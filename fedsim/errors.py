"""Errors a user can fix: the CLI prints them on one line and exits with their code."""

from __future__ import annotations


class FedsimError(Exception):
    """A user-facing error: bad input, unsupported combination. Exit code 2 by default."""

    exit_code = 2


class ConfigError(FedsimError):
    """An experiment file that cannot be loaded: names the file, the key and the value."""

    def __init__(self, file: str, key: str, value: object, reason: str) -> None:
        self.file, self.key, self.value, self.reason = file, key, value, reason
        super().__init__(f"{file}: key '{key}' = {value!r}: {reason}")


class UnsupportedError(FedsimError):
    """A task asked to run in a mode it cannot run in (e.g. a GAN under a pipeline split)."""


class RunFailedError(FedsimError):
    """A run that went wrong while training (NaN or infinite loss, a federated round in which every
    sampled client failed). What was already computed stays on disk; the CLI exits with code 1."""

    exit_code = 1
