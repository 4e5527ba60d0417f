"""The triton backend against the reference backend, whole networks under the
interpreter: outputs, loss, input and parameter gradients, BN running statistics, with
dropout in training (the same masks on both sides); fp16 and bf16 launch step by launch step."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import run_both

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

RESIDUAL = """
network two_blocks
input 3x9x9
conv 8 3 pad=1 bias=false
batchnorm
relu
residual {
    conv 8 3 pad=1 bias=false
    batchnorm
    relu
    conv 8 3 pad=1 bias=false
    batchnorm
}
relu
residual {
    conv 16 3 stride=2 pad=1 bias=false
    batchnorm
    leaky_relu 0.1
    conv 16 3 pad=1 bias=false
    batchnorm
} shortcut {
    conv 16 1 stride=2 bias=false
    batchnorm
}
gelu
global_avgpool
flatten
dense 5
softmax
"""

EVERYTHING = """
network everything
input 5x11x13
conv 6 3x5 stride=2 pad=1x2 dilation=1 groups=1
conv 6 2x4 pad=same
conv 12 3 pad=2 dilation=2 groups=3 bias=false
batchnorm affine=false momentum=0.3
sigmoid
conv 12 3 pad=1 groups=12
tanh
maxpool 3 stride=2 pad=1
avgpool 2x3 stride=1 pad=1
silu
flatten
dropout 0.3
dense 7 bias=false
batchnorm eps=0.001
relu
dense 4
"""

# Concatenated branches (the input itself among them), a gate in each form, pooling's PyTorch
# options, stochastic depth (the reference applies the triton run's masks: helpers.FixedDropout).
BRANCHES = """
network branches
input 4x9x9
conv 8 3 pad=1 bias=false
batchnorm
relu
mixed: concat {
    branch {
        conv 6 1
        relu
    }
    branch { }
    branch {
        maxpool 3 stride=1 pad=1 ceil_mode=true
        conv 4 1 bias=false
        batchnorm
        relu6
    }
}
gate {
    global_avgpool
    conv 5 1
    silu
    conv 18 1
    sigmoid
}
avgpool 3 stride=2 pad=1 count_include_pad=false
residual {
    conv 18 3 pad=1 groups=18
    gate {
        global_avgpool
        flatten
        dense 18
        hardsigmoid
    }
    stochastic_depth 0.5
}
concat {
    branch {
        maxpool 2 ceil_mode=true
    }
    branch {
        conv 8 3 stride=2 pad=1
    }
}
flatten
dense 5
"""

FUSE = pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])


# (LeNet-5 fused only: its unfused ops, conv, tanh, avgpool and dense each alone, are cifar_small's and
# EVERYTHING's unfused kernels)
EXAMPLE_RUNS = [(name, train, fuse) for name, fusions in (("cifar_small", (True, False)), ("lenet5", (True,)))
                for fuse in fusions for train in (True, False)]


@pytest.mark.parametrize(("name", "train", "fuse"), EXAMPLE_RUNS, ids=[
    f"{name}-{'train' if train else 'eval'}-{'fused' if fuse else 'unfused'}" for name, train, fuse in EXAMPLE_RUNS])
def test_example(name, train, fuse):
    run_both(EXAMPLES / f"{name}.cnn", batch=2, train=train, fuse=fuse)


@FUSE
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_residual_network(train, fuse):
    run_both(RESIDUAL, batch=3, train=train, steps=2 if train else 1, fuse=fuse)


@FUSE
def test_every_layer_kind_batch_1_eval(fuse):
    run_both(EVERYTHING, batch=1, train=False, fuse=fuse)


@FUSE
def test_every_layer_kind_train(fuse):
    _ref, tri = run_both(EVERYTHING, batch=3, train=True, fuse=fuse)
    assert int(tri.state_dict()["batchnorm1.num_batches_tracked"]) == 2  # model(x) and model.loss(x)


@FUSE
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_branches(train, fuse):
    run_both(BRANCHES, batch=3, train=train, fuse=fuse)


@FUSE
@pytest.mark.parametrize(("src", "batch", "dtype"), [(RESIDUAL, 2, torch.bfloat16), (EVERYTHING, 3, torch.bfloat16),
                                                     (EVERYTHING, 3, torch.float16)],
                         ids=["residual-bf16", "everything-bf16", "everything-fp16"])
def test_low_precision(src, batch, dtype, fuse):
    """Every launch step against float64 within 8 units in the last place (helpers.run_both)."""
    run_both(src, batch=batch, dtype=dtype, train=True, fuse=fuse)


@FUSE
def test_low_precision_branches(fuse):
    """bf16 (fp16 takes the same kernels through the same code)."""
    run_both(BRANCHES, batch=2, dtype=torch.bfloat16, train=True, fuse=fuse)


def test_dropout_train_matches_its_mask():
    """In training, dropout's mask differs from torch's RNG; the output must still be the
    input scaled by 1/(1-p) or zero, with the gradient following the same mask."""
    import cnndsl
    net = cnndsl.parse("network d\ninput 2x4x4\nflatten\ndropout 0.5\n")
    model = cnndsl.compile(net, backend="triton", device="cpu").train()
    x = torch.randn(64, 2, 4, 4, requires_grad=True)
    y = model(x)
    y.backward(torch.ones_like(y))
    kept = y != 0
    flat = x.detach().flatten(1)
    assert 0.35 < kept.float().mean() < 0.65
    torch.testing.assert_close(y[kept], 2 * flat[kept])
    torch.testing.assert_close(x.grad.flatten(1), 2 * kept.float())
    model.eval()
    torch.testing.assert_close(model(x.detach()), flat)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter switch happens only without CUDA")
def test_triton_imported_before_cnndsl():
    """torch.optim imports Triton; a triton model compiled after it still runs in the interpreter."""
    code = ("import torch, triton; torch.optim.SGD([torch.zeros(1, requires_grad=True)]); import cnndsl; "
            "m = cnndsl.compile('network t\\ninput 1x4x4\\nconv 2 3\\nrelu\\nflatten\\ndense 3\\n'); "
            "m.loss(torch.randn(2, 1, 4, 4), torch.tensor([0, 2])).backward(); print('trained')")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         check=False)
    assert out.returncode == 0 and "trained" in out.stdout, out.stderr[-2000:]


_OVERFLOW = """
import torch, cnndsl.kernels, triton, triton.language as tl
@triton.jit
def square(x_ptr):
    x = tl.load(x_ptr)
    tl.store(x_ptr, x * x)
