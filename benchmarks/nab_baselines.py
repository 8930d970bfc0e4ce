"""NAB baselines scored with our NAB scorer: NAB's windowed Gaussian, its null detector, and random scores.

The windowed Gaussian is a line-by-line port of ``nab/detectors/gaussian/windowedGaussian_detector.py``; NAB's
own scorer gives it 21.6 / 10.3 / 26.4 on the 18 files in ``../shared/data/nab`` (data README), so running it
through ``nab_scoring`` checks that scorer against NAB's.

    python benchmarks/nab_baselines.py --data ../shared/data/nab --out /tmp/nabout
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.nab_scoring import (  # noqa: E402
    PROFILES,
    CorpusScore,
    label_rows,
    load_corpus,
    load_windows,
    score_corpus,
    write_results,
)

__all__ = [
    "NAB_SUBSET_ANCHORS",
    "null_scores",
    "py2_results_precision",
    "random_scores",
    "run_detector",
    "score_baselines",
    "windowed_gaussian",
]

# NAB's own scorer on the 18 files of ../shared/data/nab (data README): standard, reward_low_FP, reward_low_FN.
NAB_SUBSET_ANCHORS: dict[str, tuple[float, float, float]] = {
    "windowedGaussian": (21.6, 10.3, 26.4),
}


def windowed_gaussian(values: np.ndarray, window_size: int = 6400, step_size: int = 100) -> np.ndarray:
    """NAB's windowed Gaussian: 1 − Q((x − mean) / std) over the preceding window, mirrored below the mean.

    The window grows to ``window_size`` values, then slides forward ``step_size`` values at a time; the
    statistics are refreshed only when the window changes, exactly as NAB does. The first row scores 0,
    and so does a missing value (NaN), which stays out of the window (NAB's corpus has none).
    """
    values = np.asarray(values, dtype=float)
    scores = np.zeros(len(values))
    # np.mean / np.std over a float buffer give NAB's figures bit for bit (same values, same summation),
    # which matters: many scores sit at 1.0 and the optimal threshold is often exactly 1.0.
    window = np.empty(window_size)
    filled = 0
    pending: list[float] = []
    mean, std = 0.0, 1.0
    for i, x in enumerate(values):
        if x != x:  # NaN
            continue
        if filled > 0:
            scores[i] = 1.0 - _normal_tail(x, mean, std)
        if filled < window_size:
            window[filled] = x
            filled += 1
            mean, std = _window_stats(window[:filled])
        else:
            pending.append(x)
            if len(pending) == step_size:
                window = np.concatenate([window[step_size:], pending])
                pending = []
                mean, std = _window_stats(window)
    return scores


def null_scores(n_rows: int) -> np.ndarray:
    """NAB's null detector: a constant 0.5, so no threshold separates anything."""
    return np.full(n_rows, 0.5)


def random_scores(n_rows: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform scores in [0, 1): the floor any detector must clear."""
    return rng.uniform(0.0, 1.0, n_rows)


def py2_results_precision(scores: np.ndarray) -> np.ndarray:
    """Round to the 12 significant digits NAB's Python 2 results files hold (``str(float)``).

    NAB's published figures were scored from those files, where e.g. 0.9999999999996 was stored as 1.0; it
    decides which rows tie at the top score.
    """
    return np.array([float(f"{s:.12g}") for s in scores])


def run_detector(
    corpus: Mapping[str, pd.DataFrame], detect: Callable[[str, np.ndarray], np.ndarray]
) -> dict[str, pd.DataFrame]:
    """Apply ``detect(relpath, values) -> scores`` to every file, returning NAB results frames."""
    return {
        relpath: pd.DataFrame(
            {
                "timestamp": frame["timestamp"],
                "value": frame["value"],
                "anomaly_score": detect(relpath, frame["value"].to_numpy(dtype=float)),
            }
        )
        for relpath, frame in corpus.items()
    }


def score_baselines(
    nab_dir: str | Path, out_dir: str | Path | None = None, random_seeds: int = 10
) -> dict[str, dict[str, CorpusScore | list[CorpusScore]]]:
    """Score the baselines on every profile: detector -> profile -> CorpusScore (a list for random seeds)."""
    corpus = load_corpus(nab_dir)
    windows = load_windows(Path(nab_dir) / "combined_windows.json")
    gaussian = run_detector(corpus, lambda _, v: windowed_gaussian(v))
    detectors: dict[str, dict[str, pd.DataFrame]] = {
        "windowedGaussian": gaussian,
        "windowedGaussian_py2": {
            k: f.assign(anomaly_score=py2_results_precision(f["anomaly_score"].to_numpy())) for k, f in gaussian.items()
        },
        "null": run_detector(corpus, lambda _, v: null_scores(len(v))),
    }
    file_ids = {relpath: k for k, relpath in enumerate(sorted(corpus))}

    def seeded(seed: int) -> Callable[[str, np.ndarray], np.ndarray]:
        # One stream per (seed, file), so a file's scores do not depend on which other files are scored.
        return lambda relpath, v: random_scores(len(v), np.random.default_rng([seed, file_ids[relpath]]))

    randoms = [run_detector(corpus, seeded(seed)) for seed in range(random_seeds)]
    if out_dir is not None:
        for detector, results in [*detectors.items(), ("random", randoms[0])]:
            for relpath, frame in results.items():
                labelled = frame.assign(label=label_rows(frame["timestamp"], windows[relpath]))
                write_results(out_dir, detector, relpath, labelled)
    table: dict[str, dict[str, CorpusScore | list[CorpusScore]]] = {}
    for detector, results in detectors.items():
        table[detector] = {p: score_corpus(results, windows, p) for p in PROFILES}
    table["random"] = {p: [score_corpus(r, windows, p) for r in randoms] for p in PROFILES}
    return table


def _normal_tail(x: float, mean: float, std: float) -> float:
    """NAB's ``normalProbability``: P(X > x), reflected about the mean for x below it (same float steps)."""
    if x < mean:
        x = 2 * mean - x
    z = (x - mean) / std
    return 0.5 * math.erfc(z / math.sqrt(2))


def _window_stats(window: np.ndarray) -> tuple[float, float]:
    std = float(np.std(window))
    return float(np.mean(window)), std if std != 0.0 else 0.000001  # NAB's floor for a flat window


def _format_table(table: Mapping[str, Mapping[str, CorpusScore | list[CorpusScore]]]) -> str:
    profiles = list(PROFILES)
    width = 30
    lines = [f"{'detector':<28}" + "".join(f"{p:>{width}}" for p in profiles)]
    for detector, by_profile in table.items():
        cells = []
        for p in profiles:
            result = by_profile[p]
            if isinstance(result, list):  # random seeds
                scores = np.array([r.score for r in result])
                cells.append(f"{scores.mean():.1f} ± {scores.std():.1f}")
            else:
                cells.append(f"{result.score:.1f} (t={result.threshold:.13g})")
        lines.append(f"{detector:<28}" + "".join(f"{c:>{width}}" for c in cells))
    for detector, anchor in NAB_SUBSET_ANCHORS.items():
        lines.append(f"{detector + ', NAB scorer':<28}" + "".join(f"{a:>{width}.1f}" for a in anchor))
    first = next(iter(table.values()))["standard"]
    first = first[0] if isinstance(first, list) else first
    lines += [
        f"{len(first.per_file)} files, {first.windows} windows; raw null / perfect (standard) "
        f"{first.null:.2f} / {first.perfect:.2f}; t = the optimised threshold.",
        "windowedGaussian_py2: the same scores rounded to 12 significant digits, as NAB's published results",
        "files hold them (Python 2 str); NAB's figures were scored from those files.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", required=True, type=Path, help="NAB directory holding data/ and combined_windows.json"
    )
    parser.add_argument("--out", type=Path, help="also write NAB results files under this directory")
    parser.add_argument("--random-seeds", type=int, default=10, help="random detector: mean ± sd over this many seeds")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    table = score_baselines(args.data, args.out, args.random_seeds)
    print(_format_table(table))
    print(f"({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
