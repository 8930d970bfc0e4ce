"""The daemon's commands: `serve`, `status` and `models list | promote V | rollback`.

Registered on the main app by `forecastd.cli` (`register(app)`), so they share its global options
(--debug, --log-level, --log-format), its error handling and its exit codes.
"""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

__all__ = ["register"]

# The same options as forecastd.cli's (tests/test_status.py checks they stay equal), declared here because
# cli imports this module to register it: importing cli from here at import time would be circular.
# The helpers (load, now_or, out) are imported from cli inside the commands, when it is complete.
ConfigOption = Annotated[Path, typer.Option(
    "--config", "-c", envvar="FORECASTD_CONFIG", help="The TOML config file (see `forecastd init`).",
    dir_okay=False,
)]
DEFAULT_CONFIG = Path("forecastd.toml")
NowOption = Annotated[str | None, typer.Option(
    "--now", help="Treat this ISO-8601 time as now (naive = UTC); default: the clock.", show_default=False,
)]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of tables.")]


# Help texts are rich markup: a bare "[serve]" is read as a style tag and vanishes, "\[serve]" prints.
def serve(ctx: typer.Context, config: ConfigOption = DEFAULT_CONFIG) -> None:
    r"""Run the daemon in the foreground: tick every \[serve] interval, retrain on \[serve] retrain_cron.

    Stops cleanly on SIGTERM or Ctrl-C after the running tick. Under systemd use deploy/forecastd.service.
    """
    # Until the daemon installs its own handler, after seconds of imports, SIGHUP's default would end it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from forecastd.cli import load
    from forecastd.daemon import serve as run_daemon

    cfg = load(config)
    # Typer vendors its own click, so the source is compared by name, not with click's enum.
    source = ctx.find_root().get_parameter_source("log_level")
    if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
        logging.getLogger().setLevel(logging.INFO)  # a daemon's log is its one line per tick and retrain
    raise typer.Exit(run_daemon(cfg))


def status(config: ConfigOption = DEFAULT_CONFIG, as_json: JsonOption = False, now: NowOption = None) -> None:
    """Show the daemon, the model versions, each series' watermark and lag, and the last day's anomalies."""
    from forecastd.cli import load, now_or, out
    from forecastd.status import status as get_status

    report = get_status(load(config), now_or(now))
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
        return
    console = out()
    for problem in report["problems"]:
        console.print(f"[bold red]problem[/bold red]: {escape(problem)}")
    d = report["daemon"]
    if d["running"]:
        console.print(f"[bold]daemon[/bold]: running, pid {d['pid']}" + (f" on {escape(d['host'])}" if d.get("host") else "")
                      + (f", since {_ts(d.get('started_at'))}" if d.get("started_at") else ""))
    else:
        stopped = f" (last stopped {_ts(d['stopped_at'])})" if d.get("stopped_at") else ""
        console.print(f"[bold]daemon[/bold]: not running{stopped}")
    tick = d.get("last_tick")
    if tick:
        line = f"[bold]last tick[/bold]: {_ts(tick['at'])}, {tick.get('outcome')}, {tick.get('duration_seconds', 0):.3f} s"
        if tick.get("outcome") == "ok":
            line += (f"; {tick.get('points', 0)} points, {tick.get('forecasts_written', 0)} forecast rows, "
                     f"{tick.get('anomalies_flagged', 0)} flagged")
        else:
            line += f": {escape(str(tick.get('error')))}"
        console.print(line)
        if d.get("consecutive_failures"):
            console.print(f"[bold red]{d['consecutive_failures']} tick(s) failed in a row[/bold red]; last success "
                          f"{_ts(d.get('last_success_at'))}")
    retrain = d.get("last_retrain")
    if retrain:
        console.print(f"[bold]last retrain[/bold]: {_ts(retrain['at'])}, {retrain['outcome']}: {escape(retrain['reason'])}")
    console.print(_models_table(report["models"]))
    console.print(_series_table(report["series"]))
    a = report["anomalies"]
    if "error" in a:
        console.print(f"[bold]anomalies[/bold]: cannot read the sink: {escape(a['error'])}")
    else:
        by = ", ".join(f"{escape(k)}: {n}" for k, n in sorted(a["by_series"].items())) or "none"
        console.print(f"[bold]anomalies[/bold] {_ts(a['since'])} .. {_ts(a['until'])}: {a['flagged']} flagged of "
                      f"{a['scored']} points scored ({by})")
        if a["top"]:
            top = Table(title="top anomalies", title_justify="left")
            for col in ("series", "ts", "value", "expected", "score"):
                top.add_column(col, justify="left" if col in ("series", "ts") else "right")
            for r in a["top"]:
                top.add_row(escape(r["series_id"]), _ts(r["ts"]), _num(r["value"]), _num(r["expected"]),
                            f"{r['score']:.3f}")
            console.print(top)


