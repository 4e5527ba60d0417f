"""Batch norm as a per-channel affine, and folded into a conv: one kernel turns (mean,
var, weight, bias) into scale = weight / sqrt(var + eps) and shift = bias - mean * scale,
and one rescales the conv's weight rows and bias, so that an eval-mode conv -> bn runs as
one conv with w' = w * scale[k] and b' = b * scale + shift."""

import torch
import triton
import triton.language as tl

from ._common import (
    ELEMENTWISE_CONFIGS,
    autotune,
    check,
    check_tensor,
    elementwise_tiles,
)


@triton.jit
def _scale_shift_kernel(mean_ptr, var_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, C, eps,
                        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < C
    scale = 1.0 / tl.sqrt(tl.load(var_ptr + offs, mask=mask, other=1.0).to(tl.float32) + eps)
    if HAS_WEIGHT:
        scale *= tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    shift = -tl.load(mean_ptr + offs, mask=mask, other=0.0).to(tl.float32) * scale
    if HAS_BIAS:
        shift += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(scale_ptr + offs, scale, mask=mask)
    tl.store(shift_ptr + offs, shift, mask=mask)


@autotune(ELEMENTWISE_CONFIGS, key=["n", "PER_K", "HAS_BIAS"], interpret=elementwise_tiles())
@triton.jit
def _fold_kernel(w_ptr, b_ptr, scale_ptr, shift_ptr, wf_ptr, bf_ptr, n, K, PER_K,
                 HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    # wf[k, ...] = w[k, ...] * scale[k] for w viewed as (K, PER_K); bf[k] = b[k] * scale[k] + shift[k]
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    k = offs // PER_K
    scale = tl.load(scale_ptr + k, mask=mask, other=0.0)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(wf_ptr + offs, (w * scale).to(wf_ptr.dtype.element_ty), mask=mask)
    if tl.program_id(0) == 0:  # the bias: K values, one program
        for k0 in range(0, K, BLOCK):
            kk = k0 + tl.arange(0, BLOCK)
            kmask = kk < K
            bf = tl.load(shift_ptr + kk, mask=kmask, other=0.0)
            if HAS_BIAS:
                bf += tl.load(b_ptr + kk, mask=kmask, other=0.0).to(tl.float32) * tl.load(
                    scale_ptr + kk, mask=kmask, other=0.0)
            tl.store(bf_ptr + kk, bf.to(bf_ptr.dtype.element_ty), mask=kmask)


def bn_scale_shift(mean, var, eps, weight=None, bias=None):
    """(scale, shift), both fp32 (C,), of batch norm with these statistics and affine parameters."""
    check_tensor(mean, "mean", ndim=1)
    C = mean.shape[0]
    for t, name in ((var, "var"), (weight, "weight"), (bias, "bias")):
        if t is not None:
            check_tensor(t, name, ndim=1, device=mean.device)
            check(t.shape[0] == C, f"{name}: expected shape ({C},), got {tuple(t.shape)}")
    scale = torch.empty(C, dtype=torch.float32, device=mean.device)
    shift = torch.empty_like(scale)
    if C:
        block = min(1024, triton.next_power_of_2(C))
        _scale_shift_kernel[(triton.cdiv(C, block),)](mean, var, weight if weight is not None else mean,
                                                      bias if bias is not None else mean, scale, shift, C,
                                                      float(eps), HAS_WEIGHT=weight is not None,
                                                      HAS_BIAS=bias is not None, BLOCK=block)
    return scale, shift


def fold_conv(w, b, scale, shift):
    """(w', b') = (w * scale[k], b * scale + shift) in w's dtype, for a conv weight (K, ...)
    and bias (K,) or None: the conv whose output equals scale * conv(x, w, b) + shift."""
    check_tensor(w, "w")
    K = w.shape[0]
    for t, name in ((scale, "scale"), (shift, "shift")):
        check_tensor(t, name, ndim=1, dtype=torch.float32, device=w.device)
        check(t.shape[0] == K, f"{name}: expected shape ({K},), got {tuple(t.shape)}")
    if b is not None:
        check_tensor(b, "b", ndim=1, dtype=w.dtype, device=w.device)
        check(b.shape[0] == K, f"b: expected shape ({K},), got {tuple(b.shape)}")
    wf = torch.empty_like(w)
    bf = torch.empty(K, dtype=w.dtype, device=w.device)
    n = w.numel()
    if n:
        _fold_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](
            w, b if b is not None else bf, scale, shift, wf, bf, n, K, n // K, HAS_BIAS=b is not None)
    return wf, bf
