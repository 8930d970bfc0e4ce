import numpy as np
import pytest
import torch

from forecastd.config import ModelConfig, TrainingConfig
from forecastd.models import (
    _TICK_LOOP_ROWS,
    _TICK_MAX_ROWS,
    Forecaster,
    State,
    _fast_tanh,
    _softplus,
    pack_hidden,
    unpack_hidden,
)
from forecastd.training import train_rows


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
def test_forward_shapes_and_hidden_roundtrip(cell):
    mc = ModelConfig(cell=cell, hidden_size=8, num_layers=2, horizon=5)
    m = Forecaster(11, mc)
    x = torch.randn(3, 7, 11)
    mean, scale, h = m(x, m.initial_state(3))
    assert mean.shape == scale.shape == (3, 7, 5)
    assert (scale > 0).all()
    packed = pack_hidden(h.rnn)
    assert packed.shape == ((4 if cell == "lstm" else 2), 3, 8)
    assert h.window.shape == (3, m.lookback) == (3, 168)  # "auto" without a grid: the hourly week
    h2 = State(unpack_hidden(packed, cell), h.window.clone())
    _, _, a = m(x, h)
    _, _, b = m(x, h2)
    torch.testing.assert_close(pack_hidden(a.rnn), pack_hidden(b.rnn))
    torch.testing.assert_close(a.window, b.window)


def test_untrained_model_is_persistence_with_growing_spread():
    m = Forecaster(11, ModelConfig(horizon=4))
    mean, scale, _ = m(torch.randn(2, 3, 11))
    assert torch.all(mean == 0)
    assert torch.all(scale[..., 3] > scale[..., 0])


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_state_after_chunks_equals_state_after_one_call(cell):
    torch.manual_seed(0)
    m = Forecaster(11, ModelConfig(cell=cell, hidden_size=16, horizon=3)).eval()
    x = torch.randn(4, 50, 11)
    mean_all, _, h_all = m(x)
    h = m.initial_state(4)
    means = []
    for c in range(0, 50, 16):
        mean, _, h = m(x[:, c : c + 16], h)
        means.append(mean)
    torch.testing.assert_close(torch.cat(means, 1), mean_all, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pack_hidden(h.rnn), pack_hidden(h_all.rnn), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.window, h_all.window)


def test_tbptt_detaches_the_carried_state_at_every_chunk():
    """Would fail if the detach at the chunk start were removed: the carried state would hold a graph."""
    torch.manual_seed(0)
    m = Forecaster(11, ModelConfig(hidden_size=8, horizon=2))
    seen = []
    original = m.forward

    def spy(x, hidden=None):
        seen.append(hidden)
        return original(x, hidden)

    m.forward = spy
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    x, y = torch.randn(2, 40, 11), torch.randn(2, 40, 2)
    mask = torch.ones(2, 40, 2, dtype=torch.bool)
    total, n = train_rows(m, opt, x, y, mask, bptt=10, clip=1.0, autocast=torch.autocast("cpu", enabled=False))
    assert len(seen) == 4 and n == 160 and np.isfinite(total)
    assert all(h.rnn.grad_fn is None and not h.rnn.requires_grad for h in seen)
    # The state is carried, not reset: chunks after the first start from a non-zero state.
    assert all(h.rnn.abs().sum() > 0 for h in seen[1:])
    assert all(h.window.abs().sum() > 0 for h in seen[1:])


def test_gradient_of_a_chunk_does_not_reach_the_previous_chunk():
    torch.manual_seed(0)
    m = Forecaster(11, ModelConfig(hidden_size=8, horizon=2))
    torch.nn.init.normal_(m.head.weight)  # the zero init would hide every input gradient
    x = torch.randn(1, 20, 11, requires_grad=True)
    _, _, h = m(x[:, :10])
    from forecastd.models import detach_state as detach
    mean, _, _ = m(x[:, 10:], detach(h))
    mean.sum().backward()
    assert torch.all(x.grad[:, :10] == 0)
    assert torch.any(x.grad[:, 10:] != 0)


def test_training_config_defaults_are_consistent():
    t = TrainingConfig()
    assert t.segment_length % t.bptt == 0


