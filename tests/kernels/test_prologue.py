"""Cross-layer fusion's prologue (kernels/prologue.py): the conv forward and weight gradient
reading z and applying y = act(z scale + shift) on load equal the same kernels reading the y that
block-level fusion's epilogue pass writes, and torch on that y, with the conv's zero padding
applied to y (not to z); the input gradient (a conv's, a max pool's) through a prologue also
gives the gradients of its scale and shift, as torch's autograd does."""

import pytest
import torch
import torch.nn.functional as F

from cnndsl.kernels.conv import (
    conv2d_backward_input,
    conv2d_backward_weight,
    conv2d_forward,
)
from cnndsl.kernels.epilogue import epilogue_forward
from cnndsl.kernels.pool import pool_backward
from cnndsl.kernels.prologue import Prologue
from cnndsl.specs import NO_ACT, Act, ConvGeometry, Window

from helpers import assert_close

# (N, C, H, W, K, (R, S), stride, padding, dilation, groups)
CASES = {
    "3x3": (2, 16, 7, 9, 16, (3, 3), 1, 1, 1, 1),
    "3x3_s2_c32": (1, 32, 9, 7, 24, (3, 3), 2, 1, 1, 1),
    "1x1_c48": (2, 48, 5, 5, 16, (1, 1), 1, 0, 1, 1),
    "3x3_dil2_p2": (1, 16, 9, 9, 8, (3, 3), 1, 2, 2, 1),
    "groups2_cg16": (1, 32, 7, 7, 32, (3, 3), 1, 1, 1, 2),
    "depthwise": (2, 16, 7, 7, 16, (3, 3), 1, 1, 1, 16),
    "depthwise_c5": (1, 5, 7, 7, 5, (3, 3), 2, 1, 1, 5),
}
# each case with one activation, each activation twice: sigmoid(shift) and leaky_relu's negative
# side are not 0 at z = 0, so the padding must be zeroed after the activation
ACTS = {"3x3": "relu", "3x3_s2_c32": "sigmoid", "1x1_c48": "leaky_relu", "3x3_dil2_p2": "none",
        "groups2_cg16": "sigmoid", "depthwise": "leaky_relu", "depthwise_c5": "relu"}
LOW_PRECISION = ["3x3_s2_c32", "groups2_cg16", "depthwise"]


