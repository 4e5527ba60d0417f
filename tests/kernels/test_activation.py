"""Activation kernels, forward and backward, against torch for every kind and dtype."""

import pytest
import torch

from cnndsl.kernels.activation import (
    ACTIVATIONS,
    activation_backward,
    activation_forward,
)
from cnndsl.specs import Act

from helpers import DTYPES, assert_close, torch_act

SLOPE = 0.2


@pytest.mark.parametrize("kind", sorted(ACTIVATIONS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (3, 7, 5, 13), (4099,)])
def test_activation(kind, dtype, shape):
    x = (3 * torch.randn(shape)).to(dtype)
    ref_x = x.double().requires_grad_()
    ref = torch_act(kind, SLOPE)(ref_x)
    dy = torch.randn(shape).to(dtype)
    ref.backward(dy.double())
    assert_close(activation_forward(x, Act(kind, SLOPE)).float(), ref, dtype, name=f"{kind} y")
    assert_close(activation_backward(x, dy, Act(kind, SLOPE)).float(), ref_x.grad, dtype, depth=2, name=f"{kind} dx")


def test_activation_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        activation_forward(torch.zeros(4), Act("swish"))
    with pytest.raises(ValueError, match=r"expected shape \(4,\), got \(5,\)"):
        activation_backward(torch.zeros(4), torch.zeros(5), Act("relu"))
    with pytest.raises(ValueError, match="contiguous"):
        activation_forward(torch.zeros(4, 4).t(), Act("relu"))