def test_path_head_reads_the_recent_path_relative_to_the_last_value():
    """path[k, j-1] weighs (value j steps ago - last value), in scaled units, across call boundaries."""
    torch.manual_seed(0)
    W, K = 5, 2
    m = Forecaster(11, ModelConfig(hidden_size=4, horizon=K, lookback=W)).eval()
    with torch.no_grad():
        m.path.zero_()
        m.path[0, 2] = 1.0  # step 1 looks 3 steps back
        m.path[1, 4] = -0.5  # step 2 looks 5 steps back
    x = torch.randn(2, 30, 11)
    changes = torch.cat([torch.zeros(2, W), x[:, :, 0]], 1)  # a fresh state means a flat past
    level = changes.cumsum(1)
    expected0 = level[:, W - 3 : W - 3 + 30] - level[:, W:]
    expected1 = -0.5 * (level[:, 0:30] - level[:, W:])
    state = m.initial_state(2)
    means = []
    for c in range(0, 30, 7):  # in chunks: the window is carried between calls
        mean, _, state = m(x[:, c : c + 7], state)
        means.append(mean)
    mean = torch.cat(means, 1)
    unit = m.unit
    torch.testing.assert_close(mean[:, :, 0] / unit[0], expected0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean[:, :, 1] / unit[1], expected1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.window, x[:, -W:, 0])


def test_ragged_rows_keep_the_window_of_their_own_last_step():
    torch.manual_seed(0)
    m = Forecaster(11, ModelConfig(hidden_size=4, horizon=2, lookback=6)).eval()
    x = torch.randn(3, 9, 11)
    lengths = torch.tensor([9, 4, 1])
    _, _, ragged = m(x, None, lengths)
    for b, n in enumerate(lengths.tolist()):
        _, _, alone = m(x[b : b + 1, :n])
        torch.testing.assert_close(ragged.window[b : b + 1], alone.window)
        torch.testing.assert_close(ragged.rnn[:, b : b + 1], alone.rnn, atol=1e-6, rtol=1e-5)


def test_lookback_zero_is_the_recurrent_state_alone():
    m = Forecaster(11, ModelConfig(hidden_size=4, horizon=2, lookback=0))
    assert m.path is None
    _, _, state = m(torch.randn(2, 5, 11))
    assert state.window.shape == (2, 0)


def _prepared(values: np.ndarray, horizon: int = 4):
    import pandas as pd

    from forecastd.config import DataConfig
    from forecastd.frames import Grid
    from forecastd.training import prepare

    ts = pd.date_range("2024-01-01", periods=len(values), freq="1h", tz="UTC")
    frame = pd.DataFrame({"series_id": "a", "ts": ts, "value": values})
    mc = ModelConfig(hidden_size=8, horizon=horizon, lookback=24)
    return mc, prepare(frame, Grid("1h"), {"a": 1.0}, mc, DataConfig(), 0.25)


def test_training_keeps_a_trained_model_even_when_persistence_would_win_on_validation():
    """The start (persistence mean, unfitted unit spread) is no candidate: a fitted spread is worth keeping."""
    from forecastd.training import fit

    rng = np.random.default_rng(0)
    mc, prepared = _prepared(np.cumsum(rng.normal(size=600)))  # a random walk: persistence is optimal
    torch.manual_seed(0)
    model = Forecaster(prepared.segments[0][0].shape[1], mc)
    result = fit(model, prepared, TrainingConfig(epochs=2, min_epoch_steps=20, device="cpu"))
    assert result.metrics["best_epoch"] >= 1
    assert not torch.all(result.model.head.weight == 0)


def test_a_flat_validation_tail_saves_a_trained_model_with_a_finite_loss(caplog):
    """No validation target changes (a stuck sensor): there is no ratio to persistence. The loss was NaN
    at every epoch and the start weights were saved (best epoch 0); the MSE in units judges instead."""
    import logging

    from forecastd.training import fit

    t = np.arange(600)
    values = np.sin(2 * np.pi * t / 24) * 5 + np.random.default_rng(3).normal(size=t.size) * 0.3
    values[400:] = 3.0  # stuck from before the validation tail (the last quarter) starts
    mc, prepared = _prepared(values)
    assert not any((y[m] != 0).any() for _, y, m, *_ in prepared.val)
    torch.manual_seed(0)
    model = Forecaster(prepared.segments[0][0].shape[1], mc)
    with caplog.at_level(logging.WARNING, "forecastd.training"):
        result = fit(model, prepared, TrainingConfig(epochs=2, min_epoch_steps=20, device="cpu"))
    assert result.metrics["best_epoch"] >= 1 and not torch.all(result.model.head.weight == 0)
    assert np.isfinite(result.metrics["val_loss"]) and result.metrics["val_loss_basis"] == "mse"
    assert all(np.isfinite(h["val_loss"]) for h in result.history)
    assert "no validation target of any series changes" in caplog.text


