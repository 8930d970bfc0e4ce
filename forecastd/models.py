"""The recurrent forecaster. No I/O: the hidden state goes in and out of `forward`, never kept on the module.

At every step the head emits the whole horizon at once ("forking sequences", MQ-RNN, Wen et al. 2017),
so one pass over a sequence trains every forecast origin in it. Outputs are a Gaussian per step ahead:
the mean and scale of the change from the last observed value, in units of the series' scale. The head
predicts in units of sqrt(k) for step k (a random walk's spread), which keeps every output near 1 and
lets one linear layer serve short and long horizons alike.

Beside the recurrent state the model carries a window of the last W scaled changes (`lookback`), and a
linear map from that recent path (each past position relative to the last value, as NLinear reads its
lookback) adds to the mean. A GRU of 64 units remembers the gist of the past, not yesterday's exact
shape; the window gives the head the shape of the last day or week directly, which is what seasonal and
long-horizon forecasts need. It is carried, not re-read: a tick shifts it by one point.

Inference has two shortcuts besides `nn.GRU`/`nn.LSTM` (the same formulas, so the same numbers to float32
round-off; `test_models` holds them to the general path):
- a tick (one step, any number of series) runs the cell's few matmuls and gates directly: the sequence
  machinery, the convolution over the window and the gather cost more than the step itself; on CUDA
  as two fused kernels (`cuda_tick`; `test_gpu` holds them to these ops);
- a few long rows (a backfill or rolling evaluation of one series) run the recurrence in a compiled loop,
  where torch would dispatch a dozen small ops per step; its tanh is a rational fit, as close to exact
  as torch's own, because libm's exp kept the loop scalar. A tick of up to a few hundred rows runs on
  the stream state's numpy arrays (`tick_arrays`), no tensor made at all: that loop and a compiled head
  for a few rows, numpy's BLAS and the same gates for more.

Letters in shape comments: B series, T steps, F features, H hidden, K horizon, L layers.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from numba import njit
from torch import nn
from torch.nn import functional as F

from forecastd.config import ModelConfig
from forecastd.windowing import resolve_lookback

__all__ = ["Forecaster", "Hidden", "State", "detach_state", "pack_hidden", "unpack_hidden"]

# GRU/RNN: one tensor [L, B, H]; LSTM: a pair (h, c).
Hidden = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class State(NamedTuple):
    """What the model carries from one call to the next."""

    rnn: Hidden
    window: torch.Tensor  # B, W: the last W scaled changes, oldest first (zeros before a series starts)


def detach_state(state: State) -> State:
    """Cut the graph at a chunk boundary; the values carry on."""
    rnn = tuple(h.detach() for h in state.rnn) if isinstance(state.rnn, tuple) else state.rnn.detach()
    return State(rnn, state.window.detach())

_CELLS = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}
_CELL_CODE = {"gru": 0, "lstm": 1, "rnn": 2}  # for the compiled loop
# Rows up to which the compiled loops serve a block of steps: they beat torch's kernels by 2-4x for one
# row and still by 2x at 16 (2 cores, H = 24 and 96); their cost grows with rows x steps, torch's mostly
# with steps (a dozen ops each, some microseconds apiece), and from about 64 rows torch is faster.
_LOOP_MAX_ROWS = 16
# A tick runs on numpy arrays (`tick_arrays`) up to _TICK_MAX_ROWS rows: row by row in the loops up to
# _TICK_LOOP_ROWS, past them with numpy's BLAS and compiled gates (`_tick_many`, from 8 rows as fast as
# the loops, 1.7x faster than torch's `_tick` at 100); beyond, torch's, whose elementwise ops use both
# cores (a whole update of 400 rows costs the same either way, 2 cores, H = 24 and 96).
_TICK_LOOP_ROWS = 8
_TICK_MAX_ROWS = 256


class Forecaster(nn.Module):
    def __init__(self, n_features: int, config: ModelConfig) -> None:
        super().__init__()
        self.cell = config.cell
        self.horizon = config.horizon
        self.lookback = resolve_lookback(config.lookback)  # pipeline.train resolves "auto" for the data's grid
        self.rnn = _CELLS[config.cell](
            n_features,
            config.hidden_size,
            config.num_layers,
            batch_first=True,
            # torch applies dropout between stacked layers only; one layer would warn and ignore it.
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, 2 * config.horizon)
        self.register_buffer(
            "unit", torch.sqrt(torch.arange(1, config.horizon + 1, dtype=torch.float32)), persistent=False
        )
        # Weights on the recent path: path[k, j-1] multiplies (value j steps ago - last value) / scale.
        self.path = nn.Parameter(torch.zeros(config.horizon, self.lookback)) if self.lookback else None
        self._cache: dict[str, tuple] = {}  # rearranged weights for inference; see _derived
        # Start as persistence with a unit spread: mean change 0, scale softplus(0.5413) = 1.
        nn.init.zeros_(self.head.weight)
        with torch.no_grad():
            self.head.bias[: config.horizon] = 0.0
            self.head.bias[config.horizon :] = math.log(math.e - 1)

    def initial_state(self, batch: int) -> State:
        """Zeros on the model's own device and dtype."""
        w = self.head.weight
        h = w.new_zeros(self.rnn.num_layers, batch, self.rnn.hidden_size)  # L, B, H
        return State((h, h.clone()) if self.cell == "lstm" else h, w.new_zeros(batch, self.lookback))

    def forward(
        self, x: torch.Tensor, state: State | None = None, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, State]:
        """x [B, T, F] -> mean [B, T, K], scale [B, T, K], the state after each row's last step.

        Feature 0 of x is the scaled change (windowing.encode). With `lengths` [B] (on the CPU), row b
        ends after lengths[b] steps: its state stops there and its later outputs are padding.
        """
        B, T, _ = x.shape
        state = state or self.initial_state(B)
        if T == 1 and self._compiled_fits(x, _TICK_MAX_ROWS):
            return self._tick_compiled(x, state)
        compiled = self._compiled_fits(x)
        if T == 1 and not self.training:
            return self._tick(x[:, 0], state)
        if compiled:
            lens = np.full(B, T, dtype=np.int64) if lengths is None else lengths.numpy().astype(np.int64)
            out, hidden = self._loop(x.numpy(), state.rnn, lens,
                                     self._derived("compiled", self._compiled_weights, detached=True)[0])
            out = torch.from_numpy(out)
        elif lengths is None:
            out, hidden = self.rnn(x, state.rnn)  # B, T, H
        else:
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            out, hidden = self.rnn(packed, state.rnn)
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T)
        mean, raw = self.head(self.drop(out)).chunk(2, dim=-1)  # B, T, K each
        window = state.window
        if self.path is not None:
            changes = torch.cat([state.window.to(x.dtype), x[:, :, 0]], dim=1)  # B, W + T
            # A position relative to the last value is minus the sum of the changes since, so the
            # path weights become one kernel over the changes, applied to every step as a convolution.
            kernel = self._kernel()  # K, W
            recent = F.conv1d(changes[:, None, :], kernel[:, None, :].to(changes.dtype))  # B, K, T + 1
            mean = mean + recent[:, :, 1:].transpose(1, 2)
            ends = torch.full((B,), T, device=x.device) if lengths is None else lengths.to(x.device)
            idx = ends[:, None] + torch.arange(self.lookback, device=x.device)[None, :]  # B, W
            window = changes.gather(1, idx)
        if not torch.is_grad_enabled():
            # softplus runs element by element over a strided slice, 4x slower than over a copy (for a
            # 10,000-series, 200-step warm-up 2.5 s against 0.7 s of CPU). Training keeps the slice: the
            # same values to an ulp, and its figures stay exactly as they were.
            raw = raw.contiguous()
        scale = F.softplus(raw) + 1e-3
        return mean * self.unit, scale * self.unit, State(hidden, window)

    def _kernel(self) -> torch.Tensor:
        """The path weights over changes: column q multiplies the change W-1-q steps back. [K, W]"""
        return self._derived("kernel", lambda: -self.path.flip(-1).cumsum(-1))

    def _derived(self, name: str, build, detached: bool = False):
        """build(), a rearrangement of the weights, kept between inference calls until a weight changes
        (`_version` counts in-place updates: an optimiser step, a load). A tick for one series would
        otherwise spend a good part of its model time rebuilding these few small tensors. With grad
        enabled it is built afresh, for autograd to follow, unless `detached` (numpy copies, outside any
        graph: kept and built under no_grad, so a tick need not enter no_grad itself, 1.5 us a call)."""
        if not detached and torch.is_grad_enabled():
            return build()
        # Straight from the parameter dicts: parameters() costs 5x more, and nn.RNN.all_weights, which goes
        # through Module.__getattr__ (about 3 us an attribute) for every tensor, was 25 of a one-series
        # tick's 500 us.
        mods = self._modules
        weights = (*mods["rnn"]._parameters.values(), *mods["head"]._parameters.values(), self._parameters.get("path"))
        key = tuple([(w.data_ptr(), w._version) for w in weights if w is not None])
        hit = self._cache.get(name)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                hit = self._cache[name] = (key, build())
        return hit[1]

    def _tick(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, torch.Tensor, State]:
        """forward for one step, x [B, F]: torch's cell formulas (aten RNN.cpp) without its sequence
        machinery, and the window's convolution reduced to its one new position.

        Laid out for a memory-bound step (B = 10,000: 2.6 MB per [B, H] tensor): every gate group has
        its own matmul so each elementwise op runs over a contiguous tensor (tanh over a column slice
        is 4x slower), and the biases ride in the input matmul as a column of ones instead of being
        broadcast into each output first. The update is a lerp: one pass, not three, and equal to torch's
        (h - new) * update + new to round-off. tanh is 2 sigmoid(2x) - 1, with the 2 folded into the
        weights: torch's tanh runs 3x slower than its sigmoid here (1.3 ms against 0.45 ms with the
        correction, 10,000 x 64), and the two agree to 2e-7. On CUDA, outside autograd, the same step runs
        as two fused kernels (`cuda_tick`): 2.6x faster at 100,000 series on an H100.
        """
        H, lstm = self.rnn.hidden_size, self.cell == "lstm"
        cells, head = self._derived("tick", self._tick_weights)
        if x.is_cuda:
            from forecastd import cuda_tick  # here, not at the top: importing Triton costs a CPU user time

            if cuda_tick.usable(x, state.window, H, self.horizon):
                mean, scale, rnn, window = cuda_tick.tick(self.cell, cells, head, self.unit, x, state.rnn, state.window)
                return mean[:, None], scale[:, None], State(rnn, window)
        w_mean, b_mean, w_raw, b_raw, kernel = head
        hs, cs = [], []
        inp = x
        for layer, w in enumerate(cells):
            xa = F.pad(inp, (0, 1), value=1.0)  # B, F + 1
            if self.cell == "gru":  # reset and update gates; the reset gate scales the hidden part of "new"
                w_rz, u_rz, w_n, u_n, b_n = w
                h = state.rnn[layer]  # B, H
                rz = torch.mm(xa, w_rz).addmm_(h, u_rz).sigmoid_()  # B, 2H
                new = _tanh_of_half_(torch.mm(xa, w_n).addcmul_(torch.addmm(b_n, h, u_n), rz[:, :H]))  # B, H
                h = torch.lerp(new, h, rz[:, H:])  # new + update * (h - new)
            elif lstm:
                w_ifo, u_ifo, w_g, u_g = w
                h, c = state.rnn[0][layer], state.rnn[1][layer]
                ifo = torch.mm(xa, w_ifo).addmm_(h, u_ifo).sigmoid_()  # B, 3H: in, forget, out
                c = torch.addcmul(ifo[:, H : 2 * H] * c, ifo[:, :H], _tanh_of_half_(torch.mm(xa, w_g).addmm_(h, u_g)))
                h = ifo[:, 2 * H :] * _tanh_of_half_(c * 2.0)
                cs.append(c)
            else:
                h = _tanh_of_half_(torch.mm(xa, w[0]).addmm_(state.rnn[layer], w[1]))
            hs.append(h)
            inp = h
        hidden = hs[0][None] if len(hs) == 1 else torch.stack(hs)  # L, B, H
        if lstm:
            hidden = (hidden, cs[0][None] if len(cs) == 1 else torch.stack(cs))
        mean = torch.addmm(b_mean, inp, w_mean)  # B, K
        window = state.window
        if kernel is not None:
            window = torch.cat([state.window[:, 1:].to(x.dtype), x[:, :1]], dim=1)  # B, W
            mean.addmm_(window, kernel)  # the convolution's last position
        scale = F.softplus(torch.addmm(b_raw, inp, w_raw)).add_(1e-3).mul_(self.unit)
        return mean.mul_(self.unit)[:, None], scale[:, None], State(hidden, window)

    def _tick_weights(self) -> tuple[list[tuple[torch.Tensor, ...]], tuple[torch.Tensor | None, ...]]:
        """For `_tick`, transposed for x @ w. Per layer and gate group: input weights with the summed
        biases as a last column, and hidden weights. GRU: (reset+update, then new; the new gate's hidden
        bias stays apart, as the reset gate scales it); LSTM: (in+forget+out, then cell); Elman: one.
        The groups that go through tanh (GRU new, LSTM cell, Elman) are doubled for `_tanh_of_half_`.
        Then the head's mean and raw-scale halves and the path kernel [W, K] (None without a window)."""
        H, K = self.rnn.hidden_size, self.horizon
        cells = []
        for w_ih, w_hh, b_ih, b_hh in self.rnn.all_weights:
            both = b_ih + b_hh
            if self.cell == "gru":
                rz, n = slice(0, 2 * H), slice(2 * H, 3 * H)
                cells.append((torch.cat([w_ih[rz], both[rz, None]], 1).t().contiguous(), w_hh[rz].t().contiguous(),
                              torch.cat([w_ih[n], b_ih[n, None]], 1).t().mul(2.0).contiguous(),
                              w_hh[n].t().mul(2.0).contiguous(), b_hh[n] * 2.0))
            elif self.cell == "lstm":
                ifo, g = torch.cat([torch.arange(2 * H), torch.arange(3 * H, 4 * H)]), slice(2 * H, 3 * H)
                cells.append((torch.cat([w_ih[ifo], both[ifo, None]], 1).t().contiguous(), w_hh[ifo].t().contiguous(),
                              torch.cat([w_ih[g], both[g, None]], 1).t().mul(2.0).contiguous(),
                              w_hh[g].t().mul(2.0).contiguous()))
            else:
                cells.append((torch.cat([w_ih, both[:, None]], 1).t().mul(2.0).contiguous(), w_hh.t().mul(2.0).contiguous()))
        w, b = self.head.weight, self.head.bias
        kernel = None if self.path is None else self._kernel().t().contiguous()
        return cells, (w[:K].t().contiguous(), b[:K], w[K:].t().contiguous(), b[K:], kernel)

    def _compiled_fits(self, x: torch.Tensor, rows: int = _LOOP_MAX_ROWS) -> bool:
        """The compiled loops serve inference on the CPU in float32 for a few rows (a tick: `rows`)."""
        return (x.shape[0] <= rows and x.device.type == "cpu" and x.dtype == torch.float32
                and not self.training and not torch.is_grad_enabled())

    def _compiled_weights(self) -> tuple[tuple[tuple[np.ndarray, ...], ...], tuple[np.ndarray, ...], np.ndarray]:
        """For the compiled loops, as numpy: per layer W_ih and W_hh transposed with their biases; the
        head's mean and raw-scale halves transposed, the path kernel [W, K] and the unit (`_head_rows`'
        order); and the whole head transposed [H, 2K], for `_tick_many`'s one matrix product."""
        K = self.horizon
        layers = tuple((w_ih.t().contiguous().numpy(), b_ih.numpy(), w_hh.t().contiguous().numpy(), b_hh.numpy())
                       for w_ih, w_hh, b_ih, b_hh in self.rnn.all_weights)
        w, b = self.head.weight, self.head.bias
        kernel = (np.zeros((0, K), dtype=np.float32) if self.path is None
                  else self._kernel().t().contiguous().numpy())
        return layers, (w[:K].t().contiguous().numpy(), b[:K].numpy(), w[K:].t().contiguous().numpy(),
                        b[K:].numpy(), kernel, self.unit.numpy()), w.t().contiguous().numpy()

    def _loop(self, x: np.ndarray, hidden: Hidden, lengths: np.ndarray, layers) -> tuple[np.ndarray, Hidden]:
        """nn.RNN/GRU/LSTM's outputs [B, T, H] (zeros past each row's length) and last state, layer by
        layer as torch runs them, each layer one call of the compiled loop. x [B, T, F] as numpy;
        layers from `_compiled_weights`."""
        B, T, _ = x.shape
        lstm = self.cell == "lstm"
        # Copies, updated in place by the loop: the caller's state is left as it was.
        h_all = (hidden[0] if lstm else hidden).numpy().copy()  # L, B, H
        c_all = hidden[1].numpy().copy() if lstm else h_all  # GRU and Elman cells never touch c
        out = x
        for layer, (w_ih, b_ih, w_hh, b_hh) in enumerate(layers):
            inp, out = out, np.zeros((B, T, self.rnn.hidden_size), dtype=np.float32)
            _recur(inp, w_ih, b_ih, w_hh, b_hh, lengths, h_all[layer], c_all[layer], out, _CELL_CODE[self.cell])
        h = torch.from_numpy(h_all)
        return out, ((h, torch.from_numpy(c_all)) if lstm else h)

    def compiled_tick(self, rows: int) -> bool:
        """Whether `tick_arrays` serves a step of this many rows: inference on the CPU in float32."""
        w = self._modules["head"]._parameters["weight"]  # not self.head.weight: __getattr__ costs 3 us a name
        return rows <= _TICK_MAX_ROWS and w.device.type == "cpu" and w.dtype == torch.float32 and not self.training

    def tick_arrays(self, x: np.ndarray, hidden: np.ndarray, window: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """`forward` for one step of a few rows (`compiled_tick`) on numpy arrays, as the stream state keeps
        them: x [B, F] float32, hidden [B, L, H] (LSTM [B, 2L, H], h then c), window [B, W]. Returns mean
        and scale [B, K], the hidden state and window after the step, all new arrays. A few rows take one
        compiled call (`_tick_rows`): for one series the torch calls of `_tick`, and even the conversions
        around a compiled call, a few microseconds each, would be most of a tick."""
        layers, head, w_head = self._derived("compiled", self._compiled_weights, detached=True)
        if x.shape[0] <= _TICK_LOOP_ROWS:
            return _tick_rows(x, hidden, window, layers, _CELL_CODE[self.cell], *head)
        h = hidden.transpose(1, 0, 2).copy()  # L (LSTM 2L), B, H: a copy the step updates in place
        c = h[len(layers):] if self.cell == "lstm" else h  # GRU and Elman cells never touch c
        mean, scale, window = self._tick_many(x, h, c, window, layers, head, w_head)
        return mean, scale, np.ascontiguousarray(h.transpose(1, 0, 2)), window

    def compiled_tick_parts(self) -> tuple[tuple, int, tuple]:
        """For a compiled caller that runs `_tick_rows` itself (a tick of a few series in one compiled call
        with the rest of the streaming step): the weights per layer, the cell's code and the head's weights,
        as `_tick_rows` takes them; kept between calls until a weight changes."""
        layers, head, _ = self._derived("compiled", self._compiled_weights, detached=True)
        return layers, _CELL_CODE[self.cell], head

    def _tick_many(self, x: np.ndarray, h: np.ndarray, c: np.ndarray, window: np.ndarray, layers, head,
                   w_head: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`tick_arrays` past the rows the row-by-row loops serve: numpy's BLAS for the matrix products,
        compiled loops for the gates and the head's last stage; h and c [L, B, H] updated in place.
        Torch's `_tick` does the same work in some twenty ops, several microseconds apiece, which at 100
        rows cost more than the arithmetic."""
        B, K, W = x.shape[0], self.horizon, window.shape[1]
        inp = x
        for layer, (w_ih, b_ih, w_hh, b_hh) in enumerate(layers):
            _gates(np.dot(inp, w_ih), np.dot(h[layer], w_hh), b_ih, b_hh, h[layer], c[layer], _CELL_CODE[self.cell])
            inp = h[layer]
        _, b_mean, _, b_raw, kernel, unit = head
        new_window = np.empty((B, W), dtype=np.float32)
        if W:
            new_window[:, :-1] = window[:, 1:]
            new_window[:, -1] = x[:, 0]
            recent = np.dot(new_window, kernel)  # the convolution's last position
        else:
            recent = np.zeros((B, K), dtype=np.float32)
        mean, scale = np.empty((B, K), dtype=np.float32), np.empty((B, K), dtype=np.float32)
        _head_finish(np.dot(inp, w_head), recent, b_mean, b_raw, unit, mean, scale)
        return mean, scale, new_window

    def _tick_compiled(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, torch.Tensor, State]:
        """forward for one step of up to _TICK_MAX_ROWS rows: `tick_arrays` on the tensors' numpy views."""
        hidden = pack_hidden(state.rnn).numpy().transpose(1, 0, 2)
        mean, scale, hidden, window = self.tick_arrays(x[:, 0].numpy(), hidden, state.window.numpy())
        rnn = unpack_hidden(torch.from_numpy(hidden.transpose(1, 0, 2).copy()), self.cell)
        return torch.from_numpy(mean)[:, None], torch.from_numpy(scale)[:, None], State(rnn, torch.from_numpy(window))


def _tanh_of_half_(t: torch.Tensor) -> torch.Tensor:
    """tanh(t / 2) in place, as 2 sigmoid(t) - 1: the caller hands in twice the argument (`Forecaster._tick`)."""
    return t.sigmoid_().mul_(2.0).sub_(1.0)


# numba compiles without fused multiply-adds unless told: each a * b + c of the polynomials and dot products
# below is then a multiply and an add, rounded twice. Fused, they are one instruction and one rounding: the
# softplus over 9,600 values (100 series at H = 96) took 17 us against 26, the gates 14 against 17.
_FMA = {"contract"}


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_FMA)
def _recur(x, w_ih, b_ih, w_hh, b_hh, lengths, h, c, out, cell):  # pragma: no cover - compiled
    """The recurrence of one layer, row by row: x [B, T, F] the layer's input, w_ih [F, G*H] and w_hh
    [H, G*H] the weights transposed, b_ih, b_hh [G*H]; h, c [B, H] updated in place; out [B, T, H].

    Every inner loop runs over independent outputs and vectorises: the matrix-vector products accumulate
    along rows of the weights, and the gates are `_cell`'s (error_model="numpy" drops the division's zero
    check, which alone kept them scalar). Sums run in another order than a BLAS's: round-off differences
    only.
    """
    B, T, F = x.shape
    H = h.shape[1]
    G = b_hh.shape[0]
    gi = np.empty(G, dtype=np.float32)
    g = np.empty(G, dtype=np.float32)
    for r in range(B):
        for t in range(lengths[r]):
            gi[:] = b_ih
            for f in range(F):
                xf = x[r, t, f]
                for i in range(G):
                    gi[i] += w_ih[f, i] * xf
            g[:] = b_hh
            for j in range(H):
                hj = h[r, j]
                for i in range(G):
                    g[i] += w_hh[j, i] * hj
            _cell(gi, g, h[r], c[r], cell)
            for i in range(H):
                out[r, t, i] = h[r, i]


@njit(cache=True, nogil=True, fastmath=_FMA)
def _tick_rows(x, hidden, window, layers, cell, w_mean, b_mean, w_raw, b_raw, kernel, unit):  # pragma: no cover
    """`Forecaster.tick_arrays` for a few rows, row by row: x [B, F] float32, hidden [B, L, H] (LSTM
    [B, 2L, H], h then c), window [B, W]; the weights per layer and the head's as `_compiled_weights` gives
    them. Returns mean and scale [B, K], the hidden state and window after the step, all new arrays.
    Compiled whole, so that the streaming step can call it inside its own compiled pass: for one series
    the calls around a compiled call, a few microseconds each, are most of a tick."""
    B, F = x.shape
    L = len(layers)
    K = w_mean.shape[1]
    h = hidden.transpose((1, 0, 2)).copy()  # L (LSTM 2L), B, H: the loop updates it in place
    c = h[L:] if cell == 1 else h  # GRU and Elman cells never touch c
    ones = np.ones(B, dtype=np.int64)
    inp = np.empty((B, 1, F), dtype=np.float32)
    inp[:, 0] = x
    for layer in range(L):
        w_ih, b_ih, w_hh, b_hh = layers[layer]
        out = np.empty((B, 1, h.shape[2]), dtype=np.float32)
        _recur(inp, w_ih, b_ih, w_hh, b_hh, ones, h[layer], c[layer], out, cell)
        inp = out
    mean, scale = np.empty((B, K), dtype=np.float32), np.empty((B, K), dtype=np.float32)
    new_window = np.empty((B, window.shape[1]), dtype=np.float32)
    _head_rows(inp[:, 0], x[:, 0], window, w_mean, b_mean, w_raw, b_raw, kernel, unit, mean, scale, new_window)
    return mean, scale, np.ascontiguousarray(h.transpose((1, 0, 2))), new_window


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_FMA)
def _gates(gi, gh, b_ih, b_hh, h, c, cell):  # pragma: no cover - compiled
    """One step of every row after its two matrix products, gi = x @ W_ih and gh = h @ W_hh [B, G*H]
    without their biases (added here, in place); h, c [B, H] updated in place."""
    for r in range(h.shape[0]):
        for i in range(b_hh.shape[0]):  # written out: `gi[r] += b_ih` kept the whole loop scalar
            gi[r, i] += b_ih[i]
            gh[r, i] += b_hh[i]
        _cell(gi[r], gh[r], h[r], c[r], cell)


