"""Pooling kernels (max and average windows, global average) forward and backward against
torch.nn.functional and its autograd over NHWC tensors: overlapping and odd windows, ceil_mode
and count_include_pad=False, ties and NaNs in max pooling, the compact argmax, and the
launcher checks."""

import math

import pytest
import torch
import torch.nn.functional as F

from cnndsl.kernels.epilogue import epilogue_forward
from cnndsl.kernels.pool import (
    global_avgpool_backward,
    global_avgpool_forward,
    pool_backward,
    pool_forward,
)
from cnndsl.specs import NO_ACT, Window

from helpers import DTYPES, assert_close, run_both

# (N, C, H, W, kernel, stride, padding)
CASES = {
    "k2_s2": (2, 17, 13, 13, (2, 2), (2, 2), (0, 0)),
    "k3_s2_p1": (1, 17, 13, 13, (3, 3), (2, 2), (1, 1)),
    "k3_s1_p1": (2, 3, 7, 7, (3, 3), (1, 1), (1, 1)),
    "k3_s2_p1_c1": (1, 1, 7, 7, (3, 3), (2, 2), (1, 1)),
    "k2x3_s2x1_p1": (1, 3, 13, 7, (2, 3), (2, 1), (1, 1)),
    "k2x3_s1x2_p01": (2, 17, 7, 13, (2, 3), (1, 2), (0, 1)),
    "k3_s3": (2, 1, 13, 13, (3, 3), (3, 3), (0, 0)),
    "k3_s3_p1_c3": (1, 3, 7, 13, (3, 3), (3, 3), (1, 1)),
}
LOW_PRECISION = ["k3_s2_p1", "k2x3_s1x2_p01"]
TORCH_POOL = {"max": F.max_pool2d, "avg": F.avg_pool2d}

# Triton's interpreter warns on every loop whose bound is a kernel argument (numpy < 2.4).
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def _nhwc(t):
    return t.permute(0, 2, 3, 1).contiguous()


def _nchw(t):
    return t.permute(0, 3, 1, 2).float()


def _run(x, mode, kernel, stride, padding, dtype, ceil_mode=False, count_include_pad=True):
    """Kernel results (y, argmax, dx) and float64 torch references (y, dx) for NCHW x of `dtype`."""
    ref_x = x.double().requires_grad_()
    options = {"ceil_mode": ceil_mode} | ({} if mode == "max" else {"count_include_pad": count_include_pad})
    ref_y = TORCH_POOL[mode](ref_x, kernel, stride, padding, **options)
    dy = torch.randn(ref_y.shape).to(dtype)
    ref_y.backward(dy.double())
    window = Window(mode, kernel, stride, padding, tuple(ref_y.shape[2:]), ceil_mode, count_include_pad)
    y, argmax = pool_forward(_nhwc(x), window)
    dx = pool_backward(_nhwc(dy), window, argmax, tuple(x.shape[2:]))
    assert y.dtype == dtype and dx.dtype == dtype
    return y, argmax, dx, ref_y.detach(), ref_x.grad


def _windows_per_pixel(kernel, stride):
    return math.ceil(kernel[0] / stride[0]) * math.ceil(kernel[1] / stride[1])


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("name,dtype", [pytest.param(c, d, id=f"{c}-{str(d)[6:]}") for c in CASES for d in DTYPES
                                        if d == torch.float32 or c in LOW_PRECISION])
def test_pool(name, dtype, mode):
    n, c, h, w, kernel, stride, padding = CASES[name]
    x = torch.randn(n, c, h, w).to(dtype)
    y, argmax, dx, ref_y, ref_dx = _run(x, mode, kernel, stride, padding, dtype)
    taps = kernel[0] * kernel[1]
    if mode == "max":
        assert argmax.dtype == torch.int8 and argmax.shape == y.shape
        assert torch.equal(_nchw(y), ref_y.float())  # a max is exact
    else:
        assert argmax is None
        assert_close(_nchw(y), ref_y, dtype, reduction=taps, name=f"{name} y")
    assert_close(_nchw(dx), ref_dx, dtype, reduction=_windows_per_pixel(kernel, stride), name=f"{name} dx")


