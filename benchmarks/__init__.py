"""Benchmarks for forecastd: accuracy and speed reports, run by hand or in CI, never pass/fail timings.

Scripts here take the shared benchmark data by a ``--data`` path; none of it is copied into the repository.
"""

from __future__ import annotations

import os


def cores() -> int:
    """CPUs this process may run on: the default number of runs a benchmark trains at once, one torch
    thread each (so a run's figures do not depend on how many ran beside it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