@njit(cache=True, inline="always", error_model="numpy", fastmath=_FMA)
def _cell(gi, g, h, c, cell):  # pragma: no cover - compiled
    """A cell's gates for one row from its input and hidden parts gi and g [G*H], biases included; h and
    c [H] updated in place. Gate order and formulas as torch's cells. The loops run over independent
    outputs and vectorise: the gates go through `_fast_tanh`, a branch-free rational function, where
    libm's exp, one gate at a time, was four fifths of a step."""
    H = h.shape[0]
    half = 0.5
    if cell == 0:  # GRU: reset, update, new; the reset gate scales the hidden part of "new"
        for i in range(H):
            reset = half + half * _fast_tanh(half * (g[i] + gi[i]))
            update = half + half * _fast_tanh(half * (g[H + i] + gi[H + i]))
            new = _fast_tanh(gi[2 * H + i] + g[2 * H + i] * reset)
            h[i] = new + update * (h[i] - new)
    elif cell == 1:  # LSTM: in, forget, cell, out
        for i in range(H):
            ig = half + half * _fast_tanh(half * (g[i] + gi[i]))
            fg = half + half * _fast_tanh(half * (g[H + i] + gi[H + i]))
            cg = _fast_tanh(g[2 * H + i] + gi[2 * H + i])
            og = half + half * _fast_tanh(half * (g[3 * H + i] + gi[3 * H + i]))
            c[i] = fg * c[i] + ig * cg
            h[i] = og * _fast_tanh(c[i])
    else:
        for i in range(H):
            h[i] = _fast_tanh(g[i] + gi[i])


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_FMA)
def _head_rows(h, change, window, w_mean, b_mean, w_raw, b_raw, kernel, unit, mean, scale,
               window_out):  # pragma: no cover - compiled
    """The head after one step: h [B, H], change [B] the step's scaled change, window [B, W] before it;
    weights transposed (kernel [W, K]). Fills mean, scale [B, K] and window_out [B, W]."""
    B, H = h.shape
    W, K = kernel.shape
    mu = np.empty(K, dtype=np.float32)
    raw = np.empty(K, dtype=np.float32)
    for r in range(B):
        if W:
            window_out[r, : W - 1] = window[r, 1:]
            window_out[r, W - 1] = change[r]
        mu[:] = b_mean
        raw[:] = b_raw
        for j in range(H):
            hj = h[r, j]
            for k in range(K):
                mu[k] += w_mean[j, k] * hj
                raw[k] += w_raw[j, k] * hj
        for q in range(W):
            v = window_out[r, q]
            for k in range(K):
                mu[k] += kernel[q, k] * v
        for k in range(K):
            mean[r, k] = mu[k] * unit[k]
            scale[r, k] = _scale(np.float64(raw[k]), unit[k])


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_FMA)
def _head_finish(hw, recent, b_mean, b_raw, unit, mean, scale):  # pragma: no cover - compiled
    """The head's last stage for `Forecaster._tick_many`, from hw = h @ [W_mean | W_raw] [B, 2K] and the
    path's part of the mean, recent [B, K]: mean and scale [B, K] as `_head_rows` fills them."""
    B, K = mean.shape
    for r in range(B):  # the mean and the scale in loops of their own, which vectorise better: 21 us against 26
        for k in range(K):
            mean[r, k] = (hw[r, k] + b_mean[k] + recent[r, k]) * unit[k]
        for k in range(K):
            scale[r, k] = _scale(np.float64(hw[r, K + k] + b_raw[k]), unit[k])


