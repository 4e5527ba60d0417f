"""Softmax and cross-entropy over the rows of (M, N) logits: one program per row, the row
in a single block when it fits, else a loop over column blocks with an online max/sum;
the softmax backward, the cross-entropy forward (per-row losses and log-sum-exps, then a
deterministic mean kernel) and its fused softmax-minus-onehot backward; the custom ops that
run a softmax layer (softmax_layer) and the loss (cross_entropy)."""

import torch
import triton
import triton.language as tl

from ._common import check, check_tensor, define, nan_max

# The widest column block; wider rows loop over blocks (tests lower it to cover the loops).
_MAX_BLOCK = 4096


@triton.jit
def _row_max_sumexp(row_ptr, N, BLOCK: tl.constexpr):
    """(m, s) with m = max(x) and s = sum(exp(x - m)) over a row wider than BLOCK, in one pass."""
    cols = tl.arange(0, BLOCK)
    m = float("-inf")
    s = 0.0
    for c0 in range(0, N, BLOCK):
        x = tl.load(row_ptr + c0 + cols, mask=c0 + cols < N, other=float("-inf")).to(tl.float32)
        m_new = nan_max(m, tl.reduce(x, 0, nan_max))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    return m, s


@triton.jit
def _softmax_fwd_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    # y[i, :] = exp(x[i, :] - max) / sum(exp(x[i, :] - max)) for x (M, N)
    row = tl.program_id(0).to(tl.int64) * N
    cols = tl.arange(0, BLOCK)
    if SINGLE:
        mask = cols < N
        x = tl.load(x_ptr + row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        e = tl.exp(x - tl.reduce(x, 0, nan_max))
        tl.store(y_ptr + row + cols, (e / tl.sum(e, axis=0)).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        m, s = _row_max_sumexp(x_ptr + row, N, BLOCK)
        inv = 1.0 / s
        for c0 in range(0, N, BLOCK):
            mask = c0 + cols < N
            x = tl.load(x_ptr + row + c0 + cols, mask=mask, other=float("-inf")).to(tl.float32)
            tl.store(y_ptr + row + c0 + cols, (tl.exp(x - m) * inv).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_bwd_kernel(dy_ptr, y_ptr, dx_ptr, N, BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    # dx[i, :] = y[i, :] * (dy[i, :] - sum(dy[i, :] * y[i, :]))
    row = tl.program_id(0).to(tl.int64) * N
    cols = tl.arange(0, BLOCK)
    if SINGLE:
        mask = cols < N
        dy = tl.load(dy_ptr + row + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + row + cols, mask=mask, other=0.0).to(tl.float32)
        dot = tl.sum(dy * y, axis=0)
        tl.store(dx_ptr + row + cols, (y * (dy - dot)).to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros((BLOCK,), tl.float32)
        for c0 in range(0, N, BLOCK):
            mask = c0 + cols < N
            dy = tl.load(dy_ptr + row + c0 + cols, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + row + c0 + cols, mask=mask, other=0.0).to(tl.float32)
            acc += dy * y
        dot = tl.sum(acc, axis=0)
        for c0 in range(0, N, BLOCK):
            mask = c0 + cols < N
            dy = tl.load(dy_ptr + row + c0 + cols, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + row + c0 + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + row + c0 + cols, (y * (dy - dot)).to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _max_count_rest(x):
    """(m, c, r) of a block: m = max(x), c = how many x equal m, r = sum(exp(x - m)) over the rest."""
    m = tl.reduce(x, 0, nan_max)
    top = x == m
    return m, tl.sum(top.to(tl.float32), axis=0), tl.sum(tl.where(top, 0.0, tl.exp(x - m)), axis=0)


@triton.jit
def _ce_fwd_kernel(x_ptr, t_ptr, lse_ptr, loss_ptr, N, BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    # lse[i] = logsumexp(x[i, :]); loss[i] = lse[i] - x[i, t[i]] (NaN for a class index outside [0, N)),
    # as (m - x_t) + log1p(c - 1 + r) with sum(exp(x - m)) = c + r: no cancellation when the
    # target dominates, where lse - x_t would lose the small loss to rounding.
    i = tl.program_id(0).to(tl.int64)
    row_ptr = x_ptr + i * N
    cols = tl.arange(0, BLOCK)
    if SINGLE:
        m, c, r = _max_count_rest(tl.load(row_ptr + cols, mask=cols < N, other=float("-inf")).to(tl.float32))
    else:  # online over blocks: maxima that fall behind a new maximum join the rest
        m = float("-inf")
        c = 0.0
        r = 0.0
        for c0 in range(0, N, BLOCK):
            x = tl.load(row_ptr + c0 + cols, mask=c0 + cols < N, other=float("-inf")).to(tl.float32)
            bm, bc, br = _max_count_rest(x)
            m_new = nan_max(m, bm)
            keep = m == m_new
            keep_b = bm == m_new
            r = ((r + tl.where(keep, 0.0, c)) * tl.exp(m - m_new)
                 + (br + tl.where(keep_b, 0.0, bc)) * tl.exp(bm - m_new))
            c = tl.where(keep, c, 0.0) + tl.where(keep_b, bc, 0.0)
            m = m_new
    e = c - 1.0 + r
    u = 1.0 + e
    log1p = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))  # log1p(e), Kahan
    target = tl.load(t_ptr + i)
    x_t = tl.load(row_ptr + target, mask=(target >= 0) & (target < N), other=float("nan")).to(tl.float32)
    tl.store(lse_ptr + i, m + log1p)
    tl.store(loss_ptr + i, (m - x_t) + log1p)


@triton.jit
def _mean_kernel(v_ptr, out_ptr, M, BLOCK: tl.constexpr):
    # out = sum(v) / M for v (M,) fp32, summed in a fixed order by one program
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float32)
    for m0 in range(0, M, BLOCK):
        acc += tl.load(v_ptr + m0 + offs, mask=m0 + offs < M, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0) / M)


@triton.jit
def _ce_bwd_kernel(x_ptr, t_ptr, lse_ptr, dloss_ptr, dx_ptr, M, N, BLOCK: tl.constexpr):
    # dx[i, j] = dloss * (exp(x[i, j] - lse[i]) - (j == t[i])) / M
    i = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + i * N + cols, mask=mask, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + i)
    t = tl.load(t_ptr + i)
    scale = tl.load(dloss_ptr).to(tl.float32) / M
    g = (tl.exp(x - lse) - tl.where(cols == t, 1.0, 0.0)) * scale
    tl.store(dx_ptr + i * N + cols, g.to(dx_ptr.dtype.element_ty), mask=mask)


def _settings(n):
    """(BLOCK, SINGLE, num_warps) for rows of n columns."""
    block = max(16, min(triton.next_power_of_2(n), _MAX_BLOCK))
    return block, n <= block, 4 if block <= 1024 else 8 if block <= 4096 else 16


def _check_rows(x, name):
    check_tensor(x, name, ndim=2)
    return x.shape


def softmax_forward(x):
    """y (M, N) = softmax of each row of x (M, N), in x.dtype (max-subtracted, fp32 maths)."""
    m, n = _check_rows(x, "x")
    y = torch.empty_like(x)
    if y.numel():
        block, single, warps = _settings(n)
        _softmax_fwd_kernel[(m,)](x, y, n, BLOCK=block, SINGLE=single, num_warps=warps)
    return y


def softmax_backward(dy, y):
    """dx (M, N) = y * (dy - sum(dy * y, row)) for softmax's output y and dy (M, N)."""
    m, n = _check_rows(y, "y")
    check_tensor(dy, "dy", ndim=2, dtype=y.dtype, device=y.device)
    check(dy.shape == y.shape, f"dy: expected shape {tuple(y.shape)}, got {tuple(dy.shape)}")
    dx = torch.empty_like(y)
    if dx.numel():
        block, single, warps = _settings(n)
        _softmax_bwd_kernel[(m,)](dy, y, dx, n, BLOCK=block, SINGLE=single, num_warps=warps)
    return dx


def _check_target(target, m, n, device, validate_range):
    check(isinstance(target, torch.Tensor), f"target: expected a torch.Tensor, got {type(target).__name__}")
    check(target.dtype == torch.int64, f"target: expected dtype torch.int64 class indices, got {target.dtype}")
    check(target.shape == (m,), f"target: expected shape ({m},), got {tuple(target.shape)}")
    check(target.device == device, f"target: expected device {device}, got {target.device}")
    check(target.is_contiguous(), f"target: expected a contiguous tensor, got strides {target.stride()}")
    if validate_range and target.device.type == "cpu" and m:
        t = target.numpy()  # input validation on the host: numpy, no torch compute op
        bad = (t < 0) | (t >= n)
        if bad.any():
            row = int(bad.argmax())
            raise ValueError(f"target: class index {int(t[row])} at row {row} is outside [0, {n})")


def cross_entropy_forward(logits, target):
    """(loss, lse) for logits (M, N) and target (M,) int64 class indices in [0, N): loss is a 0-d
    float32 tensor, the mean over rows of logsumexp - logit[target]; lse (M,) float32 is saved for
    the backward. A CPU target is range-checked (ValueError); out-of-range rows elsewhere give NaN."""
    m, n = _check_rows(logits, "logits")
    check(n >= 1, f"logits: expected at least one class, got shape {tuple(logits.shape)}")
    _check_target(target, m, n, logits.device, validate_range=True)
    lse = torch.empty(m, dtype=torch.float32, device=logits.device)
    rows = torch.empty(m, dtype=torch.float32, device=logits.device)
    loss = torch.empty((), dtype=torch.float32, device=logits.device)
    if m:
        block, single, warps = _settings(n)
        _ce_fwd_kernel[(m,)](logits, target, lse, rows, n, BLOCK=block, SINGLE=single, num_warps=warps)
    _mean_kernel[(1,)](rows, loss, m, BLOCK=1024, num_warps=4)  # M = 0 gives NaN, like torch
    return loss, lse


def cross_entropy_backward(dloss, logits, target, lse):
    """dlogits (M, N) in logits.dtype = dloss * (softmax(logits) - onehot(target)) / M, with dloss
    the 0-d gradient of the loss (read in the kernel) and lse from cross_entropy_forward."""
    m, n = _check_rows(logits, "logits")
    check_tensor(dloss, "dloss", ndim=0, device=logits.device)
    _check_target(target, m, n, logits.device, validate_range=False)
    check_tensor(lse, "lse", ndim=1, dtype=torch.float32, device=logits.device)
    check(lse.shape == (m,), f"lse: expected shape ({m},), got {tuple(lse.shape)}")
    dx = torch.empty_like(logits)
    if dx.numel():
        block = max(16, min(triton.next_power_of_2(n), 1024))
        _ce_bwd_kernel[(m, triton.cdiv(n, block))](logits, target, lse, dloss, dx, m, n, BLOCK=block,
                                                   num_warps=4)
    return dx


def _softmax_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _softmax_backward(ctx, dy):
    (y,) = ctx.saved_tensors
    return softmax_backward_op(dy.contiguous(), y)


softmax_backward_op = define("softmax_backward", "(Tensor dy, Tensor y) -> Tensor", softmax_backward,
                             lambda dy, y: torch.empty_like(y))
_softmax = define("softmax", "(Tensor x) -> Tensor", softmax_forward, lambda x: torch.empty_like(x),
                  _softmax_backward, _softmax_setup)


def softmax_layer(x, spec, state):
    return _softmax(x)


def _ce_setup(ctx, inputs, output):
    logits, target = inputs
    ctx.save_for_backward(logits, target, output[1])


def _ce_backward(ctx, dloss, _):
    logits, target, lse = ctx.saved_tensors
    return _ce_bwd(dloss.contiguous(), logits, target, lse), None


_ce_bwd = define("cross_entropy_backward", "(Tensor dloss, Tensor logits, Tensor target, Tensor lse) -> Tensor",
                 cross_entropy_backward, lambda dloss, logits, target, lse: torch.empty_like(logits))
_ce = define("cross_entropy", "(Tensor logits, Tensor target) -> (Tensor, Tensor)", cross_entropy_forward,
             lambda logits, target: (logits.new_empty((), dtype=torch.float32),
                                     logits.new_empty(logits.shape[0], dtype=torch.float32)),
             _ce_backward, _ce_setup)


def cross_entropy(logits, target):
    """Mean cross-entropy of logits against class indices, softmax and its gradient fused."""
    return _ce(logits, target)[0]
