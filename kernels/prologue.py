"""Cross-layer fusion's load-side stage: a conv whose input is the previous block's batch-norm
input z (not its output y = act(z scale + shift)) normalises and activates each tile of z as it
loads it, in the forward GEMM's A operand (conv_kernel.py) and the weight gradient's input operand
(conv_backward.py). y is then never written: per block, a training forward saves the epilogue
pass that read z and wrote y, and the next conv reads z where it read y (the same bytes).

The conv zero-pads y, not z: rows outside the image (and padded channels) are set to 0 after
the activation, whose value at z = 0 is act(shift), not 0.

The backward's counterpart (GradPrologue, "dz on load"): a block's conv gradients, input and
weight, read dy and z and apply the block's activation and batch-norm backward to each tile as
they load it, dz = scale act'(z scale + shift) dy + beta z + offset, so dz is never
written: a pass that read dy and z and wrote dz, and the two reads of dz, become two reads of
dy and z (batch norm's two per-channel sums still take one pass over dy and z, which
batchnorm_backward_on_load turns into beta and offset). A block that pools in its GEMM and keeps
no z (conv, act1, a non-overlapping pool) computes its dz on load from the pooled dy, the argmax
and the pooled y (`GradPrologue.pool`, `pooled_grad`): its backward writes no dz either."""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..specs import MIN_GEMM_K, Act, Window
from ._common import check, check_like, check_tensor
from .activation import (
    _HARDSIGMOID,
    _RELU,
    _SIGMOID,
    act_code,
    apply_act,
    apply_act_grad,
    apply_act_grad_from_output,
)
from .window import POOL_MODES, check_argmax


@dataclass(frozen=True)
class Prologue:
    """y = act(z scale[c] + shift[c]) on load: scale and shift (C,) fp32 per input channel, or
    both None (a block without batch norm: y = act(z))."""

    scale: torch.Tensor | None
    shift: torch.Tensor | None
    act: Act


def prologue_args(p: Prologue | None, x: torch.Tensor, cin_g: int, depthwise: bool) -> dict:
    """The kernels' prologue arguments (scale and shift pointers, slope, PROLOGUE, PRO_AFFINE, PRO_ACT), after
    checking p against the conv input x (N, H, W, C). Groups of fewer than 16 channels (padded with
    zeros, which the prologue would not keep zero) take none; the planner never asks for it."""
    if p is None:
        return {"pro_scale_ptr": x, "pro_shift_ptr": x, "pro_slope": 0.0, "PROLOGUE": False, "PRO_AFFINE": False,
                "PRO_ACT": 0}
    check(isinstance(p, Prologue), f"prologue: expected a Prologue, got {type(p).__name__}")
    check((p.scale is None) == (p.shift is None), "prologue: scale and shift must be given together")
    c = x.shape[3]
    for name, t in (("prologue scale", p.scale), ("prologue shift", p.shift)):
        if t is not None:
            check_tensor(t, name, ndim=1, dtype=torch.float32, device=x.device)
            check(t.shape[0] == c, f"{name}: expected shape ({c},) for x of shape {tuple(x.shape)}, got "
                                   f"{tuple(t.shape)}")
    check(depthwise or cin_g >= MIN_GEMM_K, f"prologue: needs 16 or more channels per group (or a depthwise conv), got {cin_g}")
    affine = p.scale is not None
    return {"pro_scale_ptr": p.scale if affine else x, "pro_shift_ptr": p.shift if affine else x,
            "pro_slope": float(p.act.slope), "PROLOGUE": True, "PRO_AFFINE": affine,
            "PRO_ACT": act_code(p.act, "prologue act")}


def prologue_grads_args(p: Prologue | None, z: torch.Tensor, like: torch.Tensor) -> dict:
    """prologue_args of a Prologue whose scale and shift take gradients (an input gradient's: the
    conv's or max pool's that read y = act(z scale + shift)), after checking that it has them and
    that z is contiguous, of like's shape, dtype and device (the input gradient's)."""
    check(isinstance(p, Prologue) and p.scale is not None,
          "prologue: expected a Prologue with a scale and shift (the gradients are theirs)")
    check_like(z, "z", like)
    return prologue_args(p, z, z.shape[3], True)