@njit(cache=True, inline="always", error_model="numpy", fastmath=_FMA)
def _scale(raw, unit):  # pragma: no cover - compiled
    """The head's scale of one output from its raw value (float64) and unit, as `forward` computes it in
    float32: softplus(raw) + 1e-3, times the unit; both compiled heads take it from here."""
    return np.float32(np.float32(_softplus(raw)) + np.float32(1e-3)) * unit


@njit(cache=True, inline="always", error_model="numpy", fastmath=_FMA)
def _softplus(x):  # pragma: no cover - compiled
    """F.softplus (threshold 20) in float64 arithmetic, branch-free so a loop of it vectorises, where
    libm's log1p(exp(x)), one element at a time, was half of the head at H = 96. log1p(u), u = exp(-|x|),
    is 2 atanh(s) with s = u / (2 + u) <= 1/3, whose series to s^25 is within 1e-14 (to s^19, 1e-11,
    one value in 22,000 near x = 0 rounded to the next float32); exp(a) is
    exp(a / 64)^64, six squarings after Taylor to a^13, within 1e-13 over [-40, 0] (below -40 the
    softplus is under 5e-18, which the scale's + 1e-3 does not see). Rounded to float32, libm's value
    (`test_models`)."""
    a = -abs(x)
    a = (-40.0 if a < -40.0 else a) * (1.0 / 64.0)
    p = 1.0 / 6227020800.0
    for d in (479001600.0, 39916800.0, 3628800.0, 362880.0, 40320.0, 5040.0, 720.0, 120.0, 24.0, 6.0, 2.0,
              1.0, 1.0):
        p = p * a + 1.0 / d
    for _ in range(6):
        p = p * p
    s = p / (2.0 + p)
    s2 = s * s
    q = 1.0 / 25.0
    for d in (23.0, 21.0, 19.0, 17.0, 15.0, 13.0, 11.0, 9.0, 7.0, 5.0, 3.0, 1.0):
        q = q * s2 + 1.0 / d
    sp = (x if x > 0.0 else 0.0) + 2.0 * s * q
    return x if x > 20.0 else sp


