"""The 2-D convolution kernel over NHWC activations: one implicit GEMM for the forward pass
(with a fused epilogue: bias, batch-norm tile statistics, activation, residual add, second
activation, non-overlapping pooling; its `@triton.jit` helpers live in conv_epilogue.py) and the
input gradient (the same gather run "transposed", one launch per stride phase so that only the
taps that reach a phase are visited), with a direct branch for depthwise layers. Cross-layer
fusion's transforms on load (prologue.py) act on its A tile: the forward's input, the input
gradient's dy. Its launchers, which check, allocate and split into phases, are conv.py's."""

import triton
import triton.language as tl

from ._common import autotune
from .activation import apply_act
from .conv_epilogue import (
    pool_argmax,
    pool_reduce,
    pool_rows,
    tile_prologue_grads,
    tile_stats,
)
from .conv_tiles import CONV_CONFIGS, MIN_BLOCK_M, conv_cols, prune_conv
from .prologue import (
    apply_grad_prologue,
    apply_prologue,
    grad_coefs,
    pooled_grad,
    prologue_coefs,
)


@autotune(CONV_CONFIGS, key=["M", "CIN_G", "COUT_G", "RC", "SC", "DEPTHWISE", "ACT", "HAS_RES", "ACT2", "POOL",
                             "TAPS", "STATS", "ARGMAX", "INT64", "PROLOGUE", "GRAD_PRO", "GP_POOL", "PRO_GRADS"],
          interpret={"BLOCK_M": ("M", MIN_BLOCK_M, 512), "BLOCK_N": (conv_cols, 16, 256), "BLOCK_K": ("CIN_G", 16, 128)},
          prune_configs_by={"early_config_prune": prune_conv})
@triton.heuristics({"EVEN_K": lambda a: a["CIN_G"] % a["BLOCK_K"] == 0,
                    "EVEN_N": lambda a: a["COUT_G"] % a["BLOCK_N"] == 0,
                    # (only where an on-load transform has coefficients to hoist: no other path compiles twice)
                    "ONE_CB": lambda a: a["CIN_G"] <= a["BLOCK_K"] and bool(a["PROLOGUE"] or a["GRAD_PRO"])})
