"""Pooling over NHWC activations: windowed max / average pooling forward (epilogue.py's
kernel with its other stages off; max also writes a compact argmax of window offsets
r*kw + s; an average that divides some window by fewer than its taps, Window.uneven, has
its own kernel), its backward as a deterministic gather (window.gather_dy, the conv block's
window loop too: each input pixel sums dy over the output windows that contain it, so
overlapping windows need no atomics), and global average pooling both ways. Tiles are pixels x channels,
channels contiguous; PyTorch semantics (floor or ceil mode, avg with or without
count_include_pad, the divisor as torch.nn.functional.avg_pool2d's); the custom ops that run
them as layers (pool_layer, global_avgpool_layer)."""

import torch
import triton
import triton.language as tl

from ..specs import NO_ACT, Act, Window, decode
from ._common import (
    ELEMENTWISE_CONFIGS,
    INTERPRET,
    _tile,
    absent,
    autotune,
    check,
    check_tensor,
    define,
    elementwise_tiles,
    present,
)
from .conv_block import Deferred
from .conv_epilogue import sum_tiles, tile_prologue_grads
from .epilogue import epilogue_forward
from .prologue import Prologue, prologue_grads_args
from .window import (
    CONFIGS,
    POOL_MODES,
    argmax_dtype,
    avg_divisor,
    check_argmax,
    check_window,
    gather_dy,
    pair,
    prune,
    window_count,
)

_MIN_BLOCK_P = min(c.kwargs["BLOCK_P"] for c in CONFIGS)
_TUNE = {"interpret": {"BLOCK_P": ("P", 16, 1024), "BLOCK_C": ("C", 4, 64)},
         "prune_configs_by": {"early_config_prune": prune}}


