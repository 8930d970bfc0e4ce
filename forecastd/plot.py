"""One PNG per series: history, the one-step expectation and band, flagged points, the latest forecast.

Reads the three frames forecastd already has in memory (the long history frame and the forecast and
anomaly outputs, see `frames.FORECAST_COLUMNS` / `frames.ANOMALY_COLUMNS`) and draws what exists: a
series with no forecasts or no anomaly rows yet still gets a plot, with a note saying what is missing.

Drawn with `matplotlib.figure.Figure` and the Agg canvas directly, never `pyplot`: no global figure
registry, no GUI backend picked from the environment, nothing left open if the daemon plots every tick.
"""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure

from forecastd.errors import ConfigError, DataError
from forecastd.files import atomic_write_bytes

__all__ = ["plot_series"]

_HISTORY = ("series_id", "ts", "value")
_ANOMALY = ("series_id", "ts", "value", "expected", "lower", "upper", "is_anomaly")
_FORECAST = ("series_id", "issued_at", "target_ts", "mean", "lower", "upper")
_MAX_IDS_IN_MESSAGE = 20  # enough to spot a typo; a fleet of thousands would drown the message


def plot_series(
    history: pd.DataFrame,
    forecasts: pd.DataFrame,
    anomalies: pd.DataFrame,
    series_id: str,
    path: str | Path,
    *,
    last: int | None = 500,
    title: str | None = None,
) -> Path:
    """Write a PNG of one series to `path` (atomically) and return the path.

    `history` is a long frame (series_id, ts, value); `anomalies` and `forecasts` follow the output
    contracts and may be empty. `last` keeps the last N points of history (None: all of it); anomaly rows
    are drawn over the same time window; the forecast drawn is the one with the latest `issued_at`.
    """
    if last is not None and (isinstance(last, bool) or not isinstance(last, int) or last < 1):
        raise ConfigError(f"last must be a positive number of points, or None for all history; got {last!r}")
    _require(history, _HISTORY, "history")
    hist = history[history["series_id"].astype(str) == series_id]
    if hist.empty:
        ids = sorted(history["series_id"].dropna().astype(str).unique())
        shown = ", ".join(repr(i) for i in ids[:_MAX_IDS_IN_MESSAGE])
        more = f" and {len(ids) - _MAX_IDS_IN_MESSAGE} more" if len(ids) > _MAX_IDS_IN_MESSAGE else ""
        raise DataError(
            f"series {series_id!r} is not in the history; "
            + (f"series present: {shown}{more}; pick one of those" if ids else "the history is empty")
        )
    hist = hist.assign(ts=_utc(hist["ts"])).sort_values("ts", kind="stable")
    if last is not None:
        hist = hist.tail(last)
    start, end = hist["ts"].iloc[0], hist["ts"].iloc[-1]

    anom = _series_rows(anomalies, _ANOMALY, "anomalies", series_id)
    if anom is not None:
        anom = anom.assign(ts=_utc(anom["ts"])).sort_values("ts", kind="stable")
        anom = anom[(anom["ts"] >= start) & (anom["ts"] <= end)]
    fc = _series_rows(forecasts, _FORECAST, "forecasts", series_id)
    if fc is not None:
        fc = fc.assign(issued_at=_utc(fc["issued_at"]), target_ts=_utc(fc["target_ts"]))
        fc = fc[fc["issued_at"] == fc["issued_at"].max()].sort_values("target_ts", kind="stable")

    fig = Figure(figsize=(12, 4.8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    missing: list[str] = []

    if anom is not None and not anom.empty:
        t, lo, hi, ex = _broken(anom["ts"], anom["lower"], anom["upper"], anom["expected"])
        ax.fill_between(t, lo, hi, color="tab:blue", alpha=0.15, linewidth=0, label="one-step band")
        ax.plot(t, ex, color="tab:blue", linewidth=0.9, linestyle="--", alpha=0.8, label="one-step expected")
    else:
        missing.append("no anomaly scores in this window")

    t, v = _broken(hist["ts"], hist["value"])
    ax.plot(t, v, color="black", linewidth=1.0, label="observed")

    if anom is not None and not anom.empty:
        flagged = anom[anom["is_anomaly"].astype("boolean").fillna(False).to_numpy(dtype=bool)]
        if not flagged.empty:
            ax.scatter(_naive(flagged["ts"]), flagged["value"].to_numpy(dtype=float), s=28, color="red",
                       zorder=5, label=f"anomaly ({len(flagged)})")

    if fc is not None and not fc.empty:
        issued = fc["issued_at"].iloc[0]
        t = _naive(fc["target_ts"])
        mean = fc["mean"].to_numpy(dtype=float)
        # Join the forecast to the point it was issued from, so the eye follows it out of the history.
        at_issue = hist.loc[hist["ts"] == issued, "value"]
        if not at_issue.empty and np.isfinite(at_issue.iloc[-1]):
            t, mean = np.concatenate([_naive(pd.Series([issued])), t]), np.concatenate([[at_issue.iloc[-1]], mean])
        lo, hi = fc["lower"].to_numpy(dtype=float), fc["upper"].to_numpy(dtype=float)
        ax.fill_between(_naive(fc["target_ts"]), lo, hi, color="tab:orange", alpha=0.25, linewidth=0,
                        label="forecast band")
        ax.plot(t, mean, color="tab:orange", linewidth=1.6, label=f"forecast from {issued:%Y-%m-%d %H:%M} UTC")
        ax.axvline(_naive(pd.Series([issued]))[0], color="grey", linewidth=0.8, linestyle=":")
    else:
        missing.append("no forecast")

    ax.set_title(title if title is not None else
                 f"{series_id}: {len(hist)} points to {end:%Y-%m-%d %H:%M} UTC")
    ax.set_xlabel("time (UTC)")
    ax.set_ylabel("value")
    # Explicit UTC on locator and formatter, so a user's rcParams timezone cannot relabel the axis.
    locator = AutoDateLocator(tz=dt.UTC)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator, tz=dt.UTC))
    ax.grid(True, alpha=0.3)
    # Below the axes, in one row: inside it would cover the data wherever it was put.
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(handles), fontsize="small", frameon=False)
    if missing:
        ax.text(0.995, 0.01, "; ".join(missing), transform=ax.transAxes, ha="right", va="bottom",
                fontsize="small", color="grey")

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    path = Path(path)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as exc:
        raise ConfigError(f"cannot write the plot to {str(path)!r} ({exc.strerror or exc}); give --out a path in a "
                          "directory you can write to") from None
    return path


