"""2-D convolution over NHWC activations: one implicit-GEMM kernel for the forward pass
(with a fused epilogue: bias, batch-norm tile statistics, activation, residual add, second
activation, non-overlapping pooling; its helpers live in conv_epilogue.py) and the input
gradient (the same gather run "transposed", one launch per stride phase so that only the
taps that reach a phase are visited), with a direct branch for depthwise layers; the
launchers of all three passes (the weight gradient's kernels live in conv_backward.py)."""

from dataclasses import replace

import torch
import triton
import triton.language as tl

from ..specs import NO_ACT, Act, ConvGeometry, Window
from ._common import (
    autotune,
    check,
    check_tensor,
    dot_dtype,
    dot_precision,
    gemm_config,
)
from .activation import apply_act
from .batchnorm import batchnorm_merge_stats
from .conv_backward import weight_grad
from .conv_epilogue import (
    PLAIN_EPILOGUE,
    Epilogue,
    epilogue_args,
    pool_reduce,
    pool_rows,
    tile_stats,
)

_MIN_BLOCK_M = 16  # the smallest BLOCK_M any launch uses (interpreter sizing; GPU configs use 64+)
_CONV_CONFIGS = [gemm_config(*c) for c in ((128, 128, 32, 3, 8), (128, 128, 64, 3, 8), (128, 64, 32, 4, 4),
                                    (64, 128, 32, 4, 4), (64, 64, 64, 4, 4), (256, 64, 32, 3, 8),
                                    (256, 128, 32, 3, 8), (128, 32, 32, 4, 4), (64, 32, 64, 4, 4))]


def _cols(args):
    """The output columns of one group's GEMM (every channel for a depthwise layer)."""
    return args["COUT"] if args["DEPTHWISE"] else args["COUT_G"]


def _prune(configs, named_args, **kwargs):
    """Drop N tiles far wider than the group's output channels (e.g. depthwise layers)."""
    width = max(32, triton.next_power_of_2(_cols({**named_args, **kwargs})))
    return [c for c in configs if c.kwargs["BLOCK_N"] <= width] or configs


@triton.jit
def _src(o, r, stride, pad, dil, TRANSPOSED: tl.constexpr):
    """The source pixel that tap r of destination pixel o reads: x[o*stride - pad + r*dil]
    forward; dy[(o + pad - r*dil) / stride] for the input gradient (exact: r is one of the
    taps that reach o's stride phase; negative numerators are masked by the caller)."""
    if TRANSPOSED:
        return (o + pad - r * dil) // stride
    else:
        return o * stride - pad + r * dil


