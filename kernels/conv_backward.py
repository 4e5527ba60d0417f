"""The convolution weight gradient (validated and called by conv.conv2d_backward_weight): a
split-K implicit GEMM over the N*OH*OW rows for grouped layers and a direct kernel for
depthwise ones, both writing fp32 partials per split (with the bias gradient), and the
kernel that sums the partials in a fixed order (deterministic) into the weight layout."""

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    autotune,
    dot_dtype,
    dot_precision,
    elementwise_tiles,
    gemm_config,
)

_GEMM_CONFIGS = [gemm_config(*c) for c in ((64, 64, 64, 3, 4), (64, 128, 32, 4, 4), (128, 64, 32, 4, 4),
                                    (128, 128, 32, 3, 8), (128, 128, 64, 3, 8), (32, 64, 64, 4, 4),
                                    (32, 128, 64, 3, 4))]
# Depthwise: BLOCK_M rows (pixels) x BLOCK_N channels, no dot.
_DEPTHWISE_CONFIGS = [gemm_config(*c) for c in ((128, 32, 16, 3, 4), (64, 64, 16, 3, 4), (128, 64, 16, 3, 4),
                                         (32, 128, 16, 3, 4), (64, 128, 16, 3, 8), (256, 64, 16, 3, 8))]


def _row_block(args):
    """Row blocks must tile a split's CHUNK rows exactly: its largest power-of-two divisor."""
    return args["CHUNK"] & -args["CHUNK"]


@autotune(_GEMM_CONFIGS, key=["P", "COUT_G", "NCOL", "HAS_BIAS"],
          interpret={"BLOCK_M": ("COUT_G", 16, 128), "BLOCK_N": ("NCOL", 16, 128), "BLOCK_K": (_row_block, 16, 512)})
