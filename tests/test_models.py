import numpy as np
import pytest
import torch

from forecastd.config import ModelConfig, TrainingConfig
from forecastd.models import Forecaster, pack_hidden, unpack_hidden
from forecastd.training import train_rows


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
def test_forward_shapes_and_hidden_roundtrip(cell):
    mc = ModelConfig(cell=cell, hidden_size=8, num_layers=2, horizon=5)
    m = Forecaster(11, mc)
    x = torch.randn(3, 7, 11)
    mean, scale, h = m(x, m.initial_state(3))
    assert mean.shape == scale.shape == (3, 7, 5)
    assert (scale > 0).all()
    packed = pack_hidden(h)
    assert packed.shape == ((4 if cell == "lstm" else 2), 3, 8)
    h2 = unpack_hidden(packed, cell)
    _, _, a = m(x, h)
    _, _, b = m(x, h2)
    torch.testing.assert_close(pack_hidden(a), pack_hidden(b))


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
    torch.testing.assert_close(pack_hidden(h), pack_hidden(h_all), rtol=1e-5, atol=1e-5)


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
    assert all(h.grad_fn is None and not h.requires_grad for h in seen)
    # The state is carried, not reset: chunks after the first start from a non-zero state.
    assert all(h.abs().sum() > 0 for h in seen[1:])


def test_gradient_of_a_chunk_does_not_reach_the_previous_chunk():
    torch.manual_seed(0)
    m = Forecaster(11, ModelConfig(hidden_size=8, horizon=2))
    torch.nn.init.normal_(m.head.weight)  # the zero init would hide every input gradient
    x = torch.randn(1, 20, 11, requires_grad=True)
    _, _, h = m(x[:, :10])
    from forecastd.training import detach
    mean, _, _ = m(x[:, 10:], detach(h))
    mean.sum().backward()
    assert torch.all(x.grad[:, :10] == 0)
    assert torch.any(x.grad[:, 10:] != 0)


def test_training_config_defaults_are_consistent():
    t = TrainingConfig()
    assert t.segment_length % t.bptt == 0
