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

Inference has two shortcuts besides `nn.GRU`/`nn.LSTM` (same arithmetic, so the same numbers to float32
round-off; `test_models` holds them to the general path):
- a tick (one step, any number of series) runs the cell's few matmuls and gates directly: the sequence
  machinery, the convolution over the window and the gather cost more than the step itself;
- a few long rows (a backfill or rolling evaluation of one series) run the recurrence in a compiled loop,
  where torch would dispatch a dozen small ops per step.

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
# Rows up to which the compiled loop beats torch's kernels (measured: 3.8x faster for 1 row, even at 8):
# the loop's cost grows with rows x steps (scalar exp), torch's mostly with steps (a dozen ops each).
_LOOP_MAX_ROWS = 8


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
        # Start as persistence with a unit spread: mean change 0, scale softplus(0.5413) = 1.
        self._cache: dict[str, tuple] = {}  # see _derived
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
        if T == 1 and not self.training:
            return self._tick(x[:, 0], state)
        if self._loop_fits(x):
            out, hidden = self._loop(x, state.rnn, lengths)
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
        scale = F.softplus(raw) + 1e-3
        return mean * self.unit, scale * self.unit, State(hidden, window)

    def _kernel(self) -> torch.Tensor:
        """The path weights over changes: column q multiplies the change W-1-q steps back. [K, W]"""
        return self._derived("kernel", lambda p: -p.flip(-1).cumsum(-1), self.path)

    def _derived(self, name: str, fn, *weights: torch.Tensor):
        """fn(*weights), kept between inference calls until one of the weights changes (`_version` counts
        in-place updates: an optimiser step, a load). A tick for one series would otherwise spend a
        good part of its model time rebuilding these few small tensors."""
        if torch.is_grad_enabled():
            return fn(*weights)
        key = tuple((w.data_ptr(), w._version) for w in weights)
        hit = self._cache.get(name)
        if hit is None or hit[0] != key:
            hit = self._cache[name] = (key, fn(*weights))
        return hit[1]

    def _tick(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, torch.Tensor, State]:
        """forward for one step, x [B, F]: torch's cell formulas (aten RNN.cpp) without its sequence
        machinery, and the window's convolution reduced to its one new position.

        Laid out for a memory-bound step (B = 10,000: 2.6 MB per [B, H] tensor): every gate group has
        its own matmul so each elementwise op runs over a contiguous tensor (tanh over a column slice
        is 4x slower), and the biases ride in the input matmul as a column of ones instead of being
        broadcast into each output first. The update is a lerp (one pass, not three).
        """
        H, lstm = self.rnn.hidden_size, self.cell == "lstm"
        hs, cs = [], []
        inp = x
        for layer, weights in enumerate(self.rnn.all_weights):
            w = self._derived(f"cell{layer}", self._cell_weights, *weights)
            xa = F.pad(inp, (0, 1), value=1.0)  # B, F + 1
            if self.cell == "gru":  # reset and update gates; the reset gate scales the hidden part of "new"
                w_rz, u_rz, w_n, u_n, b_n = w
                h = state.rnn[layer]  # B, H
                rz = torch.mm(xa, w_rz).addmm_(h, u_rz).sigmoid_()  # B, 2H
                new = torch.mm(xa, w_n).addcmul_(torch.addmm(b_n, h, u_n), rz[:, :H]).tanh_()  # B, H
                h = torch.lerp(new, h, rz[:, H:])  # new + update * (h - new)
            elif lstm:
                w_ifo, u_ifo, w_g, u_g = w
                h, c = state.rnn[0][layer], state.rnn[1][layer]
                ifo = torch.mm(xa, w_ifo).addmm_(h, u_ifo).sigmoid_()  # B, 3H: in, forget, out
                c = torch.addcmul(ifo[:, H : 2 * H] * c, ifo[:, :H], torch.mm(xa, w_g).addmm_(h, u_g).tanh_())
                h = ifo[:, 2 * H :] * c.tanh()
                cs.append(c)
            else:
                h = torch.mm(xa, w[0]).addmm_(state.rnn[layer], w[1]).tanh_()
            hs.append(h)
            inp = h
        hidden = hs[0][None] if len(hs) == 1 else torch.stack(hs)  # L, B, H
        if lstm:
            hidden = (hidden, cs[0][None] if len(cs) == 1 else torch.stack(cs))
        path = () if self.path is None else (self.path,)
        w_mean, b_mean, w_raw, b_raw, kernel = self._derived(
            "head", self._head_weights, self.head.weight, self.head.bias, *path)
        mean = torch.addmm(b_mean, inp, w_mean)  # B, K
        window = state.window
        if kernel is not None:
            window = torch.cat([state.window[:, 1:].to(x.dtype), x[:, :1]], dim=1)  # B, W
            mean.addmm_(window, kernel)  # the convolution's last position
        scale = F.softplus(torch.addmm(b_raw, inp, w_raw)).add_(1e-3).mul_(self.unit)
        return mean.mul_(self.unit)[:, None], scale[:, None], State(hidden, window)

    def _cell_weights(self, w_ih, w_hh, b_ih, b_hh) -> tuple[torch.Tensor, ...]:
        """Per gate group: input weights with the summed biases as a last column, and hidden weights,
        transposed for x @ w. GRU: (reset+update, then new; the new gate's hidden bias stays apart,
        as the reset gate scales it); LSTM: (in+forget+out, then cell); Elman: one group."""
        H = self.rnn.hidden_size
        both = b_ih + b_hh
        if self.cell == "gru":
            rz, n = slice(0, 2 * H), slice(2 * H, 3 * H)
            return (torch.cat([w_ih[rz], both[rz, None]], 1).t().contiguous(), w_hh[rz].t().contiguous(),
                    torch.cat([w_ih[n], b_ih[n, None]], 1).t().contiguous(), w_hh[n].t().contiguous(), b_hh[n])
        if self.cell == "lstm":
            ifo = torch.cat([torch.arange(2 * H), torch.arange(3 * H, 4 * H)])
            g = slice(2 * H, 3 * H)
            return (torch.cat([w_ih[ifo], both[ifo, None]], 1).t().contiguous(), w_hh[ifo].t().contiguous(),
                    torch.cat([w_ih[g], both[g, None]], 1).t().contiguous(), w_hh[g].t().contiguous())
        return torch.cat([w_ih, both[:, None]], 1).t().contiguous(), w_hh.t().contiguous()

    def _head_weights(self, weight, bias, path=None) -> tuple[torch.Tensor, ...]:
        """Mean and raw-scale halves of the head, transposed, and the path kernel transposed [W, K]."""
        K = self.horizon
        kernel = None if path is None else (-path.flip(-1).cumsum(-1)).t().contiguous()
        return weight[:K].t().contiguous(), bias[:K], weight[K:].t().contiguous(), bias[K:], kernel

    def _loop_fits(self, x: torch.Tensor) -> bool:
        """The compiled loop serves inference on the CPU in float32 for a few rows."""
        return (x.shape[0] <= _LOOP_MAX_ROWS and x.device.type == "cpu" and x.dtype == torch.float32
                and not self.training and not torch.is_grad_enabled())

    def _loop(self, x: torch.Tensor, hidden: Hidden, lengths: torch.Tensor | None) -> tuple[torch.Tensor, Hidden]:
        """nn.RNN/GRU/LSTM's outputs [B, T, H] (zeros past each row's length) and last state, layer by
        layer as torch runs them: one matmul projects every step's input, the compiled loop recurs."""
        B, T, _ = x.shape
        lengths = torch.full((B,), T) if lengths is None else lengths
        lens = lengths.numpy().astype(np.int64)
        lstm = self.cell == "lstm"
        # Copies, updated in place by the loop: the caller's state is left as it was.
        h_all, c_all = (hidden if lstm else (hidden, None))
        h_all = h_all.clone(memory_format=torch.contiguous_format)  # L, B, H
        c_all = c_all.clone(memory_format=torch.contiguous_format) if lstm else None
        out = x
        for layer, (w_ih, w_hh, b_ih, b_hh) in enumerate(self.rnn.all_weights):
            gi = F.linear(out, w_ih, b_ih).contiguous()  # B, T, G*H
            out = torch.zeros(B, T, self.rnn.hidden_size)
            h = h_all[layer]
            c = c_all[layer] if lstm else h  # the GRU and Elman cells never read c
            _recur(gi.numpy(), w_hh.detach().t().contiguous().numpy(), b_hh.detach().numpy(), lens,
                   h.numpy(), c.numpy(), out.numpy(), _CELL_CODE[self.cell])
        return out, ((h_all, c_all) if lstm else h_all)