@triton.jit
def prologue_coefs(scale_ptr, shift_ptr, ch, ch_ok, AFFINE: tl.constexpr, EVEN: tl.constexpr):
    """(scale, shift) fp32 of channels ch (1 and 0 without AFFINE); EVEN: every channel is real. Apart
    from apply_prologue so that a kernel whose tiles keep their channels loads them once."""
    # every return fp32: Triton types each return of the function, a branch a constexpr leaves out
    # too, and without AFFINE the pointers stand in for absent ones (the input, bf16 or fp16)
    if not AFFINE:
        return tl.full(ch.shape, 1.0, tl.float32), tl.zeros(ch.shape, tl.float32)
    if EVEN:
        return tl.load(scale_ptr + ch).to(tl.float32), tl.load(shift_ptr + ch).to(tl.float32)
    return (tl.load(scale_ptr + ch, mask=ch_ok, other=0.0).to(tl.float32),
            tl.load(shift_ptr + ch, mask=ch_ok, other=0.0).to(tl.float32))


@triton.jit
def zero_outside(v, keep, DTYPE: tl.constexpr):
    """fp32 v as DTYPE, 0 where `keep` is not (v finite there). In bf16 the zeros are a product after
    the conversion, one packed multiply a pair of elements (HMUL2), where a product before it takes
    one an element and a select five a pair (the compiler moves it past the conversion, each 16-bit
    half apart): bf16 has fp32's range, so a finite v converts finite. Not in fp16, whose conversion
    of a padding value past 65504 would be inf, and inf * 0 NaN."""
    if DTYPE == tl.bfloat16:
        return v.to(tl.bfloat16) * keep.to(tl.bfloat16)
    return (v * keep.to(tl.float32)).to(DTYPE)


@triton.jit
def apply_prologue(a, scale, shift, ch_ok, row_ok, AFFINE: tl.constexpr, ACT: tl.constexpr, slope,
                   EVEN: tl.constexpr, DTYPE: tl.constexpr):
    """act(a scale + shift) (act(a) without AFFINE) as DTYPE, computed in fp32, for a tile a (rows,
    channels) and its channels' prologue_coefs, 0 where a row or a channel is not real (the conv's
    zero padding of y); EVEN: every channel is. z loads as 0 there, so the value zeroed is
    act(shift), finite (and act(0) = 0 for a channel that is not real)."""
    v = a.to(tl.float32)
    if AFFINE:
        v = v * scale[None, :] + shift[None, :]
    keep = row_ok[:, None]
    if not EVEN:
        keep = keep & ch_ok[None, :]
    if DTYPE == tl.bfloat16:  # the zeros after the activation and the conversion (zero_outside)
        return zero_outside(_act(v, ACT, slope), keep, DTYPE)
    if ACT == _SIGMOID or ACT == _HARDSIGMOID:  # act(0) = 1/2: the padding is set after the activation
        return tl.where(keep, apply_act(v, ACT, slope), 0.0).to(DTYPE)
    # act(0) = 0: the padding zeroed before it by a product, so that a relu still folds into the
    # conversion to 16 bits. z is 0 in the padding, so v is the shift there: finite.
    return _act(v * keep.to(tl.float32), ACT, slope).to(DTYPE)


@triton.jit
def _act(v, ACT: tl.constexpr, slope):
    """apply_act, the relu as a max with NaN kept (torch's relu), which the compiler folds into a
    conversion to 16 bits (F2FP.RELU); a select it does not."""
    if ACT == _RELU:
        return tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return apply_act(v, ACT, slope)


@dataclass(frozen=True)
class GradPrologue:
    """dz on load: dz = scale act'(z scale + shift) dy + beta z + offset per channel, for
    z (N, OH, OW, K) the block's conv output (dy's shape and dtype); scale, shift (K,) fp32 or both
    None (no batch norm: dz = act'(z) dy); center (2, K) fp32 [beta, offset] (training batch
    norm) or None. With a `pool` (a non-overlapping Window over the conv's output, the block's GEMM
    pooled), dy and z are the pooled y's gradient and y itself (N, POH, POW, K), act's gradient
    comes from y (specs.Act.grad_from_output) and dz at a conv pixel is its window's dy where the
    `argmax` (max pooling's codes; None for an average) names its tap, or dy / taps (avg)."""

    z: torch.Tensor
    scale: torch.Tensor | None
    shift: torch.Tensor | None
    act: Act
    center: torch.Tensor | None = None
    pool: Window | None = None
    argmax: torch.Tensor | None = None


_NO_POOL = {"gp_pool_oh": 0, "gp_pool_ow": 0, "gp_pool_ph": 0, "gp_pool_pw": 0, "GP_POOL": 0,
            "GP_KH": 1, "GP_KW": 1, "GP_SH": 1, "GP_SW": 1}