def _problem(case, act, dtype):
    n, c, h, w, k, (r, s), stride, pad, dil, groups = case
    z = torch.randn(n, h, w, c).to(dtype)
    scale, shift = torch.rand(c) + 0.5, torch.randn(c)
    act = Act(act, 0.2)
    y, _ = epilogue_forward(z, scale, shift, act, None, NO_ACT, None)  # what block-level fusion writes
    wt = torch.randn(k, c // groups, r, s).to(dtype)
    geometry = ConvGeometry((stride,) * 2, (pad,) * 2, (dil,) * 2, groups,
                            tuple((d + 2 * pad - dil * (kk - 1) - 1) // stride + 1 for d, kk in ((h, r), (w, s))))
    return z, y, wt, geometry, Prologue(scale, shift, act)


# fp32: the same sums; bf16: Triton's interpreter rounds a stored y towards zero but keeps the
# prologue's fp32 values through tl.dot (a GPU rounds both to nearest), so within bf16's tolerance.
@pytest.mark.parametrize(("name", "dtype", "tol"), [
    *((name, torch.float32, 1e-5) for name in CASES), *((name, torch.bfloat16, None) for name in LOW_PRECISION)])
def test_the_conv_reads_the_activated_input(name, dtype, tol):
    case = CASES[name]
    z, y, wt, geometry, pro = _problem(case, ACTS[name], dtype)
    out = conv2d_forward(z, wt, None, geometry, prologue=pro)
    same = conv2d_forward(y, wt, None, geometry)  # the same kernel on the stored y: rounded the same way
    reduction = wt[0].numel()
    assert_close(out.float(), same.float(), dtype, reduction, name=f"{name} y", tol=tol)
    stride, pad, dil, groups = case[6:]
    ref = F.conv2d(y.double().permute(0, 3, 1, 2), wt.double(), None, stride, pad, dil, groups)
    assert_close(out.permute(0, 3, 1, 2).double(), ref, dtype, reduction, name=f"{name} vs torch")
    dy = torch.randn_like(out)
    dw, db = conv2d_backward_weight(z, dy, wt.shape, geometry, True, pro)
    dw_same, db_same = conv2d_backward_weight(y, dy, wt.shape, geometry, True)
    assert_close(dw.float(), dw_same.float(), dtype, dy[..., 0].numel(), name=f"{name} dw", tol=tol)
    assert torch.equal(db, db_same)


@pytest.mark.parametrize("name", ["3x3_s2_c32", "depthwise"])
def test_without_batch_norm_the_prologue_only_activates(name):
    z, _, wt, geometry, _ = _problem(CASES[name], "relu", torch.float32)
    y, _ = epilogue_forward(z, None, None, Act("leaky_relu", 0.2), None, NO_ACT, None)
    pro = Prologue(None, None, Act("leaky_relu", 0.2))
    assert_close(conv2d_forward(z, wt, None, geometry, prologue=pro), conv2d_forward(y, wt, None, geometry),
                 tol=1e-5, name="y")
    dy = torch.randn(conv2d_forward(y, wt, None, geometry).shape)
    dw, _ = conv2d_backward_weight(z, dy, wt.shape, geometry, False, pro)
    assert_close(dw, conv2d_backward_weight(y, dy, wt.shape, geometry, False)[0], tol=1e-5, name="dw")


def _torch_act(v, act):
    return {"relu": F.relu, "sigmoid": torch.sigmoid, "none": lambda t: t,
            "leaky_relu": lambda t: F.leaky_relu(t, act.slope)}[act.kind](v)


# every case (stride-2 phases, a 1x1 stride-2 conv whose phases no tap reaches, groups, depthwise)
@pytest.mark.parametrize("name", [*CASES, "1x1_s2"])
def test_the_input_gradient_gives_the_prologues_gradients(name):
    case = CASES.get(name, (2, 16, 7, 6, 16, (1, 1), 2, 0, 1, 1))
    z, _, wt, geometry, pro = _problem(case, ACTS.get(name, "relu"), torch.float32)
    dy = torch.randn(conv2d_forward(z, wt, None, geometry, prologue=pro).shape)
    dx, dscale, dshift = conv2d_backward_input(dy, wt, geometry, z.shape[1:3], prologue=pro, z=z)
    assert torch.equal(dx, conv2d_backward_input(dy, wt, geometry, z.shape[1:3]))  # y's gradient, as without
    # torch: y = act(z scale + shift) (the conv's padding is y's), conv, <dy, out>
    scale, shift = pro.scale.double().requires_grad_(), pro.shift.double().requires_grad_()
    y = _torch_act(z.double() * scale + shift, pro.act).permute(0, 3, 1, 2)
    stride, pad, dil, groups = case[6:]
    out = F.conv2d(y, wt.double(), None, stride, pad, dil, groups)
    ref_scale, ref_shift = torch.autograd.grad((out * dy.double().permute(0, 3, 1, 2)).sum(), (scale, shift))
    assert_close(dscale.double(), ref_scale, tol=1e-5, name=f"{name} dscale")
    assert_close(dshift.double(), ref_shift, tol=1e-5, name=f"{name} dshift")


def test_a_max_pools_gradient_gives_the_prologues_gradients():
    z, _, _, _, pro = _problem(CASES["1x1_c48"], "relu", torch.float32)
    window = Window("max", (3, 3), (2, 2), (1, 1), tuple((d - 1) // 2 + 1 for d in z.shape[1:3]))
    y, argmax = epilogue_forward(z, pro.scale, pro.shift, pro.act, None, NO_ACT, window, round_taps=True)
    dy = torch.randn_like(y)
    dx, dscale, dshift = pool_backward(dy, window, argmax, z.shape[1:3], pro, z)
    assert torch.equal(dx, pool_backward(dy, window, argmax, z.shape[1:3]))
    scale, shift = pro.scale.double().requires_grad_(), pro.shift.double().requires_grad_()
    v = _torch_act(z.double() * scale + shift, pro.act).permute(0, 3, 1, 2)
    out = F.max_pool2d(v, 3, 2, 1)
    ref_scale, ref_shift = torch.autograd.grad((out * dy.double().permute(0, 3, 1, 2)).sum(), (scale, shift))
    assert_close(dscale.double(), ref_scale, tol=1e-5, name="dscale")
    assert_close(dshift.double(), ref_shift, tol=1e-5, name="dshift")


def test_statistics_and_bias_with_a_prologue():
    z, y, wt, geometry, pro = _problem(CASES["3x3"], "relu", torch.float32)
    b = torch.randn(wt.shape[0])
    out, mean, var = conv2d_forward(z, wt, b, geometry, stats=True, prologue=pro)
    same, mean_same, var_same = conv2d_forward(y, wt, b, geometry, stats=True)
    assert_close(out, same, tol=1e-5, name="y")
    assert_close(mean, mean_same, tol=1e-5, name="mean")
    assert_close(var, var_same, tol=1e-5, name="var")


def test_a_bad_prologue_is_refused():
    z, _, wt, geometry, pro = _problem(CASES["3x3"], "relu", torch.float32)
    with pytest.raises(ValueError, match=r"prologue scale: expected shape \(16,\)"):
        conv2d_forward(z, wt, None, geometry, prologue=Prologue(pro.scale[:8], pro.shift, pro.act))
    with pytest.raises(ValueError, match="prologue shift: dtype torch.float64 is not supported"):
        conv2d_forward(z, wt, None, geometry, prologue=Prologue(pro.scale, pro.shift.double(), pro.act))
    dy = torch.randn(conv2d_forward(z, wt, None, geometry, prologue=pro).shape)
    with pytest.raises(ValueError, match="expected a Prologue with a scale and shift"):
        conv2d_backward_input(dy, wt, geometry, z.shape[1:3], prologue=Prologue(None, None, pro.act), z=z)
    with pytest.raises(ValueError, match=r"z: expected a contiguous tensor of shape \(2, 7, 9, 16\)"):
        conv2d_backward_input(dy, wt, geometry, z.shape[1:3], prologue=pro, z=z[:1])
    z8, _, wt8, geometry8, pro8 = _problem((1, 8, 5, 5, 8, (3, 3), 1, 1, 1, 1), "relu", torch.float32)
    with pytest.raises(ValueError, match="needs 16 or more channels per group"):
        conv2d_backward_weight(z8, torch.randn(1, 5, 5, 8), wt8.shape, geometry8, False, pro8)
