"""Batch normalization's backward over x viewed as (M, C) rows, in batchnorm.py's tiles: a
reduction pass writes per-tile partials [sum(g), sum(g (x - mean))] of the gradient g reaching
the normalisation, a merge sums them in a fixed order into dbias and dweight, and an
elementwise pass writes dx. The training backward (batch statistics) and the eval one (running
statistics, constants), each with its launcher; and the variant for a consumer that computes
dx as it loads its tiles (grad_prologue.py): the reduction takes g = dy act'(x scale + shift),
the merge writes dx's per-channel coefficients, and no elementwise pass runs."""

import torch
import triton
import triton.language as tl

from ..specs import NO_ACT, Act
from ._common import (
    ELEMENTWISE_CONFIGS,
    autotune,
    check,
    check_tensor,
    elementwise_tiles,
    row_stride,
)
from .activation import NONE, act_code, apply_act_grad
from .batchnorm import (
    _MERGE,
    _TILE_CONFIGS,
    _TILE_INTERPRET,
    _channels,
    _check_channels,
    _tiles,
)
from .sync import sync_on, sync_sums, sync_total


@autotune(_TILE_CONFIGS, key=["M", "C", "ACT"], interpret=_TILE_INTERPRET)
@triton.jit
def _bn_bwd_partial_kernel(dy_ptr, x_ptr, mean_ptr, part_ptr,  # dy, x (M, C) -> part (2, n_tiles, C)
                           scale_ptr, shift_ptr, slope,  # ACT: g = dy act'(x scale + shift), (C,)
                           M, C, rows, n_tiles, stride_dym,  # dy's row stride: C, or more for a channel slice
                           ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    tile = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    if ACT != 0:
        scale = tl.load(scale_ptr + cols, mask=cmask, other=0.0)
        shift = tl.load(shift_ptr + cols, mask=cmask, other=0.0)
    row0 = tile * rows
    row_end = tl.minimum(row0 + rows, M)
    sum_dy = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    sum_dyx = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    for start in range(row0, row_end, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        mask = (offs_m < row_end)[:, None] & cmask[None, :]
        offs = offs_m[:, None] * C + cols[None, :]
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if ACT != 0:
            dy = tl.where(mask, apply_act_grad(x * scale[None, :] + shift[None, :], dy, ACT, slope), 0.0)
        sum_dy += dy
        sum_dyx += dy * (x - mean[None, :])
    tl.store(part_ptr + tile * C + cols, tl.sum(sum_dy, axis=0), mask=cmask)
    tl.store(part_ptr + (n_tiles + tile) * C + cols, tl.sum(sum_dyx, axis=0), mask=cmask)


@triton.jit
def _bn_bwd_merge_kernel(part_ptr, part2_ptr, var_ptr, sums_ptr, dw_ptr, db_ptr, C, n_tiles, eps,
                         scale_ptr, mean_ptr, center_ptr, inv_m,  # CENTER: center (2, C)
                         WRITE_PARAMS: tl.constexpr, CENTER: tl.constexpr, RAW: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    # part, part2 (n_tiles, C): sum(dy), sum(dy (x - mean)) per tile (RAW: sum(dy x), centred here)
    # -> sums (2, C) fp32: [sum(dy), sum(dy * xhat)] = [dbias, dweight]
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    sum_dy = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    sum_dyx = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    for t0 in range(0, n_tiles, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        mask = (t < n_tiles)[:, None] & cmask[None, :]
        sum_dy += tl.load(part_ptr + t[:, None] * C + cols[None, :], mask=mask, other=0.0)
        sum_dyx += tl.load(part2_ptr + t[:, None] * C + cols[None, :], mask=mask, other=0.0)
    invstd = tl.math.rsqrt(tl.load(var_ptr + cols, mask=cmask, other=1.0).to(tl.float32) + eps)
    dbias = tl.sum(sum_dy, axis=0)
    dweight = tl.sum(sum_dyx, axis=0)
    if RAW:
        dweight -= tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(tl.float32) * dbias
    dweight *= invstd
    tl.store(sums_ptr + cols, dbias, mask=cmask)
    tl.store(sums_ptr + C + cols, dweight, mask=cmask)
    if WRITE_PARAMS:
        tl.store(dw_ptr + cols, dweight.to(dw_ptr.dtype.element_ty), mask=cmask)
        tl.store(db_ptr + cols, dbias.to(db_ptr.dtype.element_ty), mask=cmask)
    if CENTER:  # dx = scale (g - dbias/M - xhat dweight/M) = scale g + beta (x - mean) + gamma
        # = scale g + beta x + offset, offset = gamma - beta mean: one multiply-add an element where it
        # is applied (dz on load, in its K loop) instead of three; its rounding, 2^-24 |beta mean|, is
        # under 2^-20 of beta (x - mean) unless |mean| passes 16 standard deviations
        scale = tl.load(scale_ptr + cols, mask=cmask, other=0.0)
        beta = -scale * invstd * dweight * inv_m
        tl.store(center_ptr + cols, beta, mask=cmask)
        tl.store(center_ptr + C + cols, -scale * dbias * inv_m - beta * tl.load(mean_ptr + cols, mask=cmask, other=0.0),
                 mask=cmask)


@autotune(ELEMENTWISE_CONFIGS, key=["n", "C", "TRAIN", "HAS_WEIGHT"], interpret=elementwise_tiles())
@triton.jit
def _bn_bwd_kernel(dy_ptr, x_ptr, mean_ptr, var_ptr, w_ptr, sums_ptr, dx_ptr, n, C, inv_m, eps,
                   TRAIN: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask, c = _channels(n, C, BLOCK)
    dy = tl.load(dy_ptr + offs, mask=mask).to(tl.float32)
    invstd = tl.math.rsqrt(tl.load(var_ptr + c).to(tl.float32) + eps)
    scale = invstd
    if HAS_WEIGHT:
        scale *= tl.load(w_ptr + c).to(tl.float32)
    if TRAIN:  # dx = w invstd (dy - dbias/M - xhat dweight/M)
        x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
        xhat = (x - tl.load(mean_ptr + c).to(tl.float32)) * invstd
        dy = dy - tl.load(sums_ptr + c) * inv_m - xhat * (tl.load(sums_ptr + C + c) * inv_m)
    tl.store(dx_ptr + offs, (dy * scale).to(dx_ptr.dtype.element_ty), mask=mask)


def _check_stats(x, mean, var, weight):
    check_tensor(x, "x", ndim=2)
    for t, name, opt in ((mean, "mean", False), (var, "var", False), (weight, "weight", True)):
        _check_channels(t, name, x.shape[1], x.device, opt)


def _check_backward(dy, x, mean, var, weight, rows=False):
    _check_stats(x, mean, var, weight)
    check_tensor(dy, "dy", ndim=2, dtype=x.dtype, device=x.device, rows=rows)
    check(dy.shape == x.shape, f"dy: expected shape {tuple(x.shape)}, got {tuple(dy.shape)}")


def _partials(dy, x, mean, act: Act = NO_ACT, scale=None, shift=None, grads=None):
    """The reduction pass: part (2, n_tiles, C) fp32 of g = dy act'(x scale + shift) (g = dy without an act);
    with `grads`, (dscale, dshift) of that scale and shift, which hold the sums (sum g x, sum g): no pass."""
    if grads is not None:
        return grads
    M, C = x.shape
    rows, n_tiles = _tiles(M)
    part = torch.empty((2, n_tiles, C), device=x.device, dtype=torch.float32)
    code = act_code(act)
    if n_tiles and C:
        _bn_bwd_partial_kernel[lambda meta: (n_tiles, triton.cdiv(C, meta["BLOCK_C"]))](
            dy, x, mean, part, x if code == NONE else scale, x if code == NONE else shift, float(act.slope),
            M, C, rows, n_tiles, row_stride(dy), ACT=code)
    return part


def _merge(part, x, var, eps, weight, params, center=None, scale=None, mean=None, train=True):
    """sums (2, C) [dbias, dweight] of the partials, and with params dweight, dbias in weight's dtype
    (x's without one); with `center` (2, C), dx's coefficients there (batchnorm_backward_on_load).
    Synchronised in training (sync.py): dweight, dbias of this process's rows, the sums and
    center of every process's."""
    M = x.shape[0]
    if train and sync_on():
        _, dw, db = _merge_kernel(part, x, var, eps, weight, params, None, None, mean, M) if params else \
            (None, None, None)
        synced = tuple(sync_sums(p.clone()) for p in part) if isinstance(part, tuple) else sync_sums(part.clone())
        sums, _, _ = _merge_kernel(synced, x, var, eps, weight, False, center, scale, mean, sync_total(M))
        return sums, dw, db
    return _merge_kernel(part, x, var, eps, weight, params, center, scale, mean, M)


def _merge_kernel(part, x, var, eps, weight, params, center, scale, mean, rows):
    """_merge's one launch; `rows` the count behind the partials (every process's when synchronised);
    part (2, n_tiles, C), or (dscale, dshift) (_partials)."""
    C = x.shape[1]
    raw = isinstance(part, tuple)
    first, second = (part[1].view(1, C), part[0].view(1, C)) if raw else (part[0], part[1])
    sums = torch.empty((2, C), device=x.device, dtype=torch.float32)
    dw = db = None
    if params:
        dw = torch.empty(C, device=x.device, dtype=x.dtype if weight is None else weight.dtype)
        db = torch.empty_like(dw)
    if C:
        _bn_bwd_merge_kernel[(triton.cdiv(C, _MERGE["BLOCK_C"]),)](
            first, second, var, sums, sums if dw is None else dw, sums if db is None else db, C, first.shape[0],
            float(eps), sums if scale is None else scale, sums if mean is None else mean,
            sums if center is None else center, 1.0 / max(rows, 1), WRITE_PARAMS=params, CENTER=center is not None,
            RAW=raw, **_MERGE)
    return sums, dw, db


def _finish(part, dy, x, mean, var, eps, weight, params, train):
    """Merge the tile partials [sum(dy), sum(dy (x - mean))] (part None: neither parameter
    gradients nor training, nothing to merge) into dbias, dweight, then the elementwise dx."""
    M, C = x.shape
    dx = torch.empty_like(x)
    sums, dw, db = (dx, None, None) if part is None else _merge(part, x, var, eps, weight, params, mean=mean,
                                                                train=train)
    rows = sync_total(M) if train else M  # the sums' rows: every process's when synchronised
    if x.numel():
        _bn_bwd_kernel[lambda meta: (triton.cdiv(x.numel(), meta["BLOCK"]),)](
            dy, x, mean, var, x if weight is None else weight, sums, dx, x.numel(), C, 1.0 / max(rows, 1),
            float(eps), TRAIN=train, HAS_WEIGHT=weight is not None)
    return dx, dw, db


def _backward(dy, x, mean, var, eps, weight, need_param_grads, train, grads=None):
    _check_backward(dy, x, mean, var, weight)
    params = bool(need_param_grads) and weight is not None
    part = _partials(dy, x, mean, grads=_checked_grads(grads, x)) if train or params else None
    return _finish(part, dy, x, mean, var, eps, weight, params, train)


def batchnorm_backward(dy, x, mean, var, eps, weight, need_param_grads, grads=None):
    """Training backward (batch statistics mean, var): (dx in x.dtype, dweight, dbias in
    weight's dtype, or None when not needed or weight is None). A reduction pass (tile
    partials merged in a fixed order) gives dbias = sum(dy), dweight = sum(dy xhat); then
    dx = weight invstd (dy - dbias/M - xhat dweight/M). grads: (dscale, dshift) (C,) fp32,
    the sums sum(dy x) and sum(dy) computed by the reader of y = x scale + shift (a conv that
    normalised x on load: conv2d_backward_input's), in place of the reduction pass."""
    return _backward(dy, x, mean, var, eps, weight, need_param_grads, True, grads)


def batchnorm_eval_backward(dy, x, mean, var, eps, weight, need_param_grads):
    """Eval backward (running stats are constants): dx = dy weight rsqrt(var + eps); with
    need_param_grads, dweight = sum(dy (x - mean) rsqrt(var + eps)), dbias = sum(dy)."""
    return _backward(dy, x, mean, var, eps, weight, need_param_grads, False)


def _check_part(part, M, C, device):
    n_tiles = _tiles(M)[1]
    check(isinstance(part, torch.Tensor) and part.dtype == torch.float32 and part.device == device
          and tuple(part.shape) == (2, n_tiles, C) and part.is_contiguous(),
          f"part: expected a contiguous float32 tensor of shape {(2, n_tiles, C)} on {device}, got "
          f"{getattr(part, 'dtype', type(part).__name__)} {tuple(getattr(part, 'shape', ()))}")


def batchnorm_backward_from_partials(part, dy, x, mean, var, eps, weight, need_param_grads, train=True):
    """The backward finished for a caller whose own pass wrote dy (M, C) and its partials in
    _bn_bwd_partial_kernel's format: part (2, n_tiles, C) fp32 holding, per tile of _tiles(M)
    rows, [sum(dy), sum(dy (x - mean))]. Merges them into dbias, dweight and writes dx
    (train: batch statistics mean, var; else running ones, dx = dy weight invstd) -> (dx in
    x's dtype, dweight, dbias in weight's dtype (x's where weight is None) with
    need_param_grads, else None)."""
    _check_backward(dy, x, mean, var, weight)
    _check_part(part, *x.shape, x.device)
    return _finish(part, dy, x, mean, var, eps, weight, bool(need_param_grads), train)


def _on_load(part, x, mean, var, eps, weight, params, train, scale):
    center = torch.empty((2, x.shape[1]), device=x.device, dtype=torch.float32) if train else None
    _, dw, db = _merge(part, x, var, eps, weight, params, center, scale, mean, train)
    return center, dw, db


def _checked_grads(grads, x):
    if grads is not None:
        check(isinstance(grads, tuple) and len(grads) == 2, "grads: expected (dscale, dshift) or None")
        _check_affine(x, dscale=grads[0], dshift=grads[1])
    return grads


def _check_affine(x, **tensors):
    for name, t in tensors.items():
        check_tensor(t, name, ndim=1, dtype=torch.float32, device=x.device)
        check(t.shape[0] == x.shape[1], f"{name}: expected shape ({x.shape[1]},), got {tuple(t.shape)}")


def batchnorm_backward_on_load(dy, x, mean, var, eps, weight, need_param_grads, train, scale, shift, act: Act,
                               grads=None):
    """For a consumer that computes dx as it loads its tiles (prologue.GradPrologue), where the
    gradient reaching the normalisation is g = dy act'(x scale + shift) (scale, shift (C,) fp32:
    the normalisation's; act NO_ACT: g = dy): the reduction and merge of the backward over g,
    without its elementwise pass -> (center, dweight, dbias). In training (batch statistics)
    center is (2, C) fp32 [beta, offset], dx = scale g + beta x + offset; in eval
    it is None, dx = scale g. dweight, dbias as batchnorm_backward's (computed only with
    need_param_grads and a weight, or in training). dy may be a channel slice (_common.even_rows).
    grads: (dscale, dshift) of scale and shift, the sums sum(g x) and sum(g), from y's reader
    (batchnorm_backward's), in place of the reduction pass."""
    _check_backward(dy, x, mean, var, weight, rows=True)
    _check_affine(x, scale=scale, shift=shift)
    params = bool(need_param_grads) and weight is not None
    if not (train or params):
        return None, None, None
    return _on_load(_partials(dy, x, mean, act, scale, shift, _checked_grads(grads, x)), x, mean, var, eps, weight,
                    params, train, scale)


def batchnorm_on_load_from_partials(part, x, mean, var, eps, weight, need_param_grads, train, scale):
    """batchnorm_backward_on_load for a caller whose own pass wrote the partials of g (part as
    batchnorm_backward_from_partials takes it)."""
    _check_stats(x, mean, var, weight)
    _check_affine(x, scale=scale)
    _check_part(part, *x.shape, x.device)
    return _on_load(part, x, mean, var, eps, weight, bool(need_param_grads) and weight is not None, train, scale)