@njit(cache=True, nogil=True)
def _recur(gi, w_t, b, lengths, h, c, out, cell):  # pragma: no cover - compiled
    """The recurrence of one layer, row by row: gi [B, T, G*H] input projections (with their bias),
    w_t [H, G*H] the hidden weights transposed, b [G*H]; h, c [B, H] updated in place; out [B, T, H].

    Gate order and formulas as torch's cells. The matrix-vector product accumulates along rows of w_t
    so the inner loop runs over independent outputs and vectorises; gates are computed in float64.
    Sums run in another order than a BLAS's and exp/tanh are libm's: round-off differences only.
    """
    B, T, G = gi.shape
    H = h.shape[1]
    g = np.empty(G, dtype=np.float32)
    for r in range(B):
        for t in range(lengths[r]):
            g[:] = b
            for j in range(H):
                hj = h[r, j]
                for i in range(G):
                    g[i] += w_t[j, i] * hj
            for i in range(H):
                if cell == 0:  # GRU: reset, update, new; the reset gate scales the hidden part of "new"
                    reset = _sigmoid(np.float32(g[i] + gi[r, t, i]))
                    update = _sigmoid(np.float32(g[H + i] + gi[r, t, H + i]))
                    new = _tanh(gi[r, t, 2 * H + i] + g[2 * H + i] * reset)
                    h[r, i] = new + update * (h[r, i] - new)
                elif cell == 1:  # LSTM: in, forget, cell, out
                    ig = _sigmoid(np.float32(g[i] + gi[r, t, i]))
                    fg = _sigmoid(np.float32(g[H + i] + gi[r, t, H + i]))
                    cg = _tanh(np.float32(g[2 * H + i] + gi[r, t, 2 * H + i]))
                    og = _sigmoid(np.float32(g[3 * H + i] + gi[r, t, 3 * H + i]))
                    c[r, i] = fg * c[r, i] + ig * cg
                    h[r, i] = og * _tanh(c[r, i])
                else:
                    h[r, i] = _tanh(np.float32(g[i] + gi[r, t, i]))
            for i in range(H):
                out[r, t, i] = h[r, i]


@njit(cache=True, inline="always")
def _sigmoid(x):  # pragma: no cover - compiled
    return 1.0 / (1.0 + math.exp(-np.float64(x)))


@njit(cache=True, inline="always")
def _tanh(x):  # pragma: no cover - compiled
    """tanh through exp, 3x faster than libm's tanh here and within float32 round-off of torch's."""
    x = np.float64(x)
    if abs(x) < 1e-3:  # where 1 - 2 / (e^2x + 1) would lose relative precision
        return x * (1.0 - x * x / 3.0)
    return 1.0 - 2.0 / (math.exp(2.0 * x) + 1.0)


def pack_hidden(hidden: Hidden) -> torch.Tensor:
    """One tensor for storage: [L, B, H] or, for LSTM, [2L, B, H] (h then c)."""
    return torch.cat(hidden, dim=0) if isinstance(hidden, tuple) else hidden


def unpack_hidden(tensor: torch.Tensor, cell: str) -> Hidden:
    if cell == "lstm":
        h, c = tensor.chunk(2, dim=0)
        return (h.contiguous(), c.contiguous())
    return tensor
