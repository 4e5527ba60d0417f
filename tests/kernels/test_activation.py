"""Activation kernels, forward and backward, against torch for every kind and dtype."""

import pytest
import torch

from cnndsl.kernels.activation import (
    ACTIVATIONS,
    activation_backward,
    activation_forward,
)
from cnndsl.specs import Act

from helpers import DTYPES, assert_close, run_both, torch_act

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


@pytest.mark.parametrize("kind", sorted(ACTIVATIONS))
def test_activation_at_its_corners(kind):
    """Where the piecewise activations switch (0, ±3, 6), and NaN: torch's value and gradient
    (which side a corner belongs to is torch's choice, e.g. hardswish'(3) = 1, relu6'(6) = 0)."""
    x = torch.tensor([-6.0, -3.0, -1e-3, 0.0, 1e-3, 3.0, 6.0, 7.0, float("nan")])
    ref_x = x.double().requires_grad_()
    ref = torch_act(kind, SLOPE)(ref_x)
    ref.backward(torch.ones_like(ref))
    y = activation_forward(x, Act(kind, SLOPE))
    torch.testing.assert_close(y.double(), ref.detach(), equal_nan=True, rtol=1e-6, atol=1e-7)
    dx = activation_backward(x, torch.ones_like(x), Act(kind, SLOPE))
    finite = ~torch.isnan(x)  # torch's gradient at NaN is NaN for some, 0 for others
    torch.testing.assert_close(dx[finite].double(), ref_x.grad[finite], rtol=1e-6, atol=1e-7)


@pytest.mark.network
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_every_activation_in_a_network(train):
    """Each activation in a conv block (before and after a residual add) and a dense block, fused,
    trained and evaluated against the reference backend (unfused, an activation is its own kernel,
    tested above)."""
    kinds = sorted(ACTIVATIONS)
    lines = ["network acts", "input 3x6x6"]
    for i, kind in enumerate(kinds):
        lines += ["conv 4 3 pad=1 bias=false", "batchnorm",  # (a bias before batch norm has no gradient)
                  kind if kind != "leaky_relu" else "leaky_relu 0.2",
                  "residual {", "  conv 4 3 pad=1", f"  {kinds[(i + 1) % len(kinds)]}", "}",
                  kinds[(i + 2) % len(kinds)]]
    lines += ["flatten", "dense 8", "hardswish", "dense 3", "softmax"]
    src = "\n".join(lines) + "\n"
    run_both(src, batch=2, train=train, fuse=True)