@autotune(_CONV_CONFIGS, key=["M", "CIN_G", "COUT_G", "RC", "SC", "TRANSPOSED", "DEPTHWISE", "ACT", "HAS_RES",
                             "ACT2", "POOL", "TAPS", "STATS"],
          interpret={"BLOCK_M": ("M", _MIN_BLOCK_M, 512), "BLOCK_N": (_cols, 16, 128),
                     "BLOCK_K": (lambda a: a["RC"] * a["SC"] * a["CIN_G"] if a["FLAT"] else a["CIN_G"], 16, 64)},
          prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _conv_kernel(x_ptr, w_ptr, b_ptr, res_ptr, y_ptr, part_ptr,
                 M, H, W, CIN, OH, OW, COUT, CIN_G, COUT_G,  # src (N, H, W, CIN) -> dst (N, OH, OW, COUT)
                 GH, GW, P0_H, P0_W,  # dst pixels computed: (P0 + i*stride) when TRANSPOSED, else i
                 R, S, R0, S0, RSTEP, SSTEP, RC, SC,  # taps visited: r = R0 + i*RSTEP, i < RC
                 stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, slope, slope2,
                 PKH, PKW, pool_sh, pool_sw, pool_ph, pool_pw,  # POOL: y (N, GH, GW, COUT), M = N*GH*GW*TAPS
                 TRANSPOSED: tl.constexpr, DEPTHWISE: tl.constexpr, FLAT: tl.constexpr,
                 HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr, ACT2: tl.constexpr,
                 POOL: tl.constexpr, TAPS: tl.constexpr, STATS: tl.constexpr, DOT_DTYPE: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    # y[n, p, g*COUT_G + co] = sum_{taps, ci} x[n, src(p, tap), g*CIN_G + ci] * w[g, r, s, ci, co]
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    if POOL:  # rows are (pooled pixel, window tap) pairs; m_mask: the row is a real conv pixel
        n, oh, ow, m_mask = pool_rows(offs_m, m_mask, GH, GW, OH, OW, PKH, PKW, pool_sh, pool_sw,
                                      pool_ph, pool_pw, TAPS)
    else:
        n = offs_m // (GH * GW)
        oh = (offs_m // GW) % GH
        ow = offs_m % GW
        if TRANSPOSED:
            oh = P0_H + oh * stride_h
            ow = P0_W + ow * stride_w
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
    if DEPTHWISE:
        for t in range(RC * SC):
            r = R0 + (t // SC) * RSTEP
            s = S0 + (t % SC) * SSTEP
            ih = _src(oh, r, stride_h, pad_h, dil_h, TRANSPOSED)
            iw = _src(ow, s, stride_w, pad_w, dil_w, TRANSPOSED)
            row_mask = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            pix = ((n * H + ih) * W + iw) * CIN
            a = tl.load(x_ptr + pix[:, None] + col[None, :], mask=row_mask[:, None] & n_mask[None, :],
                        other=0.0).to(tl.float32)
            wv = tl.load(w_ptr + col * (R * S) + r * S + s, mask=n_mask, other=0.0).to(tl.float32)
            acc += a * wv[None, :]
    elif FLAT:  # few channels per group: (tap, ci) flattened into one reduction axis
        K_RED = RC * SC * CIN_G
        for k0 in range(0, K_RED, BLOCK_K):
            kk = k0 + offs_k
            k_mask = kk < K_RED
            ci = kk % CIN_G
            r = R0 + (kk // (SC * CIN_G)) * RSTEP
            s = S0 + ((kk // CIN_G) % SC) * SSTEP
            ih = _src(oh[:, None], r[None, :], stride_h, pad_h, dil_h, TRANSPOSED)
            iw = _src(ow[:, None], s[None, :], stride_w, pad_w, dil_w, TRANSPOSED)
            a_mask = m_mask[:, None] & k_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(x_ptr + ((n[:, None] * H + ih) * W + iw) * CIN + g * CIN_G + ci[None, :],
                        mask=a_mask, other=0.0)
            w_row = (r * S + s) * CIN_G + ci
            b = tl.load(w_ptr + w_row[:, None] * COUT_G + offs_n[None, :],
                        mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
    else:  # one flat loop over (tap, channel block) so that the pipeline spans taps
        NCB = tl.cdiv(CIN_G, BLOCK_K)
        for i in range(RC * SC * NCB):
            t = i // NCB
            ci = (i % NCB) * BLOCK_K + offs_k
            k_mask = ci < CIN_G
            r = R0 + (t // SC) * RSTEP
            s = S0 + (t % SC) * SSTEP
            ih = _src(oh, r, stride_h, pad_h, dil_h, TRANSPOSED)
            iw = _src(ow, s, stride_w, pad_w, dil_w, TRANSPOSED)
            row_mask = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            pix = ((n * H + ih) * W + iw) * CIN + g * CIN_G
            a = tl.load(x_ptr + pix[:, None] + ci[None, :], mask=row_mask[:, None] & k_mask[None, :],
                        other=0.0)
            b = tl.load(w_ptr + ((r * S + s) * CIN_G + ci)[:, None] * COUT_G + offs_n[None, :],
                        mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + col, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if STATS:  # batch-norm partials of the post-bias value
        tile_stats(acc, m_mask, n_mask, part_ptr, col, M, COUT, BLOCK_M)
    acc = apply_act(acc, ACT, slope)
    y_row = ((n * OH + oh) * OW + ow) * COUT
    mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RES:  # residual (N, OH, OW, COUT)
        acc += tl.load(res_ptr + y_row[:, None] + col[None, :], mask=mask, other=0.0).to(tl.float32)
    acc = apply_act(acc, ACT2, slope2)
    if POOL:
        out = pool_reduce(acc, m_mask, PKH * PKW, POOL, TAPS, BLOCK_M, BLOCK_N)
        offs_p = tl.program_id(0).to(tl.int64) * (BLOCK_M // TAPS) + tl.arange(0, BLOCK_M // TAPS)
        tl.store(y_ptr + (offs_p * COUT)[:, None] + col[None, :], out.to(y_ptr.dtype.element_ty),
                 mask=(offs_p < M // TAPS)[:, None] & n_mask[None, :])
    else:
        tl.store(y_ptr + y_row[:, None] + col[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def _pair(v, name, minimum):
    v = (v, v) if isinstance(v, int) else tuple(v)
    check(len(v) == 2 and all(isinstance(i, int) and i >= minimum for i in v),
          f"{name}: expected two ints >= {minimum}, got {v}")
    return v


def _geometry(w_shape, c, k, geometry: ConvGeometry):
    """Validate the conv's geometry against C and the weight shape (K, C/g, R, S) -> (stride,
    padding, dilation, out_hw) as pairs."""
    check(isinstance(geometry, ConvGeometry), f"geometry: expected a ConvGeometry, got {geometry!r}")
    check(len(w_shape) == 4 and all(isinstance(d, int) and d > 0 for d in w_shape),
          f"w: expected a positive shape (K, C/groups, R, S), got {tuple(w_shape)}")
    groups = geometry.groups
    check(isinstance(groups, int) and groups >= 1, f"groups: expected an int >= 1, got {groups}")
    check(c % groups == 0 and k % groups == 0,
          f"groups={groups} must divide both C={c} and K={k}")
    check(w_shape[0] == k, f"w: expected {k} output channels, got shape {tuple(w_shape)}")
    check(w_shape[1] * groups == c,
          f"w: expected C/groups = {c // groups} input channels, got shape {tuple(w_shape)}")
    return (_pair(geometry.stride, "stride", 1), _pair(geometry.padding, "padding", 0),
            _pair(geometry.dilation, "dilation", 1), _pair(geometry.out_hw, "out_hw", 0))


def _phases(size, k, stride, pad, dil, transposed):
    """(first pixel, pixel count, first tap, tap step, tap count) per stride phase of one dim."""
    if not transposed:
        return [(0, size, 0, 1, k)]
    phases = []
    for a in range(stride):  # dx pixels a, a + stride, ... are reached by taps r with stride | a + pad - r*dil
        taps = [r for r in range(k) if (a + pad - r * dil) % stride == 0]
        step = taps[1] - taps[0] if len(taps) > 1 else 1
        phases.append((a, max(0, -(-(size - a) // stride)), taps[0] if taps else 0, step, len(taps)))
    return phases


def _launch_conv(src, wt, bias, dst, groups, cin_g, cout_g, r, s, stride, padding, dilation,
                 transposed, out_hw, ep: Epilogue = PLAIN_EPILOGUE):
    n, h, w, cin = src.shape
    oh, ow = out_hw  # the conv's output; dst is (N, POH, POW, K) when the epilogue pools
    cout = dst.shape[3]
    if dst.numel() == 0:
        return
    depthwise = cin_g == 1 and cout_g == 1
    pooled, taps = ep.meta["POOL"] != 0, ep.meta["TAPS"]
    for p0_h, gh, r0, rstep, rc in _phases(oh, r, stride[0], padding[0], dilation[0], transposed):
        for p0_w, gw, s0, sstep, sc in _phases(ow, s, stride[1], padding[1], dilation[1], transposed):
            if pooled:  # rows: TAPS per pooled pixel
                gh, gw = dst.shape[1:3]
            m = n * gh * gw * taps
            if m == 0:
                continue

            def grid(meta, m=m):
                cols = cout if depthwise else cout_g
                return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(cols, meta["BLOCK_N"]),
                        1 if depthwise else groups)

            _conv_kernel[grid](src, wt, dst if bias is None else bias, dst if ep.res is None else ep.res,
                               dst, dst if ep.part is None else ep.part,
                               m, h, w, cin, oh, ow, cout, cin_g, cout_g, gh, gw, p0_h, p0_w,
                               r, s, r0, s0, rstep, sstep, rc, sc, *stride, *padding, *dilation, *ep.slopes,
                               *ep.window, TRANSPOSED=transposed, DEPTHWISE=depthwise, FLAT=cin_g < 16,
                               HAS_BIAS=bias is not None, DOT_DTYPE=dot_dtype(src.dtype),
                               PRECISION=dot_precision(src.dtype), **ep.meta)


def conv2d_forward(x, w, bias, geometry: ConvGeometry, act: Act = NO_ACT, *, residual=None, act2: Act = NO_ACT,
                   pool: Window | None = None, stats: bool = False):
    """y = pool(act2(act(conv(x, w) + bias) + residual)) for x (N, H, W, C) NHWC and w (K, C/groups,
    R, S); geometry.padding is the top/left pad (more padding at the bottom/right falls out of
    geometry.out_hw = (OH, OW)). residual (N, OH, OW, K) in x.dtype or None; pool None or a
    non-overlapping Window over (OH, OW) of at most specs.MAX_POOL_TAPS taps (max for inference:
    no argmax); y is (N, OH, OW, K), or (N, POH, POW, K) pooled. stats=True (nothing else fused)
    returns (y, mean (K,), var (K,)): the fp32 batch statistics (var biased) of the post-bias
    value over the N*OH*OW pixels, from per-tile partials the epilogue writes."""
    check_tensor(x, "x", ndim=4)
    check_tensor(w, "w", ndim=4, dtype=x.dtype, device=x.device)
    n, _, _, c = x.shape
    k, cin_g, r, s = w.shape
    stride, padding, dilation, (oh, ow) = _geometry(w.shape, c, k, geometry)
    if bias is not None:
        check_tensor(bias, "bias", ndim=1, dtype=x.dtype, device=x.device)
        check(bias.shape[0] == k, f"bias: expected shape ({k},), got {tuple(bias.shape)}")
    ep, y_shape = epilogue_args(x, (n, oh, ow, k), act, residual, act2, pool, stats)
    m = n * oh * ow
    if stats:  # (2, n_tiles, K) tile means and M2s, sized for the smallest BLOCK_M
        ep = replace(ep, part=torch.empty(2 * triton.cdiv(m, _MIN_BLOCK_M) * k, dtype=torch.float32,
                                          device=x.device))
    y = torch.empty(y_shape, dtype=x.dtype, device=x.device)
    groups = geometry.groups
    wt = w.view(groups, k // groups, cin_g, r, s).permute(0, 3, 4, 2, 1).contiguous()  # (G, R, S, C/g, K/g)
    _launch_conv(x, wt, bias, y, groups, cin_g, k // groups, r, s, stride, padding, dilation, False, (oh, ow), ep)
    if not stats:
        return y
    rows = _conv_kernel.best_config.kwargs["BLOCK_M"] if m else _MIN_BLOCK_M  # the tiles the launch used
    n_tiles = triton.cdiv(m, rows)
    mean, var = batchnorm_merge_stats(ep.part[:2 * n_tiles * k].view(2, n_tiles, k), rows, m)
    return y, mean, var


def conv2d_backward_input(dy, w, geometry: ConvGeometry, in_hw):
    """dx (N, H, W, C) for dy (N, OH, OW, K), (OH, OW) = geometry.out_hw, and w (K, C/groups, R, S);
    (H, W) = in_hw."""
    check_tensor(dy, "dy", ndim=4)
    check_tensor(w, "w", ndim=4, dtype=dy.dtype, device=dy.device)
    n, _, _, k = dy.shape
    _, cin_g, r, s = w.shape
    groups = geometry.groups
    stride, padding, dilation, _ = _geometry(w.shape, cin_g * groups, k, geometry)
    h, wd = _pair(in_hw, "in_hw", 0)
    dx = torch.empty((n, h, wd, cin_g * groups), dtype=dy.dtype, device=dy.device)
    wt = w.view(groups, k // groups, cin_g, r, s).permute(0, 3, 4, 1, 2).contiguous()  # (G, R, S, K/g, C/g)
    _launch_conv(dy, wt, None, dx, groups, k // groups, cin_g, r, s, stride, padding, dilation, True,
                 (h, wd))
    return dx


def conv2d_backward_weight(x, dy, w_shape, geometry: ConvGeometry, need_bias_grad):
    """(dw with shape w_shape, db (K,) or None), both in x.dtype, for x (N, H, W, C), dy (N, OH, OW, K)."""
    check_tensor(x, "x", ndim=4)
    check_tensor(dy, "dy", ndim=4, dtype=x.dtype, device=x.device)
    w_shape = tuple(w_shape)
    n, _, _, c = x.shape
    k = dy.shape[3]
    check(dy.shape[0] == n, f"dy: expected batch {n}, got shape {tuple(dy.shape)}")
    stride, padding, dilation, _ = _geometry(w_shape, c, k, geometry)
    return weight_grad(x, dy, w_shape, stride, padding, dilation, geometry.groups, bool(need_bias_grad))
