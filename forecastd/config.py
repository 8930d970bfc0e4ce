"""Configuration: frozen dataclasses per concern, loaded from TOML and validated at load.

Every default carries its reason in a comment. Validation names the bad key and the fix; unknown keys
are errors (a typo silently ignored is a production incident later).
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from forecastd.errors import ConfigError, DataError

__all__ = [
    "Config",
    "SourceConfig",
    "DataConfig",
    "ModelConfig",
    "TrainingConfig",
    "AnomalyConfig",
    "SinkConfig",
    "StateConfig",
    "ServeConfig",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "with_overrides",
    "EXAMPLE_TOML",
]


@dataclass(frozen=True)
class SourceConfig:
    kind: Literal["parquet", "sql"] = "parquet"
    # Parquet: one file, a directory dataset, or a glob. Relative paths resolve against the config file.
    path: str | None = None
    # SQL: an SQLAlchemy URL, e.g. sqlite:///data.db or postgresql+psycopg://user@host/db.
    url: str | None = None
    table: str | None = None
    db_schema: str | None = None
    # "long": one row per (series, ts); "wide": one column per series (melted on read, like ETT).
    layout: Literal["long", "wide"] = "long"
    series_column: str = "series_id"
    time_column: str = "ts"
    value_column: str = "value"
    # Wide layout only: the columns that are series. Empty means every numeric column but the time.
    value_columns: tuple[str, ...] = ()
    # SQL: a column that grows with every write (a serial id, an insert time). Rows are read in time order
    # and, among rows sharing a time, in this column's order, so duplicates = "last" keeps the latest
    # written. A table has no order of its own: without it, which of them is "last" is the database's say.
    order_column: str | None = None
    # Zone given to naive timestamps; aware ones are converted to UTC as they are. Steps of whole days
    # fall on midnight in this zone (a model keeps the zone it was trained with).
    timezone: str = "UTC"
    # SQL: seconds a read waits for a lock another session holds (an ALTER, a TRUNCATE) before it fails
    # and the next tick tries again. PostgreSQL's own setting waits for ever, and SIGTERM with it; 5 s is
    # SQLite's driver's. 0 keeps the database's own.
    lock_timeout: float = 5.0


@dataclass(frozen=True)
class DataConfig:
    # Pandas offset alias ("5min", "1h", "1D", "MS"). None infers the most common step of each dataset.
    freq: str | None = None
    # Grid steps of missing data that are filled (flagged missing) rather than treated as an outage.
    # Two days at hourly data: longer than any routine maintenance window, short of a real outage.
    max_gap: int = 48
    # Steps run through a fresh state before its outputs are trusted and written. Four days of hourly
    # data gives the recurrent state and the running levels time to settle.
    warmup: int = 96
    # Rule for several rows with one (series_id, ts) after snapping to the grid.
    duplicates: Literal["last", "first", "mean"] = "last"


@dataclass(frozen=True)
class ModelConfig:
    # GRU is the default: as accurate as LSTM on these tasks with a smaller state. "rnn" is the plain
    # Elman cell, kept for comparison.
    cell: Literal["gru", "lstm", "rnn"] = "gru"
    # 64 keeps the carried state at 256 bytes a series and is the size the peers are measured at.
    hidden_size: int = 64
    num_layers: int = 1
    dropout: float = 0.0
    # Steps ahead forecast at every point.
    horizon: int = 24
    # Smoothing factors of the running levels carried in the state; the model sees the value relative
    # to each, so it knows where it sits without ever seeing the absolute level.
    # 0.005 (a ~200-step memory) carries the slow level that long horizons revert to; it was worth
    # 8% validation MSE on ETTh1 at H=96 over (0.5, 0.1, 0.02).
    level_alphas: tuple[float, ...] = (0.5, 0.1, 0.02, 0.005)
    # Scaled changes beyond this are clipped before the model sees them, so a spike moves the state
    # no more than a 6-sigma move would (see anomaly handling in README).
    input_clip: float = 6.0
    # Recent changes carried in the state and read by a linear head (models.py): the recent shape of
    # the series. "auto" = one week of steps, at least 24 and at most 336 (hourly: 168; 5-minute: 336,
    # a day and more), but no more than one step per 50 steps of the longest training series (none if
    # that is under 24: a short history would only fit noise); fixed when the model is trained.
    # 0 = none (the recurrent state alone). Costs 4 bytes a series per step of window.
    lookback: int | Literal["auto"] = "auto"
    distribution: Literal["gaussian"] = "gaussian"
    # Refused if true: a bidirectional encoder reads the future.
    bidirectional: bool = False


@dataclass(frozen=True)
class TrainingConfig:
    # Steps per truncated-BPTT chunk; the state is carried across chunks, gradients are not. Longer
    # than a daily cycle of hourly data, short enough for many optimiser steps per epoch.
    bptt: int = 32
    # Long series are cut into parallel segments of this many steps, as word_language_model batchifies.
    segment_length: int = 256
    # Segment rows per optimiser step.
    batch_size: int = 16
    epochs: int = 30
    # Small datasets repeat passes (with new row boundaries) until an epoch has this many optimiser
    # steps; without it a handful of short series would get a few dozen updates in all.
    min_epoch_steps: int = 100
    # Chosen on ETTh1's validation split with the lookback head and the weight average: 1e-3 and 3e-4
    # tie there (3e-3 overfits within the first epoch); 1e-3 learns a small dataset's cycle in fewer epochs.
    learning_rate: float = 1e-3
    # Further learning rates to try, each from the same start weights; the lowest validation loss wins
    # (one training per rate, so two rates double the training time). On ETTh1 no one rate wins
    # validation on every set, but each training choosing between 1e-3 and 5e-4 lowered the test MSE on
    # every set (S 336: 0.089 -> 0.071 over six seeds), and NAB's score rose a little (70.9 -> 71.3);
    # docs/benchmarks.md, session 12. [] trains once at learning_rate.
    learning_rates: tuple[float, ...] = (5e-4,)
    weight_decay: float = 0.0
    # Decay per optimiser step of the moving average of the weights that is validated and saved
    # (0 = the raw weights). 0.99 averages about the last 100 steps, one epoch of a small dataset.
    weight_average: float = 0.99
    # Gradient-norm clip; recurrent nets explode without it.
    clip: float = 1.0
    # Epochs without validation improvement before stopping; the best weights are kept.
    patience: int = 6
    # Tail of each series held out for validation and early stopping.
    validation_fraction: float = 0.15
    # Steps at the start of each segment whose loss is ignored: the state there starts cold.
    burn_in: int = 16
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Stop training after this many seconds even if epochs remain (0 = no limit); with several learning
    # rates each run gets an equal share.
    max_seconds: float = 0.0


@dataclass(frozen=True)
class AnomalyConfig:
    # Points whose final score reaches this are flagged. The score is a log-likelihood scale, as in
    # Numenta's recipe: 0.5 is a one-in-100,000 event given the recent history of the series.
    threshold: float = 0.5
    # Central coverage of the lower/upper band written with every forecast and anomaly row.
    coverage: float = 0.95
    # Steps in the short average of raw surprise; a single noisy point is not an alarm.
    short_window: int = 10
    # Steps in the long-run distribution of raw surprise the short average is compared with.
    long_window: int = 2000
    # Forecasts that judge each point: the one issued a step before, two steps before, ... The least
    # surprised one counts, so the calm point after a spike (forecast from the spike) is not flagged.
    # 1 since the cooldown reports an incident once: the wider two-step forecast also damps the first
    # point of every incident. NAB, 3 seeds: 1 judge 69.2 standard, 2 judges 63.0.
    forecasts: int = 1
    # The scoring pipeline's steps (anomaly.py), each switchable so its worth can be measured
    # (benchmarks/nab.py prints the ablation). Defaults are the best measured on NAB, not tuned per file.
    # Compare the short average of surprise with its long-run distribution (Numenta's likelihood):
    # a noisy series does not alarm all day. Worth 18 NAB points over the point's own rarity.
    likelihood: bool = True
    # Surprise fed to the likelihood is capped at this -log10 p (2 = one in 100; 0 = no cap). A bounded
    # raw score, like HTM's, keeps one wild point from dominating the long-run distribution and lets a
    # run of moderate surprises (a changed pattern) count. Worth 18 NAB points; caps of 1 / 1.5 / 2 /
    # 2.5 / 3 / 4 score 52.4 / 54.0 / 53.0 / 51.6 / 52.7 / 50.3 standard, 2 is best on low-FP (44.0).
    raw_cap: float = 2.0
    # Also require the point itself to be rare (the smaller of the two rarities). On: otherwise the
    # ~short_window calm points after every spike stay flagged while the recent average holds the spike
    # (on the sample data 43 flags instead of 13 for 8 injected anomalies). On NAB it is worth 0.3 points
    # standard and 5.9 low-FP.
    point_gate: bool = True
    # "soft" (1 - 2^(-x/5)) never saturates, so one threshold ranks rarer above less rare on every
    # series; "linear" (x/10, clipped at 1) ties everything rarer than 1e-10 at 1. Both put 0.5 at 1e-5.
    # Worth 5 NAB points on the old pipeline, none once the raw cap bounds what reaches the likelihood.
    scale: Literal["soft", "linear"] = "soft"
    # A value beyond the range seen so far, widened by this fraction of the range, scores 1 (HTM's
    # "spatial anomaly", same 5 %): new extremes matter to operators even when the forecaster, which
    # learns changes, finds them ordinary. Negative disables. Worth 2.4 NAB points (it was 26 before the
    # raw cap and the cooldown took over most of its work).
    novelty_tolerance: float = 0.05
    # One report per incident: within this many points of the highest score reported so far, a point
    # scores 0 unless it scores higher (the incident got worse); 0 reports every point. The flags of
    # one event (a run of new extremes, a changed pattern the likelihood holds for a while) come once
    # instead of as a flood. Worth 4.4 NAB points (8.8 low-FP). At raw_cap 3: 50 / 100 / 200 gain 4.6 /
    # 5.5 / 2.9, and 400 loses 4.2: a long cooldown swallows the next real incident when it scores no
    # higher than the last false alarm.
    cooldown: int = 100
    # Check the likelihood's Gaussian tail against how often the series has actually gone that far out
    # (anomaly.py): a bursty series' routine bursts are not one-in-a-billion events. Worth 14 NAB points
    # (49.0 to 63.0 standard, mean of 3 training seeds; 69.2 with one judge), and all 3 seeds gain.
    empirical_tail: bool = True
    # A second, slower likelihood (anomaly.py): the average of the last ~slow_window surprises, each
    # capped at slow_cap (-log10 p; 1 = one in 10), against its own long-run distribution; a point
    # scores the higher of the two channels. It sees a pattern that changes without a striking point
    # (a daily jump that does not come). 0 disables. NAB standard, 12 training seeds: 63.4 -> 66.7,
    # 10 seeds of 12 up (6 seeds trained after it was chosen: all up, 62.1 -> 66.4); slow_cap 2 (the
    # raw cap) or a window of 40 lose.
    slow_window: int = 100
    slow_cap: float = 1.0


@dataclass(frozen=True)
class SinkConfig:
    kind: Literal["parquet", "sql"] = "parquet"
    # Parquet: a directory; forecasts/ and anomalies/ datasets are written under it.
    path: str | None = None
    url: str | None = None
    db_schema: str | None = None
    forecasts_table: str = "forecasts"
    anomalies_table: str = "anomalies"
    # Parquet partition grain. "day" keeps files few; "hour" keeps each tick's rewrite small when many
    # series tick often.
    partition: Literal["day", "hour", "month"] = "day"
    # SQL: seconds a write waits for a lock another session holds (a long transaction on the output
    # rows, an ALTER) before it is rolled back and the next tick writes again. 0 keeps the database's own.
    lock_timeout: float = 5.0


@dataclass(frozen=True)
class StateConfig:
    # Model versions, hidden states, watermarks, the daemon lock. Relative to the config file.
    dir: str = "state"
    # Model versions kept on disk; older ones are deleted after a new one is saved.
    keep_versions: int = 5
    # Stream checkpoints kept, so a corrupt latest one falls back to the one before.
    keep_checkpoints: int = 3


@dataclass(frozen=True)
class ServeConfig:
    # Seconds between ticks.
    interval: float = 60.0
    # Cron expression (UTC) for retraining; empty disables scheduled retraining.
    retrain_cron: str = "0 3 * * *"
    # Steps of recent history a retrain learns from (0 = all).
    retrain_window: int = 0
    # A scheduled retrain trains only once the points the newest model version did not learn from
    # number at least this fraction of those it learnt from (1.0: each model learns from twice the
    # history of the one before); 0 retrains at every run of the cron. Retrains then come often while
    # history is short and rarer as it grows, and their total cost stays within a few times one
    # training on all the history, where a daily retrain on everything costs more every day. On NAB
    # (3 seeds), one each time the history doubled scored 69.2, each time it grew by half 54.6, every
    # 1,000 rows 56.4: every promotion restarts the stream's learnt likelihood, and a challenger
    # trained over an anomaly wins on a validation tail that holds it.
    retrain_growth: float = 1.0
    # A challenger must beat the live model's validation loss by this fraction to be promoted.
    promote_margin: float = 0.0
    always_promote: bool = False
    # Loopback by default: the metrics endpoint is not for the open network.
    http_host: str = "127.0.0.1"
    http_port: int = 9108
    # Seconds a late tick may still start; later ones are skipped and coalesced into the next.
    misfire_grace: float = 30.0
    # Ticks that fail in a row before /healthz turns unhealthy.
    unhealthy_after: int = 3
    # Failed ticks back off: the next attempt waits interval * 2**(failures-1) seconds, capped here, so
    # a database that is down is not hammered while it restarts, and is retried within 5 minutes.
    max_backoff: float = 300.0
    # A tick running longer than this is taken as hung: /healthz turns unhealthy and the systemd watchdog
    # pings stop, so systemd restarts the daemon. Ten minutes is far above any healthy tick; 0 disables.
    tick_timeout: float = 600.0
    # A retrain still running after this many seconds is killed and counted as failed, so one hung
    # training (a stalled database read, say) cannot block every later retrain; 0 disables.
    retrain_timeout: float = 14400.0
    # Where ticks and backfills run the model. The CPU by default, also on a GPU host: a tick's features,
    # scoring and output rows run on the CPU whatever runs the model, and on a lent H100 the whole
    # streaming step on CUDA was no faster than on 2 CPU cores (one series 1.3 ms a tick against 0.4;
    # 10,000 series 0.61 M series-steps/s on both). Training keeps [training] device.
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    # Seconds between listings of every series id in the source. A tick finds new series among the rows
    # past the watermarks it reads anyway; only a listing finds a series whose rows are all older than
    # the oldest watermark (one loaded with its history), and a listing reads every file's id column, or
    # a SQL table's series index (10,000 series in 2 M SQLite rows: 42 ms), or without one the whole table
    # (1.1 s, growing with the table). 0 lists on every tick.
    list_series_every: float = 3600.0


@dataclass(frozen=True)
class Config:
    source: SourceConfig = field(default_factory=SourceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)
    sink: SinkConfig = field(default_factory=SinkConfig)
    state: StateConfig = field(default_factory=StateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    # Directory relative paths resolve against (the config file's directory).
    base_dir: str = "."

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p


_SECTIONS = {f.name: f.type for f in fields(Config) if f.name != "base_dir"}


def _section_class(name: str) -> type:
    return {
        "source": SourceConfig,
        "data": DataConfig,
        "model": ModelConfig,
        "training": TrainingConfig,
        "anomaly": AnomalyConfig,
        "sink": SinkConfig,
        "state": StateConfig,
        "serve": ServeConfig,
    }[name]


def _coerce(section: str, key: str, value: Any, annotation: Any) -> Any:
    where = f"[{section}] {key}"
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{where} = {value!r} is not allowed; use one of {choices}")
        return value
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(section, key, value, inner[0])
        for a in inner:  # e.g. int | Literal["auto"]: the first that takes the value
            try:
                return _coerce(section, key, value, a)
            except ConfigError:
                pass
        raise ConfigError(f"{where} = {value!r} is not allowed; use {' or '.join(_describe(a) for a in inner)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} = {value!r} must be a list, e.g. {key} = [..]")
        return tuple(_coerce(section, key, v, args[0]) for v in value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} = {value!r} must be true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} = {value!r} must be a whole number")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} = {value!r} must be a number")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond a float's range
            number = math.inf
        # TOML spells inf and nan, and they got past the range checks (nan fails every comparison), then
        # failed at run time: an infinite [serve] interval made serve exit 1, restarted by systemd forever.
        if not math.isfinite(number):
            raise ConfigError(f"{where} = {value!r} must be a finite number; inf and nan are not allowed (where "
                              "the key allows it, 0 means off or no limit)")
        return number
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f'{where} = {value!r} must be a string in quotes, e.g. {key} = "..."')
        return value
    raise AssertionError(f"unhandled config type {annotation!r} for {where}")


def _describe(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return " or ".join(repr(a) for a in get_args(annotation))
    return {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}.get(annotation, "a list")


def _build_section(name: str, raw: Any) -> Any:
    cls = _section_class(name)
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}] must be a table of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"[{name}] has unknown key {unknown[0]!r}; known keys are: {', '.join(sorted(known))}"
        )
    values = {k: _coerce(name, k, v, hints[k]) for k, v in raw.items()}
    return cls(**values)


def config_from_dict(raw: dict[str, Any], base_dir: str | Path = ".") -> Config:
    """Build and validate a Config from a parsed TOML document."""
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(
            f"unknown section [{unknown[0]}]; sections are: {', '.join(sorted(_SECTIONS))}"
        )
    sections = {name: _build_section(name, raw.get(name, {})) for name in _SECTIONS}
    config = Config(**sections, base_dir=str(base_dir))
    _validate(config)
    return config


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Load a TOML config file; `overrides` maps "section.key" to a value (CLI flags win)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} not found; create one with `forecastd init`") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    for dotted, value in (overrides or {}).items():
        section, key = dotted.split(".", 1)
        raw.setdefault(section, {})[key] = value
    return config_from_dict(raw, base_dir=path.resolve().parent)


def with_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """Return a copy with "section.key" overrides applied and validated."""
    raw = config_to_dict(config)
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        raw.setdefault(section, {})[key] = value
    return config_from_dict(raw, base_dir=config.base_dir)


def config_to_dict(config: Config) -> dict[str, Any]:
    """Plain dict of every section (no base_dir), suitable for JSON manifests."""
    out = {}
    for name in _SECTIONS:
        section = dataclasses.asdict(getattr(config, name))
        out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in section.items()}
    return out


_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def cron_fields(expr: str) -> dict[str, str]:
    """A crontab expression as APScheduler 3 CronTrigger keyword arguments.

    Five fields (minute hour day month weekday) or six with seconds first. Weekday numbers follow
    crontab (0 or 7 = Sunday), not APScheduler 3 (0 = Monday, its documented historical mistake), so
    they are rewritten as names. Raises ValueError naming the problem.
    """
    parts = expr.split()
    names = ["minute", "hour", "day", "month", "day_of_week"]
    if len(parts) == 6:
        names = ["second", *names]
    elif len(parts) != 5:
        raise ValueError(f"{len(parts)} fields; expected 5 (minute hour day month weekday) or 6 (seconds first)")
    fields_ = dict(zip(names, parts))
    fields_["day_of_week"] = _crontab_weekdays(fields_["day_of_week"])
    return fields_


def _crontab_weekdays(field_: str) -> str:
    if not any(ch.isdigit() for ch in field_) or field_ == "*/1":
        return field_  # "*" and names mean the same in both conventions
    days: set[int] = set()
    for item in field_.split(","):
        rng, _, step = item.partition("/")
        rng = "0-6" if rng == "*" else rng
        if not rng.replace("-", "").isdigit():
            raise ValueError(f"weekday {item!r}: mix names and numbers in separate fields, e.g. mon-fri")
        lo, _, hi = rng.partition("-")
        first, last = int(lo), int(hi or (7 if step else lo))
        if not (0 <= first <= 7 and 0 <= last <= 7 and first <= last):
            raise ValueError(f"weekday {item!r} must be within 0-7 (0 and 7 are Sunday)")
        days.update(d % 7 for d in range(first, last + 1, int(step or 1)))
    return ",".join(_WEEKDAYS[d] for d in sorted(days))


_YEAR = 366 * 86400


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def mask_password(url: str) -> str:
    """`url` with the password of a user:password@ part starred: for text SQLAlchemy cannot parse (and so
    cannot render with the password hidden), which still ends up in messages and logs."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def _check_url(section: str, url: str) -> None:
    """At load, not at the first tick: a port that is not a number failed there as an unexpected ValueError."""
    import sqlalchemy as sa  # only for SQL configs, so `import forecastd` stays light

    try:
        parsed = sa.make_url(url)
    except (sa.exc.ArgumentError, ValueError) as exc:
        raise ConfigError(f"[{section}] url = {mask_password(url)!r} is not a valid SQLAlchemy URL ({exc}); use the form "
                          '"postgresql+psycopg://user@host:5432/db" or "sqlite:///file.db"') from None
    if parsed.get_backend_name() == "sqlite":
        # "sqlite://out.db" names a host, not a file: SQLAlchemy opens an in-memory database, which keeps
        # nothing (a sink's rows would vanish while watermarks moved past them) and holds no table.
        if parsed.host:
            raise ConfigError(f"[{section}] url = {url!r} names a host, not a file; a SQLite file takes three "
                              f'slashes: "sqlite:///{parsed.host}{"/" + parsed.database if parsed.database else ""}" '
                              "(four for an absolute path)")
        if not parsed.database or parsed.database == ":memory:" or "mode=memory" in url:
            raise ConfigError(f"[{section}] url = {url!r} is an in-memory SQLite database, which keeps nothing "
                              'between connections; name a file, e.g. "sqlite:///forecastd.db"')


