"""The concat kernels (kernels/concat.py) against torch.cat, forward and backward, every dtype,
odd channel counts, flat inputs and batch 1, and the launcher's checks."""

import pytest
import torch

from cnndsl.kernels.concat import _concat, concat_backward, concat_forward

from helpers import DTYPES


@pytest.mark.parametrize("shapes", [[(2, 5, 7, 3), (2, 5, 7, 16), (2, 5, 7, 1)], [(1, 3, 3, 64), (1, 3, 3, 33)],
                                    [(3, 17), (3, 5)]], ids=["nhwc-odd", "batch1-wide", "flat"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_concat_is_torch_cat(shapes, dtype):
    xs = [torch.randn(s).to(dtype) for s in shapes]
    y = concat_forward(xs)
    assert torch.equal(y, torch.cat(xs, dim=-1))  # a copy: exact
    dy = torch.randn(y.shape).to(dtype)
    for dx, want in zip(concat_backward(dy, [x.shape[-1] for x in xs]), dy.split([x.shape[-1] for x in xs], -1)):
        assert dx.is_contiguous() and torch.equal(dx, want)


def test_concat_gradients_through_the_custom_op():
    xs = [torch.randn(2, 3, 3, c, requires_grad=True) for c in (4, 6)]
    y = _concat(xs)
    (y * torch.arange(10.0)).sum().backward()
    assert torch.equal(xs[0].grad, torch.arange(4.0).expand(2, 3, 3, 4))
    assert torch.equal(xs[1].grad, torch.arange(4.0, 10.0).expand(2, 3, 3, 6))


def test_concat_rejects_bad_inputs():
    with pytest.raises(ValueError, match="at least two inputs, got 1"):
        concat_forward([torch.zeros(1, 2, 2, 3)])
    with pytest.raises(ValueError, match=r"input 1 has shape \(1, 2, 3, 3\), input 0 \(1, 2, 2, 3\)"):
        concat_forward([torch.zeros(1, 2, 2, 3), torch.zeros(1, 2, 3, 3)])
    with pytest.raises(ValueError, match="expected dtype"):
        concat_forward([torch.zeros(1, 2, 2, 3), torch.zeros(1, 2, 2, 3, dtype=torch.float16)])
    with pytest.raises(ValueError, match="dy has 7 channels, the inputs 6"):
        concat_backward(torch.zeros(1, 2, 2, 7), [3, 3])