def _require(frame: pd.DataFrame, columns: tuple[str, ...], name: str) -> None:
    lacking = [c for c in columns if c not in frame.columns]
    if lacking:
        raise DataError(f"{name} frame lacks column(s) {lacking}; it has {list(frame.columns)}")


def _series_rows(
    frame: pd.DataFrame | None, columns: tuple[str, ...], name: str, series_id: str
) -> pd.DataFrame | None:
    """The rows of one series, or None when there are none; an empty frame of any shape counts as none."""
    if frame is None or frame.empty:
        return None
    _require(frame, columns, name)
    rows = frame[frame["series_id"].astype(str) == series_id]
    return None if rows.empty else rows


def _utc(col: pd.Series) -> pd.Series:
    """Timestamps as UTC; naive ones are taken to be UTC already, as every forecastd frame is."""
    ts = pd.to_datetime(col)
    return ts.dt.tz_localize("UTC") if ts.dt.tz is None else ts.dt.tz_convert("UTC")


def _naive(col: pd.Series) -> np.ndarray:
    # matplotlib reads naive datetime64 as UTC without pandas' converters (which are global state).
    return col.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy("datetime64[ns]")


def _broken(ts: pd.Series, *values: pd.Series) -> tuple[np.ndarray, ...]:
    """Times and values with a NaN inserted inside every gap, so lines and bands break instead of bridging it.

    A gap is a step over 1.5 times the median step: absent rows are then visible as absent, like NaNs.
    """
    t = _naive(ts)
    cols = [v.to_numpy(dtype=float) for v in values]
    if len(t) < 3:
        return (t, *cols)
    step = np.diff(t)
    at = np.flatnonzero(step > 1.5 * np.median(step)) + 1
    if at.size == 0:
        return (t, *cols)
    mid = t[at - 1] + step[at - 1] // 2
    return (np.insert(t, at, mid), *(np.insert(c, at, np.nan) for c in cols))