try:
    square[(1,)](torch.tensor([65536], dtype=torch.int32))
    print("unchecked")
except Exception as e:
    print("checked" if "overflow" in str(e) else repr(e))
"""


def test_the_interpreter_checks_integer_overflow_as_a_gpu_does():
    """A GPU compiles Triton's int32 overflow checks away unless TRITON_DEBUG=1; cnndsl's interpreter
    runs likewise (the kernel tests turn the checks on: tests/kernels/conftest.py)."""
    for debug, want in (("0", "unchecked"), ("1", "checked")):
        env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEBUG=debug)
        out = subprocess.run([sys.executable, "-c", _OVERFLOW], capture_output=True, text=True, env=env, timeout=300,
                             check=False)
        assert out.stdout.strip() == want, f"TRITON_DEBUG={debug}: {out.stdout} {out.stderr[-2000:]}"


def test_inference_folds_batch_norm_once_per_weight_change(monkeypatch):
    """Eval without autograd folds batch norm into the conv weights on the first call, reuses
    them while no tensor changes, and folds again after an in-place update (an optimizer step)."""
    import cnndsl
    from cnndsl.kernels import conv_block as blocks
    calls = []
    fold = blocks.fold_conv
    monkeypatch.setattr(blocks, "fold_conv", lambda *a: calls.append(1) or fold(*a))
    ref = cnndsl.compile(RESIDUAL, backend="torch", device="cpu").eval()
    tri = cnndsl.compile(RESIDUAL, backend="triton", device="cpu").eval()
    tri.load_state_dict(ref.state_dict())
    folded_convs = sum(g.inference[0] == "bn_fold" for g in tri.plan.groups)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        tri(x)
        tri(x)
        assert len(calls) == folded_convs == 6
        for m in (ref, tri):
            m.state_dict()["batchnorm1.weight"].mul_(1.5)
        torch.testing.assert_close(tri(x), ref(x), rtol=1e-4, atol=1e-6)
    assert len(calls) == folded_convs + 1  # only the changed block folded again