def _pool_args(gp: GradPrologue, dy: torch.Tensor, conv_hw) -> dict:
    """The pooled dz on load's arguments (pooled size, padding; POOL and the window's
    sizes as constexprs: the row's window is a division by a constant, no `//` by a variable)."""
    p = gp.pool
    check(isinstance(p, Window) and not p.overlaps, f"grad prologue pool: expected a non-overlapping Window, got {p!r}")
    check(gp.scale is None and gp.center is None, "grad prologue pool: no batch norm before a pool in the GEMM")
    check(gp.act.grad_from_output and (p.mode == "max" or gp.act.kind == "none"),
          f"grad prologue pool: expected an act whose gradient follows from the pooled output (relu, leaky_relu, "
          f"none; none for avg pooling), got {gp.act!r} with {p.mode!r} pooling")
    check(dy.is_contiguous(), "grad prologue pool: dy must be contiguous")
    n, k = dy.shape[0], dy.shape[3]
    check(tuple(dy.shape[1:3]) == tuple(p.out_hw) and all(d > 0 for d in conv_hw),
          f"grad prologue pool: dy of shape {tuple(dy.shape)} is not the pooled output {tuple(p.out_hw)} of a "
          f"{tuple(conv_hw)} conv output")
    check_argmax(gp.argmax, p.mode, p.taps, (n, *p.out_hw, k), dy.device)
    return {"gp_pool_oh": p.out_hw[0], "gp_pool_ow": p.out_hw[1], "gp_pool_ph": p.padding[0],
            "gp_pool_pw": p.padding[1], "GP_POOL": POOL_MODES[p.mode], "GP_KH": p.kernel[0], "GP_KW": p.kernel[1],
            "GP_SH": p.stride[0], "GP_SW": p.stride[1]}


def dz_hw(gp: GradPrologue | None, conv_hw):
    """The (H, W) that dz's rows walk where dy is a pooled output's gradient (the conv's output,
    conv_hw), else None: dy's own."""
    return conv_hw if getattr(gp, "pool", None) is not None else None


def grad_prologue_args(gp: GradPrologue | None, dy: torch.Tensor, cols_g: int, depthwise: bool, conv_hw=None) -> dict:
    """The kernels' dz-on-load arguments (z, scale, shift, center pointers, slope, GRAD_PRO, GP_AFFINE,
    GP_ACT, GP_CENTER, GP_SLICE: dy is a channel slice, whose rows are not z's; with a pool, _pool_args'),
    after checking gp against dy (N, OH, OW, K) whose groups hold cols_g channels each: 16 or more,
    not depthwise (the planner asks for no other); conv_hw: the conv's output (OH, OW), which a pooled
    dy is not. An absent pointer is dy (the argmax where there is none)."""
    if gp is None:
        return {"gp_z_ptr": dy, "gp_scale_ptr": dy, "gp_shift_ptr": dy, "gp_center_ptr": dy, "gp_slope": 0.0,
                "GRAD_PRO": False, "GP_AFFINE": False, "GP_ACT": 0, "GP_CENTER": False, "GP_SLICE": False,
                **_NO_POOL, "gp_arg_ptr": dy}
    check(isinstance(gp, GradPrologue), f"grad prologue: expected a GradPrologue, got {type(gp).__name__}")
    check_tensor(gp.z, "grad prologue z", dtype=dy.dtype, device=dy.device)
    check(gp.z.shape == dy.shape and gp.z.is_contiguous(),
          f"grad prologue z: expected a contiguous tensor of dy's shape {tuple(dy.shape)}, got {tuple(gp.z.shape)}")
    check((gp.scale is None) == (gp.shift is None), "grad prologue: scale and shift must be given together")
    k = dy.shape[-1]
    for name, t, shape in (("scale", gp.scale, (k,)), ("shift", gp.shift, (k,)), ("center", gp.center, (2, k))):
        if t is not None:
            check_tensor(t, f"grad prologue {name}", dtype=torch.float32, device=dy.device)
            check(tuple(t.shape) == shape and t.is_contiguous(),
                  f"grad prologue {name}: expected shape {shape}, got {tuple(t.shape)}")
    check(gp.center is None or gp.scale is not None, "grad prologue: center needs scale and shift")
    check(not depthwise and cols_g >= MIN_GEMM_K, f"grad prologue: needs 16 or more channels per group, got {cols_g}")
    pool = _NO_POOL if gp.pool is None else _pool_args(gp, dy, tuple(dy.shape[1:3]) if conv_hw is None else conv_hw)
    check(gp.pool is not None or gp.argmax is None, "grad prologue: an argmax needs a pool")
    affine, center = gp.scale is not None, gp.center is not None
    # y is read for act's gradient only: without one, dy stands in (no pointer to read)
    z = dy if gp.pool is not None and gp.act.kind == "none" else gp.z
    return {"gp_z_ptr": z, "gp_scale_ptr": gp.scale if affine else dy, "gp_shift_ptr": gp.shift if affine else dy,
            "gp_center_ptr": gp.center if center else dy, "gp_slope": float(gp.act.slope), "GRAD_PRO": True,
            "GP_AFFINE": affine, "GP_ACT": act_code(gp.act, "grad prologue act"), "GP_CENTER": center,
            "GP_SLICE": not dy.is_contiguous(), **pool, "gp_arg_ptr": dy if gp.argmax is None else gp.argmax}