# ceil_mode and count_include_pad: (N, C, H, W, kernel, stride, padding) on odd sizes, where
# ceil mode adds a last window past the padded input (the divisor of torch's avg_pool2d clips it at
# the padding's end), where it adds none (stride 1; k2_s2_p1 on 5: the window it would add starts in
# the right padding), and count_include_pad=False with and without padding.
CEIL_CASES = {
    "k2_s2_odd": (2, 3, 7, 9, (2, 2), (2, 2), (0, 0)),
    "k3_s2_p1": (1, 5, 9, 8, (3, 3), (2, 2), (1, 1)),
    "k3x2_s2x3_p10": (1, 3, 8, 11, (3, 2), (2, 3), (1, 0)),
    "k2_s2_p1_drop": (1, 3, 5, 5, (2, 2), (2, 2), (1, 1)),
    "k3_s1_p1": (1, 2, 5, 7, (3, 3), (1, 1), (1, 1)),
}
OPTIONS = [pytest.param(mode, ceil, pad, id=f"{mode}-{'ceil' if ceil else 'floor'}{'' if pad else '-nopad'}")
           for mode in ("max", "avg") for ceil in (False, True) for pad in (True, False) if mode == "avg" or pad]


@pytest.mark.parametrize("mode,ceil_mode,count_include_pad", OPTIONS)
@pytest.mark.parametrize("name,dtype", [pytest.param(c, d, id=f"{c}-{str(d)[6:]}") for c in CEIL_CASES
                                        for d in (torch.float32, torch.bfloat16)
                                        if d == torch.float32 or c == "k3_s2_p1"])
def test_pool_ceil_mode_and_count_include_pad(name, dtype, mode, ceil_mode, count_include_pad):
    n, c, h, w, kernel, stride, padding = CEIL_CASES[name]
    x = torch.randn(n, c, h, w).to(dtype)
    y, argmax, dx, ref_y, ref_dx = _run(x, mode, kernel, stride, padding, dtype, ceil_mode, count_include_pad)
    if mode == "max":
        assert torch.equal(_nchw(y), ref_y.float())
        _, indices = F.max_pool2d(x.float(), kernel, stride, padding, ceil_mode=ceil_mode, return_indices=True)
        assert torch.equal(argmax.permute(0, 3, 1, 2).long(), _torch_offsets(indices, kernel, stride, padding, w))
    else:
        assert argmax is None
        assert_close(_nchw(y), ref_y, dtype, reduction=kernel[0] * kernel[1], name=f"{name} y")
    assert_close(_nchw(dx), ref_dx, dtype, reduction=_windows_per_pixel(kernel, stride), name=f"{name} dx")


def test_ceil_mode_cases_cover_what_they_say():
    """Ceil mode adds a row and a column in the first two cases (and is floor's size in the last
    two), and each average past the padding or without count_include_pad over padding is uneven."""
    for name, (n, c, h, w, kernel, stride, padding) in CEIL_CASES.items():
        floor = F.max_pool2d(torch.zeros(1, 1, h, w), kernel, stride, padding).shape[2:]
        ceil = F.max_pool2d(torch.zeros(1, 1, h, w), kernel, stride, padding, ceil_mode=True).shape[2:]
        grows = name in ("k2_s2_odd", "k3_s2_p1", "k3x2_s2x3_p10")
        assert (ceil != floor) == grows, name
        assert Window("avg", kernel, stride, padding, tuple(ceil), True).uneven((h, w)) == grows, name
        assert Window("avg", kernel, stride, padding, tuple(floor), False, False).uneven((h, w)) == any(padding)


NETWORK = """
network ceil_pools
input 2x7x9
conv 3 3 pad=1
relu
maxpool 2 ceil_mode=true
conv 4 3 pad=1
avgpool 3 stride=2 pad=1 ceil_mode=true count_include_pad=false
avgpool 2 ceil_mode=true
flatten
dense 5
"""


