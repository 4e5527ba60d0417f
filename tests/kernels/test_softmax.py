"""Softmax and cross-entropy kernels against torch.softmax / F.cross_entropy and their
autograd, in a single column block and looping over blocks, and the launcher checks."""

import pytest
import torch
import torch.nn.functional as F

from cnndsl.kernels import softmax as sm
from cnndsl.kernels.softmax import (
    cross_entropy_backward,
    cross_entropy_forward,
    softmax_backward,
    softmax_forward,
)

from helpers import DTYPES, assert_close

ROWS, CLASSES = [1, 5], [2, 10, 37, 1000]
LOOP_CLASSES = [37, 1000]  # rows wider than a lowered block, so the kernels loop over blocks
LOW_PRECISION = [(5, 10), (5, 1000)]

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def _cases():
    for m in ROWS:
        for n in CLASSES:
            for loop in (False, True) if n in LOOP_CLASSES else (False,):
                for d in DTYPES:
                    if d == torch.float32 or ((m, n) in LOW_PRECISION and not loop):
                        yield pytest.param(m, n, loop, d, id=f"{m}x{n}-{'loop' if loop else 'block'}-{str(d)[6:]}")


@pytest.fixture
def blocks(monkeypatch):
    """Lower the widest column block to a quarter of the row, so that rows take four blocks."""
    def set_loop(n, loop):
        if loop:
            monkeypatch.setattr(sm, "_MAX_BLOCK", 1 << ((n - 1).bit_length() - 2))
    return set_loop


@pytest.mark.parametrize("m,n,loop,dtype", list(_cases()))
def test_softmax(m, n, loop, dtype, blocks):
    blocks(n, loop)
    # unit-scale logits: dx = y * (dy - sum(dy * y)) loses ~eps / min(y) to cancellation from the stored y
    x = torch.randn(m, n).to(dtype)
    ref_x = x.double().requires_grad_()
    ref_y = torch.softmax(ref_x, dim=1)
    dy = torch.randn(m, n).to(dtype)
    ref_y.backward(dy.double())
    y = softmax_forward(x)
    assert y.dtype == dtype
    assert_close(y.float(), ref_y, dtype, reduction=n, name="y")
    dx = softmax_backward(dy, y)
    assert dx.dtype == dtype
    assert_close(dx.float(), ref_x.grad, dtype, reduction=n, depth=2, name="dx")


@pytest.mark.parametrize("m,n,loop,dtype", list(_cases()))
def test_cross_entropy(m, n, loop, dtype, blocks):
    blocks(n, loop)
    # unit-scale logits: where p[target] -> 1, p - 1 cancels in fp32 (see the confident-rows test)
    logits = torch.randn(m, n).to(dtype)
    target = torch.randint(0, n, (m,))
    ref_logits = logits.double().requires_grad_()
    ref_loss = F.cross_entropy(ref_logits, target)
    dloss = torch.tensor(0.7)
    ref_loss.backward(dloss.double())
    loss, lse = cross_entropy_forward(logits, target)
    assert loss.shape == () and loss.dtype == torch.float32
    assert lse.shape == (m,) and lse.dtype == torch.float32
    assert_close(loss.reshape(1), ref_loss.detach().reshape(1), reduction=n + m, name="loss")
    assert_close(lse, torch.logsumexp(logits.double(), dim=1), reduction=n, name="lse")
    dlogits = cross_entropy_backward(dloss, logits, target, lse)
    assert dlogits.dtype == dtype
    assert_close(dlogits.float(), ref_logits.grad, dtype, reduction=n, depth=2, name="dlogits")