@njit(cache=True, inline="always", fastmath=_FMA)
def _fast_tanh(x):  # pragma: no cover - compiled
    """tanh in float64 arithmetic, branch-free so a loop of it vectorises, within 5e-8 of the exact value
    (torch's float32 tanh: 3e-8): Eigen's rational fit of degree 13/6 (generic_fast_tanh_float) at x / 2,
    then tanh(x) = 2 t / (1 + t^2), which shrinks the fit's error where tanh saturates and needs no
    clamp below |x| = 16 (tanh(16) is 1 to 1e-13). A sigmoid is 0.5 + 0.5 tanh(x / 2)."""
    x = np.float64(x) * 0.5
    c = 7.99881172180175781  # the fit's range
    x = c if x > c else x
    x = -c if x < -c else x
    x2 = x * x
    p = x2 * -2.76076847742355e-16 + 2.00018790482477e-13
    p = p * x2 - 8.60467152213735e-11
    p = p * x2 + 5.12229709037114e-08
    p = p * x2 + 1.48572235717979e-05
    p = p * x2 + 6.37261928875436e-04
    p = p * x2 + 4.89352455891786e-03
    q = x2 * 1.19825839466702e-06 + 1.18534705686654e-04
    q = q * x2 + 2.26843463243900e-03
    q = q * x2 + 4.89352518554385e-03
    # 2 t / (1 + t^2) with t = x p / q, over one division
    return 2.0 * x * p * q / (q * q + x2 * p * p)


def pack_hidden(hidden: Hidden) -> torch.Tensor:
    """One tensor for storage: [L, B, H] or, for LSTM, [2L, B, H] (h then c)."""
    return torch.cat(hidden, dim=0) if isinstance(hidden, tuple) else hidden


def unpack_hidden(tensor: torch.Tensor, cell: str) -> Hidden:
    if cell == "lstm":
        h, c = tensor.chunk(2, dim=0)
        return (h.contiguous(), c.contiguous())
    return tensor