@triton.jit
def grad_coefs(scale_ptr, shift_ptr, center_ptr, K, ch, ch_ok, AFFINE: tl.constexpr, CENTER: tl.constexpr):
    """(scale, shift, beta, offset) fp32 of channels ch (of K): 1, 0, 0, 0 where a stage is off."""
    one = tl.full(ch.shape, 1.0, tl.float32)
    zero = tl.zeros(ch.shape, tl.float32)
    scale, shift, beta, offset = one, zero, zero, zero
    if AFFINE:
        scale = tl.load(scale_ptr + ch, mask=ch_ok, other=0.0)
        shift = tl.load(shift_ptr + ch, mask=ch_ok, other=0.0)
    if CENTER:
        beta = tl.load(center_ptr + ch, mask=ch_ok, other=0.0)
        offset = tl.load(center_ptr + K + ch, mask=ch_ok, other=0.0)
    return scale, shift, beta, offset


@triton.jit
def apply_grad_prologue(dy, z, scale, shift, beta, offset, keep, AFFINE: tl.constexpr, ACT: tl.constexpr, slope,
                        CENTER: tl.constexpr, DTYPE: tl.constexpr, MASKED: tl.constexpr = True):
    """dz as DTYPE, computed in fp32, for tiles dy, z and grad_coefs broadcast to them, 0 where `keep`
    is not (the padding around dy, whose dz is 0: dy and z load as 0 there, so the value zeroed is
    the offset, finite); MASKED=False: every element is real (or is not stored), keep unread."""
    zf = z.to(tl.float32)
    pre = zf
    if AFFINE:
        pre = zf * scale + shift
    g = apply_act_grad(pre, dy.to(tl.float32), ACT, slope)
    if AFFINE:
        g = g * scale
    if CENTER:  # two multiply-adds an element (beta z + offset, then g scale + that)
        g += beta * zf + offset
    if MASKED:
        return zero_outside(g, keep, DTYPE)
    return g.to(DTYPE)


@triton.jit
def pooled_grad(dy_ptr, arg_ptr, y_ptr, n, h, w, ch, keep, POH, POW, C, ph, pw, POOL: tl.constexpr, KH: tl.constexpr,
                KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, ACT: tl.constexpr, slope):
    """dz in fp32 at conv output pixels (n, h, w) (the tile's rows, h and w >= 0 where `keep`) and
    channels ch (offsets within a pixel's C), for a non-overlapping pool (stride >= kernel): the
    pixel is tap (a, b) of window (i, j), i = (h + ph) // SH, a = h + ph - i SH, in it where a < KH
    and i < POH. Max pooling (POOL 1) passes the window's dy where the argmax is a KW + b, through
    act's gradient from the pooled y; an average (2) passes dy / (KH KW). The division by the
    constexpr stride compiles to a multiply and shifts; what a window whose stride is its size
    cannot need (a < KH) is left out."""
    i = (h + ph) // SH
    j = (w + pw) // SW
    inside = (i < POH) & (j < POW)
    if POOL == 1 or KH < SH:
        a = h + ph - i * SH
        if KH < SH:
            inside &= a < KH
    if POOL == 1 or KW < SW:
        b = w + pw - j * SW
        if KW < SW:
            inside &= b < KW
    m = keep & inside[:, None]
    off = (((n * POH + i) * POW + j) * C)[:, None] + ch[None, :]
    d = tl.load(dy_ptr + off, mask=m, other=0.0).to(tl.float32)
    if POOL == 2:  # (one return, not one in a branch: the compiler would go on to the code after it)
        d = d / (KH * KW)
    else:  # (the argmax of a row outside loads as -1: no tap)
        hit = tl.load(arg_ptr + off, mask=m, other=-1).to(tl.int32) == (a * KW + b)[:, None]
        if ACT != 0:  # (masked as dy is, not by the argmax: a load whose mask is data waits for it, and
            # the compiler cannot make it an asynchronous copy ahead of the loop's iteration)
            d = apply_act_grad_from_output(tl.load(y_ptr + off, mask=m, other=0.0).to(tl.float32), d, ACT, slope)
        d = tl.where(hit, d, 0.0)
    return d
