"""The add kernels against torch, every dtype, odd sizes, contiguous tensors and channel slices
of one (a concat's gradient, read where it lies), the fork's sum of gradients, and the launcher
checks."""

import pytest
import torch

from cnndsl.kernels.add import add_forward, fork

from helpers import DTYPES, assert_close


@pytest.mark.parametrize("shape", [(1,), (7, 13), (2, 5, 3, 17), (4099,)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_add(shape, dtype):
    a, b = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    assert_close(add_forward(a, b).float(), a.float() + b.float(), dtype, name="a + b")


def test_add_rejects_mismatch():
    with pytest.raises(ValueError, match=r"\(3,\) and \(4,\)"):
        add_forward(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="expected dtype"):
        add_forward(torch.zeros(3), torch.zeros(3, dtype=torch.float16))


@pytest.mark.parametrize(("rows", "offset", "cols", "width"), [(1, 0, 1, 3), (7, 2, 5, 9), (300, 16, 32, 80)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_reads_channel_slices(rows, offset, cols, width, dtype):
    """a a channel slice (rows `width` apart) and b contiguous, then both slices: y contiguous."""
    slab = torch.randn(2, rows, width).to(dtype)
    a, b = slab[..., offset:offset + cols], torch.randn(2, rows, cols).to(dtype)
    for x, other in ((a, b), (b, a), (a, slab[..., width - cols:])):
        y = add_forward(x, other)
        assert y.is_contiguous()
        assert_close(y.float(), x.float() + other.float(), dtype, name="slice + b")


def test_the_fork_sums_a_slice_of_a_gradient_in_place():
    """Two readers of x, one of whose gradients is a channel slice of a wider one: x's gradient is
    their sum, contiguous (and a lone slice is made contiguous)."""
    x = torch.randn(2, 3, 3, 4, requires_grad=True)
    wide = torch.randn(2, 3, 3, 10)
    a, b = fork(x, 2)
    torch.autograd.backward([a, b], [wide[..., 2:6], torch.ones(2, 3, 3, 4)])
    torch.testing.assert_close(x.grad, wide[..., 2:6] + 1)
    y = torch.randn(2, 3, 3, 4, requires_grad=True)
    (c,) = fork(y, 1)
    c.backward(wide[..., 6:])
    assert y.grad.is_contiguous() and torch.equal(y.grad, wide[..., 6:])


def test_add_rejects_a_tensor_that_is_not_rows():
    with pytest.raises(ValueError, match="b:"):
        add_forward(torch.zeros(4, 3), torch.zeros(3, 4).t())
