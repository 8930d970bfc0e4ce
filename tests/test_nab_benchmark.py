"""benchmarks/nab.py end to end on a tiny NAB-layout corpus: results files NAB can read, and --seeds."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from benchmarks import nab


def _corpus(tmp_path) -> None:
    rng = np.random.default_rng(0)
    windows = {}
    for name, spike in (("a", 1500), ("b", 1700)):
        ts = pd.date_range("2024-01-01", periods=2000, freq="5min")
        day = np.sin(2 * np.pi * np.arange(2000) / 288)
        values = 10 + day + rng.normal(scale=0.1, size=2000)
        values[spike] += 8.0
        (tmp_path / "data" / "cat").mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"timestamp": ts.strftime("%Y-%m-%d %H:%M:%S"), "value": values}).to_csv(
            tmp_path / "data" / "cat" / f"{name}.csv", index=False)
        windows[f"cat/{name}.csv"] = [[f"{ts[spike - 20]:%Y-%m-%d %H:%M:%S}.000000",
                                       f"{ts[spike + 20]:%Y-%m-%d %H:%M:%S}.000000"]]
    (tmp_path / "combined_windows.json").write_text(json.dumps(windows))


def test_nab_benchmark_writes_results_and_averages_seeds(tmp_path, capsys):
    _corpus(tmp_path)
    out = tmp_path / "out"
    nab.main(["--data", str(tmp_path), "--out", str(out), "--no-ablation", "--no-baselines", "--seeds", "2",
              "--train", "epochs=1", "--train", "min_epoch_steps=2", "--models", str(tmp_path / "models")])
    printed = capsys.readouterr().out
    assert "forecastd, seed 0" in printed and "forecastd, seed 1" in printed
    assert "forecastd, mean ± std of 2" in printed
    # One cached model set per file and seed: a second seed does not overwrite the first.
    assert len(list((tmp_path / "models").glob("*.pt"))) == 4
    for name in ("a", "b"):
        written = pd.read_csv(out / "forecastd" / "cat" / f"forecastd_{name}.csv")
        source = pd.read_csv(tmp_path / "data" / "cat" / f"{name}.csv")
        assert list(written.columns) == ["timestamp", "value", "anomaly_score", "label"]
        assert len(written) == len(source) and (written["label"].sum() == 41)
        assert written["anomaly_score"].between(0, 1).all()
        # The spike is the file's strongest score after the probationary period.
        scored = written["anomaly_score"].to_numpy()[nab.probation_length(len(written)):]
        assert scored.max() == 1.0


def test_a_file_forecastd_cannot_learn_from_scores_zero_and_the_others_go_on(tmp_path, capsys):
    _corpus(tmp_path)
    ts = pd.date_range("2024-01-01", periods=8, freq="5min")  # 1 probationary row: nothing to train on
    pd.DataFrame({"timestamp": ts.strftime("%Y-%m-%d %H:%M:%S"), "value": np.arange(8.0)}).to_csv(
        tmp_path / "data" / "cat" / "short.csv", index=False)
    windows = json.loads((tmp_path / "combined_windows.json").read_text())
    (tmp_path / "combined_windows.json").write_text(json.dumps({**windows, "cat/short.csv": []}))
    out = tmp_path / "out"
    nab.main(["--data", str(tmp_path), "--out", str(out), "--no-ablation", "--train", "epochs=1",
              "--train", "min_epoch_steps=2"])
    captured = capsys.readouterr()
    assert "cat/short.csv: no detections, forecastd could not train on it: no training targets" in captured.err
    assert "not trained: no training targets" in captured.out
    short = pd.read_csv(out / "forecastd" / "cat" / "forecastd_short.csv")
    assert len(short) == 8 and (short["anomaly_score"] == 0).all()
    for name in ("a", "b"):  # still trained and scored
        scored = pd.read_csv(out / "forecastd" / "cat" / f"forecastd_{name}.csv")["anomaly_score"].to_numpy()
        assert scored[nab.probation_length(len(scored)):].max() == 1.0


def test_clean_retrain_leaves_flagged_points_out_of_the_challengers_data(tmp_path, monkeypatch):
    """--clean: a challenger trains and is judged without the points the live stream flagged by then."""
    import dataclasses

    from forecastd.config import DataConfig

    _corpus(tmp_path)
    raw = pd.read_csv(tmp_path / "data" / "cat" / "a.csv")
    spike = pd.Timestamp(raw["timestamp"][1500], tz="UTC")
    seen: dict[bool, list[pd.DataFrame]] = {False: [], True: []}
    fit = nab._fit

    def spy(train, *args, **kwargs):
        seen[clean].append(train)
        return fit(train, *args, **kwargs)

    monkeypatch.setattr(nab, "_fit", spy)
    tc = dataclasses.replace(nab.TRAINING, epochs=1, min_epoch_steps=2)
    for clean in (False, True):
        schedule = nab.Schedule((1800,), True, "range", 0.0, clean)
        nab.train_file("cat/a.csv", raw, nab.MODEL, tc, DataConfig(), schedule)
    # [0] is the probation model, [1] the challenger at row 1,800, after the spike at row 1,500.
    assert spike in set(seen[False][1]["ts"])
    assert spike not in set(seen[True][1]["ts"])
    assert len(seen[True][1]) < len(seen[False][1]) < len(seen[True][1]) + 20  # the spike and few others


def test_retrain_rows_follow_the_growth_rule():
    n_prob = nab.probation_length(4032)  # 604
    assert nab.retrain_rows("doubling", 4032) == nab.retrain_rows("growth:1", 4032) == (1208, 2416)
    rows = nab.retrain_rows("growth:0.25", 4032)
    # Each training sees at least 1.25 times the rows of the one before, never a row past the file.
    assert [round(b / a, 2) for a, b in zip((n_prob,) + rows, rows)] == [1.25] * len(rows)
    assert rows[0] == 755 and rows[-1] < 4032 <= rows[-1] * 1.25
    assert nab.retrain_rows("1000", 4032) == (1604, 2604, 3604)
    assert nab.retrain_rows("none", 4032) == ()
