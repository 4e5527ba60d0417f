"""2-D convolution over NHWC activations: the launchers of all three passes, which check their
arguments, allocate and launch. The forward and the input gradient run conv_kernel.py's implicit
GEMM (the input gradient once per stride phase, conv_geometry.py's split, so that only the taps
that reach a phase are visited); the weight gradient runs conv_backward.py's kernels."""

from dataclasses import replace

import torch
import triton

from ..specs import (
    MAX_CONV_TAPS,
    MIN_GEMM_K,
    NO_ACT,
    Act,
    ConvGeometry,
    Window,
    stride_phases,
)
from ._common import (
    check,
    check_like,
    check_out,
    check_tensor,
    dot_dtype,
    dot_precision,
    extent,
    row_stride,
)
from .batchnorm import batchnorm_merge_stats
from .conv_backward import weight_grad
from .conv_epilogue import PLAIN_EPILOGUE, Epilogue, epilogue_args, sum_tiles
from .conv_geometry import check_geometry, pad_channels, pair
from .conv_kernel import _conv_kernel
from .conv_tiles import MIN_BLOCK_M, min_rows
from .prologue import (
    GradPrologue,
    Prologue,
    dz_hw,
    grad_prologue_args,
    prologue_args,
    prologue_grads_args,
)


def _launch_conv(src, wt, bias, dst, groups, cin_g, cout_g, r, s, stride, padding, dilation,
                 transposed, out_hw, ep: Epilogue = PLAIN_EPILOGUE, prologue: Prologue | None = None,
                 grad_prologue: GradPrologue | None = None, gate=None, src_hw=None):
    """Launch the conv kernel once per stride phase -> with PRO_GRADS (ep.part allocated here) the
    partials (2, T, K) fp32 and how many of their tiles the launches wrote, else (None, 0). src_hw:
    the (H, W) that src's rows walk where src is a pooled dy (the conv's output, dz's)."""
    oh, ow = out_hw  # the conv's output; dst is (N, POH, POW, K) when the epilogue pools
    cout = dst.shape[3]
    depthwise = cin_g == 1 and cout_g == 1
    pro_grads, tiles = ep.meta["PRO_GRADS"], 0
    # (an input gradient's prologue is the forward's, on dst, the forward's input: its coefficients only)
    pro = {**prologue_args(prologue, dst, cout_g, depthwise), "PROLOGUE": False} if pro_grads \
        else prologue_args(prologue, src, cin_g, depthwise)
    pro.update(gate_ptr=dst if gate is None else gate, GATE=gate is not None)
    no_taps = {**pro, **grad_prologue_args(None, src, cin_g, depthwise)}  # (a phase no tap reaches loads nothing)
    pro.update(grad_prologue_args(grad_prologue, src, cin_g, depthwise, src_hw))
    if not depthwise and cin_g < MIN_GEMM_K:
        src, wt = pad_channels(src, wt, groups, cin_g)
        cin_g = MIN_GEMM_K
    n, h, w, cin = src.shape
    if src_hw is not None:
        h, w = src_hw
    pooled, taps = ep.meta["POOL"] != 0, ep.meta["TAPS"]
    int64 = max(extent(src), n * h * w * cin, wt.numel(), extent(dst), 0 if ep.res is None else ep.res.numel()) >= 2**31
    check(r <= MAX_CONV_TAPS and s <= MAX_CONV_TAPS, f"w: at most {MAX_CONV_TAPS} taps a side, got a {r}x{s} kernel")
    phases = [(ph, pw, n * (dst.shape[1] if pooled else ph[1]) * (dst.shape[2] if pooled else pw[1]) * taps)
              for ph in stride_phases(oh, r, stride[0], padding[0], dilation[0], transposed)
              for pw in stride_phases(ow, s, stride[1], padding[1], dilation[1], transposed)]  # m rows each
    if pro_grads:  # every phase's tiles' partials, for the smallest tiles each launch may take
        ep = replace(ep, part=torch.empty((2, sum(triton.cdiv(m, min_rows(m)) for *_, m in phases), cout),
                                          dtype=torch.float32, device=dst.device))
    if dst.numel() == 0:
        return ep.part, 0
    for (p0_h, gh, dst_sh, src_sh, src_oh, r0, rstep, rc, dh0, dh_step), \
            (p0_w, gw, dst_sw, src_sw, src_ow, s0, sstep, sc, dw0, dw_step), m in phases:
        if m == 0:
            continue
        if pooled:  # rows: TAPS per pooled pixel
            gh, gw = dst.shape[1:3]

        def grid(meta, m=m):
            cols = cout if depthwise else cout_g
            return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(cols, meta["BLOCK_N"]), 1 if depthwise else groups)

        _conv_kernel[grid](src, wt, dst if bias is None else bias, dst if ep.res is None else ep.res,
                           dst, dst if ep.part is None else ep.part, dst if ep.argmax is None else ep.argmax,
                           m, h, w, cin, oh, ow, cout, cin_g, cout_g, row_stride(src), row_stride(dst), gh, gw,
                           p0_h, p0_w, dst_sh, dst_sw, src_sh, src_sw, src_oh, src_ow, r, s, r0, s0, rstep, sstep,
                           rc, sc, dh0, dw0, dh_step, dw_step, *ep.slopes, *ep.window, tiles,
                           ep.part.shape[1] if pro_grads else 0, **(pro if rc * sc else no_taps),
                           NO_TAPS=rc * sc == 0, DEPTHWISE=depthwise,
                           HAS_BIAS=bias is not None, INT64=int64, X_SLICE=row_stride(src) != cin,
                           Y_SLICE=row_stride(dst) != cout, DOT_DTYPE=dot_dtype(src.dtype),
                           PRECISION=dot_precision(src.dtype), **ep.meta)
        if pro_grads:
            tiles += triton.cdiv(m, _conv_kernel.best_config.kwargs["BLOCK_M"])
    return ep.part if pro_grads else None, tiles


