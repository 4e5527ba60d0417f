"""The stochastic-depth kernel (kernels/stochastic_depth.py): each sample kept whole (scaled by
1 / (1 - p)) or zeroed, the same samples for the same seed (backward regenerates forward's mask),
about 1 - p of them kept, p = 0 and p = 1, and the runner's identity in eval."""

import pytest
import torch

from cnndsl.kernels.stochastic_depth import (
    _stochastic_depth,
    stochastic_depth_forward,
    stochastic_depth_layer,
)
from cnndsl.runtime.steps import StepState
from cnndsl.specs import StochasticDepth

from helpers import DTYPES, assert_close


@pytest.mark.parametrize(("p", "dtype"), [(0.3, d) for d in DTYPES] + [(0.0, torch.float32), (1.0, torch.float32)])
def test_whole_samples_are_kept_or_zeroed(p, dtype):
    x = torch.randn(128, 2, 4, 4).to(dtype)
    y = stochastic_depth_forward(x, p, 11)
    scale = 0.0 if p == 1 else 1 / (1 - p)
    kept = (y != 0).flatten(1).all(1)
    assert torch.equal(kept, (y != 0).flatten(1).any(1))  # per sample: all or nothing
    assert_close(y[kept].double(), x[kept].double() * scale, dtype, name="kept samples")
    assert abs(kept.float().mean().item() - (1 - p)) < 0.12  # 3 standard deviations
    assert torch.equal(stochastic_depth_forward(x, p, 11), y)  # the same seed, the same samples
    if 0 < p < 1:
        assert not torch.equal(stochastic_depth_forward(x, p, 12), y)


def test_backward_applies_forward_mask():
    x = torch.randn(64, 4, 3, 3, requires_grad=True)
    y = _stochastic_depth(x, torch.tensor(5), 0.5)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, (y != 0).float() * 2.0)


def test_the_layer_is_the_identity_in_eval():
    x = torch.randn(4, 3)
    assert stochastic_depth_layer(x, StochasticDepth(0.5), StepState(False, False, {})) is x
