"""The fused conv block's training epilogue (affine / batch norm, act1, + residual, act2, pool)
and its backward against torch autograd of the composed ops in float64 from the same rounded
inputs: y, and dz, dresidual, dweight, dbias; max pooling's argmax against pool.py and torch."""

import pytest
import torch
import torch.nn.functional as F

from cnndsl.kernels.batchnorm import batchnorm_stats
from cnndsl.kernels.epilogue import epilogue_forward
from cnndsl.kernels.epilogue_backward import (
    BatchNormBackward,
    epilogue_backward,
    pooled_backward,
)
from cnndsl.kernels.pool import pool_backward, pool_forward
from cnndsl.specs import Act, Window

from helpers import DTYPES, assert_close, torch_act

# Loops with runtime bounds make Triton's interpreter convert a shape-(1,) array to an int.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
EPS, SLOPE1, SLOPE2 = 1e-5, 0.2, 0.05
ACTS = ["none", "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "silu"]
# name -> (mode, kernel, stride, padding) or None
POOLS = {"nopool": None, "max2s2": ("max", 2, 2, 0), "avg2s2": ("avg", 2, 2, 0), "max3s2p1": ("max", 3, 2, 1),
         "avg3s2p1": ("avg", 3, 2, 1), "max3s3": ("max", 3, 3, 0), "avg3s3": ("avg", 3, 3, 0)}
SHAPES = [(2, 7, 7, 5), (1, 13, 11, 3), (2, 5, 9, 17)]  # (N, H, W, C), M = 98, 143, 90
BNS = ["batch", "batch_noaffine", "fixed", "none", "running"]  # a = BN(z) with / without weight, z scale + shift,
# z, BN(z) in eval (running statistics, parameter gradients wanted)


def _cases():
    """A covering design in 35 cases: every pool with every BN mode, shape and dtype, with and
    without a residual; 35 of the 49 (act1, act2) pairs, every activation as each."""
    cases = []
    for i in range(35):
        pool, act1, act2 = list(POOLS)[i // 5], ACTS[i % 7], ACTS[(2 * i + i // 7 + 1) % 7]
        res, bn, dtype = i % 2 == 0, BNS[i % 5], DTYPES[(i + i // 3) % 3]
        cases.append(pytest.param(SHAPES[i % 3], pool, act1, act2, res, bn, dtype,
                                  id=f"{i}-{pool}-{act1}-{act2}-{'res' if res else 'nores'}-{bn}-{str(dtype)[6:]}"))
    return cases


def _nchw(t):
    return t.permute(0, 3, 1, 2) if t.dim() == 4 else t


def _reference(z, res, w, b, scale, shift, bn, act1, act2, pool, dy, running):
    """float64 torch autograd of the composed ops: (y, dz, dres, dweight, dbias), kernel layout."""
    zd = _nchw(z).double().requires_grad_()
    rd = None if res is None else _nchw(res).double().requires_grad_()
    wd, bd = (None if t is None else t.double().requires_grad_() for t in (w, b))
    if bn.startswith("batch"):
        a = F.batch_norm(zd, None, None, wd, bd, training=True, eps=EPS)
    elif bn == "running":
        a = F.batch_norm(zd, *(t.double() for t in running), wd, bd, training=False, eps=EPS)
    elif bn == "fixed":
        shape = (-1, 1, 1) if zd.dim() == 4 else (-1,)
        a = zd * scale.double().view(shape) + shift.double().view(shape)
    else:
        a = zd
    v = torch_act(act1, SLOPE1)(a)
    if rd is not None:
        v = v + rd
    y = torch_act(act2, SLOPE2)(v)
    if pool is not None:
        mode, k, s, p = pool
        y = (F.max_pool2d if mode == "max" else F.avg_pool2d)(y, k, s, p)
    y.backward(_nchw(dy).double())
    back = (lambda t: t.permute(0, 2, 3, 1)) if z.dim() == 4 else (lambda t: t)
    return (back(y.detach()), back(zd.grad), None if rd is None else back(rd.grad),
            None if wd is None else wd.grad, None if bd is None else bd.grad)


def _run(shape, pool_name, act1, act2, has_res, bn, dtype, need_param_grads=True):
    """Kernel and reference results; returns both and the reduction lengths."""
    C = shape[-1]
    z = (0.5 + 2 * torch.randn(shape)).to(dtype)
    res = torch.randn(shape).to(dtype) if has_res else None
    w = b = scale = shift = bn_arg = running = None
    if bn.startswith("batch") or bn == "running":
        if bn != "batch_noaffine":
            w, b = (1 + 0.5 * torch.randn(C)).to(dtype), torch.randn(C).to(dtype)
        train = bn != "running"
        mean, var = batchnorm_stats(z.reshape(-1, C)) if train else (torch.randn(C), 0.5 + torch.rand(C))
        running = (mean, var)
        sd = (w.double() if w is not None else 1.0) * (var.double() + EPS).rsqrt()
        scale, shift = sd.float(), ((b.double() if b is not None else 0.0) - mean.double() * sd).float()
        bn_arg = BatchNormBackward(mean, var, EPS, w, b is not None, need_param_grads, train)
    elif bn == "fixed":
        scale, shift = 1 + 0.5 * torch.randn(C), torch.randn(C)
    pool = POOLS[pool_name]
    if pool is not None:
        mode, k, s, p = pool
        pool_arg = Window(mode, (k, k), (s, s), (p, p), tuple((d + 2 * p - k) // s + 1 for d in shape[1:3]))
    else:
        pool_arg = None
    y, argmax = epilogue_forward(z, scale, shift, Act(act1, SLOPE1), res, Act(act2, SLOPE2), pool_arg)
    assert y.dtype == dtype and (argmax is not None) == (pool is not None and pool[0] == "max")
    dy = torch.randn(y.shape).to(dtype)
    got = epilogue_backward(dy, z, scale, shift, Act(act1, SLOPE1), res, Act(act2, SLOPE2), pool_arg, argmax, bn_arg)
    ref = _reference(z, res, w, b, scale, shift, bn, act1, act2, pool, dy, running)
    taps = 1 if pool is None else pool[1] ** 2
    windows = 1 if pool is None else -(-pool[1] // pool[2]) ** 2
    return (y, *got), ref, taps, windows, z.numel() // C


@pytest.mark.parametrize("shape,pool,act1,act2,has_res,bn,dtype", _cases())
def test_epilogue(shape, pool, act1, act2, has_res, bn, dtype):
    (y, dz, dres, dw, db), (ry, rdz, rdres, rdw, rdb), taps, windows, M = _run(shape, pool, act1, act2, has_res,
                                                                              bn, dtype)
    red = M if bn.startswith("batch") else windows
    assert_close(y.float(), ry, dtype, reduction=taps, depth=2, name="y")
    assert_close(dz.float(), rdz, dtype, reduction=red, depth=3, name="dz")
    if has_res:
        assert_close(dres.float(), rdres, dtype, reduction=windows, depth=2, name="dresidual")
    else:
        assert dres is None
    assert (dw is None) == (rdw is None) and (db is None) == (rdb is None)
    for got, ref, name in ((dw, rdw, "dweight"), (db, rdb, "dbias")):
        if ref is not None:
            assert got.dtype == dtype
            assert_close(got.float(), ref, dtype, reduction=M, depth=2, name=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_epilogue_flat(dtype):
    """(N, C) activations as (N, 1, 1, C): BatchNorm1d, no pool; without parameter gradients."""
    (y, dz, dres, dw, db), (ry, rdz, rdres, *_), _, _, M = _run((6, 33), "nopool", "silu", "relu", True,
                                                                "batch", dtype, need_param_grads=False)
    assert y.shape == (6, 33) and dw is None and db is None
    assert_close(y.float(), ry, dtype, depth=2, name="y")
    assert_close(dz.float(), rdz, dtype, reduction=M, depth=3, name="dz")
    assert_close(dres.float(), rdres, dtype, depth=2, name="dresidual")


@pytest.mark.parametrize("pool", [("max", 3, 2, 1), ("max", 2, 2, 0), ("avg", 3, 2, 1)])
def test_pool_matches_unfused_kernels_and_torch(pool):
    """The fused pool equals pool.py over the unpooled epilogue bit for bit (argmax codes
    included, ties from relu's zeros among them); max's argmax routes as torch's indices do,
    and the backward through it is pool_backward's / torch's."""
    mode, k, s, p = pool
    z, res = torch.randn(2, 9, 7, 6), torch.randn(2, 9, 7, 6)
    scale, shift = 1 + torch.rand(6), torch.randn(6)
    out_hw = tuple((d + 2 * p - k) // s + 1 for d in (9, 7))
    args = (z, scale, shift, Act("relu", 0.0), res, Act("relu", 0.0))
    window = Window(mode, (k, k), (s, s), (p, p), out_hw)
    u, _ = epilogue_forward(*args, None)
    y, argmax = epilogue_forward(*args, window)
    ref_y, ref_arg = pool_forward(u, window)
    assert torch.equal(y, ref_y) and (argmax is None) == (mode == "avg")
    dy = torch.randn(y.shape)
    du = pool_backward(dy, window, argmax, (9, 7))
    # with act1 = "none", act2 = "none" and no affine, dz is the pool's gradient itself
    plain = (z, None, None, Act(), None, Act(), window)
    dz, *_ = epilogue_backward(dy, *plain, epilogue_forward(*plain)[1])
    ref_z = _nchw(z).requires_grad_()
    (F.max_pool2d if mode == "max" else F.avg_pool2d)(ref_z, k, s, p).backward(_nchw(dy))
    assert_close(dz, ref_z.grad.permute(0, 2, 3, 1), reduction=4, name="dz")
    if mode == "max":
        assert torch.equal(argmax, ref_arg)
        _, idx = F.max_pool2d(_nchw(u), k, s, p, return_indices=True)
        oh, ow = torch.arange(out_hw[0]).view(-1, 1), torch.arange(out_hw[1]).view(1, -1)
        codes = (idx // 7 - (oh * s - p)) * k + idx % 7 - (ow * s - p)
        assert torch.equal(_nchw(argmax).long(), codes)
    # dresidual = act2'(v) du: relu passes du where u > 0
    _, dres, _, _ = epilogue_backward(dy, *args, window, argmax)
    assert torch.equal(dres, torch.where(u > 0, du, 0.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pool_of_a_deferred_z_is_the_pool_of_its_written_output(dtype):
    """A max pool reading a deferring block's z (round_taps): the y and argmax of pooling the
    block's written output, bit for bit, so cross-layer fusion decides every maximum as
    block-level fusion does (an overlapping 3x3 stride 2 window, as a stem's). In channels 3-5 every
    value rounds to 100: ties that only the written values make (the first tap wins them)."""
    z = torch.randn(2, 9, 7, 6).to(dtype)
    scale, shift = torch.cat([1 + torch.rand(3), torch.full((3,), 0.01)]), torch.cat([torch.randn(3),
                                                                                      torch.full((3,), 100.0)])
    window = Window("max", (3, 3), (2, 2), (1, 1), (5, 4))
    written, _ = epilogue_forward(z, scale, shift, Act("relu"), None, Act(), None)
    y, argmax = epilogue_forward(z, scale, shift, Act("relu"), None, Act(), window, round_taps=True)
    ref_y, ref_arg = pool_forward(written, window)
    assert torch.equal(y, ref_y) and torch.equal(argmax, ref_arg)


@pytest.mark.parametrize("pool,act,dtype", [
    (("max", 2, 2, 0), Act("relu"), torch.float32), (("max", 3, 3, 1), Act("leaky_relu", 0.1), torch.float32),
    (("max", 2, 2, 0), Act("none"), torch.bfloat16), (("avg", 2, 2, 1), Act("none"), torch.float32),
    (("max", 3, 3, 0), Act("relu"), torch.float16)])
def test_pooled_backward(pool, act, dtype):
    """The backward of a block that pooled in its GEMM and kept only y and the argmax: dz equals
    float64 autograd of act -> pool from z, act's gradient taken from y's sign."""
    mode, k, s, p = pool
    z = torch.randn(2, 9, 7, 6).to(dtype)
    window = Window(mode, (k, k), (s, s), (p, p), tuple((d + 2 * p - k) // s + 1 for d in (9, 7)))
    y, argmax = epilogue_forward(z, None, None, act, None, Act(), window)
    dy = torch.randn(y.shape).to(dtype)
    dz = pooled_backward(dy, y, argmax, act, window, z.shape)
    ref_z = _nchw(z).double().requires_grad_()
    (F.max_pool2d if mode == "max" else F.avg_pool2d)(torch_act(act.kind, act.slope)(ref_z), k, s, p).backward(
        _nchw(dy).double())
    assert dz.dtype == dtype
    assert_close(_nchw(dz).double(), ref_z.grad, dtype, reduction=4, name="dz")
    with pytest.raises(ValueError, match=r"act1: expected one whose gradient follows from the pooled output"):
        pooled_backward(dy, y, argmax, Act("gelu"), window, z.shape)
    with pytest.raises(ValueError, match=r"dy: expected shape \(2, \d, \d, 6\), got \(2, 1, 1, 6\)"):
        pooled_backward(dy[:, :1, :1].contiguous(), y[:, :1, :1].contiguous(), argmax, act, window, z.shape)


def test_epilogue_empty_batch():
    z = torch.zeros(0, 7, 7, 3)
    pool = Window("max", (3, 3), (2, 2), (1, 1), (4, 4))
    y, argmax = epilogue_forward(z, None, None, Act("relu", 0.0), None, Act("none", 0.0), pool)
    assert y.shape == argmax.shape == (0, 4, 4, 3)
    c = torch.ones(3)
    dz, dres, dw, db = epilogue_backward(y, z, c, c, Act("relu", 0.0), z, Act("none", 0.0), pool, argmax,
                                         BatchNormBackward(c, c, EPS, c, True, True, True))
    assert dz.shape == dres.shape == (0, 7, 7, 3) and dw.shape == db.shape == (3,)


def test_epilogue_rejects_bad_input():
    z, c = torch.zeros(1, 7, 7, 3), torch.zeros(3)
    pool = Window("max", (3, 3), (2, 2), (1, 1), (4, 4))
    with pytest.raises(ValueError, match=r"z: expected \(N, H, W, C\) or \(N, C\), got shape \(7, 7, 3\)"):
        epilogue_forward(torch.zeros(7, 7, 3), None, None, Act("relu", 0.0), None, Act("none", 0.0), None)
    with pytest.raises(ValueError, match="scale, shift: expected both or neither, got Tensor and NoneType"):
        epilogue_forward(z, c, None, Act("relu", 0.0), None, Act("none", 0.0), None)
    with pytest.raises(ValueError, match=r"scale: expected shape \(3,\), got \(4,\)"):
        epilogue_forward(z, torch.zeros(4), torch.zeros(4), Act("relu", 0.0), None, Act("none", 0.0), None)
    with pytest.raises(ValueError, match="shift: expected dtype torch.float32, got torch.float16"):
        epilogue_forward(z, c, c.half(), Act("relu", 0.0), None, Act("none", 0.0), None)
    with pytest.raises(ValueError, match=r"residual: expected shape \(1, 7, 7, 3\), got \(1, 7, 7, 2\)"):
        epilogue_forward(z, None, None, Act("relu", 0.0), torch.zeros(1, 7, 7, 2), Act("none", 0.0), None)
    with pytest.raises(ValueError, match="residual: expected dtype torch.float32, got torch.bfloat16"):
        epilogue_forward(z, None, None, Act("relu", 0.0), z.bfloat16(), Act("none", 0.0), None)
    with pytest.raises(ValueError, match="act2: unknown activation 'swish'"):
        epilogue_forward(z, None, None, Act("relu", 0.0), None, Act("swish", 0.0), None)
    with pytest.raises(ValueError, match="act1: unknown activation 9"):
        epilogue_forward(z, None, None, Act(9, 0.0), None, Act("none", 0.0), None)
    with pytest.raises(ValueError, match=r"gives \(4, 4\), got \(3, 3\)"):
        epilogue_forward(z, None, None, Act("relu", 0.0), None, Act("none", 0.0), Window("max", (3, 3), (2, 2), (1, 1), (3, 3)))
    with pytest.raises(ValueError, match="pool: expected a Window"):
        epilogue_forward(z, None, None, Act("relu", 0.0), None, Act("none", 0.0), ("max", 3, 2))
    dy = torch.zeros(1, 4, 4, 3)
    with pytest.raises(ValueError, match=r"dy: expected shape \(1, 4, 4, 3\), got \(1, 7, 7, 3\)"):
        epilogue_backward(z, z, None, None, Act("relu", 0.0), None, Act("none", 0.0), pool, None)
    with pytest.raises(ValueError, match="argmax: expected a tensor for max pooling, got NoneType"):
        epilogue_backward(dy, z, None, None, Act("relu", 0.0), None, Act("none", 0.0), pool, None)
    with pytest.raises(ValueError, match="argmax: expected dtype torch.int8, got torch.int64"):
        epilogue_backward(dy, z, None, None, Act("relu", 0.0), None, Act("none", 0.0), pool, dy.long())
    with pytest.raises(ValueError, match="argmax: expected None without max pooling, got Tensor"):
        epilogue_backward(z, z, None, None, Act("relu", 0.0), None, Act("none", 0.0), None, z)
    with pytest.raises(ValueError, match="bn: expected scale and shift"):
        epilogue_backward(z, z, None, None, Act("relu", 0.0), None, Act("none", 0.0), None, None, BatchNormBackward(c, c, EPS, c, True, True, True))
    with pytest.raises(ValueError, match=r"mean: expected shape \(3,\), got \(2,\)"):
        epilogue_backward(z, z, c, c, Act("relu", 0.0), None, Act("none", 0.0), None, None,
                          BatchNormBackward(torch.zeros(2), c, EPS, None, False, True, True))
    with pytest.raises(ValueError, match="bn: expected None or a BatchNormBackward, got"):
        epilogue_backward(z, z, c, c, Act("relu", 0.0), None, Act("none", 0.0), None, None, (c, c))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_and_act_backward_adds_the_other_gradient_where_it_lies(dtype, train):
    """add (z's gradient from its other reader: a channel slice of a concat's gradient, rows 20 apart)
    is added to dz as it is written: the same dz as without it, plus add."""
    torch.manual_seed(0)
    z = (0.5 + 2 * torch.randn(2, 3, 5, 12)).to(dtype)
    w, b = (1 + 0.5 * torch.randn(12)).to(dtype), torch.randn(12).to(dtype)
    mean, var = batchnorm_stats(z.reshape(-1, 12)) if train else (torch.randn(12), 0.5 + torch.rand(12))
    sd = w.double() * (var.double() + EPS).rsqrt()
    scale, shift = sd.float(), (b.double() - mean.double() * sd).float()
    dy = torch.randn(z.shape).to(dtype)
    slab = torch.randn(2, 3, 5, 20).to(dtype)
    add = slab[..., 4:16]  # rows 20 apart
    act = Act("relu", 0.0)
    bn = lambda: BatchNormBackward(mean, var, EPS, w, True, True, train)
    plain = epilogue_backward(dy, z, scale, shift, act, None, Act("none", 0.0), None, None, bn())
    summed = epilogue_backward(dy, z, scale, shift, act, None, Act("none", 0.0), None, None, bn(), add)
    assert_close(summed[0].float(), plain[0].double() + add.double(), dtype, reduction=z.numel() // 12, depth=3,
                 name="dz + add")
    assert torch.equal(summed[2], plain[2]) and torch.equal(summed[3], plain[3])  # the parameters' unchanged
    with pytest.raises(ValueError, match="add: only with batch norm and act1 alone"):
        epilogue_backward(dy, z, scale, shift, Act("none", 0.0), None, Act("none", 0.0), None, None, bn(), add)