@pytest.mark.network
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_network_with_ceil_mode_and_count_include_pad(fuse):
    """Pools that do not fit the conv epilogue (rules._pool_fits) run alone, trained, against the
    reference backend's torch pools."""
    import cnndsl
    from cnndsl.plan import plan
    assert [g.ops for g in plan(cnndsl.parse(NETWORK), fuse).groups if "pool" in g.ops] == [("pool",)] * 3
    run_both(NETWORK, fuse=fuse)


def _torch_offsets(indices, kernel, stride, padding, width):
    """torch's flat input indices h*W + w as window offsets r*kw + s."""
    oh = torch.arange(indices.shape[2]).view(1, 1, -1, 1)
    ow = torch.arange(indices.shape[3]).view(1, 1, 1, -1)
    r = indices // width - (oh * stride[0] - padding[0])
    s = indices % width - (ow * stride[1] - padding[1])
    return r * kernel[1] + s


@pytest.mark.parametrize("name", ["k3_s2_p1", "k3_s1_p1", "k2_s2", "k2x3_s1x2_p01"])
@pytest.mark.parametrize("values", ["constant", "few_levels"])
def test_max_pool_ties_route_like_torch(name, values):
    n, c, h, w, kernel, stride, padding = CASES[name]
    x = torch.full((n, c, h, w), 0.5) if values == "constant" else torch.randint(0, 3, (n, c, h, w)).float()
    y, argmax, dx, ref_y, ref_dx = _run(x, "max", kernel, stride, padding, torch.float32)
    _, indices = F.max_pool2d(x, kernel, stride, padding, return_indices=True)
    assert torch.equal(argmax.permute(0, 3, 1, 2).long(), _torch_offsets(indices, kernel, stride, padding, w))
    assert torch.equal(_nchw(y), ref_y.float())
    assert_close(_nchw(dx), ref_dx, reduction=_windows_per_pixel(kernel, stride), name=f"{name} dx")


def test_max_pool_nan_propagates_like_torch():
    n, c, h, w, kernel, stride, padding = CASES["k3_s2_p1"]
    x = torch.randn(n, c, h, w)
    x[0, 0, 0, 0] = x[0, 3, 5, 6] = x[0, 3, 5, 5] = x[0, 16, 12, 12] = float("nan")
    y, _, dx, ref_y, ref_dx = _run(x, "max", kernel, stride, padding, torch.float32)
    assert torch.equal(_nchw(y).isnan(), ref_y.isnan()) and ref_y.isnan().sum() > 4
    assert torch.equal(_nchw(y).nan_to_num(), ref_y.float().nan_to_num())
    assert_close(_nchw(dx), ref_dx, reduction=4, name="dx")


def test_max_pool_large_window_uses_int16_argmax():
    x = torch.randn(1, 3, 13, 13)
    y, argmax, dx, ref_y, ref_dx = _run(x, "max", (12, 11), (1, 1), (0, 0), torch.float32)
    assert argmax.dtype == torch.int16
    assert torch.equal(_nchw(y), ref_y.float())
    assert_close(_nchw(dx), ref_dx, reduction=132, name="dx")


