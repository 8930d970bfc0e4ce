"""benchmarks/peers.py without its peer libraries: it names the install and skips, never crashes.

CI has neither darts nor neuralforecast, so these tests stub the import lookup instead of needing them.
"""

from __future__ import annotations

import pytest

from benchmarks import peers


def test_missing_library_names_the_extra_and_skips_its_peers() -> None:
    found = {"neuralforecast"}
    runnable, messages = peers.check_peers(
        ["darts-blockrnn", "nf-gru", "darts-rnn"], find_spec=lambda name: object() if name in found else None,
    )
    assert runnable == ["nf-gru"]
    assert len(messages) == 2
    assert all("pip install 'forecastd[bench]'" in m and "darts is not installed" in m for m in messages)
    assert messages[0].startswith("Darts BlockRNN GRU: skipped")


def test_all_present_runs_all() -> None:
    runnable, messages = peers.check_peers(list(peers.PEERS), find_spec=lambda name: object())
    assert runnable == list(peers.PEERS) and messages == []


def test_importing_the_benchmark_needs_no_peer_library() -> None:
    import sys

    assert "darts" not in sys.modules and "neuralforecast" not in sys.modules


def test_unknown_peer_is_a_usage_error() -> None:
    with pytest.raises(SystemExit):
        peers.main(["--data", "x.csv", "--peers", "prophet"])


def test_updates_of_many_series_are_timed_fewer_times():
    assert [peers.scaled_reps(30, n) for n in (1, 100, 1000, 10000)] == [30, 30, 5, 5]
    assert [peers.scaled_reps(300, n) for n in (1, 100, 1000, 10000)] == [300, 300, 30, 5]