def _check_gate(gate, x, cin_g, prologue):
    if gate is not None:
        n, c = x.shape[0], x.shape[3]
        check_tensor(gate, "gate", ndim=2, dtype=x.dtype, device=x.device)
        check(tuple(gate.shape) == (n, c), f"gate: expected shape {(n, c)}, got {tuple(gate.shape)}")
        check(prologue is None and cin_g >= MIN_GEMM_K, f"gate: needs 16 or more input channels per group (not "
              f"a depthwise conv) and no prologue; got {cin_g} per group")


def conv2d_forward(x, w, bias, geometry: ConvGeometry, act: Act = NO_ACT, *, residual=None, act2: Act = NO_ACT,
                   pool: Window | None = None, stats: bool = False, prologue: Prologue | None = None,
                   argmax: bool = False, out=None, gate=None):
    """y = pool(act2(act(conv(x, w) + bias) + residual)) for x (N, H, W, C) NHWC and w (K, C/groups,
    R, S); geometry.padding is the top/left pad (more padding at the bottom/right falls out of
    geometry.out_hw = (OH, OW)). residual (N, OH, OW, K) in x.dtype or None; pool None or a
    non-overlapping Window over (OH, OW) of at most specs.MAX_POOL_TAPS taps; y is (N, OH, OW, K),
    or (N, POH, POW, K) pooled, and argmax=True (max pooling) returns (y, argmax) with pool.py's
    argmax codes, for a backward that keeps no z (epilogue_backward.pooled_backward). stats=True
    (nothing else fused) returns (y, mean (K,), var (K,)): the fp32 batch statistics (var biased)
    of the post-bias value over the N*OH*OW pixels, from per-tile partials the epilogue writes. With a prologue,
    x is z and the conv reads act(z scale + shift) (prologue.py). out: y is written there, a
    channel slice of a concatenation's output (_common.check_out), and returned. gate (N, C) in
    x's dtype: the conv reads x * gate[n, c] (a channel gate, squeeze-and-excitation, applied as
    its input is loaded; 16 or more channels per group, so not depthwise, and no prologue)."""
    check_tensor(x, "x", ndim=4)
    check_tensor(w, "w", ndim=4, dtype=x.dtype, device=x.device)
    n, _, _, c = x.shape
    k, cin_g, r, s = w.shape
    stride, padding, dilation, (oh, ow) = check_geometry(w.shape, c, k, geometry)
    if bias is not None:
        check_tensor(bias, "bias", ndim=1, dtype=x.dtype, device=x.device)
        check(bias.shape[0] == k, f"bias: expected shape ({k},), got {tuple(bias.shape)}")
    ep, y_shape = epilogue_args(x, (n, oh, ow, k), act, residual, act2, pool, stats, argmax)
    _check_gate(gate, x, cin_g, prologue)
    m = n * oh * ow
    if stats:  # (2, n_tiles, K) tile means and M2s, sized for the smallest BLOCK_M a launch of m rows takes
        ep = replace(ep, part=torch.empty(2 * triton.cdiv(m, min_rows(m)) * k, dtype=torch.float32,
                                          device=x.device))
    y = torch.empty(y_shape, dtype=x.dtype, device=x.device) if out is None else check_out(out, y_shape, x)
    groups = geometry.groups
    wt = w.view(groups, k // groups, cin_g, r, s).permute(0, 3, 4, 2, 1).contiguous()  # (G, R, S, C/g, K/g)
    _launch_conv(x, wt, bias, y, groups, cin_g, k // groups, r, s, stride, padding, dilation, False, (oh, ow), ep,
                 prologue, gate=gate)
    if not stats:
        return (y, ep.argmax) if argmax else y
    rows = _conv_kernel.best_config.kwargs["BLOCK_M"] if m else MIN_BLOCK_M  # the tiles the launch used
    n_tiles = triton.cdiv(m, rows)
    mean, var = batchnorm_merge_stats(ep.part[:2 * n_tiles * k].view(2, n_tiles, k), rows, m)
    return y, mean, var


def conv2d_backward_input(dy, w, geometry: ConvGeometry, in_hw, grad_prologue: GradPrologue | None = None,
                          prologue: Prologue | None = None, z=None, add=None):
    """dx (N, H, W, C) for dy (N, OH, OW, K), (OH, OW) = geometry.out_hw, and w (K, C/groups, R, S);
    (H, W) = in_hw. With a grad_prologue, dy is the gradient of the block's output, turned into the
    conv output's as each tile is loaded (prologue.py); with its pool, dy is the pooled output's
    (N, POH, POW, K). dy may be a channel slice (_common.even_rows). With the forward's prologue (scale and shift given) and its z (N, H, W, C): (dx, dscale,
    dshift), dx the gradient of y = act(z scale + shift) and dscale, dshift (C,) fp32 those of
    the prologue's scale and shift, from the epilogue's per-tile partials. add (N, H, W, C), x's
    gradient from its other reader where x forks (a residual block's shortcut), is added to dx in
    the epilogue: the sum is written once, where summing the two apart reads both and writes it."""
    check_tensor(dy, "dy", ndim=4, rows=True)
    check_tensor(w, "w", ndim=4, dtype=dy.dtype, device=dy.device)
    n, _, _, k = dy.shape
    _, cin_g, r, s = w.shape
    groups = geometry.groups
    stride, padding, dilation, _ = check_geometry(w.shape, cin_g * groups, k, geometry)
    h, wd = pair(in_hw, "in_hw", 0)
    dx = torch.empty((n, h, wd, cin_g * groups), dtype=dy.dtype, device=dy.device)
    wt = w.view(groups, k // groups, cin_g, r, s).permute(0, 3, 4, 1, 2).contiguous()  # (G, R, S, K/g, C/g)
    ep = PLAIN_EPILOGUE
    if prologue is not None:
        prologue_grads_args(prologue, z, dx)
        ep = replace(ep, res=z, meta={**ep.meta, "PRO_GRADS": True})
    if add is not None:
        check(prologue is None, "add: not with a prologue (an input read by two layers is not normalised on load)")
        check_like(add, "add", dx)
        ep = replace(ep, res=add, meta={**ep.meta, "HAS_RES": True})
    part, tiles = _launch_conv(dy, wt, None, dx, groups, k // groups, cin_g, r, s, stride, padding, dilation, True,
                               (h, wd), ep, prologue, grad_prologue, src_hw=dz_hw(grad_prologue, geometry.out_hw))
    return dx if prologue is None else (dx, *sum_tiles(part, tiles))


def conv2d_backward_weight(x, dy, w_shape, geometry: ConvGeometry, need_bias_grad, prologue: Prologue | None = None,
                           grad_prologue: GradPrologue | None = None, gate=None):
    """(dw with shape w_shape, db (K,) or None), both in x.dtype, for x (N, H, W, C), dy (N, OH, OW, K);
    with a prologue, x is z and the input is act(z scale + shift), recomputed on load; with a
    grad_prologue, dy is read as dz (see conv2d_backward_input); with a gate, the input is
    x * gate[n, c] (see conv2d_forward)."""
    check_tensor(x, "x", ndim=4)
    check_tensor(dy, "dy", ndim=4, dtype=x.dtype, device=x.device, rows=True)
    w_shape = tuple(w_shape)
    n, _, _, c = x.shape
    k = dy.shape[3]
    check(dy.shape[0] == n, f"dy: expected batch {n}, got shape {tuple(dy.shape)}")
    stride, padding, dilation, _ = check_geometry(w_shape, c, k, geometry)
    _check_gate(gate, x, w_shape[1], prologue)
    return weight_grad(x, dy, w_shape, stride, padding, dilation, geometry.groups, bool(need_bias_grad), prologue,
                       grad_prologue, gate, dz_hw(grad_prologue, geometry.out_hw))
