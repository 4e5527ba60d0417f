"""The training-mode elementwise-and-pool pass of a fused conv block. The conv kernel writes
z = conv(x) + bias (N, H, W, C) and the batch statistics; this pass computes

    a = z scale[c] + shift[c]   (batch norm as a per-channel affine, or the identity)
    h = act1(a),  v = h + residual,  u = act2(v),  y = pool(u)   (max/avg window, or y = u)

reading z (and residual) once and writing y (and max pooling's argmax, in pool.py's codes).
Its backward (epilogue_backward.py) keeps only z, residual and argmax and recomputes a and v;
the @triton.jit helpers that load and recompute them (`_affine`, `_chain`) and the validation
both passes share (`_setup`) are here."""

import torch
import triton
import triton.language as tl

from ..specs import Act, Window
from ._common import autotune, check, check_out, check_tensor, row_stride
from .activation import act_code, apply_act
from .window import (
    CONFIGS,
    POOL_MODES,
    argmax_dtype,
    check_window,
    prune,
)

_KEY = ["P", "C", "KH", "KW", "POOL", "ACT1", "ACT2", "HAS_AFFINE", "HAS_RES"]
_PRUNE = {"early_config_prune": prune}


@triton.jit
def _affine(scale_ptr, shift_ptr, offs_c, c_mask, HAS_AFFINE: tl.constexpr, BLOCK_C: tl.constexpr):
    """This tile's per-channel scale and shift in fp32, loaded once (1 and 0 without an affine)."""
    scale = tl.full((BLOCK_C,), 1.0, tl.float32)
    shift = tl.zeros((BLOCK_C,), tl.float32)
    if HAS_AFFINE:
        scale = tl.load(scale_ptr + offs_c, mask=c_mask, other=1.0).to(tl.float32)
        shift = tl.load(shift_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    return scale, shift


@triton.jit
def _chain(z_ptr, res_ptr, off, mask, scale, shift, slope1, slope2, ACT1: tl.constexpr, ACT2: tl.constexpr,
           HAS_AFFINE: tl.constexpr, HAS_RES: tl.constexpr):
    """(z, a, v, u) in fp32 at the (BLOCK_P, BLOCK_C) offsets `off` of z and residual."""
    z = tl.load(z_ptr + off, mask=mask, other=0.0).to(tl.float32)
    a = z
    if HAS_AFFINE:
        a = z * scale[None, :] + shift[None, :]
    v = apply_act(a, ACT1, slope1)
    if HAS_RES:
        v += tl.load(res_ptr + off, mask=mask, other=0.0).to(tl.float32)
    return z, a, v, apply_act(v, ACT2, slope2)


@autotune(CONFIGS, key=_KEY, interpret={"BLOCK_P": ("P", 16, 1024), "BLOCK_C": ("C", 4, 64)},
          prune_configs_by=_PRUNE)
@triton.jit
def _epilogue_fwd_kernel(z_ptr, scale_ptr, shift_ptr, res_ptr, y_ptr, arg_ptr,  # z, res (N, H, W, C) -> y (N, OH, OW, C)
                         P, H, W, C, OH, OW, stride_h, stride_w, pad_h, pad_w, slope1, slope2,
                         stride_yp,  # y's pixel stride: C, or more for a channel slice of a concat's output
                         KH: tl.constexpr, KW: tl.constexpr, POOL: tl.constexpr, ACT1: tl.constexpr,
                         ACT2: tl.constexpr, HAS_AFFINE: tl.constexpr, HAS_RES: tl.constexpr,
                         ROUND: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # ROUND: each tap's u is rounded to y's dtype before it is pooled, as if u had been written and
    # then pooled (a max pool reading a deferred block's z: the same y and argmax as block-level fusion)
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)  # output pixels (n, oh, ow)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_mask = offs_p < P
    c_mask = offs_c < C
    out_mask = p_mask[:, None] & c_mask[None, :]
    y_off = (offs_p * C)[:, None] + offs_c[None, :]
    scale, shift = _affine(scale_ptr, shift_ptr, offs_c, c_mask, HAS_AFFINE, BLOCK_C)
    if POOL == 0:
        _, _, _, y = _chain(z_ptr, res_ptr, y_off, out_mask, scale, shift, slope1, slope2, ACT1, ACT2,
                            HAS_AFFINE, HAS_RES)
    else:  # each tap's u recomputed from z (and residual), then reduced as pool.py does
        n = offs_p // (OH * OW)
        h0 = (offs_p // OW) % OH * stride_h - pad_h
        w0 = offs_p % OW * stride_w - pad_w
        best = tl.full((BLOCK_P, BLOCK_C), float("-inf"), tl.float32)
        arg = tl.full((BLOCK_P, BLOCK_C), -1, tl.int32)
        acc = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
        for r in range(KH):
            ih = h0 + r
            for s in range(KW):
                iw = w0 + s
                valid = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                mask = valid[:, None] & c_mask[None, :]
                off = (((n * H + ih) * W + iw) * C)[:, None] + offs_c[None, :]
                _, _, _, u = _chain(z_ptr, res_ptr, off, mask, scale, shift, slope1, slope2, ACT1, ACT2,
                                    HAS_AFFINE, HAS_RES)
                if ROUND:
                    u = u.to(y_ptr.dtype.element_ty).to(tl.float32)
                if POOL == 1:  # torch: the first valid tap, then strictly greater values or any NaN
                    take = mask & ((u > best) | (u != u) | (arg < 0))  # noqa: PLR0124
                    best = tl.where(take, u, best)
                    arg = tl.where(take, r * KW + s, arg)
                else:  # padding counts as zeros (count_include_pad)
                    acc += tl.where(mask, u, 0.0)
        if POOL == 1:
            tl.store(arg_ptr + y_off, arg.to(arg_ptr.dtype.element_ty), mask=out_mask)
            y = best
        else:
            y = acc / (KH * KW)
    tl.store(y_ptr + (offs_p * stride_yp)[:, None] + offs_c[None, :], y.to(y_ptr.dtype.element_ty), mask=out_mask)


def _setup(z, scale, shift, act1: Act, residual, act2: Act, pool: Window | None):
    """Validate the arguments both passes share -> (y shape, kernel args, constexprs)."""
    check_tensor(z, "z")
    check(z.dim() in (2, 4), f"z: expected (N, H, W, C) or (N, C), got shape {tuple(z.shape)}")
    c = z.shape[-1]
    check((scale is None) == (shift is None), f"scale, shift: expected both or neither, got "
          f"{type(scale).__name__} and {type(shift).__name__}")
    for t, name in ((scale, "scale"), (shift, "shift")):
        if t is not None:
            check_tensor(t, name, ndim=1, dtype=torch.float32, device=z.device)
            check(t.shape[0] == c, f"{name}: expected shape ({c},), got {tuple(t.shape)}")
    if residual is not None:
        check_tensor(residual, "residual", dtype=z.dtype, device=z.device)
        check(residual.shape == z.shape, f"residual: expected shape {tuple(z.shape)}, got {tuple(residual.shape)}")
    out_shape, args, consts = window_args(tuple(z.shape), act1, act2, pool)
    return out_shape, args, {**consts, "HAS_AFFINE": scale is not None, "HAS_RES": residual is not None}


def window_args(shape, act1: Act, act2: Act, pool: Window | None):
    """(y shape, kernel args, the activations' and window's constexprs) of both passes over a z of
    `shape`, (N, H, W, C) or (N, C) as (N, 1, 1, C); the pool (None: y = u) is checked."""
    n, h, w, c = shape if len(shape) == 4 else (shape[0], 1, 1, shape[1])
    consts = {"ACT1": act_code(act1, "act1"), "ACT2": act_code(act2, "act2")}
    if pool is None:
        geo, out_shape = (h, w, (1, 1), (0, 0)), shape  # (oh, ow, stride, padding)
        consts.update(KH=1, KW=1, POOL=0)
    else:
        check_window(pool, (h, w), "pool")
        geo, out_shape = (*pool.out_hw, pool.stride, pool.padding), (n, *pool.out_hw, c)
        consts.update(KH=pool.kernel[0], KW=pool.kernel[1], POOL=POOL_MODES[pool.mode])
    oh, ow, stride, padding = geo
    args = (h, w, c, oh, ow, *stride, *padding, float(act1.slope), float(act2.slope))
    return out_shape, args, consts


def epilogue_forward(z, scale, shift, act1: Act, residual, act2: Act, pool: Window | None, round_taps=False,
                     out=None):
    """(y, argmax or None): y = pool(act2(act1(z scale + shift) + residual)) in z's dtype for z
    (N, H, W, C) (or (N, C) as (N, 1, 1, C)) contiguous; scale, shift fp32 (C,) or both None
    (the identity); residual z's shape and dtype or None; act1, act2 Acts (NO_ACT skips one);
    pool None (y = u, z's shape) or a Window over (H, W) as pool.py's pool_forward, giving y
    (N, OH, OW, C) and for "max" its argmax codes. One pass: reads z and residual once, writes
    y (and argmax). round_taps: each pooled value is rounded to z's dtype first, as if u had been
    written and pooled (pool.py's reader of a deferred z). out: y is written there, a channel
    slice of a concatenation's output (_common.check_out)."""
    out_shape, args, consts = _setup(z, scale, shift, act1, residual, act2, pool)
    y = torch.empty(out_shape, dtype=z.dtype, device=z.device) if out is None else check_out(out, out_shape, z)
    is_max = consts["POOL"] == POOL_MODES["max"]
    argmax = torch.empty(out_shape, dtype=argmax_dtype(consts["KH"] * consts["KW"]), device=z.device) \
        if is_max else None
    pixels, c = y.numel() // max(args[2], 1), args[2]
    if y.numel():
        _epilogue_fwd_kernel[lambda meta: (triton.cdiv(pixels, meta["BLOCK_P"]), triton.cdiv(c, meta["BLOCK_C"]))](
            z, z if scale is None else scale, z if shift is None else shift, z if residual is None else residual,
            y, argmax if is_max else y, pixels, *args, row_stride(y), **consts,
            ROUND=bool(round_taps))
    return y, argmax


