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

Letters in shape comments: B series, T steps, F features, H hidden, K horizon, L layers.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
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
        if lengths is None:
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
            kernel = -self.path.flip(-1).cumsum(-1)  # K, W; column q multiplies the change W-1-q steps back
            recent = F.conv1d(changes[:, None, :], kernel[:, None, :].to(changes.dtype))  # B, K, T + 1
            mean = mean + recent[:, :, 1:].transpose(1, 2)
            ends = torch.full((B,), T, device=x.device) if lengths is None else lengths.to(x.device)
            idx = ends[:, None] + torch.arange(self.lookback, device=x.device)[None, :]  # B, W
            window = changes.gather(1, idx)
        scale = F.softplus(raw) + 1e-3
        return mean * self.unit, scale * self.unit, State(hidden, window)


def pack_hidden(hidden: Hidden) -> torch.Tensor:
    """One tensor for storage: [L, B, H] or, for LSTM, [2L, B, H] (h then c)."""
    return torch.cat(hidden, dim=0) if isinstance(hidden, tuple) else hidden


def unpack_hidden(tensor: torch.Tensor, cell: str) -> Hidden:
    if cell == "lstm":
        h, c = tensor.chunk(2, dim=0)
        return (h.contiguous(), c.contiguous())
    return tensor