models_app = typer.Typer(help="List model versions, promote one, or roll back to the previous one.",
                         no_args_is_help=True)


@models_app.command("list", epilog="Example: forecastd models list --config forecastd.toml")
def models_list(config: ConfigOption = DEFAULT_CONFIG, as_json: JsonOption = False) -> None:
    """Every model version on disk, which one is live, and its validation metrics."""
    from forecastd.cli import load, out
    from forecastd.pipeline import state_store
    from forecastd.status import model_versions

    store = state_store(load(config))
    rows = model_versions(store, store.live_version())
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    out().print(_models_table(rows))


@models_app.command("promote", epilog="Example: forecastd models promote 7 --config forecastd.toml")
def models_promote(
    version: Annotated[int, typer.Argument(help="The version to make live (see `forecastd models list`).")],
    config: ConfigOption = DEFAULT_CONFIG,
) -> None:
    """Make a version live. A running daemon picks it up at its next tick, after a warm-up."""
    from forecastd.cli import load, now_or
    from forecastd.pipeline import state_store
    from forecastd.retrain import switch_live

    store = state_store(load(config))
    previous = switch_live(store, version, reason="promoted by hand", now=now_or(None))
    _switched(version, previous)


@models_app.command("rollback", epilog="Example: forecastd models rollback --config forecastd.toml")
def models_rollback(config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Make the newest version older than the live one that has served before live again."""
    from forecastd.cli import load, now_or
    from forecastd.pipeline import state_store
    from forecastd.retrain import rollback_target, switch_live

    store = state_store(load(config))
    target = rollback_target(store)
    previous = switch_live(store, target, reason="rollback by hand", now=now_or(None))
    _switched(target, previous)


def _switched(version: int, previous: int | None) -> None:
    from forecastd.cli import out

    if previous == version:
        out().print(f"model v{version} is already live")
    else:
        out().print(f"model v{version} is live (was {f'v{previous}' if previous else 'none'}); a running daemon "
                    "switches at its next tick, warming the new model up over each series' recent history")


def _models_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="model versions (times UTC)", title_justify="left")
    for col in ("version", "trained", "data until", "series", "val loss", "val MSE", "persist. MSE"):
        table.add_column(col, justify="left" if col in ("version", "trained", "data until") else "right")
    for r in rows:
        name = f"v{r['version']}" + (" [bold green]live[/bold green]" if r["live"] else "")
        if "error" in r:
            table.add_row(name, escape(r["error"]), "", "", "", "", "")
            continue
        table.add_row(name, _ts(r["trained_at"], short=True), _ts(r["data_end"], short=True),
                      str(r.get("series") or "-"), _num(r.get("val_loss")), _num(r.get("val_mse")),
                      _num(r.get("val_persistence_mse")))
    return table


def _series_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="series (times UTC)", title_justify="left")
    for col in ("series", "watermark", "lag", "lag steps", "model"):
        table.add_column(col, justify="left" if col in ("series", "watermark") else "right")
    for r in rows:
        table.add_row(escape(r["series_id"]), _ts(r["watermark"], short=True), _duration(r["lag_seconds"]),
                      "-" if r["lag_steps"] is None else f"{r['lag_steps']:.0f}",
                      "handover" if r["model_version"] is None else f"v{r['model_version']}")
    return table


def _ts(text: str | None, *, short: bool = False) -> str:
    if not text:
        return "-"
    import pandas as pd

    t = pd.Timestamp(text)
    t = t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")
    return t.strftime("%Y-%m-%d %H:%M" if short else "%Y-%m-%d %H:%M:%S UTC")


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    sign, s = ("-" if seconds < 0 else ""), abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{sign}{s / size:.1f} {unit}"
    return f"{sign}{s:.0f} s"


def register(app: typer.Typer) -> None:
    """Add serve, status and the models sub-app to the main `forecastd` app."""
    app.command(epilog="Example: forecastd serve --config /etc/forecastd/forecastd.toml")(serve)
    app.command(epilog="Example: forecastd status --config forecastd.toml --json")(status)
    app.add_typer(models_app, name="models")
