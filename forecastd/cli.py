"""The `forecastd` command line: thin Typer commands over the library.

Each command parses its flags, loads the config, calls one library function and prints a summary. Only
this module (and the daemon) reads the clock or prints; library code raises `forecastd.errors.*` and
`ForecastdGroup.invoke` turns those into one line on stderr and the error's exit code.

Adding a command (serve, status, models, ...) is one function:

    @app.command(epilog="Example: forecastd status --config forecastd.toml")
    def status(config: ConfigOption = DEFAULT_CONFIG) -> None:
        \"\"\"Show the live model and each series' watermark.\"\"\"
        cfg = load(config)
        ...

It gets the global options, the error handling and the exit codes for free.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperGroup

from forecastd import __version__
from forecastd.config import EXAMPLE_TOML, Config, load_config
from forecastd.errors import ConfigError, ForecastdError
from forecastd.runtime import single_thread_blas, tune_malloc

__all__ = ["app", "main", "ConfigOption", "DEFAULT_CONFIG", "NowOption", "load", "parse_time", "now_or", "out",
           "epoch_progress", "configure_logging", "JsonFormatter"]

_DEBUG_KEY = "forecastd.debug"

try:  # typer >= 0.2x vendors click; before that, typer re-exported click's own exceptions
    from typer import TyperException as _UsageErrors
except ImportError:  # pragma: no cover - older typer
    from click import ClickException as _UsageErrors  # type: ignore[assignment]


# -- errors and exit codes ------------------------------------------------------------------------

class ForecastdGroup(TyperGroup):
    """Turns errors raised by any command into one line on stderr and the error's exit code.

    `--debug` lets the exception through with its full traceback instead. Click's own exits (usage
    errors, --help, typer.Exit) pass untouched.
    """

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (_UsageErrors, typer.Exit, typer.Abort):
            raise
        except ForecastdError as exc:
            if ctx.meta.get(_DEBUG_KEY):
                raise
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            if ctx.meta.get(_DEBUG_KEY):
                raise
            _fail("interrupted", 130)
        except Exception as exc:  # a bug, or a library failing in a way we did not foresee
            if ctx.meta.get(_DEBUG_KEY):
                raise
            _fail(f"unexpected {type(exc).__name__}: {_one_line(str(exc))}; run with --debug for the traceback", 1)


def _one_line(message: str) -> str:
    return " ".join(message.split()) or "(no message)"


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {_one_line(message)}", err=True)
    raise typer.Exit(code)


app = typer.Typer(
    name="forecastd",
    cls=ForecastdGroup,
    help="Streaming time-series forecasting: recurrent forecasters with a carried hidden state per series.",
    epilog="Example: forecastd demo   (trains on the bundled sample data and writes a plot)",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


# -- logging --------------------------------------------------------------------------------------

class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ISO-8601), level, logger, message (+ exc when present)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at emit time (test runners swap it between invocations)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property wins
        pass


def configure_logging(level: str, fmt: str) -> None:
    """Install one stderr handler on the root logger, replacing the one a previous call installed."""
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_forecastd", False)]:
        root.removeHandler(h)
    handler = _StderrHandler()
    handler._forecastd = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())


class LogLevel(str, Enum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


class LogFormat(str, Enum):
    text = "text"
    json = "json"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"forecastd {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback of an error.")] = False,
    log_level: Annotated[LogLevel, typer.Option(
        "--log-level", help="Log level on stderr.", case_sensitive=False,
    )] = LogLevel.warning,
    log_format: Annotated[LogFormat, typer.Option(
        "--log-format", help="text, or json: one JSON object per line (ts, level, logger, message).",
    )] = LogFormat.text,
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.",
    )] = False,
) -> None:
    """forecastd: train a recurrent forecaster on your series, then tick, backfill and plot."""
    ctx.meta[_DEBUG_KEY] = debug
    configure_logging(log_level.value, log_format.value)
    tune_malloc()
    single_thread_blas()


# -- shared options and helpers -------------------------------------------------------------------

ConfigOption = Annotated[Path, typer.Option(
    "--config", "-c", envvar="FORECASTD_CONFIG", help="The TOML config file (see `forecastd init`).",
    dir_okay=False,
)]
DEFAULT_CONFIG = Path("forecastd.toml")


def out() -> Console:
    """The stdout console; created per call so it follows a swapped sys.stdout."""
    return Console(highlight=False)


def load(path: Path, overrides: dict[str, Any] | None = None) -> Config:
    return load_config(path, {k: v for k, v in (overrides or {}).items() if v is not None})


def parse_time(text: str, flag: str) -> dt.datetime:
    """ISO-8601 to an aware UTC datetime; a naive time means UTC."""
    try:
        t = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(f"{flag} {text!r} is not an ISO-8601 time; use e.g. 2024-03-01T00:00 "
                          "or 2024-03-01T00:00+01:00 (naive times are UTC)") from None
    t = t.replace(tzinfo=dt.timezone.utc) if t.tzinfo is None else t.astimezone(dt.timezone.utc)
    # What nanosecond timestamps hold, as every stored time: past it every command failed unexpectedly.
    if not _FIRST <= t <= _LAST:
        raise ConfigError(f"{flag} {text!r} is outside the times forecastd can hold, {_FIRST:%Y-%m-%d} to "
                          f"{_LAST:%Y-%m-%d}; give a time in that range")
    return t


_FIRST = dt.datetime(1677, 9, 22, tzinfo=dt.timezone.utc)
_LAST = dt.datetime(2262, 4, 11, tzinfo=dt.timezone.utc)


def now_or(text: str | None) -> dt.datetime:
    """--now when given, else the clock: the one place the CLI reads it."""
    return parse_time(text, "--now") if text else dt.datetime.now(dt.timezone.utc)


NowOption = Annotated[str | None, typer.Option(
    "--now", help="Treat this ISO-8601 time as now (naive = UTC); default: the clock.", show_default=False,
)]


def _fmt_ts(t: Any) -> str:
    import pandas as pd

    t = pd.Timestamp(t)
    t = t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")
    return t.strftime("%Y-%m-%d %H:%M UTC")


def _fmt_seconds(seconds: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}s" for k, v in seconds.items()) or "-"


def _fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{escape(k)}: {v}" for k, v in sorted(counts.items())) or "none"


def _print_report(title: str, report: Any) -> None:
    table = Table(title=title, show_header=False, title_justify="left", box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("model version", f"v{report.model_version}")
    table.add_row("series", str(report.series))
    table.add_row("rows read", str(report.rows_read))
    table.add_row("points processed", str(report.points))
    table.add_row("forecast rows written", str(report.forecasts_written))
    table.add_row("anomaly rows written", str(report.anomalies_written))
    table.add_row("flagged anomalies", str(report.anomalies_flagged))
    table.add_row("repairs", _fmt_counts(report.repairs))
    table.add_row("stage timings", _fmt_seconds(report.seconds))
    out().print(table)


EpochCallback = Callable[[int, int, float, float], None]  # epoch, epochs, train loss, val loss


@contextlib.contextmanager
def epoch_progress(console: Console, total: int, label: str = "training") -> Iterator[EpochCallback]:
    """A rich progress bar fed by training's progress callback (epoch, epochs, train loss, val loss).

    Not on a terminal (a pipe, a log file, CI) it prints one plain line per epoch instead. If training
    fails before its first epoch, the bar is removed, so the error line stands alone.
    """
    if not console.is_terminal:
        def line(epoch: int, epochs: int, train_loss: float, val_loss: float) -> None:
            console.print(f"{label}: epoch {epoch}/{epochs}  train loss {train_loss:.4f}  val loss {val_loss:.4f}")

        yield line
        return
    progress = Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("epochs"),
        TextColumn("{task.fields[losses]}"), TimeElapsedColumn(), console=console,
    )
    task = progress.add_task(label, total=total, losses="")
    epochs_done = 0

    def report(epoch: int, epochs: int, train_loss: float, val_loss: float) -> None:
        nonlocal epochs_done
        epochs_done = epoch
        progress.update(task, completed=epoch, total=epochs,
                        losses=f"train loss {train_loss:.4f}  val loss {val_loss:.4f}")

    with progress:
        try:
            yield report
        except BaseException:
            if not epochs_done:
                progress.remove_task(task)
            raise


# -- commands -------------------------------------------------------------------------------------

@app.command(epilog="Example: forecastd init forecastd.toml   (then edit \\[source] and run `forecastd train`)")
def init(
    path: Annotated[Path, typer.Argument(help="Where to write the example config.", dir_okay=False)] = DEFAULT_CONFIG,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write an example config file with every key and its default."""
    from forecastd.files import atomic_write_bytes

    if path.exists() and not force:
        raise ConfigError(f"{str(path)!r} already exists; pass --force to overwrite it or choose another path")
    if not path.parent.exists():
        raise ConfigError(f"directory {str(path.parent)!r} does not exist; create it first")
    try:
        atomic_write_bytes(path, EXAMPLE_TOML.encode())
    except OSError as exc:
        raise ConfigError(f"cannot write {str(path)!r} ({exc.strerror or exc}); give a path in a directory you can "
                          "write to") from None
    out().print(f"wrote {escape(str(path))}; point {escape('[source]')} at your data, then run "
                f"`forecastd train --config {escape(str(path))}`")


