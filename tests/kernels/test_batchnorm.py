"""Batch-norm kernels against torch.nn.functional.batch_norm (computed in float64 from the
same rounded inputs): statistics, running-statistics update, output and every gradient,
in training and eval mode, on (M, C) views of NCHW inputs."""

import pytest
import torch
import torch.nn.functional as F

from cnndsl.kernels.batchnorm import (
    batchnorm_forward,
    batchnorm_stats,
    batchnorm_update_running,
)
from cnndsl.kernels.batchnorm_backward import (
    batchnorm_backward,
    batchnorm_eval_backward,
)

from helpers import DTYPES, assert_close

# Loops with runtime bounds make Triton's interpreter convert a shape-(1,) array to an int.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
EPS, MOMENTUM = 1e-5, 0.1
# (N, H, W) of an NCHW input, or (N,) for a flat (N, F) one (BatchNorm1d): M = 98, 169, 3
BATCHES = [(2, 7, 7), (1, 13, 13), (3,)]
CHANNELS = [1, 3, 16, 33]


def _rows(t):
    """NCHW (or NC) -> the (M, C) NHWC rows the kernels see."""
    return t.movedim(1, -1).reshape(-1, t.shape[1]).contiguous()


def _data(batch, C, dtype, loc=0.5, scale=2.0):
    shape = (batch[0], C, *batch[1:])
    x = (loc + scale * torch.randn(shape)).to(dtype)
    return x, torch.randn(shape).to(dtype)


def _params(C, dtype, affine):
    if not affine:
        return None, None
    return (1 + 0.5 * torch.randn(C)).to(dtype), torch.randn(C).to(dtype)


def _reference(x, dy, w, b, running, training):
    """Torch in float64: output and gradients as (M, C) rows / (C,) vectors."""
    xd = x.double().requires_grad_()
    wd = None if w is None else w.double().requires_grad_()
    bd = None if b is None else b.double().requires_grad_()
    y = F.batch_norm(xd, *running, wd, bd, training=training, momentum=MOMENTUM, eps=EPS)
    y.backward(dy.double())
    grads = [None if t is None else t.grad for t in (wd, bd)]
    return _rows(y.detach()), _rows(xd.grad), *grads


