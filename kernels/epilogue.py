"""The training-mode elementwise-and-pool pass of a fused conv block, and its backward. The
conv kernel writes z = conv(x) + bias (N, H, W, C) and the batch statistics; this pass computes

    a = z scale[c] + shift[c]   (batch norm as a per-channel affine, or the identity)
    h = act1(a),  v = h + residual,  u = act2(v),  y = pool(u)   (max/avg window, or y = u)

reading z (and residual) once and writing y (and max pooling's argmax, in pool.py's codes).
The backward keeps only z, residual and argmax and recomputes a, v at each pre-pool pixel:
one kernel gathers dy over the pool windows holding the pixel (no atomics), writes dresidual
and da (dz itself when the affine is fixed) and, for training batch norm, batchnorm_backward.py's
per-tile partials of sum(da), sum(da (z - mean)); batchnorm's merge and elementwise backward
(`batchnorm_backward_from_partials`) then finish dz, dweight and dbias."""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..specs import NO_ACT, Act, Window
from ._common import autotune, check, check_tensor
from .activation import NONE, act_code, apply_act, apply_act_grad
from .batchnorm import _check_channels, _tiles
from .batchnorm_backward import (
    batchnorm_backward,
    batchnorm_backward_from_partials,
    batchnorm_eval_backward,
    batchnorm_on_load_from_partials,
)
from .window import (
    CONFIGS,
    POOL_MODES,
    argmax_dtype,
    check_argmax,
    check_window,
    gather_dy,
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
    tl.store(y_ptr + y_off, y.to(y_ptr.dtype.element_ty), mask=out_mask)


@autotune(CONFIGS, key=_KEY + ["BN", "WRITE_DZ", "ACT_Y"], prune_configs_by=_PRUNE,
          interpret={"BLOCK_P": (lambda a: a["rows"] // 2 or a["P"], 16, 1024), "BLOCK_C": ("C", 4, 64)})
@triton.jit
def _epilogue_bwd_kernel(dy_ptr, arg_ptr, z_ptr, scale_ptr, shift_ptr, res_ptr, mean_ptr,  # dy (N, OH, OW, C)
                         dz_ptr, dres_ptr, part_ptr,  # -> dz (da with BN), dres (N, H, W, C), part (2, n_tiles, C)
                         P, H, W, C, OH, OW, stride_h, stride_w, pad_h, pad_w, slope1, slope2, rows, n_tiles,
                         KH: tl.constexpr, KW: tl.constexpr, POOL: tl.constexpr, ACT1: tl.constexpr,
                         ACT2: tl.constexpr, HAS_AFFINE: tl.constexpr, HAS_RES: tl.constexpr, BN: tl.constexpr,
                         WRITE_DZ: tl.constexpr, LOAD_Z: tl.constexpr, ACT_Y: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # Program (t, j) takes tile t of the P = N*H*W pre-pool pixels: `rows` of them with BN
    # (batchnorm's tiling, whose partials it writes), else BLOCK_P. ACT_Y (a block that pooled in
    # its GEMM, no z kept): z_ptr is the pooled y, and act1's gradient comes from it (gather_dy).
    tile = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    scale, shift = _affine(scale_ptr, shift_ptr, offs_c, c_mask, HAS_AFFINE, BLOCK_C)
    if BN:
        row0 = tile * rows
        row_end = tl.minimum(row0 + rows, P)
        mean = tl.load(mean_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    else:
        row0 = tile * BLOCK_P
        row_end = tl.minimum(row0 + BLOCK_P, P)
        mean = tl.zeros((BLOCK_C,), tl.float32)
    sum_da = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    sum_dax = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    for start in range(row0, row_end, BLOCK_P):
        offs_p = start + tl.arange(0, BLOCK_P)
        mask = (offs_p < row_end)[:, None] & c_mask[None, :]
        off = (offs_p * C)[:, None] + offs_c[None, :]
        du = gather_dy(dy_ptr, arg_ptr, offs_p, offs_c, mask, H, W, C, OH, OW, stride_h, stride_w, pad_h,
                        pad_w, KH, KW, POOL, BLOCK_P, BLOCK_C, y_ptr=z_ptr, slope=slope1, ACT_Y=ACT_Y)
        if LOAD_Z:  # z (and the shortcut) feed only batch norm's and the activations' gradients
            z, a, v, _ = _chain(z_ptr, res_ptr, off, mask, scale, shift, slope1, slope2, ACT1, ACT2,
                                HAS_AFFINE, HAS_RES)
            dv = apply_act_grad(v, du, ACT2, slope2)
            da = tl.where(mask, apply_act_grad(a, dv, ACT1, slope1), 0.0)
        else:
            z, dv, da = du, du, tl.where(mask, du, 0.0)
        if HAS_RES:
            tl.store(dres_ptr + off, dv.to(dres_ptr.dtype.element_ty), mask=mask)
        if BN:
            sum_da += da
            sum_dax += da * (z - mean[None, :])
        elif HAS_AFFINE:
            da = da * scale[None, :]  # a fixed affine: dz = da * scale
        if WRITE_DZ:  # else da is dres (no act1: the add passes dv through), written once
            tl.store(dz_ptr + off, da.to(dz_ptr.dtype.element_ty), mask=mask)
    if BN:  # batchnorm's _bn_bwd_partial_kernel format: [sum(da), sum(da (z - mean))] per tile
        tl.store(part_ptr + tile * C + offs_c, tl.sum(sum_da, axis=0), mask=c_mask)
        tl.store(part_ptr + (n_tiles + tile) * C + offs_c, tl.sum(sum_dax, axis=0), mask=c_mask)


@dataclass(frozen=True)
class BatchNormBackward:
    """What the backward pass of a conv block's batch norm needs: the statistics that normalised
    z (fp32 (C,): the batch's, var biased, in training; else the running ones), eps, the affine
    weight (or None), whether there is a bias, whether the parameters' gradients are wanted, and
    whether the statistics were the batch's (train: the gradient flows through them)."""

    mean: object
    var: object
    eps: float
    weight: object
    bias: bool
    param_grads: bool
    train: bool


def _setup(z, scale, shift, act1: Act, residual, act2: Act, pool: Window | None):
    """Validate the arguments both passes share -> (y shape, kernel args, constexprs)."""
    check_tensor(z, "z")
    check(z.dim() in (2, 4), f"z: expected (N, H, W, C) or (N, C), got shape {tuple(z.shape)}")
    n, h, w, c = z.shape if z.dim() == 4 else (z.shape[0], 1, 1, z.shape[1])
    check((scale is None) == (shift is None), f"scale, shift: expected both or neither, got "
          f"{type(scale).__name__} and {type(shift).__name__}")
    for t, name in ((scale, "scale"), (shift, "shift")):
        if t is not None:
            check_tensor(t, name, ndim=1, dtype=torch.float32, device=z.device)
            check(t.shape[0] == c, f"{name}: expected shape ({c},), got {tuple(t.shape)}")
    if residual is not None:
        check_tensor(residual, "residual", dtype=z.dtype, device=z.device)
        check(residual.shape == z.shape, f"residual: expected shape {tuple(z.shape)}, got {tuple(residual.shape)}")
    consts = {"ACT1": act_code(act1, "act1"), "ACT2": act_code(act2, "act2"),
              "HAS_AFFINE": scale is not None, "HAS_RES": residual is not None}
    if pool is None:
        geo, out_shape = (h, w, (1, 1), (0, 0)), tuple(z.shape)  # (oh, ow, stride, padding)
        consts.update(KH=1, KW=1, POOL=0)
    else:
        check_window(pool, (h, w), "pool")
        geo, out_shape = (*pool.out_hw, pool.stride, pool.padding), (n, *pool.out_hw, c)
        consts.update(KH=pool.kernel[0], KW=pool.kernel[1], POOL=POOL_MODES[pool.mode])
    oh, ow, stride, padding = geo
    args = (h, w, c, oh, ow, *stride, *padding, float(act1.slope), float(act2.slope))
    return out_shape, args, consts


def epilogue_forward(z, scale, shift, act1: Act, residual, act2: Act, pool: Window | None, round_taps=False):
    """(y, argmax or None): y = pool(act2(act1(z scale + shift) + residual)) in z's dtype for z
    (N, H, W, C) (or (N, C) as (N, 1, 1, C)) contiguous; scale, shift fp32 (C,) or both None
    (the identity); residual z's shape and dtype or None; act1, act2 Acts (NO_ACT skips one);
    pool None (y = u, z's shape) or a Window over (H, W) as pool.py's pool_forward, giving y
    (N, OH, OW, C) and for "max" its argmax codes. One pass: reads z and residual once, writes
    y (and argmax). round_taps: each pooled value is rounded to z's dtype first, as if u had been
    written and pooled (pool.py's reader of a deferred z)."""
    out_shape, args, consts = _setup(z, scale, shift, act1, residual, act2, pool)
    y = torch.empty(out_shape, dtype=z.dtype, device=z.device)
    is_max = consts["POOL"] == POOL_MODES["max"]
    argmax = torch.empty(out_shape, dtype=argmax_dtype(consts["KH"] * consts["KW"]), device=z.device) \
        if is_max else None
    pixels, c = y.numel() // max(args[2], 1), args[2]
    if y.numel():
        _epilogue_fwd_kernel[lambda meta: (triton.cdiv(pixels, meta["BLOCK_P"]), triton.cdiv(c, meta["BLOCK_C"]))](
            z, z if scale is None else scale, z if shift is None else shift, z if residual is None else residual,
            y, argmax if is_max else y, pixels, *args, **consts, ROUND=bool(round_taps))
    return y, argmax


def _gather(dy, z, scale, shift, residual, argmax, bn, args, consts, write_dz: bool):
    """The gather / activation-gradient pass (args and consts: _check's) -> (dz (da with bn) or None,
    dresidual or None, batch norm's partials or None); without write_dz, da is dresidual (no act1),
    written once."""
    c = args[2]
    m = z.numel() // max(c, 1)  # pre-pool pixels: batch-norm rows
    rows, n_tiles = _tiles(m) if bn is not None else (0, 0)
    dz = torch.empty_like(z) if write_dz else None
    dres = None if residual is None else torch.empty_like(residual)
    part = torch.empty((2, n_tiles, c), dtype=torch.float32, device=z.device)
    if m and c:
        # z is read only for batch norm or an activation's gradient, the shortcut only for act2's
        # (the kernel's loads of them are dead code otherwise): dy stands in for what is not read
        load_z = bn is not None or consts["ACT1"] != NONE or consts["ACT2"] != NONE
        z_in = z if load_z else dy
        res_in = residual if residual is not None and consts["ACT2"] != NONE else z_in
        mean = z_in if bn is None else bn.mean
        _epilogue_bwd_kernel[lambda meta: (n_tiles or triton.cdiv(m, meta["BLOCK_P"]), triton.cdiv(c, meta["BLOCK_C"]))](
            dy, dy if argmax is None else argmax, z_in, z_in if scale is None else scale,
            z_in if shift is None else shift, res_in, mean, dres if dz is None else dz, dz if dres is None else dres,
            part, m, *args, rows, n_tiles, **consts, BN=bn is not None, WRITE_DZ=write_dz, LOAD_Z=load_z, ACT_Y=NONE)
    return dz, dres, part if bn is not None else None


def _check(dy, z, scale, shift, act1, residual, act2, pool, argmax, bn):
    """Validate epilogue_backward's arguments -> _setup's kernel arguments and constexprs."""
    out_shape, args, consts = _setup(z, scale, shift, act1, residual, act2, pool)
    check_tensor(dy, "dy", dtype=z.dtype, device=z.device)
    check(tuple(dy.shape) == out_shape, f"dy: expected shape {out_shape}, got {tuple(dy.shape)}")
    check_argmax(argmax, pool.mode if pool else "none", consts["KH"] * consts["KW"], out_shape, z.device)
    if bn is not None:
        check(isinstance(bn, BatchNormBackward), f"bn: expected None or a BatchNormBackward, got {bn!r}")
        check(scale is not None, "bn: expected scale and shift (the batch norm's affine), got None")
        for t, name, opt in ((bn.mean, "mean", False), (bn.var, "var", False), (bn.weight, "weight", True)):
            _check_channels(t, name, args[2], z.device, opt)
    return args, consts


def epilogue_backward(dy, z, scale, shift, act1: Act, residual, act2: Act, pool: Window | None, argmax,
                      bn: BatchNormBackward | None = None):
    """(dz, dresidual or None, dweight or None, dbias or None) for dy of epilogue_forward's y,
    recomputing a, v, u from the saved z, residual and argmax. bn None: the affine (if any) is
    fixed, dz = da * scale, one pass. With bn, a is batch norm of z (scale, shift its affine):
    dz is the batch-norm backward (through the batch statistics with bn.train) and, with
    bn.param_grads, dweight (bn.weight not None) and dbias (bn.bias) come in the weight's dtype
    (z's without one). Passes: the gather / activation-gradient pass (writing da and
    batchnorm's tile partials), then with bn batchnorm's merge and elementwise backward."""
    args, consts = _check(dy, z, scale, shift, act1, residual, act2, pool, argmax, bn)
    m, c = z.numel() // max(z.shape[-1], 1), z.shape[-1]
    if bn is not None and consts["ACT1"] == consts["ACT2"] == NONE and not consts["HAS_RES"] and not consts["POOL"]:
        # batch norm alone (a projection shortcut): da = dy, so its reduction reads dy and z directly,
        # without a pass that writes da (one pass over z's size fewer)
        backward = batchnorm_backward if bn.train else batchnorm_eval_backward
        dz, dw, db = backward(dy.view(m, c), z.view(m, c), bn.mean, bn.var, bn.eps, bn.weight, bn.param_grads)
        return dz.view(z.shape), None, None if bn.weight is None else dw, db if bn.bias else None
    # a shortcut added after the conv itself (no act1, no affine): dz is dresidual, written once
    same = bn is None and scale is None and consts["HAS_RES"] and consts["ACT1"] == NONE
    dz, dres, part = _gather(dy, z, scale, shift, residual, argmax, bn, args, consts, not same)
    if same:
        return dres, dres, None, None
    if bn is None:
        return dz, dres, None, None
    dz2, dw, db = batchnorm_backward_from_partials(part, dz.view(m, c), z.view(m, c), bn.mean, bn.var, bn.eps,
                                                   bn.weight, bn.param_grads, bn.train)
    return (dz2.view(z.shape), dres, None if bn.weight is None else dw, db if bn.bias else None)


def epilogue_backward_on_load(dy, z, scale, shift, residual, act2: Act, pool: Window | None, argmax,
                              bn: BatchNormBackward | None):
    """The gather pass of a block whose batch norm's output is added to a shortcut (no act1), for
    a caller that computes dz from da as it loads it (prologue.GradPrologue): da is dresidual, so
    it is written once -> (dresidual, center (3, C) fp32 in training or None, dweight, dbias) with
    center, dweight and dbias as batchnorm_backward_on_load's; bn None: the affine is fixed
    (dz = da scale)."""
    check(residual is not None, "epilogue_backward_on_load: expected a residual (a shortcut added after batch norm)")
    check(scale is not None, "epilogue_backward_on_load: expected batch norm's scale and shift, got None")
    args, consts = _check(dy, z, scale, shift, NO_ACT, residual, act2, pool, argmax, bn)
    _, dres, part = _gather(dy, z, scale, shift, residual, argmax, bn, args, consts, False)
    if bn is None:
        return dres, None, None, None
    k = z.shape[-1]
    center, dw, db = batchnorm_on_load_from_partials(part, z.view(-1, k), bn.mean, bn.var, bn.eps, bn.weight,
                                                     bn.param_grads, bn.train, scale)
    return dres, center, None if bn.weight is None else dw, db if bn.bias else None


def pooled_backward(dy, y, argmax, act1: Act, pool: Window, conv_shape):
    """dz (conv_shape: the conv's output (N, H, W, C)) of a block that pooled in its GEMM and kept no
    z (conv2d_forward with argmax=True): dy of the pooled y (N, OH, OW, C) gathered through the
    argmax (max; act1's gradient from y, specs.Act.grad_from_output) or spread over each window
    (avg, act1 none). One pass: reads dy, argmax and y (where a window's maximum is), writes dz."""
    check_tensor(dy, "dy", ndim=4)
    check_tensor(y, "y", dtype=dy.dtype, device=dy.device)
    check(tuple(y.shape) == tuple(dy.shape), f"y: expected shape {tuple(dy.shape)}, got {tuple(y.shape)}")
    n, h, w, c = conv_shape
    check(isinstance(act1, Act) and act1.grad_from_output and (pool.mode == "max" or act1 == NO_ACT),
          f"act1: expected one whose gradient follows from the pooled output (relu, leaky_relu, none; none for "
          f"avg pooling), got {act1!r} with {pool.mode!r} pooling")
    check_window(pool, (h, w), "pool")
    out_shape = (n, *pool.out_hw, c)
    check(tuple(dy.shape) == out_shape, f"dy: expected shape {out_shape}, got {tuple(dy.shape)}")
    check_argmax(argmax, pool.mode, pool.taps, out_shape, dy.device)
    dz = dy.new_empty(conv_shape)
    m = n * h * w
    if m and c:
        _epilogue_bwd_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_P"]), triton.cdiv(c, meta["BLOCK_C"]))](
            dy, dy if argmax is None else argmax, y, y, y, y, y, dz, dz, dz, m, h, w, c, *pool.out_hw, *pool.stride,
            *pool.padding, float(act1.slope), 0.0, 0, 0, KH=pool.kernel[0], KW=pool.kernel[1],
            POOL=POOL_MODES[pool.mode], ACT1=NONE, ACT2=NONE, HAS_AFFINE=False, HAS_RES=False, BN=False,
            WRITE_DZ=True, LOAD_Z=False, ACT_Y=act_code(act1, "act1"))
    return dz