def _validate(c: Config) -> None:
    s = c.source
    if s.kind == "parquet":
        _require(bool(s.path), '[source] kind = "parquet" needs path = "file.parquet", a directory or a glob')
    else:
        _require(bool(s.url), '[source] kind = "sql" needs url = "sqlite:///file.db" (an SQLAlchemy URL)')
        _require(bool(s.table), '[source] kind = "sql" needs table = "name of the table to read"')
        _check_url("source", s.url)
    _require(s.order_column is None or s.kind == "sql",
             "[source] order_column applies to sql sources only (Parquet rows keep the order they were "
             "written in); remove the key")
    _require(s.lock_timeout >= 0,
             f"[source] lock_timeout = {s.lock_timeout} must be 0 (the database's own) or a number of seconds")
    try:
        from zoneinfo import ZoneInfo

        ZoneInfo(s.timezone)
    except Exception:
        raise ConfigError(f'[source] timezone = {s.timezone!r} is not a known zone; use e.g. "UTC" or "Europe/Berlin"') from None

    d = c.data
    if d.freq is not None:
        from forecastd.frames import Grid  # pandas only when a freq is set

        try:
            Grid(d.freq)  # a weekly or month-end step parses, and would fail only at the first read
        except ValueError:
            raise ConfigError(f'[data] freq = {d.freq!r} is not a pandas frequency; use e.g. "5min", "1h", "1D"') from None
        except DataError as exc:
            raise ConfigError(f"[data] {exc}") from None
    _require(d.max_gap >= 1, f"[data] max_gap = {d.max_gap} must be at least 1 step")
    _require(d.warmup >= 1, f"[data] warmup = {d.warmup} must be at least 1 step")

    m = c.model
    _require(not m.bidirectional, "[model] bidirectional = true is refused: a bidirectional encoder reads "
             "the future, so its forecasts would leak; remove the key")
    _require(m.hidden_size >= 1, f"[model] hidden_size = {m.hidden_size} must be at least 1")
    _require(m.num_layers >= 1, f"[model] num_layers = {m.num_layers} must be at least 1")
    _require(0.0 <= m.dropout < 1.0, f"[model] dropout = {m.dropout} must be in [0, 1)")
    _require(m.horizon >= 1, f"[model] horizon = {m.horizon} must be at least 1")
    _require(len(m.level_alphas) >= 1 and all(0 < a <= 1 for a in m.level_alphas),
             f"[model] level_alphas = {list(m.level_alphas)} must be a non-empty list of numbers in (0, 1]")
    _require(m.input_clip > 0, f"[model] input_clip = {m.input_clip} must be positive")
    _require(m.lookback == "auto" or m.lookback >= 0,
             f'[model] lookback = {m.lookback} must be "auto", 0 (none) or a number of steps')

    t = c.training
    _require(t.bptt >= 1, f"[training] bptt = {t.bptt} must be at least 1")
    _require(t.segment_length >= t.bptt,
             f"[training] segment_length = {t.segment_length} must be at least bptt = {t.bptt}")
    _require(t.burn_in < t.segment_length,
             f"[training] burn_in = {t.burn_in} must be below segment_length = {t.segment_length}")
    _require(t.batch_size >= 1, f"[training] batch_size = {t.batch_size} must be at least 1")
    _require(t.epochs >= 1, f"[training] epochs = {t.epochs} must be at least 1")
    _require(t.min_epoch_steps >= 0, f"[training] min_epoch_steps = {t.min_epoch_steps} must be 0 or more")
    _require(t.learning_rate > 0, f"[training] learning_rate = {t.learning_rate} must be positive")
    _require(all(lr > 0 for lr in t.learning_rates),
             f"[training] learning_rates = {list(t.learning_rates)} must hold positive numbers only")
    _require(0 <= t.weight_average < 1, f"[training] weight_average = {t.weight_average} must be in [0, 1)")
    _require(t.clip > 0, f"[training] clip = {t.clip} must be positive")
    _require(0.0 <= t.validation_fraction < 0.9,
             f"[training] validation_fraction = {t.validation_fraction} must be in [0, 0.9)")
    _require(t.patience >= 1, f"[training] patience = {t.patience} must be at least 1")

    a = c.anomaly
    _require(0.0 < a.threshold <= 1.0, f"[anomaly] threshold = {a.threshold} must be in (0, 1]")
    _require(0.0 < a.coverage < 1.0, f"[anomaly] coverage = {a.coverage} must be in (0, 1), e.g. 0.95")
    _require(1 <= a.forecasts <= 8, f"[anomaly] forecasts = {a.forecasts} must be in 1..8")
    _require(a.short_window >= 1, f"[anomaly] short_window = {a.short_window} must be at least 1")
    _require(a.long_window > a.short_window,
             f"[anomaly] long_window = {a.long_window} must be larger than short_window = {a.short_window}")
    _require(a.cooldown >= 0, f"[anomaly] cooldown = {a.cooldown} must be 0 (report every point) or a number of points, e.g. 100")
    _require(a.raw_cap >= 0, f"[anomaly] raw_cap = {a.raw_cap} must be 0 (no cap) or a positive -log10 p, e.g. 3.0")
    _require(a.slow_window == 0 or a.short_window < a.slow_window < a.long_window,
             f"[anomaly] slow_window = {a.slow_window} must be 0 (off) or between short_window = {a.short_window} "
             f"and long_window = {a.long_window}, e.g. 100")
    _require(a.slow_cap > 0, f"[anomaly] slow_cap = {a.slow_cap} must be a positive -log10 p, e.g. 1.0")
    _require(a.novelty_tolerance < 0 or a.novelty_tolerance <= 10,
             f"[anomaly] novelty_tolerance = {a.novelty_tolerance} must be a fraction of the range such as 0.05, "
             "or negative to disable")

    k = c.sink
    if k.kind == "parquet":
        _require(bool(k.path), '[sink] kind = "parquet" needs path = "a directory for the output datasets"')
    else:
        _require(bool(k.url), '[sink] kind = "sql" needs url = "sqlite:///out.db" (an SQLAlchemy URL)')
        _check_url("sink", k.url)
    _require(k.forecasts_table != k.anomalies_table,
             "[sink] forecasts_table and anomalies_table must differ")
    _require(k.lock_timeout >= 0,
             f"[sink] lock_timeout = {k.lock_timeout} must be 0 (the database's own) or a number of seconds")

    st = c.state
    _require(st.keep_versions >= 1, f"[state] keep_versions = {st.keep_versions} must be at least 1")
    _require(st.keep_checkpoints >= 2,
             f"[state] keep_checkpoints = {st.keep_checkpoints} must be at least 2 so a corrupt one can fall back")

    v = c.serve
    # The cap keeps the scheduler's timedelta in range (1e14 s overflowed it: serve exited 1 at start).
    _require(0 < v.interval <= _YEAR, f"[serve] interval = {v.interval} must be positive seconds, at most a year "
             f"({_YEAR})")
    _require(0 <= v.http_port < 65536, f"[serve] http_port = {v.http_port} must be a port number (0 disables)")
    _require(v.misfire_grace >= 0, f"[serve] misfire_grace = {v.misfire_grace} must be 0 or more seconds")
    _require(v.unhealthy_after >= 1, f"[serve] unhealthy_after = {v.unhealthy_after} must be at least 1 tick")
    _require(v.max_backoff >= 0, f"[serve] max_backoff = {v.max_backoff} must be 0 or more seconds")
    _require(v.tick_timeout >= 0, f"[serve] tick_timeout = {v.tick_timeout} must be 0 (off) or more seconds")
    _require(v.retrain_timeout >= 0, f"[serve] retrain_timeout = {v.retrain_timeout} must be 0 (off) or more seconds")
    _require(v.retrain_growth >= 0, f"[serve] retrain_growth = {v.retrain_growth} must be 0 (retrain at every run of "
             "retrain_cron) or a fraction of the last training's points, e.g. 1.0")
    _require(v.retrain_window >= 0, f"[serve] retrain_window = {v.retrain_window} must be 0 (all) or more steps")
    _require(v.list_series_every >= 0,
             f"[serve] list_series_every = {v.list_series_every} must be 0 (every tick) or more seconds")
    _require(v.promote_margin >= 0, f"[serve] promote_margin = {v.promote_margin} must be 0 or more, e.g. 0.02 for 2 %")
    if v.retrain_cron.strip():
        try:
            from apscheduler.triggers.cron import CronTrigger

            CronTrigger(**cron_fields(v.retrain_cron), timezone="UTC")
        except ValueError as exc:
            raise ConfigError(f"[serve] retrain_cron = {v.retrain_cron!r} is not a valid cron expression ({exc}); "
                              'use e.g. "0 3 * * *" for 03:00 UTC daily') from None


