"""Cross-layer fusion's dz on load (kernels/prologue.py's GradPrologue): the conv's input and
weight gradients reading dy and z and applying the block's batch-norm and activation backward on
load equal torch's autograd through batch norm (batch statistics, running statistics, none),
the activation and the conv, in float64; with batch norm's per-channel sums and parameter
gradients from batchnorm_backward_on_load."""

import pytest
import torch
import torch.nn.functional as F

from cnndsl.kernels.batchnorm_backward import batchnorm_backward_on_load
from cnndsl.kernels.conv import conv2d_backward_input, conv2d_backward_weight
from cnndsl.kernels.fold import bn_scale_shift
from cnndsl.kernels.prologue import GradPrologue
from cnndsl.specs import Act, ConvGeometry

from helpers import assert_close, torch_act

EPS = 1e-5
# (N, C, H, W, K, (R, S), stride, padding, dilation, groups): K / groups >= 16
CASES = {
    "3x3": (2, 16, 7, 9, 16, (3, 3), 1, 1, 1, 1),
    "3x3_s2_k32": (1, 24, 9, 7, 32, (3, 3), 2, 1, 1, 1),
    "1x1_k48": (2, 16, 5, 5, 48, (1, 1), 1, 0, 1, 1),
    "3x3_dil2": (1, 8, 9, 9, 16, (3, 3), 1, 2, 2, 1),
    "groups2_kg16": (1, 32, 7, 7, 32, (3, 3), 1, 1, 1, 2),
}
# every activation, each mode of batch norm with several, over the cases in turn
ACTS = ["relu", "leaky_relu", "sigmoid", "tanh", "gelu", "silu", "relu6", "hardswish", "hardsigmoid", "none"]
MODES = ["train", "eval", "none"]
COMBOS = [(name, mode, ACTS[(i * 3 + j) % len(ACTS)]) for i, name in enumerate(CASES) for j, mode in enumerate(MODES)]


