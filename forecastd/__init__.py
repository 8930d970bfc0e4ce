"""forecastd: a streaming time-series forecasting daemon.

The public surface is small: load a config, train, tick, backfill, and the error tree.

    >>> import forecastd
    >>> config = forecastd.load_config("forecastd.toml")          # doctest: +SKIP
    >>> forecastd.train(config, now)                               # doctest: +SKIP

`train`, `run_once` and `backfill` are imported on first use, so `import forecastd` (and the CLI's
`--help`) does not pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from forecastd.config import Config, load_config
from forecastd.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    ForecastdError,
    LockError,
    ModelError,
    SinkError,
    SourceError,
    StateError,
)
from forecastd.runtime import ensure_numba_cache

# Here, before any module that compiles with numba is imported: numba fixes its cache directory then,
# and fails the import where it finds none writable (forecastd.runtime says when).
ensure_numba_cache()

if TYPE_CHECKING:
    from forecastd.pipeline import TickReport, TrainSummary, backfill, run_once, train

__version__ = "0.1.0"  # kept equal to pyproject.toml's version by tests/test_cli.py

__all__ = [
    "__version__",
    "load_config",
    "Config",
    "train",
    "run_once",
    "backfill",
    "TrainSummary",
    "TickReport",
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

_LAZY = {"train", "run_once", "backfill", "TrainSummary", "TickReport"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from forecastd import pipeline

        value = getattr(pipeline, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'forecastd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)
