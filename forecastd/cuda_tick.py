"""The one-step tick on CUDA as fused kernels (Triton): one per layer for the cell, one for the head.

torch's ops for a step (`Forecaster._tick`) launch some fifteen kernels, each reading and writing whole
[B, H] or [B, W] tensors: at 100,000 series (GRU 64, lookback 168) a step took 0.55 ms on an H100, a
sixth of it shifting the window and half in matrix products on skinny shapes. Fused, every input is read
once and every output written once (about 0.2 GB a step), the small weight matrices stay in cache, and
the step takes 0.21 ms. For a few series the two launches cost less on the CPU than torch's fifteen.

The arithmetic is `_tick`'s: the same rearranged weights (`Forecaster._tick_weights`, biases as the input
matrices' last row, the tanh groups doubled for tanh(t / 2) = 2 sigmoid(t) - 1) and float32-accurate
products (`_DOT`), so a CUDA tick gives torch's numbers to 2e-6 and the CPU's to float32 round-off
(`tests/test_gpu.py`). Inference only: no backward, so `usable` turns it down when autograd records.
"""

from __future__ import annotations

import torch

try:  # shipped with torch's CUDA builds; absent from its CPU builds, where this module is never used
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

__all__ = ["usable", "tick"]

_CELL_CODE = {"gru": 0, "lstm": 1, "rnn": 2}
_WARPS = 4
# float32 accuracy from three TF32 products on the tensor cores (1e-6 of torch's float32, where plain
# TF32 is 1e-3 off). Triton's "ieee" float32 products run on the plain cores and spill registers: at
# 100,000 series a step took 0.52-5.4 ms with them against 0.21 ms (H100).
_DOT = "tf32x3"