def test_the_loss_of_flat_tails_is_in_the_data_units_and_a_ratio_otherwise():
    """A live model and a challenger scale a series differently: the fallback must not depend on that."""
    from forecastd.training import evaluate

    torch.manual_seed(0)
    m = Forecaster(11, ModelConfig(hidden_size=8, horizon=3, lookback=0))
    torch.nn.init.normal_(m.head.weight, std=0.1)  # forecasts some change where none comes
    x = torch.randn(30, 11).numpy()
    flat, changing, mask = np.zeros((30, 3), np.float32), np.ones((30, 3), np.float32), np.ones((30, 3), bool)
    cpu = torch.device("cpu")
    one, two = (evaluate(m, [(x, flat, mask, unit)], cpu) for unit in (1.0, 2.0))
    assert one["relative"] == two["relative"] == 0 and one["loss"] > 0
    assert two["loss"] == pytest.approx(4 * one["loss"])  # the same scaled errors are twice the size in units
    # A sequence with a change is judged against persistence: unit-free, and the flat one is left out.
    mixed = [evaluate(m, [(x, flat, mask, unit), (x, changing, mask, unit)], cpu) for unit in (1.0, 2.0)]
    assert mixed[0]["relative"] == 1 and mixed[0]["loss"] == mixed[1]["loss"]
    assert mixed[0]["loss"] == evaluate(m, [(x, changing, mask)], cpu)["loss"]


def test_a_series_near_the_largest_double_does_not_stop_the_others_training():
    """Its differences overflowed: an infinite unit, inf/inf features, and every series' training diverged."""
    import pandas as pd

    from forecastd.config import DataConfig
    from forecastd.frames import Grid
    from forecastd.training import fit, prepare
    from forecastd.windowing import robust_scale, series_steps

    t = np.arange(400)
    ts = pd.date_range("2024-01-01", periods=t.size, freq="1h", tz="UTC")
    values = {"ok": np.sin(2 * np.pi * t / 24) * 5, "huge": np.resize([1.79e308, -1.79e308], t.size)}
    frame = pd.concat([pd.DataFrame({"series_id": sid, "ts": ts, "value": v}) for sid, v in values.items()],
                      ignore_index=True)
    scales = {sid: robust_scale(v) for sid, (_, v) in series_steps(frame, Grid("1h")).items()}
    mc = ModelConfig(hidden_size=8, horizon=4, lookback=24)
    prepared = prepare(frame, Grid("1h"), scales, mc, DataConfig(), 0.25)
    torch.manual_seed(0)
    result = fit(Forecaster(prepared.segments[0][0].shape[1], mc), prepared,
                 TrainingConfig(epochs=1, min_epoch_steps=10, device="cpu", learning_rates=()))
    assert np.isfinite(result.history[0]["train_loss"]) and np.isfinite(result.metrics["val_loss"])
    assert prepared.series_ids == ["huge", "ok"] and "series_left_out" not in result.metrics


def test_a_series_without_a_usable_unit_is_left_out_named_and_the_others_kept(caplog):
    import logging

    import pandas as pd

    from forecastd.config import DataConfig
    from forecastd.errors import DataError
    from forecastd.frames import Grid
    from forecastd.training import prepare

    ts = pd.date_range("2024-01-01", periods=50, freq="1h", tz="UTC")
    frame = pd.concat([pd.DataFrame({"series_id": sid, "ts": ts, "value": np.arange(50.0)}) for sid in ("ok", "bad")],
                      ignore_index=True)
    mc = ModelConfig(hidden_size=8, horizon=4, lookback=0)
    with caplog.at_level(logging.WARNING, "forecastd.training"):
        prepared = prepare(frame, Grid("1h"), {"ok": 1.0, "bad": float("inf")}, mc, DataConfig(), 0.25)
    assert prepared.series_ids == ["ok"] and list(prepared.left_out) == ["bad"] and len(prepared.segments) == 1
    assert "'bad' is left out of training: its unit of change is inf" in caplog.text
    with pytest.raises(DataError, match="no series can be trained on: 1 left out \\('bad'\\)"):
        prepare(frame[frame["series_id"] == "bad"], Grid("1h"), {"bad": float("nan")}, mc, DataConfig(), 0.25)
    # Every value missing, with a unit that looks usable: it failed later as "every series is shorter than
    # its horizon".
    blank = frame.assign(value=np.where(frame["series_id"] == "bad", np.nan, frame["value"]))
    prepared = prepare(blank, Grid("1h"), {"ok": 1.0, "bad": 1.0}, mc, DataConfig(), 0.25)
    assert prepared.left_out == {"bad": "every value is missing (NaN or not a number)"}


