"""Dense (GEMM) kernels: forward with bias + activation epilogue, input, weight and bias
gradients against torch.nn.functional.linear and its autograd, the fused dense block
(activation, dropout by value with the kernel's own mask, softmax) forward and backward,
and the launcher checks."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from cnndsl.kernels.activation import ACTIVATIONS
from cnndsl.kernels.dense import (
    dense_backward_input,
    dense_backward_weight,
    dense_forward,
)
from cnndsl.kernels.dense_block import dense_block
from cnndsl.specs import Act, DenseBlock

from helpers import DTYPES, assert_close, torch_act

# (M, N, K): batch rows, output features, input features
SHAPES = [(1, 1, 1), (1, 65, 33), (7, 16, 33), (16, 33, 7), (33, 7, 65), (65, 65, 16), (65, 1, 7), (7, 33, 1)]
LOW_PRECISION = [(7, 16, 33), (33, 7, 65), (65, 65, 16)]
SLOPE = 0.2

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def _problem(m, n, k, dtype, has_bias, act="none"):
    """Rounded inputs and float64 torch results with every gradient."""
    x, w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
    b = torch.randn(n).to(dtype) if has_bias else None
    ref_x, ref_w = x.double().requires_grad_(), w.double().requires_grad_()
    ref_b = b.double().requires_grad_() if has_bias else None
    ref_y = F.linear(ref_x, ref_w, ref_b)
    if act != "none":
        ref_y = torch_act(act, SLOPE)(ref_y)
    dy = torch.randn(m, n).to(dtype)
    ref_y.backward(dy.double())
    return x, w, b, dy, ref_y.detach(), ref_x.grad, ref_w.grad, ref_b.grad if has_bias else None


@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape,dtype", [pytest.param(s, d, id=f"{'x'.join(map(str, s))}-{str(d)[6:]}")
                                         for s in SHAPES for d in DTYPES
                                         if d == torch.float32 or s in LOW_PRECISION])
def test_dense(shape, dtype, has_bias):
    m, n, k = shape
    x, w, b, dy, ref_y, ref_dx, ref_dw, ref_db = _problem(m, n, k, dtype, has_bias)
    y = dense_forward(x, w, b)
    assert y.dtype == dtype
    assert_close(y.float(), ref_y, dtype, reduction=k, name="y")
    dx = dense_backward_input(dy, w)
    assert dx.dtype == dtype
    assert_close(dx.float(), ref_dx, dtype, reduction=n, name="dx")
    dw, db = dense_backward_weight(dy, x, has_bias)
    assert dw.dtype == dtype
    assert_close(dw.float(), ref_dw, dtype, reduction=m, name="dw")
    if has_bias:
        assert db.dtype == dtype
        assert_close(db.float(), ref_db, dtype, reduction=m, name="db")
    else:
        assert db is None


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_activation_epilogue(act, dtype):
    m, n, k = 7, 33, 16
    x, w, b, _, ref_y, *_ = _problem(m, n, k, dtype, True, act)
    y = dense_forward(x, w, b, Act(act, SLOPE))
    assert_close(y.float(), ref_y, dtype, reduction=k, depth=2, name=f"{act} y")


def _keep(m, n, p, seed):
    """The fused kernel's own dropout mask for an (m, n) output: what it keeps of a product of ones."""
    ones = dense_forward(torch.ones(m, 1), torch.ones(n, 1), None, p=p, seed=seed)
    assert set(ones.unique().tolist()) <= {0.0, torch.tensor(1 / (1 - p)).item()}
    return ones != 0


@pytest.mark.parametrize("softmax", [False, True], ids=["no_softmax", "softmax"])
@pytest.mark.parametrize("act,dtype", [pytest.param(a, d, id=f"{a}-{str(d)[6:]}") for a, d in
                                       [(a, torch.float32) for a in ["none", *sorted(ACTIVATIONS)]] +
                                       [(a, torch.bfloat16) for a in ("relu", "gelu")]])
def test_dense_block_dropout_by_value(act, dtype, softmax):
    """dense -> act -> dropout (-> softmax) as one kernel forward and dense_block's backward,
    against float64 autograd applying the kernel's own keep mask: y, dx, dw and db."""
    m, n, k, p, seed = 9, 33, 16, 0.4, 1234
    keep = _keep(m, n, p, seed)
    assert 0.3 < keep.float().mean() < 0.9
    x, w, b, dy = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype), torch.randn(n).to(dtype), \
        torch.randn(m, n).to(dtype)
    ref = [t.double().requires_grad_() for t in (x, w, b)]
    ref_z = F.linear(*ref)
    ref_z = torch_act(act, SLOPE)(ref_z) * keep / (1 - p)
    ours = [t.clone().requires_grad_() for t in (x, w, b)]
    spec = DenseBlock(None, Act(act, SLOPE), p, softmax)
    state = SimpleNamespace(training=True, grad=True, cache={}, text=repr(spec), seed=lambda: torch.tensor(seed))
    y = dense_block(*ours, spec, state)
    y.backward(dy)
    g = dy.double()
    if softmax:  # softmax's gradient from its output, y as the block saved it (rounded in bf16)
        saved = y.detach().double()
        g = saved * (g - (saved * g).sum(1, keepdim=True))
    ref_z.backward(g)
    # bf16 under the interpreter, worst of 3 seeds: 0.0037 for y, 0.011 for a gradient (8u = 0.031)
    assert_close(y.float(), torch.softmax(ref_z, 1) if softmax else ref_z, dtype, reduction=k, name=f"{act} y")
    for (name, red), t, r in zip((("dx", n), ("dw", m), ("db", m)), ours, ref):
        assert_close(t.grad.float(), r.grad, dtype, reduction=red, name=f"{act} {name}")


def test_dense_empty_batch():
    x, w, dy = torch.zeros(0, 5), torch.randn(3, 5), torch.zeros(0, 3)
    assert dense_forward(x, w, None).shape == (0, 3)
    assert dense_backward_input(dy, w).shape == (0, 5)
    dw, db = dense_backward_weight(dy, x, True)
    assert torch.equal(dw, torch.zeros(3, 5)) and torch.equal(db, torch.zeros(3))


def test_dense_rejects_bad_input():
    x, w = torch.zeros(4, 5), torch.zeros(3, 5)
    with pytest.raises(ValueError, match=r"w: expected 5 input features \(x is \(4, 5\)\), got shape \(3, 6\)"):
        dense_forward(x, torch.zeros(3, 6), None)
    with pytest.raises(ValueError, match=r"bias: expected shape \(3,\), got \(4,\)"):
        dense_forward(x, w, torch.zeros(4))
    with pytest.raises(ValueError, match="w: expected dtype torch.float32, got torch.float16"):
        dense_forward(x, w.half(), None)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        dense_forward(x, w, None, Act("swish"))
    with pytest.raises(ValueError, match="contiguous"):
        dense_forward(torch.zeros(5, 4).t(), w, None)
    with pytest.raises(ValueError, match=r"w: expected 4 output features \(dy is \(2, 4\)\), got shape \(3, 5\)"):
        dense_backward_input(torch.zeros(2, 4), w)
    with pytest.raises(ValueError, match=r"dy: expected 4 rows \(x is \(4, 5\)\), got shape \(2, 3\)"):
        dense_backward_weight(torch.zeros(2, 3), x, True)
    with pytest.raises(ValueError, match=r"x: expected 2 dimensions, got shape \(4, 5, 1\)"):
        dense_forward(torch.zeros(4, 5, 1), w, None)
