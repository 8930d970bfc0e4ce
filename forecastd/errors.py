"""One exception tree. Library code raises these; only the CLI turns them into messages and exit codes.

Every message says what went wrong, which value, and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "ForecastdError",
    "ConfigError",
    "SourceError",
    "SinkError",
    "DataError",
    "ModelError",
    "StateError",
    "CheckpointError",
    "LockError",
]


class ForecastdError(Exception):
    """Base of every error forecastd raises on purpose."""

    exit_code = 1


class ConfigError(ForecastdError):
    """The config file or a flag has a bad key or value."""

    exit_code = 2


class SourceError(ForecastdError):
    """The source could not be read: missing file, table, column, or unreachable database."""

    exit_code = 3


class SinkError(ForecastdError):
    """Outputs could not be written."""

    exit_code = 4


class DataError(ForecastdError):
    """The data cannot be used at all (as opposed to rows that are repaired or rejected and counted)."""

    exit_code = 5


class ModelError(ForecastdError):
    """No usable model: none trained yet, a config that does not match, or training that failed."""

    exit_code = 6


class StateError(ForecastdError):
    """The state directory cannot be used."""

    exit_code = 7


class CheckpointError(StateError):
    """A checkpoint file is truncated, corrupt, or fails its checksum."""


class LockError(StateError):
    """Another forecastd process holds the state directory."""
