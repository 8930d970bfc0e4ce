"""Benchmarks for forecastd: accuracy and speed reports, run by hand or in CI, never pass/fail timings.

Scripts here take the shared benchmark data by a ``--data`` path; none of it is copied into the repository.
"""