@app.command(epilog="Example: forecastd train --config forecastd.toml --epochs 10 --device cpu")
def train(
    config: ConfigOption = DEFAULT_CONFIG,
    epochs: Annotated[int | None, typer.Option(
        "--epochs", min=1, help="Override the config's training.epochs.")] = None,
    device: Annotated[Device | None, typer.Option("--device", help="Override the config's training.device.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Override the config's training.seed.")] = None,
    now: NowOption = None,
) -> None:
    """Train a model on everything the source holds and make it the live version."""
    from forecastd.pipeline import train as train_model

    when = now_or(now)
    cfg = load(config, {"training.epochs": epochs, "training.device": device.value if device else None,
                        "training.seed": seed})
    started = time.monotonic()
    with epoch_progress(out(), cfg.training.epochs) as report:
        summary = train_model(cfg, when, progress=report)
    seconds = time.monotonic() - started
    m = summary.metrics
    val, base = m.get("val_mse", math.nan), m.get("val_persistence_mse", math.nan)
    gain = ""
    if base and math.isfinite(val) and math.isfinite(base):
        change = 100 * (val / base - 1)
        gain = f" ({abs(change):.1f} % {'below' if change < 0 else 'above'} persistence)"
    table = Table(title=f"trained model v{summary.version} (live)", show_header=False, title_justify="left",
                  box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("series", str(summary.series))
    table.add_row("points", str(summary.points))
    table.add_row("frequency", summary.freq)
    table.add_row("epochs", f"{m.get('epochs_run', len(summary.history))} run, best {m.get('best_epoch', '-')}")
    if "learning_rate" in m:
        tried = m.get("learning_rate_losses") or {}
        others = ", ".join(f"{lr}: {'-' if loss is None else f'{loss:.4f}'}" for lr, loss in tried.items())
        table.add_row("learning rate", f"{m['learning_rate']:g}" + (f" (val loss {others})" if others else ""))
    table.add_row("val MSE", f"{val:.4f}{gain}")
    table.add_row("persistence MSE", f"{base:.4f}")
    table.add_row("device", str(m.get("device", "-")))
    table.add_row("repairs", _fmt_counts(summary.repairs))
    table.add_row("seconds", f"{seconds:.1f}")
    out().print(table)


@app.command("run-once", epilog="Example: forecastd run-once --config forecastd.toml --now 2024-04-01T00:00")
def run_once(config: ConfigOption = DEFAULT_CONFIG, now: NowOption = None) -> None:
    """Run one tick: forecast and score the points that arrived since the last tick."""
    from forecastd.daemon import StateLock
    from forecastd.pipeline import run_once as tick
    from forecastd.pipeline import state_store

    when = now_or(now)  # flags first: a bad --now is reported before the config is read
    cfg = load(config)
    # Under the daemon's lock: a tick beside a running daemon (or an overlapping cron run) would
    # interleave their checkpoints, and one's watermarks would overwrite the other's.
    with StateLock(state_store(cfg).root):
        report = tick(cfg, when)
    _print_report("tick", report)


@app.command(epilog="Example: forecastd backfill --config forecastd.toml --start 2024-01-10 --end 2024-03-31T23:00")
def backfill(
    config: ConfigOption = DEFAULT_CONFIG,
    start: Annotated[str, typer.Option("--start", help="First point to write (ISO-8601, naive = UTC).")] = ...,
    end: Annotated[str, typer.Option("--end", help="Last point to write, inclusive (ISO-8601, naive = UTC).")] = ...,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Compute and report, write nothing.")] = False,
) -> None:
    """Forecasts and anomaly rows for every point in a time range, with the live model.

    The same computation as ticking through the range; the streaming state is left alone.
    """
    from forecastd.pipeline import backfill as run_backfill

    t0, t1 = parse_time(start, "--start"), parse_time(end, "--end")
    report = run_backfill(load(config), t0, t1, write=not dry_run)
    _print_report(f"backfill {_fmt_ts(t0)} .. {_fmt_ts(t1)}" + (" (dry run, nothing written)" if dry_run else ""),
                  report)


@app.command(epilog="Example: forecastd plot --config forecastd.toml --series sensor-temp-1 --out temp.png")
def plot(
    config: ConfigOption = DEFAULT_CONFIG,
    series: Annotated[str, typer.Option("--series", help="The series to draw.")] = ...,
    out_path: Annotated[Path | None, typer.Option(
        "--out", help="PNG to write; default SERIES.png in the current directory.", dir_okay=False,
    )] = None,
    last: Annotated[int, typer.Option("--last", min=1, help="Points of history to draw.")] = 500,
) -> None:
    """Draw one series: history, one-step band, flagged points and the latest forecast, as a PNG."""
    from forecastd.demo import plot_stored

    if out_path is not None and out_path.suffix.lower() != ".png":
        raise ConfigError(f"--out {str(out_path)!r}: the plot is a PNG; give a path ending in .png")
    cfg = load(config)
    written = plot_stored(cfg, series, out_path or Path(f"{_safe_name(series)}.png"), last=last)
    out().print(f"wrote {escape(str(written))}")


def _safe_name(series_id: str) -> str:
    # No leading dot: "../x" would be the hidden file ".._x".
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in series_id).lstrip(".") or "series"