@autotune(CONFIGS, key=["P", "C", "KH", "KW", "AVG_DIV"], **_TUNE)
@triton.jit
def _avg_pool_fwd_kernel(x_ptr, y_ptr, P, H, W, C, OH, OW,  # x (N, H, W, C) -> y (N, OH, OW, C)
                         stride_h, stride_w, pad_h, pad_w, KH: tl.constexpr, KW: tl.constexpr,
                         AVG_DIV: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # y[n, oh, ow, c] = sum of x[n, ih, iw, c] over window (oh, ow)'s taps inside the input
    #     / window.window_count(oh) * window_count(ow) (AVG_DIV 1 or 2: window.avg_divisor)
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)  # output pixels (n, oh, ow)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_mask = offs_p < P
    c_mask = offs_c < C
    n = offs_p // (OH * OW)
    oh = (offs_p // OW) % OH
    ow = offs_p % OW
    acc = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    for r in range(KH):
        ih = oh * stride_h - pad_h + r
        for s in range(KW):
            iw = ow * stride_w - pad_w + s
            valid = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            off = (((n * H + ih) * W + iw) * C)[:, None] + offs_c[None, :]
            acc += tl.load(x_ptr + off, mask=valid[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
    count = window_count(oh, H, stride_h, pad_h, KH, AVG_DIV) * window_count(ow, W, stride_w, pad_w, KW, AVG_DIV)
    y = acc / tl.maximum(count, 1).to(tl.float32)[:, None]  # at least 1 in every window; masked rows 0 / 1
    tl.store(y_ptr + (offs_p * C)[:, None] + offs_c[None, :], y.to(y_ptr.dtype.element_ty),
             mask=p_mask[:, None] & c_mask[None, :])


@autotune(CONFIGS, key=["P", "C", "KH", "KW", "POOL", "AVG_DIV", "PRO_GRADS"], **_TUNE)
@triton.jit
def _pool_bwd_kernel(dy_ptr, arg_ptr, dx_ptr, P, H, W, C, OH, OW,  # dy, arg (N, OH, OW, C) -> dx (N, H, W, C)
                     stride_h, stride_w, pad_h, pad_w,
                     z_ptr, scale_ptr, shift_ptr, slope, part_ptr, T_MAX,  # PRO_GRADS: z (N, H, W, C), part (2, T_MAX, C)
                     KH: tl.constexpr, KW: tl.constexpr, POOL: tl.constexpr, AVG_DIV: tl.constexpr,
                     PRO_GRADS: tl.constexpr, ACT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # dx[n, ih, iw, c] = sum over windows (oh, ow) holding (ih, iw) at tap (r, s) of dy[n, oh, ow, c]
    #     (max: only where arg[n, oh, ow, c] == r*KW + s; avg: divided by KH*KW, or with AVG_DIV by
    #     each window's count): window.gather_dy
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)  # input pixels (n, ih, iw)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_p < P)[:, None] & (offs_c < C)[None, :]
    dx = gather_dy(dy_ptr, arg_ptr, offs_p, offs_c, mask, H, W, C, OH, OW, stride_h, stride_w, pad_h, pad_w,
                   KH, KW, POOL, BLOCK_P, BLOCK_C, AVG_DIV)
    if PRO_GRADS:  # the input was y = act(z scale + shift) of a deferred block: its scale's and shift's gradients
        tile_prologue_grads(dx, z_ptr + (offs_p * C)[:, None] + offs_c[None, :], mask, scale_ptr, shift_ptr, offs_c,
                            offs_c < C, ACT, slope, part_ptr, tl.program_id(0), T_MAX, C)
    tl.store(dx_ptr + (offs_p * C)[:, None] + offs_c[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


@autotune(CONFIGS, key=["HW", "C"], **{**_TUNE, "interpret": {"BLOCK_P": ("HW", 16, 1024), "BLOCK_C": ("C", 4, 64)}})
@triton.jit
def _global_avg_fwd_kernel(x_ptr, y_ptr, HW, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # y[n, c] = sum_p x[n, p, c] / HW for x (N, HW, C)
    n = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    offs_p = tl.arange(0, BLOCK_P)
    x_ptr += n * HW * C
    acc = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    for p0 in range(0, HW, BLOCK_P):
        p = p0 + offs_p
        acc += tl.load(x_ptr + (p * C)[:, None] + offs_c[None, :], mask=(p < HW)[:, None] & c_mask[None, :],
                       other=0.0).to(tl.float32)
    tl.store(y_ptr + n * C + offs_c, (tl.sum(acc, axis=0) / HW).to(y_ptr.dtype.element_ty), mask=c_mask)


@autotune(ELEMENTWISE_CONFIGS, key=["total", "C"], interpret=elementwise_tiles("total"))
@triton.jit
def _global_avg_bwd_kernel(dy_ptr, dx_ptr, total, HW, C, BLOCK: tl.constexpr):
    # dx[n, p, c] = dy[n, c] / HW for dx (N, HW, C) with `total` elements
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    src = offs // (HW * C) * C + offs % C
    d = tl.load(dy_ptr + src, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + offs, (d / HW).to(dx_ptr.dtype.element_ty), mask=mask)


def _grid(pixels, c):
    return lambda meta: (triton.cdiv(pixels, meta["BLOCK_P"]), triton.cdiv(c, meta["BLOCK_C"]))


def pool_forward(x, window: Window):
    """(y (N, OH, OW, C), argmax) for x (N, H, W, C), (OH, OW) = window.out_hw; argmax is None for
    "avg" and for "max" the window offset r*kw + s of each maximum (N, OH, OW, C), int8 when
    kh*kw <= 127 (else int16/32). Max: the first maximum wins, NaN propagates, padding never
    wins; avg divides by kh*kw, or as torch's avg_pool2d where that differs (ceil_mode windows
    past the padding, count_include_pad=False with padding: window.avg_divisor). The fused
    epilogue's kernel with every other stage off, one window loop for both, except for an
    average whose divisor differs (_avg_pool_fwd_kernel)."""
    check_tensor(x, "x", ndim=4)
    n, h, w, c = x.shape
    check_window(window, (h, w), uneven=True)
    if window.mode == "max" or not window.uneven((h, w)):
        return epilogue_forward(x, None, None, NO_ACT, None, NO_ACT, window)
    y = torch.empty((n, *window.out_hw, c), dtype=x.dtype, device=x.device)
    if y.numel():
        pixels = y.numel() // c
        _avg_pool_fwd_kernel[_grid(pixels, c)](x, y, pixels, h, w, c, *window.out_hw, *window.stride,
                                               *window.padding, KH=window.kernel[0], KW=window.kernel[1],
                                               AVG_DIV=avg_divisor(window, (h, w)))
    return y, None


def pool_backward(dy, window: Window, argmax, in_hw, prologue: Prologue | None = None, z=None):
    """dx (N, H, W, C), (H, W) = in_hw, for dy (N, OH, OW, C) and pool_forward's argmax (None for avg).
    With the prologue its input was read through (y = act(z scale + shift): a deferred block's, scale
    and shift given) and z (N, H, W, C): (dx, dscale, dshift), as conv2d_backward_input's."""
    check_tensor(dy, "dy", ndim=4)
    n, oh, ow, c = dy.shape
    in_hw = pair(in_hw, "in_hw", 0)
    check_window(window, in_hw, uneven=True)
    check(tuple(window.out_hw) == (oh, ow), f"dy: expected (N, {window.out_hw[0]}, {window.out_hw[1]}, C) "
                                            f"for the window's output, got shape {tuple(dy.shape)}")
    is_max = window.mode == "max"
    check_argmax(argmax, window.mode, window.taps, dy.shape, dy.device)
    h, w = in_hw
    dx = torch.empty((n, h, w, c), dtype=dy.dtype, device=dy.device)
    pixels = n * h * w
    part, pro = dx, {"z_ptr": dx, "scale_ptr": dx, "shift_ptr": dx, "slope": 0.0, "PRO_GRADS": False, "ACT": 0}
    if prologue is not None:
        a = prologue_grads_args(prologue, z, dx)
        pro = {"z_ptr": z, "scale_ptr": a["pro_scale_ptr"], "shift_ptr": a["pro_shift_ptr"], "slope": a["pro_slope"],
               "PRO_GRADS": True, "ACT": a["PRO_ACT"]}
        rows = _tile(pixels, 16, 1024) if INTERPRET else _MIN_BLOCK_P  # the fewest pixels a tile takes
        part = torch.empty((2, triton.cdiv(pixels, rows), c), dtype=torch.float32, device=dy.device)
    if dx.numel():
        _pool_bwd_kernel[_grid(pixels, c)](dy, argmax if is_max else dy, dx, pixels, h, w, c, oh, ow,
                                           *window.stride, *window.padding, part_ptr=part,
                                           T_MAX=part.shape[1] if prologue is not None else 0, **pro,
                                           KH=window.kernel[0], KW=window.kernel[1], POOL=POOL_MODES[window.mode],
                                           AVG_DIV=avg_divisor(window, in_hw))
    if prologue is None:
        return dx
    tiles = triton.cdiv(pixels, _pool_bwd_kernel.best_config.kwargs["BLOCK_P"]) if dx.numel() else 0
    return (dx, *sum_tiles(part, tiles))


def global_avgpool_forward(x):
    """y (N, 1, 1, C) = the mean of x (N, H, W, C) over H and W."""
    check_tensor(x, "x", ndim=4)
    n, h, w, c = x.shape
    check(h * w > 0, f"x: global average pooling needs H, W >= 1, got shape {tuple(x.shape)}")
    y = torch.empty((n, 1, 1, c), dtype=x.dtype, device=x.device)
    if y.numel():
        _global_avg_fwd_kernel[lambda meta: (n, triton.cdiv(c, meta["BLOCK_C"]))](x, y, h * w, c)
    return y


def global_avgpool_backward(dy, in_hw):
    """dx (N, H, W, C) = dy (N, 1, 1, C) / (H*W) broadcast over (H, W) = in_hw."""
    check_tensor(dy, "dy", ndim=4)
    n, one_h, one_w, c = dy.shape
    check(one_h == 1 and one_w == 1, f"dy: expected shape (N, 1, 1, C), got {tuple(dy.shape)}")
    h, w = pair(in_hw, "in_hw", 1)
    dx = torch.empty((n, h, w, c), dtype=dy.dtype, device=dy.device)
    total = dx.numel()
    if total:
        _global_avg_bwd_kernel[lambda meta: (triton.cdiv(total, meta["BLOCK"]),)](dy, dx, total, h * w, c)
    return dx


def _pool_fake(x, spec):
    w = decode(spec)
    y = x.new_empty((x.shape[0], *w.out_hw, x.shape[3]))
    return y, y.new_empty(y.shape, dtype=argmax_dtype(w.taps)) if w.mode == "max" else absent(x, torch.int8)


def _pool_setup(ctx, inputs, output):
    x, ctx.spec = inputs
    ctx.in_hw = (x.shape[1], x.shape[2])
    ctx.save_for_backward(output[1])


def _pool_backward(ctx, dy, _):
    (argmax,) = ctx.saved_tensors
    return _pool_bwd(dy.contiguous(), argmax, ctx.spec, *ctx.in_hw), None


_pool_bwd = define("pool_backward", "(Tensor dy, Tensor argmax, str spec, SymInt h, SymInt w) -> Tensor",
                   lambda dy, argmax, spec, h, w: pool_backward(dy, decode(spec), present(argmax), (h, w)),
                   lambda dy, argmax, spec, h, w: dy.new_empty((dy.shape[0], h, w, dy.shape[3])))
_pool = define("pool", "(Tensor x, str spec) -> (Tensor, Tensor)",
               lambda x, spec: _argmax_or_absent(x, *pool_forward(x, decode(spec))), _pool_fake,
               _pool_backward, _pool_setup)


def _argmax_or_absent(x, y, argmax):
    return y, absent(x, torch.int8) if argmax is None else argmax


def _pool_pro_setup(ctx, inputs, output):
    z, scale, shift, ctx.spec, ctx.act, ctx.slope = inputs
    ctx.in_hw = (z.shape[1], z.shape[2])
    ctx.save_for_backward(output[1], z, scale, shift)


def _pool_pro_backward(ctx, dy, _):
    argmax, z, scale, shift = ctx.saved_tensors
    if scale is None or not (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
        return _pool_bwd(dy.contiguous(), argmax, ctx.spec, *ctx.in_hw), None, None, None, None, None
    # with the gradients of scale and shift: the deferred block's batch norm's sums (conv_block.py)
    return (*_pool_pro_bwd(dy.contiguous(), argmax, z, scale, shift, ctx.spec, ctx.act, ctx.slope), None, None, None)


_pool_pro_bwd = define(
    "pool_prologue_backward", "(Tensor dy, Tensor argmax, Tensor z, Tensor scale, Tensor shift, str spec, str act, "
    "float slope) -> (Tensor, Tensor, Tensor)",
    lambda dy, argmax, z, scale, shift, spec, act, slope: pool_backward(
        dy, decode(spec), argmax, tuple(z.shape[1:3]), Prologue(scale, shift, Act(act, slope)), z),
    lambda dy, argmax, z, scale, shift, spec, act, slope: (torch.empty_like(z), torch.empty_like(scale),
                                                           torch.empty_like(shift)))


# A max pool reading a deferring conv block's z (cross-layer fusion): y = max(act(z scale + shift))
# as epilogue.py's pass computes it, each tap rounded as the written output would be (the same y
# and argmax as pooling it), so the block's output is never written; backward returns the gradient
# of the block's output, which the block's backward takes (plan.py).
_pool_pro = define("pool_prologue", "(Tensor z, Tensor? scale, Tensor? shift, str spec, str act, float slope) -> "
                   "(Tensor, Tensor)",
                   lambda z, scale, shift, spec, act, slope: epilogue_forward(
                       z, scale, shift, Act(act, slope), None, NO_ACT, decode(spec), round_taps=True),
                   lambda z, scale, shift, spec, act, slope: _pool_fake(z, spec), _pool_pro_backward,
                   _pool_pro_setup)


def pool_layer(x, spec: Window, state):
    """A max or average pooling layer alone: keeps max pooling's int8 argmax for the gradient,
    not its input; a deferred input (a max pool only) is normalised and activated as it loads."""
    if isinstance(x, Deferred):
        return _pool_pro(x.z, x.scale, x.shift, state.text, x.act.kind, float(x.act.slope))[0]
    return _pool(x, state.text)[0]


def _gap_setup(ctx, inputs, output):
    ctx.in_hw = (inputs[0].shape[1], inputs[0].shape[2])


_gap_bwd = define("global_avgpool_backward", "(Tensor dy, SymInt h, SymInt w) -> Tensor",
                  lambda dy, h, w: global_avgpool_backward(dy, (h, w)),
                  lambda dy, h, w: dy.new_empty((dy.shape[0], h, w, dy.shape[3])))
_gap = define("global_avgpool", "(Tensor x) -> Tensor", global_avgpool_forward,
              lambda x: x.new_empty((x.shape[0], 1, 1, x.shape[3])),
              lambda ctx, dy: _gap_bwd(dy.contiguous(), *ctx.in_hw), _gap_setup)


def global_avgpool_layer(x, spec, state):  # x (N, H, W, C) -> (N, 1, 1, C)
    return _gap(x)
