"""Benchmarks for forecastd: accuracy and speed reports, run by hand or in CI, never pass/fail timings.

Scripts here take the shared benchmark data by a ``--data`` path; none of it is copied into the repository.
"""

from __future__ import annotations

import os


def cores(memory_per_job: float = 1.5 * 2**30) -> int:
    """Runs a benchmark trains at once by default, one torch thread each (so a run's figures do not
    depend on how many ran beside it): one per CPU this process may use, but no more than the free
    memory holds at `memory_per_job` bytes each (an ETT multivariate run peaks at 1.2 GB)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf here
        return cpus
    return max(1, min(cpus, int(free // memory_per_job)))