EXAMPLE_TOML = '''\
# forecastd configuration. Relative paths resolve against this file's directory.
# Every key is optional unless marked; the values shown are the defaults.

[source]
kind = "parquet"                 # "parquet" or "sql"
path = "data/*.parquet"          # parquet: a file, a directory dataset or a glob (required for parquet)
# url = "sqlite:///data.db"      # sql: an SQLAlchemy URL (required for sql); PostgreSQL:
#                                #   "postgresql+psycopg://user@host:5432/db"
# table = "readings"             # sql: the table to read (required for sql)
# db_schema = "public"           # sql: the table's schema (default: the connection's search path)
layout = "long"                  # "long": series_id, ts, value rows; "wide": one column per series
series_column = "series_id"      # long layout: the column naming the series
time_column = "ts"
value_column = "value"           # long layout: the value column
# value_columns = ["OT", "HUFL"] # wide layout: the series columns (default: every numeric column)
# order_column = "id"            # sql: a column growing with each write; of rows sharing a time, the
#                                #   latest written is "last" (without it the database's order decides)
timezone = "UTC"                 # zone for naive timestamps
lock_timeout = 5.0               # sql: seconds a read waits for another session's lock (0 = the database's own)

[data]
# freq = "1h"                    # grid step; default: the data's most common step (irregular
                                 # timestamps: the round step nearest the median, with a warning)
max_gap = 48                     # longer gaps (in steps) restart a series from a warm-up
warmup = 96                      # steps run before a fresh state's outputs are written
duplicates = "last"              # "last", "first" or "mean" for repeated timestamps

[model]
cell = "gru"                     # "gru", "lstm" or "rnn"
hidden_size = 64
num_layers = 1
dropout = 0.0
horizon = 24                     # steps ahead forecast at every point
level_alphas = [0.5, 0.1, 0.02, 0.005]  # smoothing of the running levels the model sees the value against
input_clip = 6.0                 # scaled changes beyond this are clipped before the model sees them
lookback = "auto"                # recent steps carried for the model to read: a week (24..336), at most 1 per 50 of history, none below a day (0 = none)
distribution = "gaussian"        # the forecast distribution (mean and scale)
bidirectional = false            # true is refused: a bidirectional encoder reads the future

[training]
bptt = 32                        # truncated-BPTT chunk length
segment_length = 256             # long series are cut into parallel segments this long
batch_size = 16
epochs = 30
min_epoch_steps = 100            # small datasets repeat passes until an epoch has this many optimiser steps
learning_rate = 0.001
learning_rates = [0.0005]        # further rates tried from the same start; lowest validation loss wins ([] = one training)
weight_decay = 0.0
weight_average = 0.99            # moving average of the weights that is validated and saved (0 = off)
clip = 1.0                       # gradient-norm clip
patience = 6                     # early stopping on the validation tail
validation_fraction = 0.15
burn_in = 16                     # steps at each segment's start whose loss is ignored (the state starts cold)
seed = 0                         # start weights and shuffling: same seed and data, same model on a CPU
device = "auto"                  # "auto" (CUDA when present), "cpu" or "cuda"
max_seconds = 0.0                # stop at the first epoch end past this many seconds (0 = no limit)

[anomaly]
threshold = 0.5                  # score in [0, 1] at or above which a point is flagged
coverage = 0.95                  # central coverage of the lower/upper bands
short_window = 10                # points in the short average of surprise
long_window = 2000               # points in the long-run distribution it is compared with
forecasts = 1                    # forecasts that judge each point (1..8): issued 1, 2, ... steps before
likelihood = true                # compare the short average with its long-run distribution (Numenta's recipe)
raw_cap = 2.0                    # cap (-log10 p) on the surprise fed to the likelihood (0 = no cap)
point_gate = true                # the point itself must be rare too
scale = "soft"                   # "soft" or "linear" map from rarity to score
novelty_tolerance = 0.05         # values beyond the range seen, widened by this fraction of it, score 1 (negative = off)
cooldown = 100                   # points after a report in which only a higher score is reported again
empirical_tail = true            # no point rarer than the series' own history of such excursions
slow_window = 100                # a second, slower likelihood: a pattern that changes with no striking point (0 = off)
slow_cap = 1.0                   # cap (-log10 p) on the surprise fed to the slow likelihood

[sink]
kind = "parquet"                 # "parquet" or "sql"
path = "out"                     # parquet: output directory (required for parquet)
# url = "sqlite:///out.db"       # sql: an SQLAlchemy URL (required for sql)
# db_schema = "forecasting"      # sql: the tables' schema (default: the connection's search path)
forecasts_table = "forecasts"
anomalies_table = "anomalies"
partition = "day"                # parquet: "day", "hour" or "month" directories
lock_timeout = 5.0               # sql: seconds a write waits for another session's lock (0 = the database's own)

[state]
dir = "state"                    # model versions, hidden states, watermarks
keep_versions = 5                # model versions kept on disk
keep_checkpoints = 3             # stream checkpoints kept, so a corrupt one falls back (at least 2)

[serve]
interval = 60.0                  # seconds between ticks
retrain_cron = "0 3 * * *"       # UTC cron for retraining; "" disables
retrain_window = 0               # steps of recent history a retrain learns from (0 = all)
retrain_growth = 1.0             # train once the new points reach this fraction of the last training's; 0 = every run
promote_margin = 0.0             # a challenger must beat the live model's validation loss by this fraction
always_promote = false           # promote every successful retrain regardless of its loss
http_host = "127.0.0.1"
http_port = 9108                 # /metrics and /healthz; 0 disables
misfire_grace = 30.0             # seconds a late tick may still start
unhealthy_after = 3              # failed ticks in a row before /healthz answers 503
max_backoff = 300.0              # cap (seconds) on the wait before retrying after failed ticks
tick_timeout = 600.0             # a tick running longer is hung: /healthz 503, watchdog pings stop (0 = off)
retrain_timeout = 14400.0        # a retrain running longer is killed and counted as failed (0 = off)
device = "cpu"                   # where ticks and backfills run the model ("cpu", "cuda" or "auto"); training uses [training] device
list_series_every = 3600.0       # seconds between listings of every series id (new series with old rows)
'''


def example_config() -> Config:
    return config_from_dict(tomllib.loads(EXAMPLE_TOML))


# Keep `replace` importable from here for callers that tweak one field of a section.
__all__ += ["replace", "example_config", "cron_fields"]
