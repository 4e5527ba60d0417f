"""The backward of a fused conv block's epilogue pass (epilogue.py): it keeps only z, residual
and argmax and recomputes a and v at each pre-pool pixel; one kernel gathers dy over the pool
windows holding the pixel (no atomics), writes dresidual and da (dz itself when the affine is
fixed) and, for training batch norm, batchnorm_backward.py's per-tile partials of sum(da),
sum(da (z - mean)); batchnorm's merge and elementwise backward (`batchnorm_backward_from_partials`)
then finish dz, dweight and dbias. A block that pooled in its GEMM and kept no z takes the same
kernel with dy gathered through the argmax and act1's gradient from y (`pooled_backward`)."""

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..specs import NO_ACT, Act, Window
from ._common import autotune, check, check_tensor
from .activation import NONE, act_code, apply_act_grad
from .batchnorm import _TILE_CONFIGS, _check_channels, _tiles
from .batchnorm_backward import (
    batchnorm_backward,
    batchnorm_backward_from_partials,
    batchnorm_backward_on_load,
    batchnorm_eval_backward,
    batchnorm_on_load_from_partials,
)
from .epilogue import _KEY, _PRUNE, _affine, _chain, _setup, window_args
from .prologue import apply_grad_prologue, grad_coefs
from .window import (
    CONFIGS,
    check_argmax,
    gather_dy,
)


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
    whether the statistics were the batch's (train: the gradient flows through them); and `grads`,
    (dscale, dshift) of its scale and shift where the reader of a deferred y computed them
    (batch norm's sums, then: batchnorm_backward's), or None."""

    mean: object
    var: object
    eps: float
    weight: object
    bias: bool
    param_grads: bool
    train: bool
    grads: tuple | None = None


def _gather(dy, z, scale, shift, residual, argmax, bn, args, consts, write_dz: bool, act_y: int = NONE,
            shape=None):
    """The gather / activation-gradient pass (args and consts: _check's) -> (dz (da with bn) or None,
    dresidual or None, batch norm's partials or None); without write_dz, da is dresidual (no act1),
    written once. act_y (pooled_backward): `z` is the pooled y, act1's gradient comes from it, and
    dz has `shape` (the conv's output)."""
    shape = tuple(z.shape) if shape is None else shape
    c = args[2]
    m = math.prod(shape) // max(c, 1)  # pre-pool pixels: batch-norm rows
    rows, n_tiles = _tiles(m) if bn is not None else (0, 0)
    dz = z.new_empty(shape) if write_dz else None
    dres = None if residual is None else torch.empty_like(residual)
    part = torch.empty((2, n_tiles, c), dtype=torch.float32, device=z.device)
    if m and c:
        # z is read only for batch norm or an activation's gradient, the shortcut only for act2's
        # (the kernel's loads of them are dead code otherwise): dy stands in for what is not read
        load_z = bn is not None or consts["ACT1"] != NONE or consts["ACT2"] != NONE
        z_in = z if load_z or act_y != NONE else dy
        res_in = residual if residual is not None and consts["ACT2"] != NONE else z_in
        mean = z_in if bn is None else bn.mean
        _epilogue_bwd_kernel[lambda meta: (n_tiles or triton.cdiv(m, meta["BLOCK_P"]), triton.cdiv(c, meta["BLOCK_C"]))](
            dy, dy if argmax is None else argmax, z_in, z_in if scale is None else scale,
            z_in if shift is None else shift, res_in, mean, dres if dz is None else dz, dz if dres is None else dres,
            part, m, *args, rows, n_tiles, **consts, BN=bn is not None, WRITE_DZ=write_dz, LOAD_Z=load_z,
            ACT_Y=act_y)
    return dz, dres, part if bn is not None else None


def _check(dy, z, scale, shift, act1, residual, act2, pool, argmax, bn):
    """Validate epilogue_backward's arguments -> _setup's kernel arguments and constexprs."""
    out_shape, args, consts = _setup(z, scale, shift, act1, residual, act2, pool)
    check_tensor(dy, "dy", dtype=z.dtype, device=z.device)
    check(tuple(dy.shape) == out_shape, f"dy: expected shape {out_shape}, got {tuple(dy.shape)}")
    check_argmax(argmax, pool.mode if pool else "none", consts["KH"] * consts["KW"], out_shape, z.device)
    if bn is not None:
        check(isinstance(bn, BatchNormBackward), f"bn: expected None or a BatchNormBackward, got {type(bn).__name__}")
        check(scale is not None, "bn: expected scale and shift (the batch norm's affine), got None")
        for t, name, opt in ((bn.mean, "mean", False), (bn.var, "var", False), (bn.weight, "weight", True)):
            _check_channels(t, name, args[2], z.device, opt)
    return args, consts


# (batch norm's elementwise (M, C) tiles)
@autotune(_TILE_CONFIGS, key=["M", "C", "ACT", "CENTER", "HAS_ADD"],
          interpret={"BLOCK_M": ("M", 16, 512), "BLOCK_C": ("C", 16, 128)})
@triton.jit
def _bn_act_bwd_kernel(dy_ptr, z_ptr, dz_ptr,  # (M, C); dy's rows stride_dym apart (a concat's gradient slice)
                       scale_ptr, shift_ptr, center_ptr, slope,  # fp32 (C,), (C,), (2, C): [beta, offset]
                       add_ptr,  # HAS_ADD: (M, C), rows stride_addm apart: z's gradient from its other reader
                       M, C, stride_dym, stride_addm, ACT: tl.constexpr, CENTER: tl.constexpr,
                       HAS_ADD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    # dz = scale g + beta z + offset with g = dy act'(z scale + shift): batch norm's backward
    # through the batch statistics (CENTER; else through constants, dz = scale g), the activation's
    # recomputed from z: what a conv's gradient kernels apply as they load dy (prologue.py), as a pass.
    # HAS_ADD: z forks (DenseNet: the concat copies it too) and its other gradient is added here, so
    # the sum is written once: 1 read more where a separate sum would read dz and it and write again
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ch_ok = ch < C
    keep = (rows < M)[:, None] & ch_ok[None, :]
    offs = rows[:, None] * C + ch[None, :]
    s, t, beta, off = grad_coefs(scale_ptr, shift_ptr, center_ptr, C, ch, ch_ok, True, CENTER)
    dy = tl.load(dy_ptr + rows[:, None] * stride_dym + ch[None, :], mask=keep, other=0.0)
    z = tl.load(z_ptr + offs, mask=keep, other=0.0)
    dz = apply_grad_prologue(dy, z, s[None, :], t[None, :], beta[None, :], off[None, :], keep, True,
                             ACT, slope, CENTER, tl.float32, MASKED=False)  # (stored where keep is: no zeros)
    if HAS_ADD:
        dz += tl.load(add_ptr + rows[:, None] * stride_addm + ch[None, :], mask=keep, other=0.0).to(tl.float32)
    tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=keep)


def _bn_act_backward(dy, z, scale, shift, act1: Act, bn, add=None):
    """(dz, dweight, dbias) of batch norm then act1 alone: batch norm's sums of g = dy act1'(u)
    (dy and z in, as dz on load's), then dz in one pass (dy and z in), act1's gradient recomputed:
    5 passes over z's size where the gather pass writing da and batch norm's rereading it take 6.
    add (z's shape, or a channel slice of a concat's gradient): added to dz as it is written."""
    m, c = z.numel() // max(z.shape[-1], 1), z.shape[-1]
    dy2, z2 = dy.reshape(m, c), z.view(m, c)  # (dy a channel slice: a view, its rows apart)
    center, dw, db = batchnorm_backward_on_load(dy2, z2, bn.mean, bn.var, bn.eps, bn.weight, bn.param_grads, bn.train,
                                                scale, shift, act1, bn.grads)
    add2 = None if add is None else add.reshape(m, c)  # (a channel slice stays a view)
    dz = torch.empty_like(z)
    if dz.numel():
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(c, meta["BLOCK_C"]))
        _bn_act_bwd_kernel[grid](dy2, z2, dz, scale, shift, scale if center is None else center, float(act1.slope),
                                 dz if add2 is None else add2, m, c, dy2.stride(0),
                                 c if add2 is None else add2.stride(0), ACT=act_code(act1), CENTER=center is not None,
                                 HAS_ADD=add2 is not None)
    return dz, dw if bn.param_grads else None, db if bn.param_grads else None


def epilogue_backward(dy, z, scale, shift, act1: Act, residual, act2: Act, pool: Window | None, argmax,
                      bn: BatchNormBackward | None = None, add=None):
    """(dz, dresidual or None, dweight or None, dbias or None) for dy of epilogue_forward's y,
    recomputing a, v, u from the saved z, residual and argmax; add (batch norm and act1 alone: z's
    gradient from its other reader, _bn_act_backward) is added to dz. bn None: the affine (if any) is
    fixed, dz = da * scale, one pass. With bn, a is batch norm of z (scale, shift its affine):
    dz is the batch-norm backward (through the batch statistics with bn.train) and, with
    bn.param_grads, dweight (bn.weight not None) and dbias (bn.bias) come in the weight's dtype
    (z's without one). Passes: the gather / activation-gradient pass (writing da and
    batchnorm's tile partials), then with bn batchnorm's merge and elementwise backward."""
    args, consts = _check(dy, z, scale, shift, act1, residual, act2, pool, argmax, bn)
    m, c = z.numel() // max(z.shape[-1], 1), z.shape[-1]
    alone = bn is not None and consts["ACT1"] != NONE and consts["ACT2"] == NONE and not consts["HAS_RES"] \
        and not consts["POOL"]
    if add is not None:
        check(alone, "add: only with batch norm and act1 alone (no shortcut, second activation or pool)")
        check_tensor(add, "add", dtype=z.dtype, device=z.device, rows=True)
        check(tuple(add.shape) == tuple(z.shape), f"add: expected shape {tuple(z.shape)}, got {tuple(add.shape)}")
    if bn is not None and consts["ACT1"] == consts["ACT2"] == NONE and not consts["HAS_RES"] and not consts["POOL"]:
        # batch norm alone (a projection shortcut): da = dy, so its reduction reads dy and z directly,
        # without a pass that writes da (one pass over z's size fewer)
        args = (dy.view(m, c), z.view(m, c), bn.mean, bn.var, bn.eps, bn.weight, bn.param_grads)
        dz, dw, db = batchnorm_backward(*args, bn.grads) if bn.train else batchnorm_eval_backward(*args)
        return dz.view(z.shape), None, None if bn.weight is None else dw, db if bn.bias else None
    if alone:  # batch norm and act1 alone: two passes, none writing da
        dz, dw, db = _bn_act_backward(dy, z, scale, shift, act1, bn, add)
        return dz, None, None if bn.weight is None else dw, db if bn.bias else None
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
    it is written once -> (dresidual, center (2, C) fp32 in training or None, dweight, dbias) with
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
    check(isinstance(act1, Act) and act1.grad_from_output and (pool.mode == "max" or act1 == NO_ACT),
          f"act1: expected one whose gradient follows from the pooled output (relu, leaky_relu, none; none for "
          f"avg pooling), got {act1!r} with {pool.mode!r} pooling")
    out_shape, args, consts = window_args(tuple(conv_shape), act1, NO_ACT, pool)
    check(tuple(dy.shape) == out_shape, f"dy: expected shape {out_shape}, got {tuple(dy.shape)}")
    check_argmax(argmax, pool.mode, pool.taps, out_shape, dy.device)
    # act1's gradient is taken from y (ACT_Y), not recomputed from a z (ACT1)
    consts.update(ACT1=NONE, HAS_AFFINE=False, HAS_RES=False)
    return _gather(dy, y, None, None, None, argmax, None, args, consts, True, act_code(act1, "act1"),
                   tuple(conv_shape))[0]
