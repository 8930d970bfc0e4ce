"""The fused CUDA tick's kernels (`forecastd.cuda_tick`) on the CPU, through Triton's interpreter.

CI has no GPU, so `tests/test_gpu.py` never runs there; with `TRITON_INTERPRET=1` Triton runs the same
kernels over CPU tensors (in plain float32: the TF32 products are the GPU's alone), which checks their
indexing, masking and arithmetic against torch's ops of `Forecaster._tick`. In a subprocess: the variable
must be set before the kernels are defined, at the module's import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="Triton is not installed (pip install triton); it runs the fused kernels")

CHECK = r"""
import json, sys, torch
from forecastd.config import ModelConfig
from forecastd.models import Forecaster, State
from forecastd import cuda_tick

out = []
for cell, hidden, layers, horizon, lookback, features, rows in json.loads(sys.argv[1]):
    torch.manual_seed(0)
    model = Forecaster(features, ModelConfig(cell=cell, hidden_size=hidden, num_layers=layers, horizon=horizon,
                                             lookback=lookback)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        model.head.bias[horizon:] = torch.linspace(-25, 25, horizon)
        history = torch.randn(rows, 3, features)
        x = history[:, 1]  # a view: rows 3 features apart
        h = torch.randn(layers, rows, hidden)
        rnn = (h, torch.randn_like(h)) if cell == "lstm" else h
        window = torch.randn(rows, model.lookback)
        cells, head = model._derived("tick", model._tick_weights)
        mean, scale, rnn2, window2 = cuda_tick.tick(cell, cells, head, model.unit, x, rnn, window)
        ref_mean, ref_scale, ref = model._tick(x, State(rnn, window))  # on the CPU: torch's ops
    got = [mean, scale, *(rnn2 if cell == "lstm" else (rnn2,)), window2]
    want = [ref_mean[:, 0], ref_scale[:, 0], *(ref.rnn if cell == "lstm" else (ref.rnn,)), ref.window]
    shapes = all(g.shape == w.shape for g, w in zip(got, want))
    worst = max(float((g - w).abs().max() / w.abs().max()) for g, w in zip(got, want) if w.numel())
    out.append({"case": [cell, hidden, layers, horizon, lookback, features, rows], "shapes": shapes, "worst": worst,
                "scale": float(((scale - ref_scale[:, 0]).abs() / ref_scale[:, 0]).max())})
print(json.dumps(out))
"""

CASES = [
    ["gru", 64, 1, 24, 168, 12, 70],    # the default model; rows past one program's 64
    ["lstm", 64, 1, 24, 168, 12, 65],
    ["rnn", 64, 1, 24, 168, 12, 17],
    ["gru", 20, 2, 200, 5, 9, 33],      # no powers of two; a horizon over several 64-wide blocks
    ["lstm", 33, 2, 7, 0, 20, 40],      # no window; more features than one 16-wide block
    ["gru", 100, 1, 65, 33, 12, 1],     # one series; wide tiles, fewer rows a program
    ["rnn", 8, 3, 1, 1, 1, 16],
]


def test_the_fused_kernels_compute_torchs_tick():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK, json.dumps(CASES)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.splitlines()[-1])
    assert [r["case"] for r in results] == CASES
    for r in results:
        assert r["shapes"], r
        assert r["worst"] < 1e-5, r  # float32 round-off, relative to each output's largest value
        assert r["scale"] < 1e-5, r  # each scale to its own size, down to softplus(-25)
