"""Convolution kernels (forward with its fused epilogue: bias, activation, residual add,
second activation, non-overlapping pooling, batch-norm statistics; input gradient, weight
and bias gradients) against torch.nn.functional and its autograd, over NHWC tensors."""

import pytest
import torch
import torch.nn.functional as F

from cnndsl.kernels import conv_backward
from cnndsl.kernels.activation import ACTIVATIONS
from cnndsl.kernels.batchnorm import batchnorm_merge_stats
from cnndsl.kernels.conv import (
    conv2d_backward_input,
    conv2d_backward_weight,
    conv2d_forward,
)
from cnndsl.kernels.epilogue import epilogue_forward
from cnndsl.specs import Act, ConvGeometry, Window

from helpers import DTYPES, assert_close, torch_act

# (N, C, H, W, K, (R, S), stride, padding, dilation, groups, bias); padding "same" is PyTorch's.
CASES = {
    "1x1": (2, 16, 7, 7, 16, (1, 1), 1, 0, 1, 1, True),
    "3x3_c3": (1, 3, 11, 13, 7, (3, 3), 1, 1, 1, 1, True),
    "3x3_c1_k1": (2, 1, 13, 11, 1, (3, 3), 1, 1, 1, 1, True),
    "5x5_s2_p2": (2, 5, 13, 11, 16, (5, 5), 2, 2, 1, 1, True),
    "3x5_s12_p12": (1, 16, 7, 11, 7, (3, 5), (1, 2), (1, 2), 1, 1, False),
    "7x7_s2_p3_stem": (1, 3, 13, 13, 16, (7, 7), 2, 3, 1, 1, False),
    "3x3_s3_p0": (2, 5, 13, 11, 7, (3, 3), 3, 0, 1, 1, True),
    "3x3_s2_c20": (1, 20, 7, 7, 7, (3, 3), 2, 1, 1, 1, True),
    "3x3_dil2": (1, 16, 11, 13, 16, (3, 3), 1, 2, 2, 1, True),
    "3x3_s2_dil2_k32": (1, 7, 13, 11, 32, (3, 3), 2, 2, 2, 1, True),
    "groups2_cg16": (2, 32, 7, 11, 16, (3, 3), 1, 1, 1, 2, True),
    "groups2_cg5": (1, 10, 11, 7, 16, (3, 3), 2, 1, 1, 2, False),
    "depthwise": (2, 16, 11, 7, 16, (3, 3), 1, 1, 1, 16, True),
    "depthwise_s2_c5": (1, 5, 13, 11, 5, (3, 3), 2, 1, 1, 5, True),
    "depthwise_x2": (1, 3, 7, 7, 6, (3, 3), 1, 1, 1, 3, True),
    "same_2x4": (1, 5, 7, 11, 7, (2, 4), 1, "same", 1, 1, True),
    "same_2x4_dil2": (1, 3, 11, 7, 16, (2, 4), 1, "same", 2, 1, True),
    "1x1_s2": (1, 16, 7, 9, 7, (1, 1), 2, 0, 1, 1, True),
    "1x1_p2": (1, 3, 5, 5, 7, (1, 1), 1, 2, 1, 1, True),
    "h_below_stride": (1, 3, 2, 7, 7, (3, 3), 3, 1, 1, 1, True),
}
LOW_PRECISION = ["3x3_c3", "5x5_s2_p2", "3x3_s2_c20", "groups2_cg16", "depthwise", "same_2x4"]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _problem(case, dtype):
    """Rounded inputs, the kernel's geometry, and float64 torch results with every gradient."""
    n, c, h, w, k, (r, s), stride, padding, dilation, groups, has_bias = case
    stride, dilation = _pair(stride), _pair(dilation)
    x = torch.randn(n, c, h, w).to(dtype)
    wt = torch.randn(k, c // groups, r, s).to(dtype)
    b = torch.randn(k).to(dtype) if has_bias else None
    ref_x, ref_w = x.double().requires_grad_(), wt.double().requires_grad_()
    ref_b = b.double().requires_grad_() if has_bias else None
    ref_y = F.conv2d(ref_x, ref_w, ref_b, stride, padding, dilation, groups)
    if padding == "same":  # top/left pad; the extra bottom/right pad falls out of out_hw
        padding = tuple(d * (kk - 1) // 2 for d, kk in zip(dilation, (r, s)))
    dy = torch.randn(ref_y.shape).to(dtype)
    ref_y.backward(dy.double())
    return {
        "x": x.permute(0, 2, 3, 1).contiguous(), "w": wt, "b": b, "dy": dy.permute(0, 2, 3, 1).contiguous(),
        "geometry": ConvGeometry(stride, _pair(padding), dilation, groups, tuple(ref_y.shape[2:])),
        "out_hw": tuple(ref_y.shape[2:]),
        "y": ref_y.detach(), "dx": ref_x.grad, "dw": ref_w.grad, "db": ref_b.grad if has_bias else None,
    }


def _nchw(t):
    return t.permute(0, 3, 1, 2).float()


# Triton's interpreter warns on every loop whose bound is a kernel argument (numpy < 2.4).
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


@pytest.mark.parametrize("name,dtype", [pytest.param(c, d, id=f"{c}-{str(d)[6:]}") for c in CASES for d in DTYPES
                                        if d == torch.float32 or c in LOW_PRECISION])
def test_conv(name, dtype):
    case = CASES[name]
    n, c, h, w, k, (r, s), *_, groups, has_bias = case
    p = _problem(case, dtype)
    y = conv2d_forward(p["x"], p["w"], p["b"], p["geometry"])
    assert y.dtype == dtype
    assert_close(_nchw(y), p["y"], dtype, reduction=r * s * c // groups, name=f"{name} y")
    dx = conv2d_backward_input(p["dy"], p["w"], p["geometry"], (h, w))
    assert dx.dtype == dtype
    assert_close(_nchw(dx), p["dx"], dtype, reduction=r * s * k // groups, name=f"{name} dx")
    dw, db = conv2d_backward_weight(p["x"], p["dy"], p["w"].shape, p["geometry"], has_bias)
    assert dw.dtype == dtype
    rows = n * p["out_hw"][0] * p["out_hw"][1]
    assert_close(dw.float(), p["dw"], dtype, reduction=rows, name=f"{name} dw")
    if has_bias:
        assert db.dtype == dtype
        assert_close(db.float(), p["db"], dtype, reduction=rows, name=f"{name} db")
    else:
        assert db is None


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_conv_activation_epilogue(act):
    p = _problem(CASES["3x3_c3"], torch.float32)
    y = conv2d_forward(p["x"], p["w"], p["b"], p["geometry"], act=Act(act, 0.2))
    assert_close(_nchw(y), torch_act(act, 0.2)(p["y"]), reduction=27, depth=2, name=f"{act} y")


def test_conv_weight_grad_splits_rows_deterministically():
    # 286 rows of a 1x1 conv (one tile): three splits of 128 rows under the interpreter, the last one short.
    p = _problem((2, 3, 13, 11, 7, (1, 1), 1, 0, 1, 1, True), torch.float32)
    assert conv_backward._splits(286, 1, "cpu") == (3, 128)
    first = conv2d_backward_weight(p["x"], p["dy"], p["w"].shape, p["geometry"], True)
    again = conv2d_backward_weight(p["x"], p["dy"], p["w"].shape, p["geometry"], True)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert_close(first[0], p["dw"], reduction=286, name="dw")
    assert_close(first[1], p["db"], reduction=286, name="db")


def test_conv_weight_grad_stops_at_the_last_row():
    # 1536 rows in one split of 2048 under the interpreter, in row blocks of 512 that divide the rows:
    # the last block of the split lies past the tensors and must not be read.
    p = _problem((6, 16, 16, 16, 16, (3, 3), 1, 1, 1, 1, True), torch.float32)
    assert conv_backward._splits(1536, 9, "cpu") == (1, 2048)
    dw, db = conv2d_backward_weight(p["x"], p["dy"], p["w"].shape, p["geometry"], True)
    assert_close(dw, p["dw"], reduction=1536, name="dw")
    assert_close(db, p["db"], reduction=1536, name="db")


def test_conv_empty_batch():
    x, dy, w = torch.zeros(0, 5, 5, 3), torch.zeros(0, 5, 5, 4), torch.randn(4, 3, 3, 3)
    geometry = ConvGeometry((1, 1), (1, 1), (1, 1), 1, (5, 5))
    assert conv2d_forward(x, w, None, geometry).shape == (0, 5, 5, 4)
    assert conv2d_backward_input(dy, w, geometry, (5, 5)).shape == (0, 5, 5, 3)
    dw, db = conv2d_backward_weight(x, dy, w.shape, geometry, True)
    assert dw.shape == w.shape and not dw.any() and db.shape == (4,) and not db.any()


def test_conv_rejects_bad_input():
    x, w, g1 = torch.zeros(1, 5, 5, 4), torch.zeros(8, 4, 3, 3), ConvGeometry((1, 1), (1, 1), (1, 1), 1, (5, 5))
    with pytest.raises(ValueError, match=r"w: expected C/groups = 4 input channels, got shape \(8, 3, 3, 3\)"):
        conv2d_forward(x, torch.zeros(8, 3, 3, 3), None, g1)
    with pytest.raises(ValueError, match="groups=3 must divide both C=4 and K=8"):
        conv2d_forward(x, w, None, ConvGeometry((1, 1), (1, 1), (1, 1), 3, (5, 5)))
    with pytest.raises(ValueError, match="w: expected dtype torch.float32, got torch.float16"):
        conv2d_forward(x, w.half(), None, g1)
    with pytest.raises(ValueError, match=r"bias: expected shape \(8,\), got \(7,\)"):
        conv2d_forward(x, w, torch.zeros(7), g1)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        conv2d_forward(x, w, None, g1, act=Act("swish"))
    with pytest.raises(ValueError, match=r"stride: expected two ints >= 1, got \(0, 1\)"):
        conv2d_forward(x, w, None, ConvGeometry((0, 1), (1, 1), (1, 1), 1, (5, 5)))
    with pytest.raises(ValueError, match=r"x: expected 4 dimensions, got shape \(5, 5, 4\)"):
        conv2d_forward(x[0], w, None, g1)
    with pytest.raises(ValueError, match="x: expected a contiguous tensor"):
        conv2d_forward(torch.zeros(1, 4, 5, 5).permute(0, 2, 3, 1), w, None, g1)
    with pytest.raises(ValueError, match=r"in_hw: expected two ints >= 0, got \(-1, 5\)"):
        conv2d_backward_input(torch.zeros(1, 5, 5, 8), w, g1, (-1, 5))
    with pytest.raises(ValueError, match=r"dy: expected batch 1, got shape \(2, 5, 5, 8\)"):
        conv2d_backward_weight(x, torch.zeros(2, 5, 5, 8), w.shape, g1, True)
    with pytest.raises(ValueError, match=r"w: expected 8 output channels, got shape \(7, 4, 3, 3\)"):
        conv2d_backward_weight(x, torch.zeros(1, 5, 5, 8), (7, 4, 3, 3), g1, True)


def _fused_ref(y, act="none", slope=0.01, residual=None, act2="none", slope2=0.01, pool=None):
    """torch's conv -> act -> + residual -> act2 -> pool from the float64 conv output y (NCHW)."""
    y = torch_act(act, slope)(y)
    if residual is not None:
        y = y + residual.permute(0, 3, 1, 2).double()
    y = torch_act(act2, slope2)(y)
    if pool is not None:
        mode, kernel, stride, padding = pool
        y = (F.max_pool2d if mode == "max" else F.avg_pool2d)(y, kernel, stride, padding)
    return y


ACTS = ["none", *sorted(ACTIVATIONS)]


@pytest.mark.parametrize("act,act2", list(zip(ACTS, ACTS[1:] + ACTS[:1])))  # each act in both places
def test_conv_residual_epilogue_activations(act, act2):
    p = _problem(CASES["3x3_c3"], torch.float32)
    res = torch.randn(*p["y"].shape[:1], *p["out_hw"], p["y"].shape[1])
    y = conv2d_forward(p["x"], p["w"], p["b"], p["geometry"], Act(act, 0.2), residual=res,
                       act2=Act(act2, 0.05))
    ref = _fused_ref(p["y"], act, 0.2, res, act2, 0.05)
    assert_close(_nchw(y), ref, reduction=27, depth=2, name=f"{act} + res -> {act2} y")


RES_CASES = ["1x1", "3x3_c3", "5x5_s2_p2", "groups2_cg5", "depthwise", "depthwise_x2", "same_2x4"]


@pytest.mark.parametrize("name,dtype", [pytest.param(c, d, id=f"{c}-{str(d)[6:]}") for c in RES_CASES for d in DTYPES
                                        if d == torch.float32 or c in LOW_PRECISION])
def test_conv_residual_relu(name, dtype):
    """ResNet's eval join: conv (batch norm folded) -> + identity -> relu, act 'none'."""
    case = CASES[name]
    p = _problem(case, dtype)
    res = torch.randn(p["y"].shape[0], *p["out_hw"], p["y"].shape[1]).to(dtype)
    y = conv2d_forward(p["x"], p["w"], p["b"], p["geometry"], residual=res, act2=Act("relu"))
    assert y.dtype == dtype and y.shape == res.shape
    red = case[5][0] * case[5][1] * case[1] // case[9]
    assert_close(_nchw(y), _fused_ref(p["y"], residual=res, act2="relu"), dtype, reduction=red, depth=2,
                 name=f"{name} y")


# (mode, kernel, stride, padding): non-overlapping windows, with pool padding, gaps between windows
# (stride > kernel), a 1x1 window, 16 taps exactly and 9 taps padded to 16 rows.
POOLS = {
    "max2": ("max", (2, 2), (2, 2), (0, 0)),
    "avg2_p1": ("avg", (2, 2), (2, 2), (1, 1)),
    "max3_p1": ("max", (3, 3), (3, 3), (1, 1)),
    "avg3x2_gaps": ("avg", (3, 2), (4, 3), (1, 0)),
    "max1_s2": ("max", (1, 1), (2, 2), (0, 0)),
    "avg4_p2": ("avg", (4, 4), (4, 4), (2, 0)),
    "max2x4_p12": ("max", (2, 4), (2, 4), (1, 2)),
}
POOL_CASES = ["3x3_c3", "5x5_s2_p2", "groups2_cg16", "depthwise", "depthwise_x2", "1x1_s2"]
# Each pool with every case in fp32, rotating through the epilogues that can precede it.
FUSED = [("none", None, "none"), ("relu", "res", "none"), ("leaky_relu", "res", "gelu"), ("silu", None, "tanh"),
         ("none", "res", "relu"), ("gelu", "res", "sigmoid")]
POOL_PARAMS = [pytest.param(pl, c, torch.float32, FUSED[(i + j) % len(FUSED)], id=f"{pl}-{c}-float32")
               for i, pl in enumerate(POOLS) for j, c in enumerate(POOL_CASES)]
POOL_PARAMS += [pytest.param(pl, c, d, FUSED[1], id=f"{pl}-{c}-{str(d)[6:]}") for d in DTYPES[1:]
                for pl, c in (("max2", "3x3_c3"), ("avg2_p1", "groups2_cg16"), ("max3_p1", "depthwise"))]


@pytest.mark.parametrize("pool_name,name,dtype,fused", POOL_PARAMS)
def test_conv_pool_epilogue(pool_name, name, dtype, fused):
    case = CASES[name]
    act, res, act2 = fused
    p = _problem(case, dtype)
    res = torch.randn(p["y"].shape[0], *p["out_hw"], p["y"].shape[1]).to(dtype) if res else None
    ref = _fused_ref(p["y"], act, 0.1, res, act2, 0.3, POOLS[pool_name])
    pool = Window(*POOLS[pool_name], tuple(ref.shape[2:]))
    y = conv2d_forward(p["x"], p["w"], p["b"], p["geometry"], Act(act, 0.1), residual=res, act2=Act(act2, 0.3),
                       pool=pool)
    assert y.dtype == dtype
    red = case[5][0] * case[5][1] * case[1] // case[9]
    assert_close(_nchw(y), ref, dtype, reduction=red, depth=2, name=f"{name} {pool_name} y")


# M = N*OH*OW rows: 1 and 2 interpreter tiles, a partial last tile, and 3 tiles (M = 1350 > 2*512).
STATS_CASES = {**{c: CASES[c] for c in ("1x1", "3x3_c3", "5x5_s2_p2", "groups2_cg5", "depthwise", "same_2x4")},
               "three_tiles": (2, 3, 27, 25, 5, (3, 3), 1, 1, 1, 1, True)}


@pytest.mark.parametrize("name,dtype", [pytest.param(c, d, id=f"{c}-{str(d)[6:]}") for c in STATS_CASES
                                        for d in DTYPES if d == torch.float32 or c in ("3x3_c3", "three_tiles")])
def test_conv_stats(name, dtype):
    case = STATS_CASES[name]
    n, c, *_, (r, s), _, _, _, groups, _ = case
    p = _problem(case, dtype)
    y, mean, var = conv2d_forward(p["x"], p["w"], p["b"], p["geometry"], stats=True)
    red, rows = r * s * c // groups, n * p["out_hw"][0] * p["out_hw"][1]
    assert_close(_nchw(y), p["y"], dtype, reduction=red, name=f"{name} y")
    ref_var, ref_mean = torch.var_mean(p["y"], dim=(0, 2, 3), unbiased=False)
    assert mean.dtype == var.dtype == torch.float32
    # The statistics come from the fp32 accumulator of the rounded inputs, not from the stored y.
    assert_close(mean, ref_mean, reduction=red + rows, name=f"{name} mean")
    assert_close(var, ref_var, reduction=red + rows, name=f"{name} var")


def test_conv_stats_large_mean():
    """|mean| = 1000 std: tile means and M2s about them keep the variance accurate."""
    p = _problem(STATS_CASES["three_tiles"], torch.float32)
    b = p["b"] * 0.01 + 1000.0
    _, mean, var = conv2d_forward(p["x"], p["w"], b, p["geometry"], stats=True)
    y = p["y"] - p["b"].double()[:, None, None] + b.double()[:, None, None]
    ref_var, ref_mean = torch.var_mean(y, dim=(0, 2, 3), unbiased=False)
    assert_close(mean, ref_mean, reduction=27 + 1350, name="mean")
    assert_close(var, ref_var, reduction=27 + 1350, depth=4, name="var")  # y itself is rounded near 1000


def test_conv_fused_empty_batch():
    x, w, geometry = torch.zeros(0, 5, 5, 3), torch.randn(4, 3, 3, 3), ConvGeometry((1, 1), (1, 1), (1, 1), 1, (5, 5))
    y, mean, var = conv2d_forward(x, w, None, geometry, stats=True)
    assert y.shape == (0, 5, 5, 4) and mean.shape == var.shape == (4,)
    pool = Window("avg", (2, 2), (2, 2), (1, 1), (3, 3))
    y = conv2d_forward(x, w, None, geometry, Act("relu"), residual=torch.zeros(0, 5, 5, 4), pool=pool)
    assert y.shape == (0, 3, 3, 4)


def test_conv_rejects_bad_epilogue():
    x, w, g1 = torch.zeros(1, 5, 5, 4), torch.zeros(8, 4, 3, 3), ConvGeometry((1, 1), (1, 1), (1, 1), 1, (5, 5))

    def fwd(**kwargs):
        return conv2d_forward(x, w, None, g1, **kwargs)
    with pytest.raises(ValueError, match=r"residual: expected shape \(1, 5, 5, 8\) \(the conv output\), got \(1, 5, 5, 7\)"):
        fwd(residual=torch.zeros(1, 5, 5, 7))
    with pytest.raises(ValueError, match="residual: expected dtype torch.float32, got torch.float16"):
        fwd(residual=torch.zeros(1, 5, 5, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="residual: expected a contiguous tensor"):
        fwd(residual=torch.zeros(1, 8, 5, 5).permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match="act2: unknown activation 'swish'"):
        fwd(act2=Act("swish"))
    with pytest.raises(ValueError, match=r"stats=True .* needs act='none', act2='none', no residual and no pool; "
                                         r"got act='relu', act2='none', residual None, pool=None"):
        fwd(act=Act("relu"), stats=True)
    with pytest.raises(ValueError, match=r"residual \(1, 5, 5, 8\)"):
        fwd(residual=torch.zeros(1, 5, 5, 8), stats=True)
    with pytest.raises(ValueError, match="stats: expected a bool, got 1"):
        fwd(stats=1)
    with pytest.raises(ValueError, match=r"pool: expected a Window, got \('max', 2, 2, 0\)"):
        fwd(pool=("max", 2, 2, 0))
    with pytest.raises(ValueError, match="pool: mode: expected 'max' or 'avg', got 'min'"):
        fwd(pool=Window("min", (2, 2), (2, 2), (0, 0), (2, 2)))
    with pytest.raises(ValueError, match=r"pool: only non-overlapping windows fuse \(stride >= kernel\), "
                                         r"got kernel \(3, 3\) with stride \(2, 2\)"):
        fwd(pool=Window("max", (3, 3), (2, 2), (1, 1), (3, 3)))
    with pytest.raises(ValueError, match="pool window too large to fuse: 5x4 = 20 taps, at most 16"):
        fwd(pool=Window("avg", (5, 4), (5, 4), (0, 0), (1, 1)))
    with pytest.raises(ValueError, match=r"pool: out_hw: input \(5, 5\) with kernel \(2, 2\), stride \(2, 2\), "
                                         r"padding \(0, 0\) gives \(2, 2\), got \(3, 3\)"):
        fwd(pool=Window("max", (2, 2), (2, 2), (0, 0), (3, 3)))
    with pytest.raises(ValueError, match=r"pool: padding \(2, 0\) must be at most half the kernel \(2, 2\)"):
        fwd(pool=Window("max", (2, 2), (2, 2), (2, 0), (4, 2)))
    with pytest.raises(ValueError, match=r"part: expected shape \(2, 3, C\) for M=40 rows in tiles of 16, "
                                         r"got \(2, 2, 8\)"):
        batchnorm_merge_stats(torch.zeros(2, 2, 8), 16, 40)


# Realistic and > 2**31-element shapes: on a GPU only, against cuDNN in float32.
GPU_CASES = {
    "resnet_3x3": (8, 64, 56, 56, 64, (3, 3), 1, 1, 1, 1, True),
    "resnet_down": (8, 128, 28, 28, 256, (3, 3), 2, 1, 1, 1, False),
    "stem_7x7": (8, 3, 224, 224, 64, (7, 7), 2, 3, 1, 1, False),
    "depthwise_s2": (8, 96, 112, 112, 96, (3, 3), 2, 1, 1, 96, True),
    "pointwise": (8, 96, 56, 56, 24, (1, 1), 1, 0, 1, 1, True),
    "grouped": (4, 128, 28, 28, 128, (3, 3), 1, 1, 1, 32, True),
}


def _gpu_check(case, dtype, name):
    n, c, h, w, k, (r, s), stride, padding, dilation, groups, has_bias = case
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    x = torch.randn(n, h, w, c, device="cuda", dtype=dtype)
    wt = torch.randn(k, c // groups, r, s, device="cuda", dtype=dtype)
    b = torch.randn(k, device="cuda", dtype=dtype) if has_bias else None
    ref_x = x.permute(0, 3, 1, 2).float().requires_grad_()
    ref_w, ref_b = wt.float().requires_grad_(), b.float().requires_grad_() if has_bias else None
    with torch.backends.cudnn.flags(allow_tf32=False):
        ref_y = F.conv2d(ref_x, ref_w, ref_b, stride, padding, dilation, groups)
        dy = torch.randn(ref_y.shape, device="cuda").to(dtype)
        ref_y.backward(dy.float())
    dy = dy.permute(0, 2, 3, 1).contiguous()
    geometry = ConvGeometry(stride, padding, dilation, groups, tuple(ref_y.shape[2:]))
    y = conv2d_forward(x, wt, b, geometry)
    # TF32 dots (when torch allows them for fp32) round operands to fp16's 10-bit mantissa.
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    tol, depth = (torch.float16, 2) if tf32 else (dtype, 1)
    assert_close(_nchw(y), ref_y, tol, reduction=r * s * c // groups, depth=depth, name=f"{name} y")
    dx = conv2d_backward_input(dy, wt, geometry, (h, w))
    assert_close(_nchw(dx), ref_x.grad, tol, reduction=r * s * k // groups, depth=depth, name=f"{name} dx")
    dw, db = conv2d_backward_weight(x, dy, wt.shape, geometry, has_bias)
    rows = dy.shape[0] * dy.shape[1] * dy.shape[2]
    assert_close(dw.float(), ref_w.grad, tol, reduction=rows, depth=depth, name=f"{name} dw")
    if has_bias:
        assert_close(db.float(), ref_b.grad, dtype, reduction=rows, name=f"{name} db")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(GPU_CASES))
def test_conv_gpu(name, dtype):
    _gpu_check(GPU_CASES[name], dtype, name)


@pytest.mark.gpu
def test_conv_gpu_int64_offsets():
    # x has 2 * 1024 * 1024 * 1040 > 2**31 elements: offsets must be computed in int64.
    _gpu_check((2, 1040, 1024, 1024, 16, (1, 1), 1, 0, 1, 1, True), torch.float16, "int64")


@pytest.mark.parametrize("pool_name,act", [("max2", "relu"), ("max3_p1", "leaky_relu"), ("max1_s2", "none"),
                                           ("max2x4_p12", "relu")])
def test_conv_pool_argmax(pool_name, act):
    """Training's pool in the GEMM (no z kept): y and the argmax codes are the epilogue pass's over the
    stored conv output, on random inputs, on ties (a zero filter: every tap holds the bias; the first
    valid tap wins) and with NaNs (an input NaN reaches some windows: the last NaN tap wins)."""
    p = _problem(CASES["3x3_c3"], torch.float32)
    out_hw = tuple(_fused_ref(p["y"], pool=POOLS[pool_name]).shape[2:])
    pool, a = Window(*POOLS[pool_name], out_hw), Act(act, 0.1)
    tied, nan = p["x"].clone(), p["x"].clone()
    nan[0, 4, 5:7, 1] = float("nan")
    for name, x, w in (("random", p["x"], p["w"]), ("tied", tied, torch.zeros_like(p["w"])), ("nan", nan, p["w"])):
        y, argmax = conv2d_forward(x, w, p["b"], p["geometry"], a, pool=pool, argmax=True)
        ref_y, ref_arg = epilogue_forward(conv2d_forward(x, w, p["b"], p["geometry"]), None, None, a, None,
                                          Act(), pool)
        assert argmax.dtype == ref_arg.dtype == torch.int8
        assert torch.equal(argmax, ref_arg), f"{name}: argmax"
        torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5, equal_nan=True, msg=name)
    assert torch.isnan(y).any()  # the last case reached some windows
    with pytest.raises(ValueError, match=r"argmax=True needs max pooling, got pool=None"):
        conv2d_forward(p["x"], p["w"], p["b"], p["geometry"], a, argmax=True)
