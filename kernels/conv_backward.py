"""The convolution weight gradient (validated and called by conv.conv2d_backward_weight): a
split-K implicit GEMM over the N*OH*OW rows, one program per (tap, channel tiles), for grouped
layers and a direct kernel for depthwise ones, both writing fp32 partials per split (with the
bias gradient), and the kernel that sums the partials in a fixed order (deterministic) into
the weight layout. Cross-layer fusion (prologue.py): the input tile may be recomputed from the
previous block's z as it loads, and dz from dy and z (then dz is the B operand)."""

from dataclasses import replace

import torch
import triton
import triton.language as tl

from ..specs import H100, INTERPRETER, weight_grad_split, weight_grad_tiles
from ._common import (
    INTERPRET,
    autotune,
    dot_dtype,
    dot_precision,
    elementwise_tiles,
    extent,
    row_stride,
)
from .conv_tiles import (
    DEPTHWISE_CONFIGS,
    WEIGHT_GRAD_CONFIGS_16BIT,
    WEIGHT_GRAD_CONFIGS_FP32,
    prune_weight_grad,
    row_block,
)
from .prologue import (
    apply_grad_prologue,
    apply_prologue,
    grad_coefs,
    grad_prologue_args,
    pooled_grad,
    prologue_args,
    prologue_coefs,
)