def _check_grads(dx, dw, db, ref, dtype, M):
    _, rdx, rdw, rdb = ref
    assert_close(dx.float(), rdx, dtype, reduction=M, depth=3, name="dx")
    if rdw is None:
        assert dw is None and db is None
    else:
        assert dw.dtype == db.dtype == dtype
        assert_close(dw.float(), rdw, dtype, reduction=M, depth=2, name="dweight")
        assert_close(db.float(), rdb, dtype, reduction=M, name="dbias")


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", CHANNELS)
@pytest.mark.parametrize("batch", BATCHES)
def test_batchnorm_train(batch, C, dtype, affine):
    x, dy = _data(batch, C, dtype)
    w, b = _params(C, dtype, affine)
    rm, rv = 0.1 * torch.randn(C), 0.5 + torch.rand(C)
    ref_running = (rm.double(), rv.double())
    ref = _reference(x, dy, w, b, ref_running, training=True)
    x2, dy2 = _rows(x), _rows(dy)
    M = x2.shape[0]
    nbt = torch.tensor(5)

    mean, var = batchnorm_stats(x2)
    assert mean.dtype == var.dtype == torch.float32
    xd = x2.double()
    assert_close(mean, xd.mean(0), reduction=M, name="mean")
    assert_close(var, xd.var(0, unbiased=False), reduction=M, depth=2, name="var")
    batchnorm_update_running(mean, var, rm, rv, nbt, MOMENTUM, M)
    assert_close(rm, ref_running[0], reduction=M, depth=2, name="running_mean")
    assert_close(rv, ref_running[1], reduction=M, depth=3, name="running_var")
    assert nbt.item() == 6 and nbt.dtype == torch.int64

    y = batchnorm_forward(x2, mean, var, EPS, w, b)
    assert y.dtype == dtype
    assert_close(y.float(), ref[0], dtype, reduction=M, depth=2, name="y")
    _check_grads(*batchnorm_backward(dy2, x2, mean, var, EPS, w, True), ref, dtype, M)
    dx, dw, db = batchnorm_backward(dy2, x2, mean, var, EPS, w, False)
    assert dw is None and db is None
    assert_close(dx.float(), ref[1], dtype, reduction=M, depth=3, name="dx without param grads")


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", CHANNELS)
@pytest.mark.parametrize("batch", BATCHES)
def test_batchnorm_eval(batch, C, dtype, affine):
    """Running statistics in the model's dtype (a module moved to half precision)."""
    x, dy = _data(batch, C, dtype)
    w, b = _params(C, dtype, affine)
    rm, rv = (0.5 + 0.3 * torch.randn(C)).to(dtype), (0.5 + 3 * torch.rand(C)).to(dtype)
    saved = rm.clone(), rv.clone()
    ref = _reference(x, dy, w, b, (rm.double(), rv.double()), training=False)
    x2, dy2 = _rows(x), _rows(dy)
    M = x2.shape[0]
    y = batchnorm_forward(x2, rm, rv, EPS, w, b)
    assert_close(y.float(), ref[0], dtype, depth=2, name="y")
    _check_grads(*batchnorm_eval_backward(dy2, x2, rm, rv, EPS, w, True), ref, dtype, M)
    dx, dw, db = batchnorm_eval_backward(dy2, x2, rm, rv, EPS, w, False)
    assert dw is None and db is None
    assert_close(dx.float(), ref[1], dtype, depth=2, name="dx without param grads")
    assert torch.equal(rm, saved[0]) and torch.equal(rv, saved[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_batchnorm_large_mean(dtype):
    """Data at 1000 + N(0, 1): E[x^2] - E[x]^2 in fp32 would lose every digit of var; the
    shifted Welford/Chan merge keeps it to fp32 accuracy. M = 676 rows make 11 tiles under
    the interpreter, so the merge runs over two chunks of 8 tiles."""
    x, dy = _data((4, 13, 13), 5, dtype, loc=1000.0, scale=1.0)
    w, b = _params(5, dtype, True)
    x2, dy2 = _rows(x), _rows(dy)
    M = x2.shape[0]
    mean, var = batchnorm_stats(x2)
    xd = x2.double()
    assert_close(mean, xd.mean(0), reduction=M, name="mean")
    assert_close(var, xd.var(0, unbiased=False), reduction=M, depth=2, name="var")
    ref = _reference(x, dy, w, b, (None, None), training=True)
    # Rounding the mean (1000) to fp32 alone moves y = (x - mean)/std by up to 1000 * 2**-24.
    depth = 128 if dtype == torch.float32 else 3
    assert_close(batchnorm_forward(x2, mean, var, EPS, w, b).float(), ref[0], dtype, M, depth, "y")
    dx, dw, db = batchnorm_backward(dy2, x2, mean, var, EPS, w, True)
    assert_close(dx.float(), ref[1], dtype, M, depth, "dx")
    assert_close(dw.float(), ref[2], dtype, M, depth, "dweight")
    assert_close(db.float(), ref[3], dtype, M, 1, "dbias")


def test_batchnorm_stats_deterministic():
    x = torch.randn(1000, 7)
    first = batchnorm_stats(x)
    for a, b in zip(first, batchnorm_stats(x)):
        assert torch.equal(a, b)


def test_update_running_cumulative_and_half_buffers():
    """momentum=None is torch's cumulative average over num_batches_tracked; half-precision
    buffers are updated in fp32 and stored rounded."""
    bn = torch.nn.BatchNorm1d(3, momentum=None)
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(0)
    for _ in range(3):
        x = 4 + torch.randn(9, 3)
        bn(x)
        batchnorm_update_running(*batchnorm_stats(x), rm, rv, nbt, None, 9)
    assert_close(rm, bn.running_mean, reduction=27, depth=3, name="running_mean")
    assert_close(rv, bn.running_var, reduction=27, depth=3, name="running_var")
    assert torch.equal(nbt, bn.num_batches_tracked)
    rm16, rv16, nbt = torch.zeros(3, dtype=torch.float16), torch.ones(3, dtype=torch.float16), torch.tensor(0)
    rm64, rv64 = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    x = 4 + torch.randn(9, 3)
    F.batch_norm(x.double(), rm64, rv64, training=True, momentum=0.3)
    batchnorm_update_running(*batchnorm_stats(x), rm16, rv16, nbt, 0.3, 9)
    assert_close(rm16.float(), rm64, torch.float16, name="half running_mean")
    assert_close(rv16.float(), rv64, torch.float16, name="half running_var")


def test_update_running_empty_batch_and_single_value():
    rm, rv, nbt = torch.randn(4), torch.rand(4), torch.tensor(2)
    saved = rm.clone(), rv.clone()
    batchnorm_update_running(torch.zeros(4), torch.full((4,), float("nan")), rm, rv, nbt, 0.1, 0)
    assert torch.equal(rm, saved[0]) and torch.equal(rv, saved[1]) and nbt.item() == 3
    x = torch.randn(1, 4)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        F.batch_norm(x, rm, rv, training=True)
    with pytest.raises(ValueError, match="more than 1 value per channel when training, got 1 value per "
                                         "channel for 4 channels"):
        batchnorm_update_running(*batchnorm_stats(x), rm, rv, nbt, 0.1, 1)
    assert torch.equal(rm, saved[0]) and nbt.item() == 3


def test_batchnorm_rejects_bad_input():
    x, c = torch.zeros(5, 3), torch.zeros(3)
    with pytest.raises(ValueError, match=r"x: expected 2 dimensions, got shape \(15,\)"):
        batchnorm_stats(torch.zeros(15))
    with pytest.raises(ValueError, match=r"mean: expected shape \(3,\), got \(4,\)"):
        batchnorm_forward(x, torch.zeros(4), c, EPS, None, None)
    with pytest.raises(ValueError, match=r"weight: expected shape \(3,\), got \(2,\)"):
        batchnorm_forward(x, c, c, EPS, torch.zeros(2), None)
    with pytest.raises(ValueError, match=r"dy: expected shape \(5, 3\), got \(3, 5\)"):
        batchnorm_backward(torch.zeros(3, 5), x, c, c, EPS, None, False)
    with pytest.raises(ValueError, match="dy: expected dtype torch.float32, got torch.float16"):
        batchnorm_eval_backward(x.half(), x, c, c, EPS, None, False)
    with pytest.raises(ValueError, match="contiguous"):
        batchnorm_stats(torch.zeros(3, 5).t())
    with pytest.raises(ValueError, match="num_batches_tracked: expected a 0-d int64 tensor"):
        batchnorm_update_running(c, c, c.clone(), c.clone(), torch.tensor(0.0), 0.1, 5)
    with pytest.raises(ValueError, match=r"running_var: expected shape \(3,\), got \(2,\)"):
        batchnorm_update_running(c, c, c.clone(), torch.zeros(2), torch.tensor(0), 0.1, 5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_batchnorm_large_gpu(dtype):
    x = (3 + torch.randn(32, 64, 56, 56, device="cuda")).to(dtype)
    dy = torch.randn_like(x)
    w, b = (1 + torch.randn(64, device="cuda")).to(dtype), torch.randn(64, device="cuda").to(dtype)
    ref = _reference(x, dy, w, b, (None, None), training=True)
    x2, dy2 = _rows(x), _rows(dy)
    M = x2.shape[0]
    mean, var = batchnorm_stats(x2)
    assert_close(var, x2.double().var(0, unbiased=False), reduction=M, depth=2, name="var")
    assert_close(batchnorm_forward(x2, mean, var, EPS, w, b).float(), ref[0], dtype, M, 2, "y")
    _check_grads(*batchnorm_backward(dy2, x2, mean, var, EPS, w, True), ref, dtype, M)