def _problem(case, mode, act, dtype):
    n, c, h, w, k, (r, s), stride, pad, dil, groups = case
    oh, ow = ((d + 2 * pad - dil * (kk - 1) - 1) // stride + 1 for d, kk in ((h, r), (w, s)))
    z = (torch.randn(n, oh, ow, k) * 2 + 1).to(dtype)  # |mean| ~ std: the centring matters
    dy = torch.randn(n, oh, ow, k).to(dtype)
    x = torch.randn(n, h, w, c).to(dtype)
    wt = torch.randn(k, c // groups, r, s).to(dtype)
    geometry = ConvGeometry((stride,) * 2, (pad,) * 2, (dil,) * 2, groups, (oh, ow))
    bn = None
    if mode != "none":
        zm = z.double().view(-1, k)
        mean, var = (zm.mean(0), zm.var(0, unbiased=False)) if mode == "train" else \
            (torch.randn(k, dtype=torch.float64), torch.rand(k, dtype=torch.float64) + 0.5)
        bn = (mean.float(), var.float(), torch.rand(k) + 0.5, torch.randn(k))  # mean, var, weight, bias
    return x, z, dy, wt, geometry, bn, Act(act, 0.2)


def _reference(x, z, dy, wt, case, mode, bn, act):
    """dx, dw, the conv bias' gradient (dz's channel sums) and the batch norm's dweight, dbias (or
    None), in float64 by autograd."""
    stride, pad, dil, groups = case[6:]
    k = z.shape[-1]
    x64, z64 = x.double().requires_grad_(), z.double().view(-1, k).requires_grad_()
    w64 = wt.double().requires_grad_()
    leaves = [x64, w64]
    a = z64
    if bn is not None:
        mean, var, weight, bias = (t.double().requires_grad_(i >= 2) for i, t in enumerate(bn))
        leaves += [weight, bias]
        a = F.batch_norm(z64, None if mode == "train" else mean, None if mode == "train" else var, weight, bias,
                         training=mode == "train", eps=EPS)
    v = a if act.kind == "none" else torch_act(act.kind, act.slope)(a)
    (dz,) = torch.autograd.grad(v, z64, dy.double().view(-1, k), retain_graph=bn is not None)
    out = F.conv2d(x64.permute(0, 3, 1, 2), w64, None, stride, pad, dil, groups)
    dx, dw = torch.autograd.grad(out, [x64, w64], dz.view(z.shape).permute(0, 3, 1, 2))
    bn_grads = torch.autograd.grad(v, leaves[2:], dy.double().view(-1, k)) if bn is not None else (None, None)
    return dx, dw, dz.sum(0), *bn_grads


def _grad_prologue(z, dy, bn, mode, act, param_grads=True):
    if bn is None:
        return GradPrologue(z, None, None, act), None, None
    mean, var, weight, bias = bn
    scale, shift = bn_scale_shift(mean, var, EPS, weight, bias)
    k = z.shape[-1]
    center, dweight, dbias = batchnorm_backward_on_load(dy.view(-1, k), z.view(-1, k), mean, var, EPS, weight,
                                                        param_grads, mode == "train", scale, shift, act)
    return GradPrologue(z, scale, shift, act, center), dweight, dbias


@pytest.mark.parametrize(("name", "mode", "act"), COMBOS)
def test_gradients_with_dz_on_load(name, mode, act):
    case = CASES[name]
    x, z, dy, wt, geometry, bn, act = _problem(case, mode, act, torch.float32)
    gp, dweight, dbias = _grad_prologue(z, dy, bn, mode, act)
    dx = conv2d_backward_input(dy, wt, geometry, tuple(x.shape[1:3]), grad_prologue=gp)
    dw, db = conv2d_backward_weight(x, dy, wt.shape, geometry, True, grad_prologue=gp)
    ref_dx, ref_dw, ref_db, ref_dweight, ref_dbias = _reference(x, z, dy, wt, case, mode, bn, act)
    rows = dy[..., 0].numel()
    assert_close(dx.double(), ref_dx, reduction=rows, name=f"{name} dx")
    assert_close(dw.double(), ref_dw, reduction=rows, name=f"{name} dw")
    if mode == "train":  # through the batch statistics dz sums to 0 per channel: an absolute bound
        assert (db.double() - ref_db).abs().max() < 1e-4, f"{name} db: {db}"
    else:
        assert_close(db.double(), ref_db, reduction=rows, name=f"{name} db")
    if bn is not None:
        assert_close(dweight.double(), ref_dweight, reduction=rows, name=f"{name} bn dweight")
        assert_close(dbias.double(), ref_dbias, reduction=rows, name=f"{name} bn dbias")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_gradients_with_dz_on_load(dtype):
    case = CASES["3x3_s2_k32"]
    x, z, dy, wt, geometry, bn, act = _problem(case, "train", "relu", dtype)
    gp, _, _ = _grad_prologue(z, dy, bn, "train", act)
    dx = conv2d_backward_input(dy, wt, geometry, tuple(x.shape[1:3]), grad_prologue=gp)
    dw, _ = conv2d_backward_weight(x, dy, wt.shape, geometry, False, grad_prologue=gp)
    ref_dx, ref_dw, _, _, _ = _reference(x, z, dy, wt, case, "train", bn, act)
    rows = dy[..., 0].numel()
    assert_close(dx.double(), ref_dx, dtype, rows, depth=2, name="dx")
    assert_close(dw.double(), ref_dw, dtype, rows, depth=2, name="dw")


def test_a_bad_grad_prologue_is_refused():
    x, z, dy, wt, geometry, bn, act = _problem(CASES["3x3"], "train", "relu", torch.float32)
    gp, _, _ = _grad_prologue(z, dy, bn, "train", act)
    in_hw = tuple(x.shape[1:3])
    with pytest.raises(ValueError, match=r"grad prologue z: expected a contiguous tensor of dy's shape"):
        conv2d_backward_input(dy, wt, geometry, in_hw, GradPrologue(z[:1], gp.scale, gp.shift, act, gp.center))
    with pytest.raises(ValueError, match=r"grad prologue center: expected shape \(2, 16\)"):
        conv2d_backward_input(dy, wt, geometry, in_hw, GradPrologue(z, gp.scale, gp.shift, act, gp.center[:1]))
    with pytest.raises(ValueError, match="grad prologue: center needs scale and shift"):
        conv2d_backward_weight(x, dy, wt.shape, geometry, False, grad_prologue=GradPrologue(z, None, None, act,
                                                                                           gp.center))
    _, z8, dy8, wt8, geometry8, _, _ = _problem((1, 8, 5, 5, 8, (3, 3), 1, 1, 1, 1), "none", "relu", torch.float32)
    with pytest.raises(ValueError, match="needs 16 or more channels per group, got 8"):
        conv2d_backward_input(dy8, wt8, geometry8, (5, 5), GradPrologue(z8, None, None, act))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_shortcut_block_computes_dz_on_load_from_the_shortcut_gradient(mode):
    """conv -> batch norm -> + shortcut -> relu: the gather pass writes da once, as the shortcut's
    gradient, with batch norm's sums; the gradient kernels turn it into dz as they load it."""
    from cnndsl.kernels.epilogue_backward import (
        BatchNormBackward,
        epilogue_backward_on_load,
    )
    case = CASES["3x3"]
    x, z, dy, wt, geometry, bn, _ = _problem(case, mode, "none", torch.float32)
    res = torch.randn_like(z)
    mean, var, weight, bias = bn
    scale, shift = bn_scale_shift(mean, var, EPS, weight, bias)
    stats = BatchNormBackward(mean, var, EPS, weight, True, True, mode == "train")
    dres, center, dweight, dbias = epilogue_backward_on_load(dy, z, scale, shift, res, Act("relu"), None, None, stats)
    gp = GradPrologue(z, scale, shift, Act("none"), center)
    dx = conv2d_backward_input(dres, wt, geometry, tuple(x.shape[1:3]), grad_prologue=gp)
    dw, _ = conv2d_backward_weight(x, dres, wt.shape, geometry, False, grad_prologue=gp)
    # float64 autograd through relu(bn(z) + res), then the conv
    k, stride, pad, dil, groups = z.shape[-1], *case[6:]
    z64, res64, x64 = z.double().view(-1, k).requires_grad_(), res.double().requires_grad_(), x.double().requires_grad_()
    w64, weight64, bias64 = wt.double().requires_grad_(), weight.double().requires_grad_(), bias.double().requires_grad_()
    a = F.batch_norm(z64, None if mode == "train" else mean.double(), None if mode == "train" else var.double(),
                     weight64, bias64, training=mode == "train", eps=EPS)
    v = torch.relu(a.view(z.shape) + res64)
    dz64, dres64, dweight64, dbias64 = torch.autograd.grad(v, [z64, res64, weight64, bias64], dy.double())
    out = F.conv2d(x64.permute(0, 3, 1, 2), w64, None, stride, pad, dil, groups)
    dx64, dw64 = torch.autograd.grad(out, [x64, w64], dz64.view(z.shape).permute(0, 3, 1, 2))
    rows = dy[..., 0].numel()
    for name, got, want in (("dres", dres, dres64), ("dx", dx, dx64), ("dw", dw, dw64), ("dweight", dweight, dweight64),
                            ("dbias", dbias, dbias64)):
        assert_close(got.double(), want, reduction=rows, name=name)


def test_without_batch_norm_a_shortcut_block_writes_dz_once():
    """conv -> + shortcut -> relu: dz is the shortcut's gradient, one tensor, written once."""
    from cnndsl.kernels.epilogue_backward import epilogue_backward
    z, res, dy = torch.randn(2, 5, 5, 16), torch.randn(2, 5, 5, 16), torch.randn(2, 5, 5, 16)
    dz, dres, _, _ = epilogue_backward(dy, z, None, None, Act("none"), res, Act("relu"), None, None)
    assert dz is dres and torch.equal(dz, torch.where(z + res > 0, dy, 0.0))


# A block that pools in its GEMM (conv -> act -> a non-overlapping pool, no z kept): dz on load from
# the pooled dy, the argmax and y. (case, pool (mode, kernel, stride, padding, ceil_mode), act)
POOLED = [
    ("3x3", ("max", 2, 2, 0, False), "relu"),
    ("3x3_s2_k32", ("max", 2, 2, 1, True), "leaky_relu"),
    ("1x1_k48", ("max", 2, 3, 0, False), "none"),  # stride past the kernel: pixels no window reads
    ("3x3_dil2", ("avg", 2, 2, 1, False), "none"),
    ("groups2_kg16", ("max", 3, 3, 1, True), "relu"),
]


@pytest.mark.parametrize(("name", "pool", "act", "dtype"), [
    pytest.param(*case, dtype, id=f"{case[0]}-{case[1][0]}{case[1][1]}s{case[1][2]}-{case[2]}-{str(dtype)[6:]}")
    for i, case in enumerate(POOLED) for dtype in (torch.float32, torch.bfloat16)[:1 + (i < 2)]])
def test_pooled_dz_on_load_equals_the_pooled_backward_pass(name, pool, act, dtype):
    """The gradients computed from the pooled dy, argmax and y as the kernels load them equal those
    of dz written by the pooled backward pass (epilogue_backward.pooled_backward): the input
    gradient bit for bit in fp32, the weight gradient to rounding."""
    from cnndsl.kernels.epilogue import epilogue_forward
    from cnndsl.kernels.epilogue_backward import pooled_backward
    from cnndsl.specs import Window, window_out

    case = CASES[name]
    x, z, _, wt, geometry, _, act = _problem(case, "none", act, dtype)
    act = act if act.kind == "leaky_relu" else Act(act.kind)
    mode, k, s, p, ceil = pool
    out = tuple(window_out(d, k, s, 2 * p, 1, ceil) for d in z.shape[1:3])
    window = Window(mode, (k, k), (s, s), (p, p), out, ceil)
    y, argmax = epilogue_forward(z, None, None, act, None, Act(), window)
    dy = torch.randn(y.shape).to(dtype)
    dz = pooled_backward(dy, y, argmax, act, window, z.shape)
    gp = GradPrologue(y, None, None, act, pool=window, argmax=argmax)
    in_hw = tuple(x.shape[1:3])
    dx, want_dx = (conv2d_backward_input(d, wt, geometry, in_hw, grad_prologue=g) for d, g in ((dy, gp), (dz, None)))
    rows = z[..., 0].numel()
    if dtype == torch.float32:
        assert torch.equal(dx, want_dx)
    else:  # (a 16-bit dz computed in registers and one stored may round apart in the last bit)
        assert_close(dx.double(), want_dx.double(), dtype, rows, name="dx")
    # (the weight gradient with dz on load multiplies dz as its B operand, in another order of sums)
    got, want = (conv2d_backward_weight(x, d, wt.shape, geometry, True, grad_prologue=g)
                 for d, g in ((dy, gp), (dz, None)))
    assert_close(got[0].double(), want[0].double(), dtype, rows, name="dw")
    assert_close(got[1].double(), want[1].double(), dtype, rows, name="db")


def test_a_bad_pooled_grad_prologue_is_refused():
    from cnndsl.specs import Window
    x, _, _, wt, geometry, _, act = _problem(CASES["3x3"], "none", "relu", torch.float32)
    window = Window("max", (2, 2), (2, 2), (0, 0), (3, 4))
    y, dy = torch.randn(2, 3, 4, 16), torch.randn(2, 3, 4, 16)
    argmax = torch.zeros(2, 3, 4, 16, dtype=torch.int8)
    in_hw = tuple(x.shape[1:3])
    bad = [(GradPrologue(y, None, None, Act("gelu"), pool=window, argmax=argmax), "expected an act whose gradient"),
           (GradPrologue(y, None, None, act, pool=window), "argmax: expected a tensor for max pooling"),
           (GradPrologue(y, None, None, act, pool=Window("max", (3, 3), (2, 2), (1, 1), (3, 4)), argmax=argmax),
            "expected a non-overlapping Window"),
           (GradPrologue(y, None, None, act, argmax=argmax), "an argmax needs a pool")]
    for gp, message in bad:
        with pytest.raises(ValueError, match=message):
            conv2d_backward_input(dy, wt, geometry, in_hw, grad_prologue=gp)
    with pytest.raises(ValueError, match=r"is not the pooled output \(3, 4\)"):
        conv2d_backward_weight(x, dy[:, :2].contiguous(), wt.shape, geometry, False,
                               grad_prologue=GradPrologue(y[:, :2].contiguous(), None, None, act, pool=window,
                                                          argmax=argmax[:, :2].contiguous()))