def test_weight_average_is_what_gets_validated_and_kept():
    from forecastd.training import fit

    t = np.arange(800)
    rng = np.random.default_rng(1)
    mc, prepared = _prepared(np.sin(2 * np.pi * t / 24) * 5 + rng.normal(size=t.size) * 0.3)
    runs = {}
    for decay in (0.0, 0.99):
        torch.manual_seed(0)
        model = Forecaster(prepared.segments[0][0].shape[1], mc)
        runs[decay] = fit(model, prepared, TrainingConfig(epochs=3, min_epoch_steps=30, device="cpu",
                                                          weight_average=decay, learning_rate=3e-3))
    # The same optimiser path, judged through different weights: the validation curves differ, and
    # both models learnt the cycle (better than persistence on the held-out tail).
    assert [h["val_loss"] for h in runs[0.0].history] != [h["val_loss"] for h in runs[0.99].history]
    assert all(r.metrics["val_loss"] < 0.9 for r in runs.values())


def test_further_learning_rates_keep_the_lowest_validation_loss_from_the_same_start():
    from forecastd.training import fit

    t = np.arange(800)
    rng = np.random.default_rng(2)
    mc, prepared = _prepared(np.sin(2 * np.pi * t / 24) * 5 + rng.normal(size=t.size) * 0.3)
    base = TrainingConfig(epochs=2, min_epoch_steps=20, device="cpu")
    torch.manual_seed(0)
    start = Forecaster(prepared.segments[0][0].shape[1], mc).state_dict()
    alone = {}
    for lr in (3e-3, 1e-4):  # each rate on its own, from the same start weights
        model = Forecaster(prepared.segments[0][0].shape[1], mc)
        model.load_state_dict(start)
        alone[lr] = (fit(model, prepared, TrainingConfig(**{**base.__dict__, "learning_rate": lr})),
                     {k: v.clone() for k, v in model.state_dict().items()})
    assert alone[3e-3][0].metrics["val_loss"] != alone[1e-4][0].metrics["val_loss"]
    winner = min(alone, key=lambda lr: alone[lr][0].metrics["val_loss"])
    for first, further in ((3e-3, (1e-4,)), (1e-4, (3e-3,))):  # the order of the candidates does not matter
        model = Forecaster(prepared.segments[0][0].shape[1], mc)
        model.load_state_dict(start)
        config = TrainingConfig(**{**base.__dict__, "learning_rate": first, "learning_rates": further})
        seen = []
        result = fit(model, prepared, config, progress=lambda e, n, tl, vl: seen.append((e, n)))
        assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]  # one count over both runs' epochs
        assert result.metrics["learning_rate"] == winner
        assert result.metrics["val_loss"] == alone[winner][0].metrics["val_loss"]
        assert set(result.metrics["learning_rate_losses"]) == {"0.003", "0.0001"}
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, alone[winner][1][k], rtol=0, atol=0)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1, None])
def test_adamw_takes_torchs_steps_bit_for_bit(weight_decay):
    """training.AdamW and the cosine schedule give torch.optim's AdamW + CosineAnnealingLR weights
    exactly, with torch's default weight decay too (None), and when a parameter has no gradient for a
    step (it and its step count stay put)."""
    from forecastd.training import AdamW, _cosine

    torch.manual_seed(0)
    mc = ModelConfig(hidden_size=8, horizon=3, lookback=6)
    ours, theirs = Forecaster(4, mc), Forecaster(4, mc)
    theirs.load_state_dict(ours.state_dict())
    lr, epochs = 3e-3, 4
    decay = {} if weight_decay is None else {"weight_decay": weight_decay}
    opt = AdamW(ours.parameters(), lr=lr, **decay)
    ref = torch.optim.AdamW(theirs.parameters(), lr=lr, **decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(ref, T_max=epochs, eta_min=lr / 10)
    for epoch in range(1, epochs + 1):
        for k in range(5):
            x, y = torch.randn(3, 7, 4), torch.randn(3, 7, 3)
            for model, o in ((ours, opt), (theirs, ref)):
                o.zero_grad(set_to_none=True)
                mean, scale, _ = model(x)
                ((mean - y) ** 2).mean().add(scale.mean()).backward()
                if k == 2:
                    model.path.grad = None
                o.step()
        sched.step()
        opt.lr = _cosine(opt.lr, epoch, epochs, lr / 10)
        assert opt.lr == ref.param_groups[0]["lr"]
        for a, b in zip(ours.parameters(), theirs.parameters()):
            assert torch.equal(a, b)
    assert opt.lr == pytest.approx(lr / 10)


def test_training_leaves_torch_dynamo_unimported():
    """torch.optim's optimisers import torch._dynamo on first use (1.3-1.7 s a process); training must
    not, or every `forecastd train` and retrain child pays it again."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np, torch\n"
        "from tests.test_models import _prepared\n"
        "from forecastd.config import TrainingConfig\n"
        "from forecastd.models import Forecaster\n"
        "from forecastd.training import fit\n"
        "mc, prepared = _prepared(np.sin(np.arange(400) / 4.0))\n"
        "fit(Forecaster(prepared.segments[0][0].shape[1], mc), prepared, TrainingConfig(epochs=2, min_epoch_steps=5, device='cpu'))\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def _random_state(m: Forecaster, batch: int) -> State:
    h = m.initial_state(batch)
    rnn = tuple(torch.randn_like(t) for t in h.rnn) if isinstance(h.rnn, tuple) else torch.randn_like(h.rnn)
    return State(rnn, torch.randn_like(h.window))


def _general(m: Forecaster, *args):
    """The nn.GRU/LSTM/RNN path: train mode skips the inference shortcuts, and with dropout 0 it is
    the same function."""
    m.train()
    try:
        with torch.no_grad():
            return m(*args)
    finally:
        m.eval()


def _assert_same(a, b, rows=slice(None), steps=slice(None)):
    for got, want in zip(a[:2], b[:2]):
        torch.testing.assert_close(got[rows, steps], want[rows, steps], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pack_hidden(a[2].rnn)[:, rows], pack_hidden(b[2].rnn)[:, rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a[2].window[rows], b[2].window[rows])


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("lookback", [0, 6])
def test_inference_shortcuts_give_the_general_paths_numbers(cell, layers, lookback):
    """The tick (T = 1: row by row for a few rows, BLAS and compiled gates for more, torch's ops past those)
    and the compiled loop (a few rows, ragged) against nn.GRU/LSTM/RNN and the window's convolution; then
    again after the weights change in place (the shortcuts keep derived weights between calls)."""
    torch.manual_seed(0)
    m = Forecaster(11, ModelConfig(cell=cell, hidden_size=8, num_layers=layers, horizon=3, lookback=lookback)).eval()
    for _ in range(2):
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn_like(p) * 0.5)  # in place, as an optimiser step; the zero head would hide errors
        x = torch.randn(3, 9, 11)
        state = _random_state(m, 3)
        for B in (1, 3, _TICK_LOOP_ROWS + 1, 40, _TICK_MAX_ROWS + 1):
            xb, sb = torch.randn(B, 1, 11), _random_state(m, B)
            with torch.no_grad():
                _assert_same(m(xb, sb), _general(m, xb, sb))
        lengths = torch.tensor([9, 4, 1])
        with torch.no_grad():
            loop = m(x, state, lengths)
        general = _general(m, x, state, lengths)
        _assert_same(loop, general, steps=slice(0, 1))
        for b, n in enumerate(lengths.tolist()):
            _assert_same(loop, general, rows=slice(b, b + 1), steps=slice(0, n))
        # Ticking through the block one step at a time ends where the block does.
        ticked = state
        with torch.no_grad():
            means = []
            for t in range(9):
                mean, _, ticked = m(x[:, t : t + 1], ticked)
                means.append(mean)
        torch.testing.assert_close(torch.cat(means, 1), _general(m, x, state)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pack_hidden(ticked.rnn), pack_hidden(_general(m, x, state)[2].rnn),
                                   rtol=1e-5, atol=1e-5)


def test_the_compiled_loops_tanh_is_as_close_to_exact_as_torchs():
    """The rational tanh of the compiled loops, over the range where gates live and far into saturation,
    within 5e-8 of the exact value (torch's float32 tanh: 3e-8), odd, and exactly 0 at 0."""
    x = np.concatenate([np.linspace(-40.0, 40.0, 40_001), np.geomspace(1e-9, 20.0, 2_001)])
    x = np.concatenate([x, -x[40_001:]])
    got = np.array([_fast_tanh(v) for v in x])
    assert np.abs(got - np.tanh(x)).max() < 5e-8
    np.testing.assert_array_equal(got[40_001:42_002], -got[42_002:])
    assert _fast_tanh(0.0) == 0.0


def test_the_compiled_softplus_rounds_to_libms_value():
    """The branch-free softplus of the compiled heads, rounded to float32 as they use it, equals libm's
    log1p(exp(x)) (torch's F.softplus formula, threshold 20) over the range a raw scale lives in and far
    past it; below -40 both are too small for the scale's + 1e-3 to see."""
    x = np.concatenate([np.linspace(-40.0, 60.0, 100_001), np.random.default_rng(0).normal(0.0, 5.0, 100_000),
                        np.linspace(-0.25, 0.25, 200_001)])  # where u = exp(-|x|) is near 1 and the series slowest
    x = x[x >= -40.0].astype(np.float32).astype(np.float64)
    want = np.where(x > 20.0, x, np.log1p(np.exp(x))).astype(np.float32)
    got = np.array([_softplus(v) for v in x]).astype(np.float32)
    np.testing.assert_array_equal(got, want)
    far = np.array([-40.0, -60.0, -1e4])
    assert (np.float32(np.array([_softplus(v) for v in far]).astype(np.float32) + np.float32(1e-3))
            == np.float32(1e-3)).all()


def test_the_compiled_loop_serves_only_inference():
    """With gradients on, the loop would cut the graph: training must take nn.GRU."""
    torch.manual_seed(0)
    m = Forecaster(11, ModelConfig(hidden_size=8, horizon=2, lookback=4)).eval()
    torch.nn.init.normal_(m.head.weight)
    x = torch.randn(1, 5, 11, requires_grad=True)
    mean, _, _ = m(x)
    mean.sum().backward()
    assert x.grad.abs().sum() > 0 and m.rnn.weight_hh_l0.grad is not None



def test_the_numpy_tick_follows_optimiser_steps_with_gradients_on():
    """`tick_arrays` runs outside no_grad (it keeps its numpy weights whatever the grad mode) and still
    sees every optimiser step; training's own forward keeps its graph through the path kernel. Any
    number of rows is served, past those a tick hands it (`compiled_tick`)."""
    torch.manual_seed(0)
    m = Forecaster(11, ModelConfig(hidden_size=8, horizon=3, lookback=4)).eval()
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    for B in (2, 1, 40):
        x, state = torch.randn(B, 1, 11), _random_state(m, B)
        hidden = pack_hidden(state.rnn).transpose(0, 1).contiguous().numpy()
        assert torch.is_grad_enabled()
        mean, scale, h, window = m.tick_arrays(x[:, 0].numpy(), hidden, state.window.numpy())
        want = _general(m, x, state)
        _assert_same((torch.from_numpy(mean)[:, None], torch.from_numpy(scale)[:, None],
                      State(torch.from_numpy(h).transpose(0, 1).contiguous(), torch.from_numpy(window))), want)
        m.train()
        loss = m(torch.randn(2, 5, 11))[0].sum()
        opt.zero_grad()
        loss.backward()
        assert m.path.grad.abs().sum() > 0
        opt.step()
        m.eval()

def test_max_seconds_bounds_every_learning_rates_run():
    from forecastd.training import fit

    t = np.arange(600)
    mc, prepared = _prepared(np.sin(2 * np.pi * t / 24) * 5)
    seen = []
    result = fit(Forecaster(prepared.segments[0][0].shape[1], mc), prepared,
                 TrainingConfig(epochs=5, min_epoch_steps=5, device="cpu", max_seconds=1e-6, learning_rates=(5e-4,)),
                 progress=lambda e, n, tl, vl: seen.append((e, n)))
    assert seen == [(1, 10), (6, 10)]  # each rate's run stops after its first epoch
    assert result.metrics["epochs_run"] == 1


def test_learning_rates_are_read_from_the_config_and_checked():
    from forecastd.config import config_from_dict
    from forecastd.errors import ConfigError

    paths = {"source": {"path": "x.parquet"}, "sink": {"path": "out"}}
    assert config_from_dict({**paths, "training": {"learning_rates": [5e-4, 3e-4]}}).training.learning_rates == (5e-4, 3e-4)
    with pytest.raises(ConfigError, match=r"learning_rates = \[0.0005, -1.0\] must hold positive numbers"):
        config_from_dict({**paths, "training": {"learning_rates": [5e-4, -1]}})
