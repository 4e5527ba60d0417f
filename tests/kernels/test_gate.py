"""The gate kernels (kernels/gate.py), y = x * g per sample and channel, against torch in float64:
output, dx and the per-channel dg, every dtype, odd sizes, batch 1, and the launcher's checks."""

import pytest
import torch

from cnndsl.kernels.gate import gate_backward, gate_forward

from helpers import DTYPES, assert_close


@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (1, 1, 1, 16), (3, 11, 9, 70)], ids=["odd", "batch1-1x1", "wide"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gate_forward_and_backward(shape, dtype):
    n, h, w, c = shape
    x, g, dy = torch.randn(shape).to(dtype), torch.rand(n, 1, 1, c).to(dtype), torch.randn(shape).to(dtype)
    xd, gd = x.double().requires_grad_(), g.double().requires_grad_()
    want = xd * gd
    want.backward(dy.double())
    assert_close(gate_forward(x, g).double(), want, dtype, name="y")
    dx, dg = gate_backward(dy, x, g)
    assert dg.shape == g.shape
    assert_close(dx.double(), xd.grad, dtype, name="dx")
    assert_close(dg.double(), gd.grad, dtype, reduction=h * w, name="dg")


def test_gate_takes_a_flat_gate():
    x, g = torch.randn(2, 3, 3, 5), torch.rand(2, 5)
    assert_close(gate_forward(x, g), x * g[:, None, None, :], name="y")


def test_gate_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"g has shape \(2, 4\), expected 10 values \(N=2, C=5\)"):
        gate_forward(torch.zeros(2, 3, 3, 5), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="expected 4 dimensions"):
        gate_forward(torch.zeros(2, 5), torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"dy has shape \(2, 3, 3, 4\), x \(2, 3, 3, 5\)"):
        gate_backward(torch.zeros(2, 3, 3, 4), torch.zeros(2, 3, 3, 5), torch.zeros(2, 5))