@app.command(epilog="Example: forecastd demo --dir ./forecastd-demo --epochs 8")
def demo(
    directory: Annotated[Path, typer.Option("--dir", help="Working directory for the demo's config, "
                                             "state and outputs.", file_okay=False)] = Path("forecastd-demo"),
    epochs: Annotated[int | None, typer.Option(
        "--epochs", min=1, help="Training epochs (default: a quick run).")] = None,
) -> None:
    """Train, backfill and plot on the bundled sample data: the first-run experience."""
    from forecastd.demo import DEMO_EPOCHS, run_demo

    n_epochs = epochs or DEMO_EPOCHS
    console = out()
    console.print(f"forecastd {__version__} demo in {escape(str(directory))}: training up to {n_epochs} epochs at "
                  "each learning rate on the bundled sample data, then a backfill over its history")
    with epoch_progress(console, n_epochs) as report:
        result = run_demo(directory, dt.datetime.now(dt.timezone.utc), epochs=n_epochs, progress=report)
    _print_demo(console, result)


def _print_demo(console: Console, r: Any) -> None:
    console.print(f"\n[bold]data[/bold]: {r.series} series, {r.points} points "
                  f"({_fmt_ts(r.start)} .. {_fmt_ts(r.end)}), config {escape(str(r.config_path))}")
    first, last = r.loss_curve[0], r.loss_curve[-1]
    # The curve is the kept run's: with several learning rates the bar counted every run's epochs.
    kept = "" if len(r.learning_rate_losses) < 2 else (
        f" (the run at learning rate {r.learning_rate:g} of {', '.join(r.learning_rate_losses)}, its validation "
        "loss the lowest)")
    console.print(f"[bold]training[/bold]: model v{r.version}, {len(r.loss_curve)} epochs{kept} in {r.train_seconds:.1f} s; "
                  f"train loss {first['train_loss']:.4f} -> {last['train_loss']:.4f}, "
                  f"val loss {first['val_loss']:.4f} -> {last['val_loss']:.4f}; kept epoch {r.best_epoch} "
                  f"(val loss {r.loss_curve[r.best_epoch - 1]['val_loss']:.4f})")
    console.print(f"[bold]backfill[/bold]: {_fmt_ts(r.backfill_start)} .. {_fmt_ts(r.backfill_end)}: "
                  f"{r.forecast_rows} forecast rows, {r.anomaly_rows} anomaly rows in {r.backfill_seconds:.1f} s")

    table = Table(title="forecast MAE on the backfill (lower is better)", title_justify="left")
    for col in ("rows", "step", "forecastd", "persistence", "seasonal", "vs best", "points"):
        table.add_column(col, justify="left" if col == "rows" else "right")
    for e in r.errors:
        best = min(e.persistence, e.seasonal)
        table.add_row(e.scope, str(e.step), f"{e.model:.4f}", f"{e.persistence:.4f}", f"{e.seasonal:.4f}",
                      f"{100 * (e.model / best - 1):+.1f}%" if best > 0 else "-", str(e.n))
    console.print(table)
    console.print("  persistence: the last observed value; seasonal: the value 24 h before the target (at step 24\n"
                  "  that is the last observed value too); held-out: forecasts issued in the last "
                  f"{r.validation_fraction:.0%} of each series,\n  which training never fit")
    console.print(f"[bold]anomalies[/bold]: {r.flagged} flagged of {r.anomaly_rows} points scored"
                  + (f"; injected anomalies caught: {r.injected_caught} of {r.injected_total} (within 1 h); "
                     f"flags elsewhere: {r.flags_elsewhere}" if r.injected_total else ""))
    if r.top_anomalies:
        top = Table(title="strongest anomalies (runs of consecutive flags)", title_justify="left")
        for col in ("series", "peak at", "points", "value", "expected", "score"):
            top.add_column(col, justify="left" if col in ("series", "peak at") else "right")
        for a in r.top_anomalies:
            top.add_row(escape(a["series_id"]), _fmt_ts(a["ts"]), str(a["points"]), f"{a['value']:.3f}",
                        f"{a['expected']:.3f}", f"{a['score']:.3f}")
        console.print(top)
    console.print(f"[bold]plot[/bold]: {escape(str(r.plot_path))}")
    console.print(f"next: forecastd plot --config {escape(str(r.config_path))} --series price-1 --out price-1.png")


from forecastd.cli_serve import register as _register_serve; _register_serve(app)  # noqa: E402,E702 (serve, status, models)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="forecastd")


if __name__ == "__main__":
    main()
