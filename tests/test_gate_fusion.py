"""A channel gate (squeeze-and-excitation) fused into the conv that reads it: the conv block's
optional first stage (rules.py). The conv scales each loaded tile of x by g[n, c] (kernels/conv_kernel.py
and conv_backward.py, GATE), forward and weight gradient, so x * g is never written; the gradient
of x * g (the input gradient's GEMM) goes through the gate's backward pass, which gives x's and
g's. Values and gradients are the reference's, and the plan and the launches say so."""

import pytest
import torch

import cnndsl
from cnndsl.kernels.conv import conv2d_backward_weight, conv2d_forward
from cnndsl.kernels.gate import gate_forward
from cnndsl.kernels.prologue import Prologue
from cnndsl.specs import Act, ConvGeometry, Window

from helpers import DTYPES, launches, run_both

# An MBConv block as EfficientNet's: expand, depthwise, squeeze-and-excitation, project.
MBCONV = """
network mbconv
input 16x8x8
conv 32 1 bias=false
batchnorm
silu
conv 32 3 pad=1 groups=32 bias=false
batchnorm
silu
gate {
    global_avgpool
    conv 8 1
    silu
    conv 32 1
    sigmoid
}
conv 16 1 bias=false
batchnorm
global_avgpool
flatten
dense 3
softmax
"""


def test_the_plan_fuses_the_gate_into_its_reader():
    model = cnndsl.compile(MBCONV)
    group = next(g for g in model.plan.groups if g.ops[0] == "gate")
    assert group.ops == ("gate", "conv", "batchnorm")
    assert group.inference == ("bn_fold", "gate+conv_fwd+epilogue")
    assert group.forward[0] == "gate+conv_fwd+stats" and "gate_fwd" not in group.forward
    assert "gate+dz_on_load+conv_bwd_weight" in group.backward and group.backward[-1] == "gate_bwd"
    assert ("gate",) in [g.ops for g in cnndsl.compile(MBCONV, fuse=False).plan.groups]  # unfused: a pass alone


def test_inference_writes_no_gated_tensor():
    model = cnndsl.compile(MBCONV).eval()
    with torch.no_grad():
        names = launches(lambda: model(torch.randn(2, 16, 8, 8)), execute=False)
    assert "_gate_fwd_kernel" not in names and "_conv_kernel" in names


def test_training_writes_no_gated_tensor():
    model = cnndsl.compile(MBCONV).train()
    names = launches(lambda: model.loss(torch.randn(2, 16, 8, 8), torch.tensor([0, 2])).backward(), execute=False)
    assert "_gate_fwd_kernel" not in names and names.count("_gate_bwd_kernel") == 1


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_a_fused_gate_matches_the_reference(train):
    """(Batch 4 at 8x8: the depthwise block's batch-norm parameter gradients cancel, and at batch 2
    at 6x6 fp32's rounding alone, fused or not, exceeds the whole-network bound.)"""
    run_both(MBCONV, batch=4, train=train, fuse=True)


def test_a_fused_gate_in_bf16_step_by_step():
    run_both(MBCONV, batch=2, dtype=torch.bfloat16, train=True, fuse=True)


def test_a_gate_read_by_a_depthwise_conv_runs_alone():
    src = MBCONV.replace("conv 16 1 bias=false", "conv 32 3 pad=1 groups=32 bias=false")
    group = next(g for g in cnndsl.compile(src).plan.groups if "gate" in g.ops)
    assert group.ops == ("gate",)
    assert group.reason.startswith("a gate joins the conv block of the conv that reads it, when that conv reads 16 "
                                   "or more channels per group (not a depthwise conv)")


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_conv_kernel_scales_its_input_by_the_gate(dtype):
    """Against the gate's own pass then the conv: bit for bit in fp32; within one rounding of x * g
    in 16 bits (the interpreter's dot keeps it in fp32, a GPU rounds it as the gate's pass does)."""
    torch.manual_seed(0)
    x, g = torch.randn(3, 5, 5, 32).to(dtype), torch.rand(3, 32).to(dtype)
    w, b = torch.randn(24, 16, 3, 3).to(dtype), torch.randn(24).to(dtype)
    geo = ConvGeometry((1, 1), (1, 1), (1, 1), 2, (5, 5))
    pool = Window("max", (2, 2), (2, 2), (0, 0), (2, 2))
    got = conv2d_forward(x, w, b, geo, gate=g, pool=pool)
    want = conv2d_forward(gate_forward(x, g), w, b, geo, pool=pool)
    if dtype == torch.float32:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-1)


@pytest.mark.parametrize("shape", [(3, 5, 7, 32), (4, 16, 16, 16), (5, 15, 15, 32)],
                         ids=["one-step", "two-samples-a-step", "samples-carried"])
def test_the_weight_gradient_scales_its_input_by_the_gate(shape):
    """Bit for bit against the gate's own pass then the weight gradient (fp32): the interpreter's row
    blocks of up to 512 pixels span several samples, whose gate rows the kernel follows by a counter."""
    torch.manual_seed(0)
    n, h, w, c = shape
    x, g = torch.randn(shape), torch.rand(n, c)
    geo = ConvGeometry((1, 1), (1, 1), (1, 1), 1, (h, w))
    dy = torch.randn(n, h, w, 24)
    got = conv2d_backward_weight(x, dy, (24, c, 3, 3), geo, True, gate=g)
    want = conv2d_backward_weight(gate_forward(x, g), dy, (24, c, 3, 3), geo, True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_the_gate_is_checked():
    x, w = torch.randn(1, 4, 4, 16), torch.randn(8, 16, 1, 1)
    geo = ConvGeometry((1, 1), (0, 0), (1, 1), 1, (4, 4))
    with pytest.raises(ValueError, match=r"gate: expected shape \(1, 16\), got \(1, 8\)"):
        conv2d_forward(x, w, None, geo, gate=torch.ones(1, 8))
    with pytest.raises(ValueError, match="needs 16 or more input channels per group"):
        conv2d_forward(x, torch.randn(8, 8, 1, 1), None, ConvGeometry((1, 1), (0, 0), (1, 1), 2, (4, 4)),
                       gate=torch.ones(1, 16))
    with pytest.raises(ValueError, match="and no prologue"):
        conv2d_forward(x, w, None, geo, gate=torch.ones(1, 16), prologue=Prologue(None, None, Act("relu")))
    with pytest.raises(ValueError, match=r"gate: expected shape \(1, 16\), got \(2, 16\)"):
        conv2d_backward_weight(x, torch.randn(1, 4, 4, 8), (8, 16, 1, 1), geo, False, gate=torch.ones(2, 16))
