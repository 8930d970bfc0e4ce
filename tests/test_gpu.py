"""The CUDA path: what a GPU user gets must be what a CPU user gets.

Off by default (marker `gpu`); run with `pytest -m gpu` on a machine with CUDA. The checks: streaming
on the GPU gives the CPU's rows and states, the fused one-step kernels (`forecastd.cuda_tick`) give
torch's numbers, training on the GPU (bf16 autocast) learns, and its checkpoint serves on either
device, so a model trained on a GPU box can be served from a CPU one.
"""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from forecastd.config import AnomalyConfig, ModelConfig, load_config
from forecastd.cuda_tick import tick as _fused_tick
from forecastd.frames import Grid
from forecastd.models import Forecaster, State
from forecastd.pipeline import run_once, state_store, train
from forecastd.state import Segment, StreamState
from forecastd.streaming import Emit, run_segments
from forecastd.windowing import n_features

from test_pipeline import START, _key_sorted, _series, _write_config
from test_streaming import _model, _segments

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible; the gpu tests need one"),
]

GRID = Grid("1h")


@pytest.fixture(autouse=True)
def _full_float32():
    """cuDNN may run float32 RNNs in TF32 by default; the comparisons below are against float32 CPU."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("lookback", [0, 4])
def test_streaming_on_cuda_gives_the_cpu_rows_and_states(cell, lookback):
    cpu, mc = _model(cell, lookback)
    gpu = Forecaster(n_features(len(mc.level_alphas)), mc).eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu.cuda()
    segs = _segments(40)  # more series than the compiled CPU loop takes, ragged, with gaps: every branch
    scales = {g.series_id: 1.0 + i / 8 for i, g in enumerate(segs)}
    ac = AnomalyConfig()
    empty = StreamState.fresh([], np.zeros(0), len(mc.level_alphas), (1 + (cell == "lstm"), mc.hidden_size),
                              ac.forecasts, cpu.lookback)

    outs, states = [], []
    for model in (cpu, gpu):
        out, state = run_segments(model, empty, segs, scales, GRID, mc, ac, 1, Emit(5), chunk=64)
        # And one more tick on the carried state, which takes the one-step path.
        ticks = [Segment(g.series_id, False, g.start + len(g.values), np.array([56.0])) for g in segs]
        out2, state = run_segments(model, state, ticks, scales, GRID, mc, ac, 1, Emit(5))
        outs.append((out, out2))
        states.append(state)

    for a, b in zip(*outs):
        fa, aa = _key_sorted(a)
        fb, ab = _key_sorted(b)
        assert len(fa) == len(fb) > 0 and len(aa) == len(ab) > 0
        pd.testing.assert_frame_equal(fa, fb, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(ab["score"], aa["score"], atol=1e-3)
    mine, want = states[1].to_arrays(), states[0].to_arrays()
    for key, value in want.items():
        np.testing.assert_allclose(mine[key], value, rtol=1e-4, atol=1e-4, err_msg=key)


def test_a_model_trained_on_cuda_learns_and_serves_on_either_device(tmp_path):
    data = _series()
    history = data[data["ts"] < START + pd.Timedelta(hours=400)]
    history.to_parquet(tmp_path / "data.parquet")
    cfg = _write_config(tmp_path, tmp_path / "data.parquet")
    cfg.write_text(cfg.read_text().replace('device = "cpu"', 'device = "cuda"'))
    config = load_config(cfg)
    train(config, START + pd.Timedelta(hours=400))

    mv = state_store(config).load_live(torch.device("cpu"))
    metrics = mv.manifest["metrics"]
    assert metrics["device"] == "cuda"
    assert metrics["val_mse"] < metrics["val_persistence_mse"]

    # The saved weights are plain CPU tensors; the same checkpoint serves on the GPU and on the CPU
    # ([serve] device; training's device does not decide where ticks run).
    data[data["ts"] < START + pd.Timedelta(hours=450)].to_parquet(tmp_path / "data.parquet")
    outs = []
    for device in ("cuda", "cpu"):
        d = tmp_path / device
        d.mkdir()
        shutil.copytree(tmp_path / "state", d / "state")
        c = _write_config(d, tmp_path / "data.parquet", serve=f'device = "{device}"')
        outs.append(run_once(load_config(c), START + pd.Timedelta(hours=450), keep_outputs=True).outputs)
    (fg, ag), (fc, ac) = map(_key_sorted, outs)
    assert len(fg) == len(fc) > 0 and len(ag) == len(ac) > 0
    pd.testing.assert_frame_equal(fg, fc, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("cell,hidden,layers,horizon,lookback,rows", [
    ("gru", 64, 1, 24, 168, 1000),   # the default model; rows not a multiple of a program's
    ("lstm", 64, 1, 24, 168, 333),
    ("rnn", 64, 1, 24, 168, 65),
    ("gru", 20, 2, 200, 5, 33),      # a hidden size and horizon no power of two; horizon over one block
    ("lstm", 33, 2, 7, 0, 130),      # no window
    ("gru", 128, 1, 96, 336, 200),   # wide tiles: fewer rows a program
    ("lstm", 128, 1, 24, 24, 100),
    ("rnn", 8, 3, 1, 1, 1),          # one series
    ("gru", 256, 1, 24, 24, 50),     # wider than the kernel takes: torch's ops serve
])
def test_the_fused_cuda_tick_gives_torchs_numbers(monkeypatch, cell, hidden, layers, horizon, lookback, rows):
    from forecastd import cuda_tick

    mc = ModelConfig(cell=cell, hidden_size=hidden, num_layers=layers, horizon=horizon, lookback=lookback)
    torch.manual_seed(0)
    model = Forecaster(12, mc).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # not the zero head of a fresh model: every output must depend on its inputs
        model.head.bias[horizon:] = torch.linspace(-25, 25, horizon)  # the softplus from 1e-11 to past its threshold
    model.cuda()
    x = torch.randn(rows, 1, 12, device="cuda")
    state = model.initial_state(rows)
    rnn = tuple(torch.randn_like(t) for t in state.rnn) if cell == "lstm" else torch.randn_like(state.rnn)
    state = State(rnn, torch.randn(rows, model.lookback, device="cuda"))
    calls = []
    monkeypatch.setattr(cuda_tick, "tick", lambda *a: calls.append(1) or _fused_tick(*a))

    want = [t.detach() for t in _flat(model(x, state))]  # autograd recording: torch's ops serve
    assert not calls
    with torch.no_grad():
        got = _flat(model(x, state))
    assert calls == ([1] if hidden <= cuda_tick.MAX_WIDTH else [])
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * float(w.abs().max()) if w.numel() else 0.0)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=0)  # each scale to its own size, however small


def test_the_fused_cuda_tick_reads_a_strided_input_and_leaves_wide_inputs_to_torch(monkeypatch):
    from forecastd import cuda_tick

    mc = ModelConfig(hidden_size=16, horizon=4, lookback=8)
    model = Forecaster(12, mc).eval().cuda()
    history = torch.randn(50, 7, 12, device="cuda")
    state = State(torch.randn(1, 50, 16, device="cuda"), torch.randn(50, 8, device="cuda"))
    with torch.no_grad():
        got = _flat(model(history[:, 3:4], state))  # rows 84 floats apart
        want = _flat(model(history[:, 3:4].contiguous(), state))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    with torch.no_grad():
        assert cuda_tick.usable(torch.zeros(5, cuda_tick.MAX_WIDTH, device="cuda"), state.window, 16, 4)
        assert not cuda_tick.usable(torch.zeros(5, cuda_tick.MAX_WIDTH + 1, device="cuda"), state.window, 16, 4)
        assert not cuda_tick.usable(history[:, 3], state.window, cuda_tick.MAX_WIDTH + 1, 4)
    assert not cuda_tick.usable(history[:, 3], state.window, 16, 4)  # autograd records


def _flat(out):
    mean, scale, state = out
    return [mean, scale, *(state.rnn if isinstance(state.rnn, tuple) else (state.rnn,)), state.window]
