"""Dropout kernels: the kept fraction and the scale, backward regenerating forward's mask,
the mask as a function of (seed, offset) only, p = 0 and p = 1, the autograd Function
against torch autograd with the kernel's own mask, and argument errors."""

import math
from types import SimpleNamespace

import pytest
import torch

import cnndsl.kernels  # noqa: F401  (first: picks Triton's interpreter before triton is imported)

# isort: split
import triton
import triton.language as tl

from cnndsl.kernels.dropout import (
    _dropout_kernel,
    dropout_backward,
    dropout_forward,
    dropout_keep,
    dropout_layer,
)
from cnndsl.specs import Dropout

from helpers import DTYPES, assert_close

N = 2**15 + 3  # large enough for the statistics, odd so that the last group of 4 is partial


def _positive(shape, dtype):
    return (0.5 + torch.rand(shape)).to(dtype)  # never 0: y == 0 means dropped


def _assert_scaled(y, x, p):
    """Kept elements are x * fp32(1 / (1 - p)) in fp32, rounded to x's dtype: bit for bit,
    except bf16 under the interpreter, whose fp32 -> bf16 cast truncates (1 ulp)."""
    expected = (x.float() * torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)).to(x.dtype)
    if x.dtype == torch.bfloat16 and not torch.cuda.is_available():
        torch.testing.assert_close(y, expected, rtol=2**-7, atol=0)
    else:
        assert torch.equal(y, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_mask_fraction_and_scale(p, dtype):
    x = _positive(N, dtype)
    y = dropout_forward(x, p, 1234)
    assert y.dtype == dtype and y.shape == x.shape
    kept = y != 0
    sigma = math.sqrt(p * (1 - p) / N)
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * sigma
    for lane in range(4):  # each of the four Philox outputs is used, each with rate 1 - p
        assert abs(kept[lane::4].float().mean().item() - (1 - p)) < 5 * 2 * sigma
    _assert_scaled(y[kept], x[kept], p)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (3, 5, 7, 2), (4099,)])
def test_dropout_backward_uses_forward_mask(shape, dtype):
    p, seed = 0.4, 77
    x = _positive(shape, dtype)
    dy = torch.randn(shape).to(dtype)
    y = dropout_forward(x, p, seed)
    dx = dropout_backward(dy, p, seed)
    kept = y != 0
    assert torch.equal(dx != 0, kept & (dy != 0))
    _assert_scaled(dx[kept], dy[kept], p)
    nz = dy != 0
    ratio_y = y.double()[kept & nz] / x.double()[kept & nz]
    ratio_dx = dx.double()[kept & nz] / dy.double()[kept & nz]
    torch.testing.assert_close(ratio_dx, ratio_y, rtol=2**-7, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 37), (3, 4, 5, 7)])
def test_dropout_fn_matches_torch_autograd_with_its_mask(shape, dtype):
    """dropout_layer (the unfused layer) forward and backward against float64 autograd of
    x * keep / (1 - p), keep read off the kernel's dropout of ones with the same seed."""
    p, seed = 0.3, 2024
    keep = dropout_forward(torch.ones(shape, dtype=dtype), p, seed) != 0
    assert 0.5 < keep.float().mean() < 0.9
    x, dy = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    ours, ref = x.clone().requires_grad_(), x.double().requires_grad_()
    y = dropout_layer(ours, Dropout(p), SimpleNamespace(training=True, grad=True, cache={}, text=repr(Dropout(p)),
                                                         seed=lambda: torch.tensor(seed)))
    y.backward(dy)
    ref_y = ref * keep / (1 - p)
    ref_y.backward(dy.double())
    assert_close(y.float(), ref_y, dtype, name="y")
    assert_close(ours.grad.float(), ref.grad, dtype, name="dx")


def test_dropout_seeds():
    x = torch.ones(N)
    a, b = dropout_forward(x, 0.5, 1), dropout_forward(x, 0.5, 1)
    assert torch.equal(a, b)
    for other in (2, 2**31 + 1, 2**62 + 5):  # int32, int64 and high seeds
        c = dropout_forward(x, 0.5, other)
        assert abs(((a != 0) != (c != 0)).float().mean().item() - 0.5) < 0.05  # independent masks


def test_dropout_expected_value_preserved():
    p = 0.3
    y = dropout_forward(torch.ones(N), p, 99)
    assert abs(y.double().mean().item() - 1) < 5 * math.sqrt(p / (1 - p) / N)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_p0_copy_and_p1_zeros(dtype):
    x = torch.randn(3, 7, 5).to(dtype)
    y = dropout_forward(x, 0.0, 5)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    assert torch.equal(dropout_backward(x, 0, 5), x)
    assert torch.equal(dropout_forward(x, 1.0, 5), torch.zeros_like(x))  # torch's p = 1
    assert dropout_forward(torch.empty(0, 3, dtype=dtype), 0.5, 1).shape == (0, 3)


def test_dropout_mask_independent_of_block():
    """The mask is a function of (seed, offset): the kernel run with other BLOCKs, and the
    `dropout_keep` helper for epilogues, give the same one."""
    x = _positive(1501, torch.float32)
    p, seed = 0.5, 4242
    y = dropout_forward(x, p, seed)
    for block in (16, 256, 4096):
        y_b = torch.empty_like(x)
        _dropout_kernel.fn[(triton.cdiv(x.numel(), block),)](x, y_b, x.numel(), p, 2.0, seed, DROP=True, BLOCK=block)
        assert torch.equal(y_b, y), block
    assert torch.equal(_keep(seed, p, torch.arange(1501, dtype=torch.int64)), y != 0)
    # the high word of the 64-bit Philox counter is used: offsets 2**34 + i get another mask
    high = _keep(seed, p, 2**34 + torch.arange(1501, dtype=torch.int64))
    assert abs((high != (y != 0)).float().mean().item() - 0.5) < 0.05


@triton.jit
def _keep_kernel(offs_ptr, out_ptr, n, p, seed, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs = tl.load(offs_ptr + i, mask=i < n, other=0)
    tl.store(out_ptr + i, dropout_keep(seed, offs, p).to(tl.int8), mask=i < n)


def _keep(seed, p, offs):
    out = torch.empty(offs.shape, dtype=torch.int8, device=offs.device)
    _keep_kernel[(triton.cdiv(offs.numel(), 1024),)](offs, out, offs.numel(), p, seed, BLOCK=1024)
    return out.bool()


def test_dropout_rejects_bad_arguments():
    x = torch.zeros(8)
    for p in (-0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match=r"p must be a number in \[0, 1\], got"):
            dropout_forward(x, p, 1)
    for seed in (-1, 2**63, 1.5):
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\), got"):
            dropout_backward(x, 0.5, seed)
    with pytest.raises(ValueError, match="contiguous"):
        dropout_forward(torch.zeros(4, 4).t(), 0.5, 1)
    with pytest.raises(ValueError, match="dtype torch.int64 is not supported"):
        dropout_forward(torch.zeros(4, dtype=torch.int64), 0.5, 1)


@pytest.mark.gpu
def test_dropout_large_gpu():
    x = torch.ones(2**31 + 4099, dtype=torch.float16, device="cuda")  # offsets past 2**31
    y = dropout_forward(x, 0.25, 3)
    assert abs((y != 0).float().mean().item() - 0.75) < 1e-3
    tail = _keep(3, 0.25, torch.arange(2**31, 2**31 + 4099, device="cuda"))
    assert torch.equal(tail, y[2**31:] != 0)