@pytest.mark.parametrize("shape", [(2, 17, 7, 7), (1, 3, 13, 5), (1, 1, 1, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_global_avgpool(shape, dtype):
    x = torch.randn(shape).to(dtype)
    ref_x = x.double().requires_grad_()
    ref_y = F.adaptive_avg_pool2d(ref_x, 1)
    dy = torch.randn(ref_y.shape).to(dtype)
    ref_y.backward(dy.double())
    y = global_avgpool_forward(_nhwc(x))
    assert y.shape == (shape[0], 1, 1, shape[1]) and y.dtype == dtype
    assert_close(_nchw(y), ref_y, dtype, reduction=shape[2] * shape[3], name="y")
    dx = global_avgpool_backward(_nhwc(dy), shape[2:])
    assert dx.dtype == dtype
    assert_close(_nchw(dx), ref_x.grad, dtype, name="dx")


def _window(mode, k, s, p, out_hw):
    return Window(mode, (k, k), (s, s), (p, p), out_hw)


def test_pool_empty_batch():
    y, argmax = pool_forward(torch.zeros(0, 7, 7, 3), _window("max", 3, 2, 1, (4, 4)))
    assert y.shape == argmax.shape == (0, 4, 4, 3)
    assert pool_backward(torch.zeros(0, 4, 4, 3), _window("avg", 3, 2, 1, (4, 4)), None, (7, 7)).shape == (0, 7, 7, 3)


def test_pool_rejects_bad_input():
    x = torch.zeros(1, 7, 7, 3)
    with pytest.raises(ValueError, match="expected 'max' or 'avg', got 'min'"):
        pool_forward(x, _window("min", 2, 2, 0, (3, 3)))
    with pytest.raises(ValueError, match=r"gives \(4, 4\), got \(3, 3\)"):
        pool_forward(x, _window("max", 3, 2, 1, (3, 3)))
    with pytest.raises(ValueError, match=r"padding \(2, 2\) must be at most half the kernel \(3, 3\)"):
        pool_forward(x, _window("avg", 3, 1, 2, (9, 9)))
    with pytest.raises(ValueError, match=r"expected 4 dimensions, got shape \(7, 7, 3\)"):
        pool_forward(torch.zeros(7, 7, 3), _window("max", 2, 2, 0, (3, 3)))
    dy = torch.zeros(1, 4, 4, 3)
    with pytest.raises(ValueError, match="argmax: expected a tensor for max pooling"):
        pool_backward(dy, _window("max", 3, 2, 1, (4, 4)), None, (7, 7))
    with pytest.raises(ValueError, match="argmax: expected dtype torch.int8, got torch.int64"):
        pool_backward(dy, _window("max", 3, 2, 1, (4, 4)), torch.zeros(1, 4, 4, 3, dtype=torch.long), (7, 7))
    with pytest.raises(ValueError, match=r"argmax: expected shape \(1, 4, 4, 3\), got \(1, 4, 4, 2\)"):
        pool_backward(dy, _window("max", 3, 2, 1, (4, 4)), torch.zeros(1, 4, 4, 2, dtype=torch.int8), (7, 7))
    with pytest.raises(ValueError, match=r"input \(9, 9\) .* gives \(5, 5\), got \(4, 4\)"):
        pool_backward(dy, _window("avg", 3, 2, 1, (4, 4)), None, (9, 9))
    with pytest.raises(ValueError, match=r"expected shape \(N, 1, 1, C\), got \(1, 4, 4, 3\)"):
        global_avgpool_backward(dy, (4, 4))


def test_pool_rejects_bad_options():
    x = torch.zeros(1, 7, 7, 3)
    with pytest.raises(ValueError, match=r"ceil_mode gives \(4, 4\), got \(3, 3\)"):
        pool_forward(x, Window("max", (2, 2), (2, 2), (0, 0), (3, 3), True))
    with pytest.raises(ValueError, match=r"gives \(3, 3\), got \(4, 4\)"):
        pool_forward(x, Window("max", (2, 2), (2, 2), (0, 0), (4, 4), False))
    with pytest.raises(ValueError, match="count_include_pad=False is for 'avg' pooling only"):
        pool_forward(x, Window("max", (2, 2), (2, 2), (0, 0), (3, 3), False, False))
    with pytest.raises(ValueError, match="ceil_mode: expected a bool, got 1"):
        pool_forward(x, Window("avg", (2, 2), (2, 2), (0, 0), (4, 4), 1))
    # the fused epilogues divide by the taps: an uneven average is pool_forward's alone
    with pytest.raises(ValueError, match="divides every window by its 4 taps"):
        epilogue_forward(x, None, None, NO_ACT, None, NO_ACT, Window("avg", (2, 2), (2, 2), (0, 0), (4, 4), True))
    with pytest.raises(ValueError, match="divides every window by its 9 taps"):
        epilogue_forward(x, None, None, NO_ACT, None, NO_ACT, Window("avg", (3, 3), (2, 2), (1, 1), (4, 4), False,
                                                                     False))
    y, _ = epilogue_forward(x, None, None, NO_ACT, None, NO_ACT, Window("max", (2, 2), (2, 2), (0, 0), (4, 4), True))
    assert y.shape == (1, 4, 4, 3)