@pytest.mark.parametrize("loop", [False, True], ids=["block", "loop"])
def test_cross_entropy_confident_rows(loop, blocks):
    """A dominant target leaves a loss far below the logits' rounding: the kernel keeps it
    accurate (lse - x_t as (max - x_t) + log1p(rest)); the gradient's p - 1 is only as accurate
    as the float32 lse allows, an absolute error of a few ulps of lse (as in torch's float32)."""
    n = 37
    blocks(n, loop)
    logits = torch.full((4, n), -40.0)
    logits[0, 0], logits[1, :2], logits[2, 36], logits[3, 20:22] = 20.0, torch.tensor([-3.0, 12.0]), 30.0, 9.0
    logits[3, 30] = 5.0  # row 3: two tied maxima, the target one of them
    target = torch.tensor([0, 1, 36, 21])
    ref_logits = logits.double().requires_grad_()
    ref_loss = F.cross_entropy(ref_logits, target)
    ref_loss.backward()
    loss, lse = cross_entropy_forward(logits[:3], target[:3])  # mean loss about 1e-7
    assert_close(loss.reshape(1), F.cross_entropy(logits[:3].double(), target[:3]).reshape(1), reduction=n, name="loss")
    loss, lse = cross_entropy_forward(logits, target)
    assert_close(loss.reshape(1), ref_loss.detach().reshape(1), reduction=n, name="loss with ties")
    assert_close(lse, torch.logsumexp(logits.double(), dim=1), reduction=n, name="lse")
    dlogits = cross_entropy_backward(torch.tensor(1.0), logits, target, lse)
    ulps = (dlogits.double() - ref_logits.grad).abs() * 4 / (lse.double().abs()[:, None] * 2.0**-23)
    assert ulps.max() <= 4, f"dlogits: error of {ulps.max():.3g} ulps of lse / M"


def test_cross_entropy_is_deterministic():
    logits, target = torch.randn(333, 10), torch.randint(0, 10, (333,))
    first, again = cross_entropy_forward(logits, target)[0], cross_entropy_forward(logits, target)[0]
    assert torch.equal(first, again)
    assert_close(first.reshape(1), F.cross_entropy(logits.double(), target).reshape(1), reduction=343, name="loss")


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
def test_cross_entropy_empty_batch_is_nan_like_torch():
    loss, lse = cross_entropy_forward(torch.zeros(0, 10), torch.zeros(0, dtype=torch.long))
    assert loss.isnan() and lse.shape == (0,)


def test_softmax_rejects_bad_input():
    with pytest.raises(ValueError, match=r"x: expected 2 dimensions, got shape \(2, 3, 4\)"):
        softmax_forward(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"dy: expected shape \(2, 3\), got \(2, 4\)"):
        softmax_backward(torch.zeros(2, 4), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="dy: expected dtype torch.float32, got torch.bfloat16"):
        softmax_backward(torch.zeros(2, 3, dtype=torch.bfloat16), torch.zeros(2, 3))


def test_cross_entropy_rejects_bad_input():
    logits = torch.zeros(3, 5)
    with pytest.raises(ValueError, match="target: expected dtype torch.int64 class indices, got torch.float32"):
        cross_entropy_forward(logits, torch.zeros(3))
    with pytest.raises(ValueError, match=r"target: expected shape \(3,\), got \(3, 1\)"):
        cross_entropy_forward(logits, torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"target: class index 5 at row 1 is outside \[0, 5\)"):
        cross_entropy_forward(logits, torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match=r"target: class index -100 at row 2 is outside \[0, 5\)"):
        cross_entropy_forward(logits, torch.tensor([0, 4, -100]))
    with pytest.raises(ValueError, match="target: expected device cpu, got meta"):
        cross_entropy_forward(logits, torch.zeros(3, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="expected at least one class"):
        cross_entropy_forward(torch.zeros(3, 0), torch.zeros(3, dtype=torch.long))
    _, lse = cross_entropy_forward(logits, torch.tensor([0, 4, 1]))
    with pytest.raises(ValueError, match=r"dloss: expected 0 dimensions, got shape \(1,\)"):
        cross_entropy_backward(torch.ones(1), logits, torch.tensor([0, 4, 1]), lse)
    with pytest.raises(ValueError, match=r"lse: expected shape \(3,\), got \(2,\)"):
        cross_entropy_backward(torch.tensor(1.0), logits, torch.tensor([0, 4, 1]), lse[:2])