@triton.jit
def _conv_dw_kernel(x_ptr, dy_ptr, part_ptr, dbp_ptr,
                    P, H, W, C, OH, OW, K, CIN_G, COUT_G, S, NCOL, CHUNK,
                    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                    HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # part[split, g*COUT_G + k, (r*S + s)*CIN_G + c] = sum over this split's rows p = (n, oh, ow)
    #     of dy[p, g*COUT_G + k] * x[n, oh*stride - pad + r*dil, ow*stride - pad + s*dil, g*CIN_G + c]
    g = tl.program_id(1)
    split = tl.program_id(2)
    num_n = tl.cdiv(NCOL, BLOCK_N)
    pid_m = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) % num_n
    offs_k = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output channel within the group
    k_mask = offs_k < COUT_G
    offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (tap, input channel)
    j_mask = offs_j < NCOL
    c = offs_j % CIN_G
    r = (offs_j // CIN_G) // S
    s = (offs_j // CIN_G) % S
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_M,), dtype=tl.float32)
    p_start = split.to(tl.int64) * CHUNK
    for p0 in range(0, CHUNK, BLOCK_K):
        p = p_start + p0 + tl.arange(0, BLOCK_K)
        p_mask = p < P
        n = p // (OH * OW)
        oh = (p // OW) % OH
        ow = p % OW
        a = tl.load(dy_ptr + p[None, :] * K + g * COUT_G + offs_k[:, None],
                    mask=k_mask[:, None] & p_mask[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        ih = oh[:, None] * stride_h - pad_h + r[None, :] * dil_h
        iw = ow[:, None] * stride_w - pad_w + s[None, :] * dil_w
        b_mask = p_mask[:, None] & j_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        b = tl.load(x_ptr + ((n[:, None] * H + ih) * W + iw) * C + g * CIN_G + c[None, :],
                    mask=b_mask, other=0.0)  # (BLOCK_K, BLOCK_N)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
        if HAS_BIAS and pid_n == 0:
            db += tl.sum(a.to(tl.float32), axis=1)
    rows = split.to(tl.int64) * K + g * COUT_G + offs_k
    tl.store(part_ptr + rows[:, None] * NCOL + offs_j[None, :], acc, mask=k_mask[:, None] & j_mask[None, :])
    if HAS_BIAS and pid_n == 0:
        tl.store(dbp_ptr + rows, db, mask=k_mask)


@autotune(_DEPTHWISE_CONFIGS, key=["P", "C", "RS", "HAS_BIAS"],
          interpret={"BLOCK_M": (_row_block, 16, 512), "BLOCK_N": ("C", 16, 64)})
@triton.jit
def _depthwise_dw_kernel(x_ptr, dy_ptr, part_ptr, dbp_ptr, P, H, W, C, OH, OW, S, RS, CHUNK,
                         stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                         HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    # part[split, c, r*S + s] = sum over this split's rows p of dy[p, c] * x[n, ih(oh, r), iw(ow, s), c]
    offs_c = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = offs_c < C
    tap = tl.program_id(1)
    r = tap // S
    s = tap % S
    split = tl.program_id(2).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p0 in range(0, CHUNK, BLOCK_M):
        p = split * CHUNK + p0 + tl.arange(0, BLOCK_M)
        p_mask = p < P
        n = p // (OH * OW)
        ih = (p // OW) % OH * stride_h - pad_h + r * dil_h
        iw = p % OW * stride_w - pad_w + s * dil_w
        row_mask = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        d = tl.load(dy_ptr + p[:, None] * C + offs_c[None, :], mask=p_mask[:, None] & c_mask[None, :],
                    other=0.0).to(tl.float32)
        xv = tl.load(x_ptr + (((n * H + ih) * W + iw) * C)[:, None] + offs_c[None, :],
                     mask=row_mask[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
        acc += d * xv
        if HAS_BIAS:
            db += d
    tl.store(part_ptr + (split * C + offs_c) * RS + tap, tl.sum(acc, axis=0), mask=c_mask)
    if HAS_BIAS and tap == 0:
        tl.store(dbp_ptr + split * C + offs_c, tl.sum(db, axis=0), mask=c_mask)


@autotune([triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((256, 4), (1024, 4), (2048, 8))],
          key=["total", "SPLIT"], interpret=elementwise_tiles("total"))
@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, total, SPLIT, CIN_G, RS, BLOCK: tl.constexpr):
    # out (K, CIN_G, R, S) = sum over splits of part[split] (K, R*S, CIN_G), always in split order
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < total
    src = (idx // (CIN_G * RS) * RS + idx % RS) * CIN_G + (idx // RS) % CIN_G
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = part_ptr + src
    for _ in range(SPLIT):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += total
    tl.store(out_ptr + idx, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _splits(rows, tiles, device):
    """Split the N*OH*OW rows so that about four waves of `tiles`-wide programs run."""
    grain = 32 if INTERPRET else 256  # a multiple of every row block
    sms = 2 if INTERPRET else torch.cuda.get_device_properties(device).multi_processor_count
    split = max(1, min(triton.cdiv(4 * sms, tiles), triton.cdiv(rows, 4 * grain)))
    chunk = triton.cdiv(triton.cdiv(rows, split), grain) * grain
    if INTERPRET:  # a power of two, so that one large row block tiles it (see _row_block)
        chunk = triton.next_power_of_2(chunk)
    return triton.cdiv(rows, chunk), chunk


def _sum_splits(part, out, split, cin_g, rs):
    total = out.numel()
    _sum_splits_kernel[lambda meta: (triton.cdiv(total, meta["BLOCK"]),)](part, out, total, split, cin_g, rs)


def weight_grad(x, dy, w_shape, stride, padding, dilation, groups, need_bias_grad):
    """(dw (K, C/g, R, S), db (K,) or None) in x.dtype; arguments already validated by conv.py."""
    n, h, w, c = x.shape
    _, oh, ow, k = dy.shape
    _, cin_g, r, s = w_shape
    rows, ncol, cout_g = n * oh * ow, r * s * cin_g, k // groups
    if rows == 0:  # no rows: the gradients are empty sums
        db = torch.zeros(k, dtype=x.dtype, device=x.device) if need_bias_grad else None
        return torch.zeros(w_shape, dtype=x.dtype, device=x.device), db
    geometry = (*stride, *padding, *dilation)
    depthwise = cin_g == 1 and cout_g == 1
    tiles = triton.cdiv(k, 64) * r * s if depthwise else groups * triton.cdiv(cout_g, 64) * triton.cdiv(ncol, 64)
    split, chunk = _splits(rows, tiles, x.device)
    part = torch.empty((split, k, ncol), dtype=torch.float32, device=x.device)  # (split, K, R*S*C/g)
    dbp = torch.empty((split, k), dtype=torch.float32, device=x.device) if need_bias_grad else part
    if depthwise:
        grid = lambda meta: (triton.cdiv(k, meta["BLOCK_N"]), r * s, split)
        _depthwise_dw_kernel[grid](x, dy, part, dbp, rows, h, w, c, oh, ow, s, r * s, chunk, *geometry,
                                   HAS_BIAS=need_bias_grad)
    else:
        grid = lambda meta: (triton.cdiv(cout_g, meta["BLOCK_M"]) * triton.cdiv(ncol, meta["BLOCK_N"]),
                             groups, split)
        _conv_dw_kernel[grid](x, dy, part, dbp, rows, h, w, c, oh, ow, k, cin_g, cout_g, s, ncol, chunk,
                              *geometry, HAS_BIAS=need_bias_grad,
                              DOT_DTYPE=dot_dtype(x.dtype), PRECISION=dot_precision(x.dtype))
    dw = torch.empty(w_shape, dtype=x.dtype, device=x.device)
    _sum_splits(part, dw, split, cin_g, r * s)
    db = torch.empty(k, dtype=x.dtype, device=x.device) if need_bias_grad else None
    if need_bias_grad:
        _sum_splits(dbp, db, split, 1, 1)
    return dw, db