@triton.jit
def _split_rows(tap, split, S, CHUNK, P, OH, OW, H, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                ROWS: tl.constexpr):
    """The first ROWS rows p of a split at tap (r, s) = (tap // S, tap % S), and where the split
    ends: (p, p_end, its row count, ih_off, iw_off, n*H, ih, iw) with ih = oh*stride_h + ih_off,
    ih_off = r*dil_h - pad_h, for output pixels p = (n, oh, ow) (the divisions, before the loop)."""
    p_start = split * CHUNK
    p_end = tl.minimum(p_start + CHUNK, P)
    p = p_start + tl.arange(0, ROWS)
    ih_off = tap // S * dil_h - pad_h
    iw_off = tap % S * dil_w - pad_w
    return (p, p_end, p_end - p_start, ih_off, iw_off,
            p // (OH * OW) * H, p // OW % OH * stride_h + ih_off, p % OW * stride_w + iw_off)


@triton.jit
def _advance_source_rows(nh, ih, iw, STEP, OH, OW, H, stride_h, stride_w, ih_off, iw_off):
    """_split_rows' (n*H, ih, iw) of p + STEP from those of p, with compares instead of `//` and `%`: STEP is
    DN*OH*OW + DH*OW + DW pixels, and each of ow + DW and oh + DH + carry carries at most once."""
    q = STEP % (OH * OW)  # scalars: folded out of the loop
    iw += q % OW * stride_w
    wrap = iw >= OW * stride_w + iw_off
    iw = tl.where(wrap, iw - OW * stride_w, iw)
    ih += tl.where(wrap, q // OW * stride_h + stride_h, q // OW * stride_h)
    wrap = ih >= OH * stride_h + ih_off
    ih = tl.where(wrap, ih - OH * stride_h, ih)
    nh += tl.where(wrap, STEP // (OH * OW) * H + H, STEP // (OH * OW) * H)
    return nh, ih, iw


@triton.jit
def _inside(i, size):
    """0 <= i < size, as one unsigned compare (size an int32 argument, or a constexpr where Triton
    specialises an argument equal to 1: a 1x1 map)."""
    return i.to(tl.uint32, bitcast=True) < tl.cast(size, tl.uint32)


@autotune(WEIGHT_GRAD_CONFIGS_16BIT + WEIGHT_GRAD_CONFIGS_FP32,
          key=["P", "CIN_G", "COUT_G", "RS", "HAS_BIAS", "INT64", "PROLOGUE", "GRAD_PRO", "GP_POOL", "GATE"],
          interpret={"BLOCK_M": ("COUT_G", 16, 128), "BLOCK_N": ("CIN_G", 16, 128), "BLOCK_K": (row_block, 16, 512)},
          prune_configs_by={"early_config_prune": prune_weight_grad})
@triton.heuristics({"EVEN_P": lambda a: a["P"] % a["BLOCK_K"] == 0,
                    "EVEN_M": lambda a: a["COUT_G"] % a["BLOCK_M"] == 0,
                    "EVEN_N": lambda a: a["CIN_G"] % a["BLOCK_N"] == 0})
@triton.jit
def _conv_dw_kernel(x_ptr, dy_ptr, part_ptr, dbp_ptr,  # x (N, H, W, C), dy (P, K) = (N*OH*OW, K)
                    P, H, W, C, OH, OW, K, CIN_G, COUT_G, S, RS, CHUNK,  # part (split, K, RS*CIN_G), dbp (split, K)
                    stride_dyp,  # dy's row stride: K, or more for a channel slice of a concat's gradient
                    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                    pro_scale_ptr, pro_shift_ptr, pro_slope,  # PROLOGUE: x is z, read as act(z scale + shift), (C,)
                    PROLOGUE: tl.constexpr, PRO_AFFINE: tl.constexpr, PRO_ACT: tl.constexpr,
                    gp_z_ptr, gp_scale_ptr, gp_shift_ptr, gp_center_ptr, gp_slope,  # GRAD_PRO: dy read as dz, (K,)
                    GRAD_PRO: tl.constexpr, GP_AFFINE: tl.constexpr, GP_ACT: tl.constexpr, GP_CENTER: tl.constexpr,
                    GP_SLICE: tl.constexpr,  # dy a channel slice: z's rows (K apart) are not dy's
                    gp_arg_ptr, gp_pool_oh, gp_pool_ow, gp_pool_ph, gp_pool_pw,  # GP_POOL: dy the pooled dy, z the
                    GP_POOL: tl.constexpr, GP_KH: tl.constexpr, GP_KW: tl.constexpr,  # pooled y, arg the argmax
                    GP_SH: tl.constexpr, GP_SW: tl.constexpr,  # (N, POH, POW, K); the window's sizes and stride
                    gate_ptr, GATE: tl.constexpr,  # GATE: x read as x * gate[n, c], a channel gate, (N, C)
                    HAS_BIAS: tl.constexpr, INT64: tl.constexpr, DOT_DTYPE: tl.constexpr,
                    PRECISION: tl.constexpr, EVEN_P: tl.constexpr, EVEN_M: tl.constexpr,
                    EVEN_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # part[split, g*COUT_G + k, (r*S + s)*CIN_G + c] = sum over this split's rows p = (n, oh, ow)
    #     of dy[p, g*COUT_G + k] * x[n, oh*stride - pad + r*dil, ow*stride - pad + s*dil, g*CIN_G + c]
    # One program holds one tap (r, s): its B tile is BLOCK_K source pixels x BLOCK_N contiguous
    # channels, so bounds are per row and loads are 16-byte vectors; rows advance by counters.
    num_m = tl.cdiv(COUT_G, BLOCK_M)
    num_n = tl.cdiv(CIN_G, BLOCK_N)
    pid = tl.program_id(0)
    pid_n = pid % num_n
    pid_m = pid // num_n % num_m
    tap = pid // (num_n * num_m) % RS
    g = pid // (num_n * num_m * RS)
    split = tl.program_id(1)
    if INT64:
        split = split.to(tl.int64)
    offs_k = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output channel within the group
    k_mask = offs_k < COUT_G
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input channel within the group
    c_mask = offs_c < CIN_G
    p, p_end, rows, ih_off, iw_off, nh, ih, iw = _split_rows(tap, split, S, CHUNK, P, OH, OW, H, stride_h, stride_w,
                                                             pad_h, pad_w, dil_h, dil_w, BLOCK_K)
    # The bias gradient's row sums as a product with e0 (ones in column 0): a 16-wide MMA beside the
    # tile's instead of a cross-thread reduction every step; the first programs store it.
    if GRAD_PRO:  # dz on load (prologue.py): dy^T x computed as (x^T dz)^T, so that dz, transformed in
        # registers, is the B operand (wgmma takes B from shared memory; an A operand transformed in
        # registers makes ptxas serialize the wgmma pipeline here); its coefficients are loaded once
        a_off = p[:, None] * stride_dyp + (g * COUT_G + offs_k)[None, :]  # (BLOCK_K, BLOCK_M)
        z_ptrs = gp_z_ptr + (p[:, None] * K + (g * COUT_G + offs_k)[None, :] if GP_SLICE else a_off)
        s, t, beta, off = grad_coefs(gp_scale_ptr, gp_shift_ptr, gp_center_ptr, K, g * COUT_G + offs_k, k_mask,
                                     GP_AFFINE, GP_CENTER)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        db = tl.zeros((16, BLOCK_M), dtype=tl.float32)
        e0 = tl.broadcast_to((tl.arange(0, 16) == 0)[:, None], (16, BLOCK_K)).to(DOT_DTYPE)
    else:
        a_off = p[None, :] * stride_dyp + (g * COUT_G + offs_k)[:, None]  # (BLOCK_M, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        db = tl.zeros((BLOCK_M, 16), dtype=tl.float32)
        e0 = tl.broadcast_to((tl.arange(0, 16) == 0)[None, :], (BLOCK_K, 16)).to(DOT_DTYPE)
    a_ptrs = dy_ptr + a_off
    if PROLOGUE:  # a program's input channels are fixed: their coefficients loaded once
        ps, pt = prologue_coefs(pro_scale_ptr + g * CIN_G, pro_shift_ptr + g * CIN_G, offs_c, c_mask, PRO_AFFINE,
                                EVEN_N)
    if GP_POOL != 0:  # each row's conv pixel (n, oh, ow): dz's, read from the pooled dy; advanced as nh
        pn = p // (OH * OW)
        poh = p // OW % OH
        pow_ = p % OW
    x_ptr += g * CIN_G + offs_c[None, :]
    if GATE:  # the gate's row of each pixel's sample, n * C, advanced by a counter as nh is
        gate_ptr += g * CIN_G + offs_c[None, :]
        gn = p // (OH * OW) * C
    for _ in range(0, rows, BLOCK_K):  # EVEN_P: whole row blocks, every row real
        p_mask = p < p_end
        row_ok = _inside(ih, H) & _inside(iw, W)
        if not EVEN_P:
            row_ok &= p_mask
        b_ptrs = x_ptr + (((nh + ih) * W + iw) * C)[:, None]  # (BLOCK_K, BLOCK_N)
        if GP_POOL != 0:  # dz from the pooled dy, argmax and y (prologue.pooled_grad)
            a = pooled_grad(dy_ptr, gp_arg_ptr, gp_z_ptr, pn, poh, pow_, g * COUT_G + offs_k,
                            p_mask[:, None] & k_mask[None, :], gp_pool_oh, gp_pool_ow, K, gp_pool_ph, gp_pool_pw,
                            GP_POOL, GP_KH, GP_KW, GP_SH, GP_SW, GP_ACT, gp_slope)
        elif GRAD_PRO and EVEN_P and EVEN_M:  # every row and channel real: no mask
            a = apply_grad_prologue(tl.load(a_ptrs), tl.load(z_ptrs), s[None, :], t[None, :], beta[None, :],
                                    off[None, :], p_mask, GP_AFFINE, GP_ACT, gp_slope, GP_CENTER,
                                    DOT_DTYPE, MASKED=False)
            z_ptrs += BLOCK_K * K
        elif GRAD_PRO:
            keep = p_mask[:, None] & k_mask[None, :]
            a = tl.load(a_ptrs, mask=keep, other=0.0)
            zt = tl.load(z_ptrs, mask=keep, other=0.0)
            a = apply_grad_prologue(a, zt, s[None, :], t[None, :], beta[None, :], off[None, :], keep,
                                    GP_AFFINE, GP_ACT, gp_slope, GP_CENTER, DOT_DTYPE)
            z_ptrs += BLOCK_K * K
        elif EVEN_P and EVEN_M:  # every row of every split is real: no mask
            a = tl.load(a_ptrs)
        elif EVEN_M:
            a = tl.load(a_ptrs, mask=p_mask[None, :], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=k_mask[:, None] & p_mask[None, :], other=0.0)
        if EVEN_N:
            b = tl.load(b_ptrs, mask=row_ok[:, None], other=0.0)
        else:
            b = tl.load(b_ptrs, mask=row_ok[:, None] & c_mask[None, :], other=0.0)
        if PROLOGUE:  # the input recomputed from z: act(z scale + shift), 0 in the padding
            b = apply_prologue(b, ps, pt, c_mask, row_ok, PRO_AFFINE, PRO_ACT, pro_slope, EVEN_N, DOT_DTYPE)
        if GATE:  # x * gate[n, c] in fp32, rounded to the dot's dtype as the forward conv rounds it
            gv = tl.load(gate_ptr + gn[:, None], mask=p_mask[:, None] & c_mask[None, :], other=0.0)
            b = b.to(tl.float32) * gv.to(tl.float32)
        if GRAD_PRO:
            acc = tl.dot(tl.trans(b.to(DOT_DTYPE)), a.to(DOT_DTYPE), acc, input_precision=PRECISION)
            if HAS_BIAS:
                db = tl.dot(e0, a.to(DOT_DTYPE), db, input_precision=PRECISION)
        else:
            acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
            if HAS_BIAS:
                db = tl.dot(a.to(DOT_DTYPE), e0, db, input_precision=PRECISION)
        p += BLOCK_K
        a_ptrs += BLOCK_K * stride_dyp
        if GATE:  # the sample advanced by STEP // (OH*OW) or one more where nh carried: so does gn
            nh_was = nh
        nh, ih, iw = _advance_source_rows(nh, ih, iw, BLOCK_K, OH, OW, H, stride_h, stride_w, ih_off, iw_off)
        if GP_POOL != 0:  # (n, oh, ow): the source rows' walk at stride 1, no offset, H = 1
            pn, poh, pow_ = _advance_source_rows(pn, poh, pow_, BLOCK_K, OH, OW, 1, 1, 1, 0, 0)
        if GATE:
            samples = BLOCK_K // (OH * OW)
            gn += tl.where(nh - nh_was > samples * H, samples * C + C, samples * C)
    rows = split * K + g * COUT_G + offs_k
    cols = tap * CIN_G + offs_c
    if GRAD_PRO:  # acc and db hold the transposes
        tl.store(part_ptr + (rows * (RS * CIN_G))[None, :] + cols[:, None], acc,
                 mask=c_mask[:, None] & k_mask[None, :])
        if HAS_BIAS and (tap == 0) & (pid_n == 0):
            tl.store(dbp_ptr + rows, tl.sum(db, axis=0), mask=k_mask)
    else:
        tl.store(part_ptr + (rows * (RS * CIN_G))[:, None] + cols[None, :], acc,
                 mask=k_mask[:, None] & c_mask[None, :])
        if HAS_BIAS and (tap == 0) & (pid_n == 0):
            tl.store(dbp_ptr + rows, tl.sum(db, axis=1), mask=k_mask)


@autotune(DEPTHWISE_CONFIGS, key=["P", "C", "RS", "HAS_BIAS", "INT64", "PROLOGUE"],
          interpret={"BLOCK_M": (row_block, 16, 512), "BLOCK_N": ("C", 16, 256)})
@triton.jit
def _depthwise_dw_kernel(x_ptr, dy_ptr, part_ptr, dbp_ptr,  # x (N, H, W, C), dy (P, C): part (split, C, RS)
                         P, H, W, C, OH, OW, S, RS, CHUNK, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                         pro_scale_ptr, pro_shift_ptr, pro_slope, PROLOGUE: tl.constexpr,
                         PRO_AFFINE: tl.constexpr, PRO_ACT: tl.constexpr,
                         HAS_BIAS: tl.constexpr, INT64: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # part[split, c, r*S + s] = sum over this split's rows p of dy[p, c] * x[n, ih(oh, r), iw(ow, s), c]
    offs_c = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = offs_c < C
    tap = tl.program_id(1)
    split = tl.program_id(2)
    if INT64:
        split = split.to(tl.int64)
    p, p_end, rows, ih_off, iw_off, nh, ih, iw = _split_rows(tap, split, S, CHUNK, P, OH, OW, H, stride_h, stride_w,
                                                             pad_h, pad_w, dil_h, dil_w, BLOCK_M)
    if PROLOGUE:  # a program's channels are fixed: their coefficients loaded once
        ps, pt = prologue_coefs(pro_scale_ptr, pro_shift_ptr, offs_c, c_mask, PRO_AFFINE, False)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, rows, BLOCK_M):
        p_mask = p < p_end
        row_ok = p_mask & _inside(ih, H) & _inside(iw, W)
        d = tl.load(dy_ptr + (p * C)[:, None] + offs_c[None, :], mask=p_mask[:, None] & c_mask[None, :],
                    other=0.0).to(tl.float32)
        xv = tl.load(x_ptr + (((nh + ih) * W + iw) * C)[:, None] + offs_c[None, :],
                     mask=row_ok[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
        if PROLOGUE:
            xv = apply_prologue(xv, ps, pt, c_mask, row_ok, PRO_AFFINE, PRO_ACT, pro_slope, False, tl.float32)
        acc += d * xv
        if HAS_BIAS:
            db += d
        p += BLOCK_M
        nh, ih, iw = _advance_source_rows(nh, ih, iw, BLOCK_M, OH, OW, H, stride_h, stride_w, ih_off, iw_off)
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
    """Split the N*OH*OW rows so that about four waves of `tiles`-wide programs run (under the
    interpreter into chunks of a power of two rows, so that one large row block tiles each; see
    row_block)."""
    machine = INTERPRETER if INTERPRET else replace(H100, sms=torch.cuda.get_device_properties(device).multi_processor_count)
    return weight_grad_split(rows, tiles, machine)


def _sum_splits(part, out, split, cin_g, rs):
    total = out.numel()
    _sum_splits_kernel[lambda meta: (triton.cdiv(total, meta["BLOCK"]),)](part, out, total, split, cin_g, rs)


def _pad_groups(x, groups, cin_g, width):
    """x (N, H, W, G*cin_g) with each group's channels padded with zeros to `width`: a tap's tile of
    1-15 channels would be scalar loads (the stem conv's 3), 16 are 16-byte vectors."""
    n, h, w, _ = x.shape
    padded = x.new_zeros((n, h, w, groups, width))
    padded[..., :cin_g] = x.view(n, h, w, groups, cin_g)
    return padded.view(n, h, w, groups * width)


def weight_grad(x, dy, w_shape, stride, padding, dilation, groups, need_bias_grad, prologue=None, grad_prologue=None,
                gate=None, out_hw=None):
    """(dw (K, C/g, R, S), db (K,) or None) in x.dtype; arguments already validated by conv.py (the
    prologue here); gate (N, C): the input is x * gate[n, c] (16 or more channels a group); out_hw:
    the conv's output (OH, OW), where dy is a pooled output's gradient (grad_prologue.pool)."""
    n, h, w, c = x.shape
    _, oh, ow, k = dy.shape
    if out_hw is not None:
        oh, ow = out_hw
    _, cin_g, r, s = w_shape
    rows, cout_g = n * oh * ow, k // groups
    if rows == 0:  # no rows: the gradients are empty sums
        db = torch.zeros(k, dtype=x.dtype, device=x.device) if need_bias_grad else None
        return torch.zeros(w_shape, dtype=x.dtype, device=x.device), db
    geometry = (*stride, *padding, *dilation)
    depthwise = cin_g == 1 and cout_g == 1
    pro = prologue_args(prologue, x, cin_g, depthwise)
    gp = grad_prologue_args(grad_prologue, dy, cout_g, depthwise, out_hw)
    width, tiles = weight_grad_tiles(k, groups, cin_g, r * s)  # the channels a tap's tile covers
    if width != cin_g:
        x = _pad_groups(x, groups, cin_g, width)
        c = groups * width
    split, chunk = _splits(rows, tiles, x.device)
    part = torch.empty((split, k, r * s * width), dtype=torch.float32, device=x.device)  # (split, K, R*S*width)
    dbp = torch.empty((split, k), dtype=torch.float32, device=x.device) if need_bias_grad else part
    int64 = max(x.numel(), extent(dy), rows * k, part.numel()) >= 2**31
    if depthwise:
        dy = dy.contiguous()  # (its kernel reads rows K apart; the planner hands it no channel slice)
        grid = lambda meta: (triton.cdiv(k, meta["BLOCK_N"]), r * s, split)
        _depthwise_dw_kernel[grid](x, dy, part, dbp, rows, h, w, c, oh, ow, s, r * s, chunk, *geometry, **pro,
                                   HAS_BIAS=need_bias_grad, INT64=int64)
    else:
        grid = lambda meta: (groups * r * s * triton.cdiv(cout_g, meta["BLOCK_M"]) * triton.cdiv(width, meta["BLOCK_N"]),
                             split)
        _conv_dw_kernel[grid](x, dy, part, dbp, rows, h, w, c, oh, ow, k, width, cout_g, s, r * s, chunk,
                              row_stride(dy), *geometry, **pro, **gp, gate_ptr=part if gate is None else gate,
                              GATE=gate is not None, HAS_BIAS=need_bias_grad, INT64=int64,
                              DOT_DTYPE=dot_dtype(x.dtype), PRECISION=dot_precision(x.dtype))
    dw = torch.empty((k, width, r, s), dtype=x.dtype, device=x.device)
    _sum_splits(part, dw, split, width, r * s)
    if width != cin_g:
        dw = dw[:, :cin_g].contiguous()
    db = torch.empty(k, dtype=x.dtype, device=x.device) if need_bias_grad else None
    if need_bias_grad:
        _sum_splits(dbp, db, split, 1, 1)
    return dw, db
