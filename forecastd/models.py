"""The recurrent forecaster. No I/O: the hidden state goes in and out of `forward`, never kept on the module.

At every step the head emits the whole horizon at once ("forking sequences", MQ-RNN, Wen et al. 2017),
so one pass over a sequence trains every forecast origin in it. Outputs are a Gaussian per step ahead:
the mean and scale of the change from the last observed value, in units of the series' scale. The head
predicts in units of sqrt(k) for step k (a random walk's spread), which keeps every output near 1 and
lets one linear layer serve short and long horizons alike.

Letters in shape comments: B series, T steps, F features, H hidden, K horizon, L layers.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from forecastd.config import ModelConfig

__all__ = ["Forecaster", "Hidden", "pack_hidden", "unpack_hidden"]

# GRU/RNN: one tensor [L, B, H]; LSTM: a pair (h, c).
Hidden = torch.Tensor | tuple[torch.Tensor, torch.Tensor]

_CELLS = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}


class Forecaster(nn.Module):
    def __init__(self, n_features: int, config: ModelConfig) -> None:
        super().__init__()
        self.cell = config.cell
        self.horizon = config.horizon
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
        # Start as persistence with a unit spread: mean change 0, scale softplus(0.5413) = 1.
        nn.init.zeros_(self.head.weight)
        with torch.no_grad():
            self.head.bias[: config.horizon] = 0.0
            self.head.bias[config.horizon :] = math.log(math.e - 1)

    def initial_state(self, batch: int) -> Hidden:
        """Zeros on the model's own device and dtype."""
        w = self.head.weight
        h = w.new_zeros(self.rnn.num_layers, batch, self.rnn.hidden_size)  # L, B, H
        return (h, h.clone()) if self.cell == "lstm" else h

    def forward(
        self, x: torch.Tensor, hidden: Hidden | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, Hidden]:
        """x [B, T, F] (or a PackedSequence) -> mean [B, T, K], scale [B, T, K], hidden after the last step."""
        out, hidden = self.rnn(x, hidden)  # B, T, H
        if isinstance(out, nn.utils.rnn.PackedSequence):
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
        mean, raw = self.head(self.drop(out)).chunk(2, dim=-1)  # B, T, K each
        scale = F.softplus(raw) + 1e-3
        return mean * self.unit, scale * self.unit, hidden


def pack_hidden(hidden: Hidden) -> torch.Tensor:
    """One tensor for storage: [L, B, H] or, for LSTM, [2L, B, H] (h then c)."""
    return torch.cat(hidden, dim=0) if isinstance(hidden, tuple) else hidden


def unpack_hidden(tensor: torch.Tensor, cell: str) -> Hidden:
    if cell == "lstm":
        h, c = tensor.chunk(2, dim=0)
        return (h.contiguous(), c.contiguous())
    return tensor
