"""The CLI end to end, on Parquet and on SQLite: init -> edit -> train -> run-once -> backfill -> plot.

One trained state per backend is shared by every test (module-scoped fixture), so the whole file stays
well under a minute on two cores. The pipeline runs in the fixture and records each command's result;
the tests only look at what it left behind. Most commands go through typer's CliRunner; a few run as
real processes (`python -m forecastd ...`) to cover the entry point, exit codes and stderr as a user
sees them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

import forecastd
from forecastd.cli import JsonFormatter, app
from forecastd.config import load_config
from forecastd.errors import ConfigError, LockError, ModelError, SourceError
from forecastd.frames import ANOMALY_COLUMNS, ANOMALY_KEY, FORECAST_COLUMNS, FORECAST_KEY
from forecastd.sinks import open_sink

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_data"
NOW = "2024-04-01T00:00"  # a fixed clock: the sample data ends 2024-03-31 23:00 UTC
FIRST = pd.Timestamp("2024-02-20 00:00", tz="UTC")  # training data: a month of the sample, to keep it quick
CUTOFF = pd.Timestamp("2024-03-24 23:00", tz="UTC")  # training and the first tick see data up to here
NEW = pd.Timestamp("2024-03-26 23:00", tz="UTC")  # the second tick brings the 48 hours after the cutoff
HOURS_NEW = 48
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

runner = CliRunner()


def cli(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def run_module(*args: Any, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m forecastd ...` in a real process, importable from this checkout even if not installed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("FORECASTD_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "forecastd", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def set_keys(text: str, section: str, **values: Any) -> str:
    """Set keys of one [section] of a TOML text: replace `key = ...` or `# key = ...`, else append."""
    lines = text.splitlines()
    start = lines.index(f"[{section}]") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("[")), len(lines))
    for key, value in values.items():
        line = f"{key} = {json.dumps(value)}"
        hit = next((i for i in range(start, end) if re.match(rf"#?\s*{key}\s*=", lines[i])), None)
        if hit is None:
            lines.insert(end, line)
            end += 1
        else:
            lines[hit] = line
    return "\n".join(lines) + "\n"


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one error line, got: {stderr!r}"
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in stderr
    return lines[0]


def written(output: str, what: str) -> int:
    match = re.search(rf"^{what}\s+(\d+)\s*$", output, re.MULTILINE)
    assert match, f"no {what!r} line in:\n{output}"
    return int(match.group(1))


def sample_frame() -> pd.DataFrame:
    return pd.read_parquet(SAMPLE / "series.parquet")


# -- the shared pipeline run ------------------------------------------------------------------------

@dataclass
class Run:
    backend: str
    dir: Path
    config: Path
    results: dict[str, Any] = field(default_factory=dict)
    tick3: subprocess.CompletedProcess | None = None
    after_tick2: dict[str, pd.DataFrame] = field(default_factory=dict)
    after_tick3: dict[str, pd.DataFrame] = field(default_factory=dict)
    after_backfill: dict[str, pd.DataFrame] = field(default_factory=dict)

    def outputs(self) -> dict[str, pd.DataFrame]:
        sink = open_sink(load_config(self.config))
        return {t: sink.read(t) for t in ("forecasts", "anomalies")}

    def stored(self, table: str) -> pd.DataFrame:
        """The table as it sits in storage, read without forecastd (what a user's own tools see)."""
        if self.backend == "parquet":
            return pd.read_parquet(self.dir / "out" / table)
        with sqlite3.connect(self.dir / "out.sqlite") as conn:
            return pd.read_sql_query(f"SELECT * FROM {table}", conn)  # fixed table names


def _parquet_data(run: Run) -> None:
    frame = sample_frame()
    (run.dir / "data").mkdir()
    frame[(frame["ts"] >= FIRST) & (frame["ts"] <= CUTOFF)].to_parquet(run.dir / "data" / "part-1.parquet")


def _parquet_append(run: Run) -> None:
    frame = sample_frame()
    frame[(frame["ts"] > CUTOFF) & (frame["ts"] <= NEW)].to_parquet(run.dir / "data" / "part-2.parquet")


def _text(t: pd.Timestamp) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S")


def _sqlite_data(run: Run) -> None:
    db = run.dir / "series.sqlite"
    shutil.copy(SAMPLE / "series.sqlite", db)
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM readings WHERE ts < ? OR ts > ?", (_text(FIRST), _text(CUTOFF)))


def _sqlite_append(run: Run) -> None:
    with sqlite3.connect(run.dir / "series.sqlite") as conn:
        conn.execute("ATTACH DATABASE ? AS sample", (str(SAMPLE / "series.sqlite"),))
        conn.execute("INSERT INTO readings SELECT * FROM sample.readings WHERE ts > ? AND ts <= ?",
                     (_text(CUTOFF), _text(NEW)))


@pytest.fixture(scope="module", params=["parquet", "sqlite"])
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Run:
    backend = request.param
    d = tmp_path_factory.mktemp(backend)
    r = Run(backend, d, d / "forecastd.toml")
    r.results["init"] = cli("init", r.config)
    text = set_keys(r.config.read_text(), "model", hidden_size=16)
    text = set_keys(text, "data", freq="1h")
    if backend == "parquet":
        _parquet_data(r)  # the example config already reads data/*.parquet
    else:
        _sqlite_data(r)
        text = set_keys(text, "source", kind="sql", url="sqlite:///series.sqlite", table="readings")
        text = set_keys(text, "sink", kind="sql", url="sqlite:///out.sqlite")
    r.config.write_text(text)

    # The file keeps epochs = 30: --epochs 2 must win (CLI flags override the config).
    r.results["train"] = cli("train", "--config", r.config, "--epochs", 2, "--seed", 1, "--device", "cpu",
                             "--now", NOW)
    r.results["tick1"] = cli("run-once", "--config", r.config, "--now", NOW)
    (_parquet_append if backend == "parquet" else _sqlite_append)(r)
    r.results["tick2"] = cli("run-once", "--config", r.config, "--now", NOW)
    r.after_tick2 = r.outputs()
    # No new data: a real process this time, logging JSON lines.
    r.tick3 = run_module("--log-format", "json", "--log-level", "info", "run-once", "--config", r.config,
                         "--now", NOW)
    r.after_tick3 = r.outputs()
    r.results["backfill"] = cli("backfill", "--config", r.config, "--start", "2024-03-20", "--end",
                                "2024-03-26T23:00:00+00:00")
    r.after_backfill = r.outputs()
    return r


def test_every_command_succeeds(run: Run) -> None:
    for name, result in run.results.items():
        assert result.exit_code == 0, f"{name}: {result.output}\n{result.exception!r}"
    assert run.tick3 is not None and run.tick3.returncode == 0, run.tick3.stderr


def test_train_reports_flag_overrides_and_baseline(run: Run) -> None:
    out = run.results["train"].stdout
    assert "trained model v1" in out
    assert re.search(r"epochs\s+2 run", out), out  # --epochs 2 beat the file's 30
    # One progress line per epoch off a terminal, counted over both learning rates' runs (2 x 2 epochs).
    assert "epoch 4/4" in out and "val loss" in out
    assert re.search(r"^learning rate\s+0\.00\d+ \(val loss 0\.001: \d\.\d{4}, 0\.0005: \d\.\d{4}\)", out, re.MULTILINE), out
    assert "persistence MSE" in out and "val MSE" in out
    assert re.search(r"^series\s+6\s*$", out, re.MULTILINE)


def test_first_tick_warms_up_and_writes_the_latest_point(run: Run) -> None:
    out = run.results["tick1"].stdout
    assert written(out, "anomaly rows written") == 6  # one per series: the latest point
    assert written(out, "forecast rows written") == 6 * 24


def test_second_tick_writes_every_new_point_without_gap(run: Run) -> None:
    out = run.results["tick2"].stdout
    assert written(out, "anomaly rows written") == 6 * HOURS_NEW
    assert written(out, "forecast rows written") == 6 * HOURS_NEW * 24
    anomalies = run.after_tick2["anomalies"]
    expected = pd.date_range(CUTOFF, NEW, freq="h")
    for sid, rows in anomalies.groupby("series_id"):
        assert list(rows["ts"]) == list(expected), sid


def test_a_tick_without_new_data_writes_nothing(run: Run) -> None:
    assert run.tick3 is not None
    assert written(run.tick3.stdout, "anomaly rows written") == 0
    assert written(run.tick3.stdout, "forecast rows written") == 0
    for table in ("forecasts", "anomalies"):
        pd.testing.assert_frame_equal(run.after_tick2[table], run.after_tick3[table])


def test_json_log_lines(run: Run) -> None:
    assert run.tick3 is not None
    lines = [ln for ln in run.tick3.stderr.splitlines() if ln.strip()]
    assert lines, "--log-level info should log the tick"
    for line in lines:
        entry = json.loads(line)
        assert {"ts", "level", "logger", "message"} <= set(entry)
    assert any(json.loads(ln)["logger"] == "forecastd.pipeline" for ln in lines)


def test_backfill_writes_the_range(run: Run) -> None:
    out = run.results["backfill"].stdout
    hours = 7 * 24
    # One row per observed point: sensor-temp-1's NaN at 2024-03-22 19:00 is missing, not observed.
    assert written(out, "anomaly rows written") == 6 * hours - 1
    assert written(out, "forecast rows written") == (6 * hours - 1) * 24
    anomalies = run.after_backfill["anomalies"]
    in_range = anomalies[(anomalies["ts"] >= "2024-03-20") & (anomalies["ts"] <= "2024-03-26 23:00")]
    assert len(in_range) == 6 * hours - 1


@pytest.mark.parametrize("table,columns,key", [
    ("forecasts", FORECAST_COLUMNS, FORECAST_KEY),
    ("anomalies", ANOMALY_COLUMNS, ANOMALY_KEY),
])
def test_outputs_have_the_documented_columns_and_unique_keys(run: Run, table: str, columns: dict,
                                                             key: tuple) -> None:
    frame = run.after_backfill[table]
    assert list(frame.columns) == list(columns)
    assert not frame.duplicated(list(key)).any()
    stored = run.stored(table)  # the raw storage, not forecastd's reader
    assert set(columns) <= set(stored.columns)
    assert not stored.duplicated(list(key)).any()
    assert len(stored) == len(frame)
    if table == "forecasts":
        assert frame["step"].between(1, 24).all()
        assert (frame["target_ts"] - frame["issued_at"] == pd.to_timedelta(frame["step"], unit="h")).all()
        assert (frame["lower"] <= frame["mean"]).all() and (frame["mean"] <= frame["upper"]).all()
    else:
        assert frame["score"].between(0, 1).all()
    assert (frame["model_version"] == 1).all()


def test_plot_writes_a_png(run: Run, tmp_path: Path) -> None:
    png = tmp_path / "temp.png"
    result = cli("plot", "--config", run.config, "--series", "sensor-temp-1", "--out", png, "--last", 200)
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_plot_names_the_series_present(run: Run, tmp_path: Path) -> None:
    result = cli("plot", "--config", run.config, "--series", "sensor-temp-9", "--out", tmp_path / "x.png")
    assert result.exit_code == 5
    line = one_error_line(result.stderr)
    assert "'sensor-temp-9'" in line and "'sensor-temp-1'" in line


# -- errors -------------------------------------------------------------------------------------------

def test_missing_config_is_one_line_exit_2(tmp_path: Path) -> None:
    result = cli("train", "--config", tmp_path / "nope.toml")
    assert result.exit_code == ConfigError.exit_code == 2
    line = one_error_line(result.stderr)
    assert "nope.toml" in line and "forecastd init" in line


def test_missing_config_in_a_real_process(tmp_path: Path) -> None:
    proc = run_module("run-once", "--config", tmp_path / "nope.toml")
    assert proc.returncode == 2
    assert "not found" in one_error_line(proc.stderr)
    assert proc.stdout == ""


def test_unknown_config_key_is_named(tmp_path: Path) -> None:
    config = tmp_path / "forecastd.toml"
    assert cli("init", config).exit_code == 0
    config.write_text(set_keys(config.read_text(), "model", colour="blue"))
    result = cli("train", "--config", config)
    assert result.exit_code == 2
    line = one_error_line(result.stderr)
    assert "'colour'" in line and "[model]" in line


def test_train_before_data_exists(tmp_path: Path) -> None:
    config = tmp_path / "forecastd.toml"
    assert cli("init", config).exit_code == 0
    result = cli("train", "--config", config, "--now", NOW)
    assert result.exit_code == SourceError.exit_code
    line = one_error_line(result.stderr)
    assert "data/*.parquet" in line and "matches no files" in line
    assert "training" not in result.stdout  # no empty progress bar left behind


def test_run_once_before_train_names_the_fix(tmp_path: Path) -> None:
    config = tmp_path / "forecastd.toml"
    assert cli("init", config).exit_code == 0
    (tmp_path / "data").mkdir()
    shutil.copy(SAMPLE / "series.parquet", tmp_path / "data")
    for args in (["run-once", "--now", NOW], ["backfill", "--start", "2024-03-01", "--end", "2024-03-02"]):
        result = cli(*args, "--config", config)
        assert result.exit_code == ModelError.exit_code, result.output
        assert "forecastd train" in one_error_line(result.stderr)


def test_run_once_beside_a_daemon_is_refused(tmp_path: Path) -> None:
    """A tick beside a running daemon would interleave their checkpoints: refused, naming the holder."""
    from forecastd.daemon import StateLock

    config = tmp_path / "forecastd.toml"
    assert cli("init", config).exit_code == 0
    with StateLock(tmp_path / "state"):  # what `forecastd serve` holds, from this process
        proc = run_module("run-once", "--config", config, "--now", NOW)
    assert proc.returncode == LockError.exit_code, proc.stderr
    assert f"in use by forecastd pid {os.getpid()}" in one_error_line(proc.stderr)


def test_bad_time_is_one_line(tmp_path: Path) -> None:
    result = cli("run-once", "--config", tmp_path / "x.toml", "--now", "yesterday")
    assert result.exit_code == 2
    assert "ISO-8601" in one_error_line(result.stderr)


def test_an_unwritable_output_path_is_a_config_error_not_a_crash(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("a file, not a directory")
    result = cli("init", plain / "forecastd.toml")
    assert result.exit_code == 2 and "cannot write" in one_error_line(result.stderr)
    result = cli("plot", "--config", tmp_path / "x.toml", "--series", "a", "--out", tmp_path / "a.svg")
    assert result.exit_code == 2 and "the plot is a PNG" in one_error_line(result.stderr)


@pytest.mark.parametrize("flag, value", [("--now", "9999-12-31"), ("--now", "1600-01-01T00:00")])
def test_a_time_nanoseconds_cannot_hold_is_a_config_error_not_a_crash(tmp_path: Path, flag: str, value: str) -> None:
    result = cli("run-once", "--config", tmp_path / "x.toml", flag, value)
    assert result.exit_code == 2
    assert "outside the times forecastd can hold, 1677-09-22 to 2262-04-11" in one_error_line(result.stderr)


def test_debug_lets_the_traceback_through(tmp_path: Path) -> None:
    result = cli("--debug", "run-once", "--config", tmp_path / "nope.toml")
    assert isinstance(result.exception, ConfigError)
    assert "error:" not in result.stderr


def test_unexpected_errors_point_at_debug(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import forecastd.pipeline

    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("boom\nsecond line")

    config = tmp_path / "forecastd.toml"
    assert cli("init", config).exit_code == 0
    monkeypatch.setattr(forecastd.pipeline, "run_once", boom)
    result = cli("run-once", "--config", config)
    assert result.exit_code == 1
    line = one_error_line(result.stderr)
    assert "RuntimeError: boom second line" in line and "--debug" in line


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    config = tmp_path / "forecastd.toml"
    assert cli("init", config).exit_code == 0
    config.write_text("# mine\n")
    result = cli("init", config)
    assert result.exit_code == 2 and "--force" in one_error_line(result.stderr)
    assert config.read_text() == "# mine\n"
    assert cli("init", config, "--force").exit_code == 0
    assert load_config(config).model.horizon == 24


def _example_keys() -> dict[str, dict[str, bool]]:
    """Each section's keys in the file `forecastd init` writes: key -> whether it is set (not commented out)."""
    from forecastd.config import EXAMPLE_TOML

    keys: dict[str, dict[str, bool]] = {}
    section = None
    for line in EXAMPLE_TOML.splitlines():
        if match := re.fullmatch(r"\[(\w+)\]", line.strip()):
            section = match.group(1)
        elif section and (match := re.match(r"(#\s*)?(\w+)\s*=", line)):
            keys.setdefault(section, {})[match.group(2)] = match.group(1) is None
    return keys


def test_init_writes_every_key_with_its_default(tmp_path: Path) -> None:
    """Every key the config accepts, with its default (a commented-out example where it has none), so the
    file cannot fall behind the dataclasses again."""
    import dataclasses

    from forecastd.config import Config, config_to_dict

    config = tmp_path / "forecastd.toml"
    assert cli("init", config).exit_code == 0
    loaded = config_to_dict(load_config(config))
    defaults = config_to_dict(Config())
    keys = _example_keys()
    assert set(keys) == set(defaults)
    for section, values in defaults.items():
        for key, default in values.items():
            assert key in keys[section], f"`forecastd init` does not write [{section}] {key}"
            if not keys[section][key]:
                assert default in (None, []), f"[{section}] {key} is commented out but has a default, {default!r}"
            elif (section, key) not in {("source", "path"), ("sink", "path")}:  # required, shown with an example
                assert loaded[section][key] == default, f"[{section}] {key} is written as {loaded[section][key]!r}"
    for section, written in keys.items():
        field_names = {f.name for f in dataclasses.fields(getattr(Config(), section))}
        assert set(written) <= field_names, f"[{section}] lists keys the config refuses: {set(written) - field_names}"


def test_readme_shows_the_file_init_writes() -> None:
    from forecastd.config import EXAMPLE_TOML

    blocks = re.findall(r"```toml\n(.*?)```", README, re.DOTALL)
    assert EXAMPLE_TOML in blocks, "README's config block differs from what `forecastd init` writes"


@pytest.mark.parametrize("key, value", [("serve.interval", "inf"), ("serve.tick_timeout", "nan"),
                                        ("anomaly.threshold", "-inf"), ("model.level_alphas", "[0.5, nan]"),
                                        ("serve.max_backoff", "1" + "0" * 400)])
def test_non_finite_numbers_are_config_errors(tmp_path: Path, key: str, value: str) -> None:
    """TOML's inf and nan passed validation, then serve exited 1 with an OverflowError, restarted forever."""
    section, name = key.split(".")
    config = tmp_path / "forecastd.toml"
    assert cli("init", config).exit_code == 0
    text = re.sub(rf"(?m)^{name} = .*$", f"{name} = {value}", config.read_text(), count=1)
    config.write_text(text)
    result = cli("serve", "--config", config)
    assert result.exit_code == ConfigError.exit_code == 2, result.output
    line = one_error_line(result.stderr)
    assert f"[{section}] {name}" in line and "must be a finite number" in line


def test_a_huge_interval_is_a_config_error() -> None:
    from forecastd.config import config_from_dict

    with pytest.raises(ConfigError, match=r"\[serve\] interval = 1e\+20 must be .* at most a year"):
        config_from_dict({"sink": {"path": "out"}, "source": {"path": "x"}, "serve": {"interval": 1e20}})


@pytest.mark.parametrize("section, url, shown", [
    ("source", "postgresql+psycopg://u@127.0.0.1:5432:99/test", "postgresql+psycopg://u@127.0.0.1:5432:99/test"),
    ("sink", "postgresql+psycopg://u:secret@db:port/test", "postgresql+psycopg://u:***@db:port/test"),
    ("source", "not a url", "not a url"),
])
def test_an_unparseable_url_is_a_config_error(tmp_path: Path, section: str, url: str, shown: str) -> None:
    """Not an unexpected ValueError (exit 1) at the first tick, hours into a deployment."""
    config = tmp_path / "forecastd.toml"
    assert cli("init", config).exit_code == 0
    text = set_keys(config.read_text(), section, kind="sql", url=url, **({"table": "readings"} if section == "source" else {}))
    config.write_text(text)
    proc = run_module("serve", "--config", config)
    assert proc.returncode == ConfigError.exit_code, proc.stderr
    line = one_error_line(proc.stderr)
    assert f"[{section}] url = {shown!r} is not a valid SQLAlchemy URL" in line and "postgresql+psycopg://user@host" in line
    assert "secret" not in line


@pytest.mark.parametrize("url, says", [
    ("sqlite://", "in-memory SQLite database"),
    ("sqlite:///:memory:", "in-memory SQLite database"),
    ("sqlite://out.db", 'names a host, not a file; a SQLite file takes three slashes: "sqlite:///out.db"'),
])
def test_a_sqlite_url_that_keeps_no_file_is_a_config_error(url: str, says: str) -> None:
    """An in-memory sink kept nothing while the watermarks moved past its rows; "sqlite://out.db" (two
    slashes) is one, and failed only at the first write, as a sink outage the daemon retried for ever."""
    from forecastd.config import config_from_dict

    for section in ("source", "sink"):
        other = "sink" if section == "source" else "source"
        with pytest.raises(ConfigError, match=re.escape(f"[{section}] url = {url!r}") + ".*" + re.escape(says)):
            config_from_dict({section: {"kind": "sql", "url": url, **({"table": "t"} if section == "source" else {})},
                              other: {"path": "x"}})


def _commands(group: Any = None, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every leaf command, sub-apps included (`models list`), so commands added later meet the rule too."""
    group = group or typer.main.get_command(app)
    found = []
    for name, command in sorted(group.commands.items()):
        subcommands = getattr(command, "commands", None)
        found += _commands(command, (*prefix, name)) if subcommands else [(*prefix, name)]
    return found


@pytest.mark.parametrize("command", _commands(), ids=" ".join)
def test_help_has_an_example(command: tuple[str, ...]) -> None:
    result = cli(*command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.stdout


def _help_texts(command: Any) -> list[str]:
    """What `--help` of a command shows: its help, epilog and options, and the first line of its commands'."""
    texts = [command.help, command.epilog, command.short_help]
    texts += [getattr(p, "help", None) for p in command.params]
    texts += [(sub.short_help or sub.help or "").strip().splitlines()[0] for sub in getattr(command, "commands", {}).values()]
    return [t for t in texts if t]


@pytest.mark.parametrize("command", [(), ("models",), *_commands()], ids=lambda c: " ".join(c) or "forecastd")
def test_help_shows_config_sections_in_brackets(command: tuple[str, ...]) -> None:
    """Help is rich markup, where a bare "[serve]" is a style tag and vanishes ("tick every  interval")."""
    group = typer.main.get_command(app)
    target = group
    for name in command:
        target = target.commands[name]
    sections = {m for text in _help_texts(target) for m in re.findall(r"\[(\w+)\]", text)}
    result = cli(*command, "--help")
    assert result.exit_code == 0
    for section in sections:
        assert f"[{section}]" in result.stdout, f"[{section}] vanished from `forecastd {' '.join(command)} --help`"


def test_serve_help_names_its_config_keys() -> None:
    assert "tick every [serve] interval" in " ".join(cli("serve", "--help").stdout.split())
    assert "then edit [source]" in " ".join(cli("init", "--help").stdout.split())


def test_top_level_help_and_version() -> None:
    result = cli("--help")
    assert result.exit_code == 0 and "Example" in result.stdout
    for command in ("init", "train", "run-once", "backfill", "plot", "demo"):
        assert command in result.stdout
    result = cli("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"forecastd {forecastd.__version__}"


def test_version_matches_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert forecastd.__version__ == project["version"]


def test_public_surface() -> None:
    for name in forecastd.__all__:
        assert getattr(forecastd, name) is not None, name
    assert forecastd.train is forecastd.pipeline.train
    assert issubclass(forecastd.ConfigError, forecastd.ForecastdError)


def test_json_formatter() -> None:
    record = logging.LogRecord("forecastd.x", logging.WARNING, __file__, 1, "a %s", ("b",), None)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["level"] == "warning" and entry["logger"] == "forecastd.x" and entry["message"] == "a b"
    assert entry["ts"].endswith("+00:00")


# -- sample configs and the demo ----------------------------------------------------------------------

def test_sample_configs_load() -> None:
    parquet = load_config(SAMPLE / "forecastd.toml")
    sqlite = load_config(SAMPLE / "forecastd-sqlite.toml")
    assert parquet.source.kind == "parquet" and sqlite.source.kind == "sql"
    assert parquet.model == sqlite.model and parquet.training == sqlite.training and parquet.data == sqlite.data


@pytest.fixture
def small_sample(tmp_path: Path) -> Path:
    """A sample_data/ stand-in: three series over three weeks (two injected spikes), a small model."""
    d = tmp_path / "sample"
    d.mkdir()
    frame = sample_frame()
    keep = frame["series_id"].isin(["sensor-temp-1", "sensor-load-1", "sine"])
    keep &= (frame["ts"] >= "2024-01-25") & (frame["ts"] < "2024-02-15")
    frame[keep].to_parquet(d / "series.parquet")
    text = set_keys((SAMPLE / "forecastd.toml").read_text(), "model", hidden_size=16)
    (d / "forecastd.toml").write_text(text)
    shutil.copy(SAMPLE / "anomalies.json", d)
    return d


def test_demo(small_sample: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import forecastd.demo

    monkeypatch.setattr(forecastd.demo, "sample_data_dir", lambda: small_sample)
    target = tmp_path / "demo"
    result = cli("demo", "--dir", target, "--epochs", 1)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "3 series" in out and "forecast MAE" in out and "persistence" in out and "seasonal" in out
    assert "strongest anomalies" in out and "sensor-load-1" in out  # the 02-08 spike
    png = target / "sensor-temp-1.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and str(png) in out.replace("\n", "")
    config = load_config(target / "forecastd.toml")
    assert Path(config.source.path).is_absolute() and Path(config.source.path).is_file()
    assert (target / "out" / "anomalies").is_dir()

    # The demo never overwrites a config that is not its own.
    other = tmp_path / "mine"
    other.mkdir()
    (other / "forecastd.toml").write_text("# my config\n")
    result = cli("demo", "--dir", other, "--epochs", 1)
    assert result.exit_code == 2 and "not a demo config" in one_error_line(result.stderr)


def test_demo_without_sample_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import forecastd.demo

    monkeypatch.setattr(forecastd.demo, "__file__", str(tmp_path / "pkg" / "forecastd" / "demo.py"))
    result = cli("demo", "--dir", tmp_path / "demo")
    assert result.exit_code == SourceError.exit_code
    assert "sample data not found" in one_error_line(result.stderr)


@pytest.mark.slow
def test_demo_on_the_bundled_sample_data(tmp_path: Path) -> None:
    """The real first-run experience (about a minute): the model must beat persistence one step ahead."""
    proc = run_module("demo", "--dir", tmp_path / "demo", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cells = r"\W+".join([r"all", r"1", *[r"([\d.]+)"] * 3])  # the row "all | 1 | model | persistence | seasonal"
    match = re.search(cells, proc.stdout)
    assert match, proc.stdout
    model, persistence, seasonal = map(float, match.groups())
    assert model < persistence and model < seasonal
    assert (tmp_path / "demo" / "sensor-temp-1.png").is_file()


# -- the README ---------------------------------------------------------------------------------------

README = (ROOT / "README.md").read_text()


def test_readme_config_blocks_are_valid() -> None:
    from forecastd.config import config_from_dict

    blocks = re.findall(r"```toml\n(.*?)```", README, re.DOTALL)
    assert blocks
    for block in blocks:
        config_from_dict(tomllib.loads(block))  # raises ConfigError naming any stale key


def test_readme_quickstart_matches_ci() -> None:
    commands = re.findall(r"```\n(.*?)\n```", README.split("## Quickstart")[1].split("\n## ")[0], re.DOTALL)
    assert len(commands) == 2, "the quickstart is exactly two commands"
    setup, test = commands
    assert "pip install torch==2.13.0" in setup and "pip install -e '.[test]'" in setup
    assert setup.endswith("forecastd demo")
    test_command = test.split("&&")[-1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(rf"^{re.escape(test_command)}$", ci, re.MULTILINE), "CI must run the README's test command"
    assert "pip install --quiet torch==2.13.0" in ci and "pip install --quiet -e '.[test]'" in ci


def test_readme_lists_every_command() -> None:
    for name in {command[0] for command in _commands()}:
        assert any(f"`{form}" in README for form in (f"forecastd {name}", f"{name}`", f"{name} ")), name


@pytest.mark.parametrize("freq, fix", [("W", "fixed step"), ("ME", "month starts 'MS'"), ("fortnightly", "pandas frequency")])
def test_an_unsupported_freq_fails_when_the_config_loads(freq, fix) -> None:
    """Not at the first read, hours into a deployment."""
    from forecastd.config import config_from_dict

    with pytest.raises(ConfigError, match=rf"\[data\].*{freq!r}.*{fix}"):
        config_from_dict({"source": {"path": "x.parquet"}, "sink": {"path": "out"}, "data": {"freq": freq}})
