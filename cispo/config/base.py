"""The schema's shared pieces: the error every bad value raises, and the checks the groups' `__post_init__`
share."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad user input (a config value, a dataset row): reported as one message, without a traceback."""


def _one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {sorted(allowed)}, got {value!r}")


def _positive(name: str, value) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")