def _rows(tile: int) -> int:
    """Series per program: 64, fewer where a program's output tiles are wider than 64 columns (a large
    hidden size, a long horizon), so its accumulators stay in registers. H100, hidden 64: 64 rows gave
    483 M series-steps/s at 100,000 series against 427 M for 32 and 291 M for 128; a horizon of 96 (two
    64-wide blocks) 286 M with 32 rows against 220 M with 64."""
    return max(16, min(64, 4096 // tile))


# Widest input or hidden state the cell kernel takes: its products stage the [F, H] and [H, H] weights
# in shared memory, and at 256 (256 KB) they exceed an H100's 227 KB. Wider models keep torch's ops.
MAX_WIDTH = 128


def usable(x: torch.Tensor, window: torch.Tensor, hidden: int, horizon: int) -> bool:
    """Whether the fused tick serves this step: CUDA, float32, Triton present, nothing for autograd,
    features and hidden size the kernel takes, and every [B, width] tensor `tick` hands the kernels
    (x, made contiguous there, included) addressable in 32 bits."""
    B, F = x.shape
    return (triton is not None and x.is_cuda and not torch.is_grad_enabled() and x.dtype == window.dtype
            == torch.float32 and 0 < B and max(F, hidden) <= MAX_WIDTH
            and B * max(F, window.shape[1], hidden, horizon) < 2**31)


def _pow2(n: int) -> int:
    """Block width for n columns: a power of two, at least 16 (tl.dot's smallest)."""
    return max(16, triton.next_power_of_2(n))


def tick(cell: str, cells, head, unit: torch.Tensor, x: torch.Tensor, rnn, window: torch.Tensor):
    """`Forecaster._tick` fused: x [B, F], rnn [L, B, H] (LSTM a pair), window [B, W], the weights as
    `_tick_weights` gives them. Returns mean [B, K], scale [B, K], the new rnn state and window."""
    B, F = x.shape
    lstm = cell == "lstm"
    if x.stride() != (F, 1):  # rows F apart, as `usable` bounded the offsets: a strided view's may not be
        x = x.contiguous()
    h_old = (rnn[0] if lstm else rnn).contiguous()
    c_old = rnn[1].contiguous() if lstm else h_old  # GRU and Elman cells never read c
    window = window.contiguous()
    L, _, H = h_old.shape
    h_new = torch.empty_like(h_old)
    c_new = torch.empty_like(c_old) if lstm else h_new
    rows = _rows(_pow2(H))
    grid = (triton.cdiv(B, rows),)
    inp, in_stride, width = x, x.stride(0), F
    for layer, w in enumerate(cells):
        # The kernel takes two gate groups and the GRU's hidden bias of "new"; a cell without one of them
        # passes any tensor in its place, which the kernel never reads.
        unread = w[0]
        if cell == "gru":
            w_a, u_a, w_b, u_b, b_n = w
        elif lstm:
            w_a, u_a, w_b, u_b = w
            b_n = unread
        else:
            w_a, u_a = w
            w_b = u_b = b_n = unread
        _cell[grid](
            inp, in_stride, h_old[layer], c_old[layer], h_new[layer], c_new[layer], w_a, u_a, w_b, u_b, b_n, B,
            FIN=width, H=H, FP=_pow2(width), HP=_pow2(H), CELL=_CELL_CODE[cell], ROWS=rows,
            DOT=_DOT, num_warps=_WARPS,
        )
        inp, in_stride, width = h_new[layer], H, H
    w_mean, b_mean, w_raw, b_raw, kernel = head
    K, W = b_mean.shape[0], window.shape[1]
    mean = x.new_empty((B, K))
    scale = x.new_empty((B, K))
    new_window = x.new_empty((B, W))
    BK = min(_pow2(K), 64)
    rows = _rows(2 * BK)
    _head[(triton.cdiv(B, rows), triton.cdiv(K, BK))](
        inp, x, x.stride(0), window, new_window, w_mean, b_mean, w_raw, b_raw,
        kernel if kernel is not None else w_mean, unit, mean, scale, B,
        H=H, K=K, W=W, HP=_pow2(H), BK=BK, BW=32, ROWS=rows, DOT=_DOT, num_warps=_WARPS,
    )
    return mean, scale, ((h_new, c_new) if lstm else h_new), new_window


if triton is not None:

    @triton.jit
    def _sigmoid(t):
        return 1.0 / (1.0 + tl.exp(-t))

    @triton.jit
    def _group(xa, h, w_ptr, u_ptr, col, N, FIN: tl.constexpr, H: tl.constexpr, FP: tl.constexpr,
               HP: tl.constexpr, DOT: tl.constexpr):
        """xa @ w[:FIN, col:col+H] + w[FIN, col:col+H] (the bias row) + h @ u[:, col:col+H]."""
        f = tl.arange(0, FP)
        j = tl.arange(0, HP)
        k = tl.arange(0, HP)
        cols = col + j
        w = tl.load(w_ptr + f[:, None] * N + cols[None, :], mask=(f[:, None] < FIN) & (j[None, :] < H), other=0.0)
        u = tl.load(u_ptr + k[:, None] * N + cols[None, :], mask=(k[:, None] < H) & (j[None, :] < H), other=0.0)
        bias = tl.load(w_ptr + FIN * N + cols, mask=j < H, other=0.0)
        acc = tl.dot(xa, w, input_precision=DOT) + bias[None, :]
        return tl.dot(h, u, acc, input_precision=DOT)

    @triton.jit
    def _cell(inp_ptr, in_stride, h_ptr, c_ptr, h_out, c_out, wa_ptr, ua_ptr, wb_ptr, ub_ptr, bn_ptr, B,
              FIN: tl.constexpr, H: tl.constexpr, FP: tl.constexpr, HP: tl.constexpr, CELL: tl.constexpr,
              ROWS: tl.constexpr, DOT: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        f = tl.arange(0, FP)
        j = tl.arange(0, HP)
        live = rows[:, None] < B
        xa = tl.load(inp_ptr + rows[:, None] * in_stride + f[None, :], mask=live & (f[None, :] < FIN), other=0.0)
        at = rows[:, None] * H + j[None, :]
        keep = live & (j[None, :] < H)
        h = tl.load(h_ptr + at, mask=keep, other=0.0)
        if CELL == 0:  # GRU: reset, update, then new = tanh(x W + b + reset * (h U + b_hn))
            r = _sigmoid(_group(xa, h, wa_ptr, ua_ptr, 0, 2 * H, FIN, H, FP, HP, DOT))
            z = _sigmoid(_group(xa, h, wa_ptr, ua_ptr, H, 2 * H, FIN, H, FP, HP, DOT))
            k = tl.arange(0, HP)
            w = tl.load(wb_ptr + f[:, None] * H + j[None, :], mask=(f[:, None] < FIN) & (j[None, :] < H), other=0.0)
            u = tl.load(ub_ptr + k[:, None] * H + j[None, :], mask=(k[:, None] < H) & (j[None, :] < H), other=0.0)
            b_in = tl.load(wb_ptr + FIN * H + j, mask=j < H, other=0.0)
            b_hn = tl.load(bn_ptr + j, mask=j < H, other=0.0)
            hn = tl.dot(h, u, input_precision=DOT) + b_hn[None, :]
            xn = tl.dot(xa, w, input_precision=DOT) + b_in[None, :]
            new = 2.0 * _sigmoid(xn + r * hn) - 1.0
            tl.store(h_out + at, new + z * (h - new), mask=keep)
        elif CELL == 1:  # LSTM: in, forget, out, then the cell candidate (doubled for the tanh)
            c = tl.load(c_ptr + at, mask=keep, other=0.0)
            i = _sigmoid(_group(xa, h, wa_ptr, ua_ptr, 0, 3 * H, FIN, H, FP, HP, DOT))
            fg = _sigmoid(_group(xa, h, wa_ptr, ua_ptr, H, 3 * H, FIN, H, FP, HP, DOT))
            o = _sigmoid(_group(xa, h, wa_ptr, ua_ptr, 2 * H, 3 * H, FIN, H, FP, HP, DOT))
            g = 2.0 * _sigmoid(_group(xa, h, wb_ptr, ub_ptr, 0, H, FIN, H, FP, HP, DOT)) - 1.0
            c = fg * c + i * g
            tl.store(c_out + at, c, mask=keep)
            tl.store(h_out + at, o * (2.0 * _sigmoid(2.0 * c) - 1.0), mask=keep)
        else:  # Elman: tanh(x W + b + h U), doubled
            t = _group(xa, h, wa_ptr, ua_ptr, 0, H, FIN, H, FP, HP, DOT)
            tl.store(h_out + at, 2.0 * _sigmoid(t) - 1.0, mask=keep)

    @triton.jit
    def _head(h_ptr, x_ptr, x_stride, win_ptr, win_out, wm_ptr, bm_ptr, wr_ptr, br_ptr, kern_ptr, unit_ptr,
              mean_ptr, scale_ptr, B, H: tl.constexpr, K: tl.constexpr, W: tl.constexpr, HP: tl.constexpr,
              BK: tl.constexpr, BW: tl.constexpr, ROWS: tl.constexpr, DOT: tl.constexpr):
        """mean and scale for one block of rows and steps ahead; the first block of steps also writes the
        window shifted by one with the new change (x's feature 0) at its end."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        steps = tl.program_id(1) * BK + tl.arange(0, BK)
        live = rows[:, None] < B
        ahead = steps < K
        j = tl.arange(0, HP)
        h = tl.load(h_ptr + rows[:, None] * H + j[None, :], mask=live & (j[None, :] < H), other=0.0)
        wmask = (j[:, None] < H) & ahead[None, :]
        w_mean = tl.load(wm_ptr + j[:, None] * K + steps[None, :], mask=wmask, other=0.0)
        w_raw = tl.load(wr_ptr + j[:, None] * K + steps[None, :], mask=wmask, other=0.0)
        mean = tl.dot(h, w_mean, input_precision=DOT) + tl.load(bm_ptr + steps, mask=ahead, other=0.0)[None, :]
        raw = tl.dot(h, w_raw, input_precision=DOT) + tl.load(br_ptr + steps, mask=ahead, other=0.0)[None, :]
        if W > 0:
            change = tl.load(x_ptr + rows * x_stride, mask=rows < B, other=0.0)
            first = tl.program_id(1) == 0
            for w0 in range(0, W, BW):
                cols = w0 + tl.arange(0, BW)
                inside = live & (cols[None, :] < W)
                shifted = tl.load(win_ptr + rows[:, None] * W + cols[None, :] + 1,
                                  mask=live & (cols[None, :] < W - 1), other=0.0)
                shifted = tl.where(cols[None, :] == W - 1, change[:, None], shifted)
                if first:
                    tl.store(win_out + rows[:, None] * W + cols[None, :], shifted, mask=inside)
                kern = tl.load(kern_ptr + cols[:, None] * K + steps[None, :],
                               mask=(cols[:, None] < W) & ahead[None, :], other=0.0)
                mean = tl.dot(shifted, kern, mean, input_precision=DOT)
        unit = tl.load(unit_ptr + steps, mask=ahead, other=1.0)[None, :]
        # softplus as torch has it (threshold 20): max(raw, 0) + log1p(e), e = exp(-|raw|) in (0, 1].
        # log(1 + e) would lose most of a small e to the rounding of 1 + e (5.6e-5 of the scale at raw
        # near -10); log1p(e) = 2 atanh(u), u = e / (2 + e) <= 1/3, whose series to u^19 is exact in float32
        # (the CPU heads' `models._softplus` ends the same way, in float64 to u^25).
        e = tl.exp(-tl.abs(raw))
        u = e / (2.0 + e)
        u2 = u * u
        series = 1.0 / 19.0
        for d in tl.static_range(17, 0, -2):
            series = series * u2 + 1.0 / d
        soft = tl.where(raw > 20.0, raw, tl.maximum(raw, 0.0) + 2.0 * u * series)
        out = rows[:, None] * K + steps[None, :]
        keep = live & ahead[None, :]
        tl.store(mean_ptr + out, mean * unit, mask=keep)
        tl.store(scale_ptr + out, (soft + 1e-3) * unit, mask=keep)