@triton.jit
def _conv_kernel(x_ptr, w_ptr, b_ptr, res_ptr, y_ptr, part_ptr, arg_ptr,  # ARGMAX: arg (N, GH, GW, COUT)
                 M, H, W, CIN, OH, OW, COUT, CIN_G, COUT_G,  # src (N, H, W, CIN) -> dst (N, OH, OW, COUT)
                 stride_xp, stride_yp,  # src's and dst's pixel strides: CIN and COUT, or more for channel slices
                 GH, GW, P0_H, P0_W, DST_SH, DST_SW,  # the dst pixels computed: P0 + i*DST_S, i < G
                 SRC_SH, SRC_SW, SRC_OH, SRC_OW,  # the src pixel dst pixel i reads at shift 0: i*SRC_S + SRC_O
                 R, S, R0, S0, RSTEP, SSTEP, RC, SC,  # taps visited: r = R0 + j*RSTEP, j < RC
                 DH0, DW0, DH_STEP, DW_STEP,  # the src shift of tap j: DH0 + j*DH_STEP
                 slope, slope2, PKH, PKW, pool_sh, pool_sw, pool_ph, pool_pw,  # POOL: y (N, GH, GW, COUT)
                 tile0, t_max,  # PRO_GRADS: part (2, t_max, COUT), this launch's tiles from tile0; res is z
                 pro_scale_ptr, pro_shift_ptr, pro_slope,  # PROLOGUE: x is z, read as act(z scale + shift), (CIN,)
                 gate_ptr,  # GATE: x is read as x * gate[n, c], a channel gate (squeeze-and-excitation), (N, CIN)
                 GATE: tl.constexpr,
                 PROLOGUE: tl.constexpr, PRO_AFFINE: tl.constexpr, PRO_ACT: tl.constexpr,
                 gp_z_ptr, gp_scale_ptr, gp_shift_ptr, gp_center_ptr, gp_slope,  # GRAD_PRO: x is dy, read as dz
                 GRAD_PRO: tl.constexpr, GP_AFFINE: tl.constexpr, GP_ACT: tl.constexpr, GP_CENTER: tl.constexpr,
                 GP_SLICE: tl.constexpr,  # GRAD_PRO with dy a channel slice: z's rows (CIN apart) are not dy's
                 gp_arg_ptr, gp_pool_oh, gp_pool_ow, gp_pool_ph, gp_pool_pw,  # GP_POOL: x is the pooled dy, z the
                 GP_POOL: tl.constexpr, GP_KH: tl.constexpr, GP_KW: tl.constexpr,  # pooled y, arg the argmax
                 GP_SH: tl.constexpr, GP_SW: tl.constexpr,  # (N, POH, POW, CIN); the window's sizes and stride
                 X_SLICE: tl.constexpr, Y_SLICE: tl.constexpr,  # src, dst channel slices: rows stride_xp, stride_yp apart
                 DEPTHWISE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr,
                 ACT2: tl.constexpr, POOL: tl.constexpr, TAPS: tl.constexpr, STATS: tl.constexpr, ARGMAX: tl.constexpr,
                 PRO_GRADS: tl.constexpr, NO_TAPS: tl.constexpr,  # NO_TAPS: an input gradient's phase no tap reaches
                 INT64: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
                 EVEN_N: tl.constexpr, ONE_CB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # y[n, P0 + i*DST_S, g*COUT_G + co] = sum over taps j, ci of
    #     x[n, i*SRC_S + SRC_O + (D0 + j*D_STEP), g*CIN_G + ci] * w[g, R0 + j*RSTEP, ..., ci, co]
    # (forward: DST_S = 1, SRC_S = stride, SRC_O = -pad, D = r*dil; the input gradient of one stride
    # phase: DST_S = stride, SRC_S = 1, SRC_O = 0, D = (P0 + pad - r*dil) / stride, exact). The K loop
    # walks (tap, channel block) with counters: every row's offset and bounds are set up once, and
    # each iteration adds a scalar shift (int32 offsets unless the launcher says a tensor needs 64 bits).
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    pid_m = tl.program_id(0)
    if INT64:
        pid_m = pid_m.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    if POOL:  # rows are (pooled pixel, window tap) pairs; m_mask: the row is a real conv pixel
        n, gh, gw, m_mask = pool_rows(offs_m, m_mask, GH, GW, OH, OW, PKH, PKW, pool_sh, pool_sw,
                                      pool_ph, pool_pw, TAPS)
    else:
        n = offs_m // (GH * GW)
        gh = (offs_m // GW) % GH
        gw = offs_m % GW
    oh = P0_H + gh * DST_SH
    ow = P0_W + gw * DST_SW
    ih0 = gh * SRC_SH + SRC_OH
    iw0 = gw * SRC_SW + SRC_OW
    pix = (n * H + ih0) * W + iw0  # each row's shift-0 source pixel
    x_rows = CIN  # the elements from one src pixel to the next: CIN, or stride_xp for a channel slice
    if X_SLICE:
        x_rows = stride_xp
    row = pix * x_rows  # where it starts
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if DEPTHWISE:  # one input channel per output channel: columns are channels, no dot
        col = offs_n
        n_mask = col < COUT
    else:
        col = g * COUT_G + offs_n
        n_mask = offs_n < COUT_G
    w_ptr += g * (R * S * CIN_G * COUT_G)  # w: (G, R, S, CIN_G, COUT_G)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Which taps of each row read inside the source: bit j of rows_in (cols_in) for tap row (column) j,
    # set up once, so that each iteration tests two bits instead of four bounds (specs.MAX_CONV_TAPS a side).
    rows_in = tl.zeros((BLOCK_M,), tl.int32)
    for j in range(RC):
        dh = DH0 + j * DH_STEP
        rows_in |= ((ih0 >= -dh) & (ih0 < H - dh) & m_mask).to(tl.int32) << j
    cols_in = tl.zeros((BLOCK_M,), tl.int32)
    for j in range(SC):
        dw = DW0 + j * DW_STEP
        cols_in |= ((iw0 >= -dw) & (iw0 < W - dw)).to(tl.int32) << j
    tr = 0  # the tap's row and column, and (below) the channel block: counters, not `//`
    ts = 0
    if DEPTHWISE:
        if PROLOGUE:  # a program's channels are fixed: their coefficients loaded once
            ps, pt = prologue_coefs(pro_scale_ptr, pro_shift_ptr, col, n_mask, PRO_AFFINE, False)
        for _ in range(RC * SC):
            dh = DH0 + tr * DH_STEP
            dw = DW0 + ts * DW_STEP
            ok = ((rows_in >> tr) & (cols_in >> ts) & 1) != 0
            a = tl.load(x_ptr + (row + (dh * W + dw) * x_rows)[:, None] + col[None, :],
                        mask=ok[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
            if PROLOGUE:
                a = apply_prologue(a, ps, pt, n_mask, ok, PRO_AFFINE, PRO_ACT, pro_slope, False, tl.float32)
            tap = (R0 + tr * RSTEP) * S + S0 + ts * SSTEP
            wv = tl.load(w_ptr + col * (R * S) + tap, mask=n_mask, other=0.0).to(tl.float32)
            acc += a * wv[None, :]
            ts += 1
            wrap = ts == SC
            ts = tl.where(wrap, 0, ts)
            tr = tl.where(wrap, tr + 1, tr)
    else:  # one flat loop over (tap, channel block) so that the pipeline spans taps
        row += g * CIN_G
        if GP_SLICE:
            z_row = pix * CIN + g * CIN_G
        w_off = offs_k[:, None] * COUT_G + offs_n[None, :]
        NCB = tl.cdiv(CIN_G, BLOCK_K)
        cb = 0
        # One channel block (ONE_CB: CIN_G <= BLOCK_K): the on-load coefficients are the same every
        # iteration, loaded once (else each iteration's channels, 2 or 5 vectors through shared memory).
        if PROLOGUE and ONE_CB:
            ps, pt = prologue_coefs(pro_scale_ptr + g * CIN_G, pro_shift_ptr + g * CIN_G, offs_k, offs_k < CIN_G,
                                    PRO_AFFINE, EVEN_K)
        if GRAD_PRO and ONE_CB and GP_POOL == 0:
            s, t, beta, off = grad_coefs(gp_scale_ptr + g * CIN_G, gp_shift_ptr + g * CIN_G,
                                         gp_center_ptr + g * CIN_G, CIN, offs_k, offs_k < CIN_G, GP_AFFINE, GP_CENTER)
        if GRAD_PRO and not NO_TAPS:  # (else the loop is left out) with a zero-trip path to the accumulator's
            # last wgmma wait, ptxas serializes dz on load's wgmma pipeline (C7515) behind an epilogue's loads
            tl.assume(RC * SC * NCB > 0)
        for _ in range(0 if NO_TAPS else RC * SC * NCB):
            dh = DH0 + tr * DH_STEP
            dw = DW0 + ts * DW_STEP
            ok = ((rows_in >> tr) & (cols_in >> ts) & 1) != 0
            k0 = cb * BLOCK_K
            a_off = (row + (dh * W + dw) * x_rows + k0)[:, None] + offs_k[None, :]
            a_ptrs = x_ptr + a_off
            b_ptrs = w_ptr + (((R0 + tr * RSTEP) * S + S0 + ts * SSTEP) * CIN_G + k0) * COUT_G + w_off
            if EVEN_K:  # (a pooled dy is not dz's tile: GP_POOL computes it below)
                if GP_POOL == 0:
                    a = tl.load(a_ptrs, mask=ok[:, None], other=0.0)
                b = tl.load(b_ptrs) if EVEN_N else tl.load(b_ptrs, mask=n_mask[None, :], other=0.0)
            else:
                k_mask = k0 + offs_k < CIN_G
                if GP_POOL == 0:
                    a = tl.load(a_ptrs, mask=ok[:, None] & k_mask[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            ch = k0 + offs_k
            if PROLOGUE:  # y = act(z scale + shift) of the tile's channels; the padding stays 0
                if not ONE_CB:
                    ps, pt = prologue_coefs(pro_scale_ptr + g * CIN_G, pro_shift_ptr + g * CIN_G, ch, ch < CIN_G,
                                            PRO_AFFINE, EVEN_K)
                a = apply_prologue(a, ps, pt, ch < CIN_G, ok, PRO_AFFINE, PRO_ACT, pro_slope, EVEN_K, DOT_DTYPE)
            if GATE:  # x * gate[n, c] in fp32, rounded to the dot's dtype as the gate's own pass stores it
                gv = tl.load(gate_ptr + (n * CIN + g * CIN_G)[:, None] + ch[None, :],
                             mask=m_mask[:, None] & (ch < CIN_G)[None, :], other=0.0)
                a = a.to(tl.float32) * gv.to(tl.float32)
            if GRAD_PRO:  # dz = the block's batch-norm and activation backward of dy, from z (prologue.py)
                keep = ok[:, None] if EVEN_K else ok[:, None] & (ch < CIN_G)[None, :]
                if GP_POOL != 0:  # from the pooled dy, argmax and y at the tap's pixels (prologue.pooled_grad)
                    a = pooled_grad(x_ptr, gp_arg_ptr, gp_z_ptr, n, ih0 + dh, iw0 + dw, g * CIN_G + ch, keep,
                                    gp_pool_oh, gp_pool_ow, CIN, gp_pool_ph, gp_pool_pw, GP_POOL, GP_KH, GP_KW,
                                    GP_SH, GP_SW, GP_ACT, gp_slope)
                else:
                    if GP_SLICE:
                        zt = tl.load(gp_z_ptr + (z_row + (dh * W + dw) * CIN + k0)[:, None] + offs_k[None, :],
                                     mask=keep, other=0.0)
                    else:
                        zt = tl.load(gp_z_ptr + a_off, mask=keep, other=0.0)
                    if not ONE_CB:
                        s, t, beta, off = grad_coefs(gp_scale_ptr + g * CIN_G, gp_shift_ptr + g * CIN_G,
                                                     gp_center_ptr + g * CIN_G, CIN, ch, ch < CIN_G, GP_AFFINE,
                                                     GP_CENTER)
                    a = apply_grad_prologue(a, zt, s[None, :], t[None, :], beta[None, :], off[None, :], keep,
                                            GP_AFFINE, GP_ACT, gp_slope, GP_CENTER, DOT_DTYPE)
            acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
            cb += 1
            wrap = cb == NCB
            cb = tl.where(wrap, 0, cb)
            ts = tl.where(wrap, ts + 1, ts)
            wrap = ts == SC
            ts = tl.where(wrap, 0, ts)
            tr = tl.where(wrap, tr + 1, tr)
    if HAS_BIAS:
        acc += tl.load(b_ptr + col, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if STATS:  # batch-norm partials of the post-bias value
        tile_stats(acc, m_mask, n_mask, part_ptr, col, M, COUT, BLOCK_M)
    acc = apply_act(acc, ACT, slope)
    # Y_SLICE: dst is a channel slice of a concat's output, its rows stride_yp apart; else the rows'
    # offsets are the residual's (one set of offsets: two would cost a 256-row tile its registers)
    pix = (n * OH + oh) * OW + ow
    y_row = pix * COUT
    mask = m_mask[:, None] & n_mask[None, :]
    if PRO_GRADS:  # an input gradient through a prologue: the gradients of its scale and shift, per tile
        tile_prologue_grads(acc, res_ptr + y_row[:, None] + col[None, :], mask, pro_scale_ptr, pro_shift_ptr, col,
                            n_mask, PRO_ACT, pro_slope, part_ptr, tile0 + pid_m, t_max, COUT)
    if HAS_RES:  # residual (N, OH, OW, COUT)
        acc += tl.load(res_ptr + y_row[:, None] + col[None, :], mask=mask, other=0.0).to(tl.float32)
    acc = apply_act(acc, ACT2, slope2)
    if POOL:
        out = pool_reduce(acc, m_mask, PKH * PKW, POOL, TAPS, BLOCK_M, BLOCK_N)
        offs_p = tl.program_id(0).to(tl.int64) * (BLOCK_M // TAPS) + tl.arange(0, BLOCK_M // TAPS)
        p_mask = (offs_p < M // TAPS)[:, None] & n_mask[None, :]
        p_row = offs_p * COUT
        if ARGMAX:  # training keeps no z: backward routes dy by the argmax, act's gradient from y
            arg = pool_argmax(acc, out, m_mask, TAPS, BLOCK_M, BLOCK_N)
            tl.store(arg_ptr + p_row[:, None] + col[None, :], arg.to(arg_ptr.dtype.element_ty), mask=p_mask)
        if Y_SLICE:
            p_row = offs_p * stride_yp
        tl.store(y_ptr + p_row[:, None] + col[None, :], out.to(y_ptr.dtype.element_ty), mask=p_mask)
    else:
        if Y_SLICE:
            y_row = pix * stride_yp
        tl.store(y_ptr + y_row[:, None] + col[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)
