"""One timestamp of any form to a UTC instant: the per-row parser that sources and frames share.

A module of its own, below both, because sources may not import frames (a later stage).
"""

from __future__ import annotations

from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd

__all__ = ["utc_instant"]


def utc_instant(value: object, zone: str | ZoneInfo) -> pd.Timestamp:
    """A UTC Timestamp, or NaT for a missing, unparseable (text other than ISO-8601) or impossible local time.

    A naive value is read in `zone`; an ambiguous or non-existent local time (a DST change) is NaT
    rather than a guess.
    """
    if value is None or isinstance(value, (int, float, np.number)):
        # A number is no timestamp: pandas would read 1704067200 as nanoseconds after 1970. Epoch
        # numbers in a column of them get `frames`' error that names the fix.
        return pd.NaT
    try:
        # Text only as ISO-8601, as the column-wide parse reads it: pd.Timestamp would guess at any other
        # shape, month first, so '01/03/2024' became January 3rd (and '13/03/2024' a bad timestamp).
        t = pd.to_datetime(value, format="ISO8601") if isinstance(value, str) else pd.Timestamp(value)
    except (ValueError, TypeError, OverflowError):
        return pd.NaT
    if t is pd.NaT:
        return pd.NaT
    if t.tzinfo is None:
        try:
            t = t.tz_localize(zone, ambiguous="NaT", nonexistent="NaT")
        except Exception:  # pandas raises several kinds for impossible local times
            return pd.NaT
        if t is pd.NaT:
            return pd.NaT
    return t.tz_convert("UTC")
