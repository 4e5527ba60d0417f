"""Batch normalization over x viewed as (M, C) rows (NHWC flattened, or a flat (N, F)
tensor as BatchNorm1d): deterministic per-channel statistics (per-tile Welford partials
merged Chan-style, no atomics), the running-statistics update and the normalization, each
with its launcher; the backward passes are in batchnorm_backward.py, and batchnorm_layer.py
runs both as a layer.

Tiles of `rows` consecutive rows (chosen by the launcher from M alone, never by the
autotuned config) give [n_tiles, C] fp32 partials; a tile's count is min(rows, M - tile*rows),
so only its mean and M2 (or its two sums) are stored. The statistics are taken of x - x[0]
(row 0 as a per-channel shift): every mean that the merges combine is then O(std), and a
large |mean| costs no precision beyond rounding the final fp32 mean."""

import torch
import triton
import triton.language as tl
from torch.autograd.graph import increment_version

from ._common import (
    ELEMENTWISE_CONFIGS,
    INTERPRET,
    autotune,
    check,
    check_tensor,
    elementwise_tiles,
)
from .sync import sync_moments, sync_total

_TILE_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_C": c}, num_warps=w, num_stages=s)
                 for m, c, w, s in ((64, 64, 4, 3), (128, 32, 4, 3), (32, 128, 4, 3), (256, 16, 4, 3),
                                    (128, 64, 8, 3), (64, 128, 8, 3), (128, 128, 8, 2))]
_TILE_INTERPRET = {"BLOCK_M": (lambda a: a["rows"] // 2, 16, 512), "BLOCK_C": ("C", 16, 128)}
# Rows per tile: a power of two >= every BLOCK_M, with at most _MAX_TILES tiles (few under the
# interpreter, which pays per program; tests still merge several tiles of two sub-blocks each).
_MIN_ROWS, _MAX_TILES = (64, 8) if INTERPRET else (256, 1024)
_MERGE = {"BLOCK_T": 8, "BLOCK_C": 128} if INTERPRET else {"BLOCK_T": 128, "BLOCK_C": 16}


@autotune(_TILE_CONFIGS, key=["M", "C"], interpret=_TILE_INTERPRET)
@triton.jit
def _bn_stats_partial_kernel(x_ptr, part_ptr, M, C, rows, n_tiles,  # x (M, C) -> part (2, n_tiles, C)
                             BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    tile = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    shift = tl.load(x_ptr + cols, mask=cmask, other=0.0).to(tl.float32)  # row 0: stats of x - x[0]
    row0 = tile * rows
    row_end = tl.minimum(row0 + rows, M)
    n = tl.zeros([], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for start in range(row0, row_end, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        mask = (offs_m < row_end)[:, None] & cmask[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, x - shift[None, :], 0.0)
        # Sub-block mean and M2 (two-pass on registers), then Chan's merge into the tile's.
        nb = tl.minimum(row_end - start, BLOCK_M).to(tl.float32)
        bmean = tl.sum(x, axis=0) / nb
        d = tl.where(mask, x - bmean[None, :], 0.0)
        delta = bmean - mean
        frac = nb / (n + nb)
        mean += delta * frac
        m2 += tl.sum(d * d, axis=0) + delta * delta * n * frac
        n += nb
    tl.store(part_ptr + tile * C + cols, mean, mask=cmask)
    tl.store(part_ptr + (n_tiles + tile) * C + cols, m2, mask=cmask)


@triton.jit
def _bn_stats_merge_kernel(x_ptr, part_ptr, mean_ptr, var_ptr, M, C, rows, n_tiles,
                           BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    n = tl.zeros([], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for t0 in range(0, n_tiles, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        tmask = t < n_tiles
        cnt = tl.where(tmask, tl.minimum(M - t * rows, rows), 0).to(tl.float32)  # (BLOCK_T,)
        mask = tmask[:, None] & cmask[None, :]
        pmean = tl.load(part_ptr + t[:, None] * C + cols[None, :], mask=mask, other=0.0)
        pm2 = tl.load(part_ptr + (n_tiles + t)[:, None] * C + cols[None, :], mask=mask, other=0.0)
        nb = tl.sum(cnt, axis=0)
        bmean = tl.sum(cnt[:, None] * pmean, axis=0) / nb
        d = pmean - bmean[None, :]
        bm2 = tl.sum(pm2 + cnt[:, None] * d * d, axis=0)
        delta = bmean - mean
        frac = nb / (n + nb)
        mean += delta * frac
        m2 += bm2 + delta * delta * n * frac
        n += nb
    nonempty = tl.full([BLOCK_C], M, tl.int32) > 0  # a tensor mask: scalar bools break newer interpreters
    shift = tl.load(x_ptr + cols, mask=cmask & nonempty, other=0.0).to(tl.float32)
    tl.store(mean_ptr + cols, shift + mean, mask=cmask)
    tl.store(var_ptr + cols, m2 / n, mask=cmask)  # biased


@triton.jit
def _bn_update_running_kernel(mean_ptr, var_ptr, rmean_ptr, rvar_ptr, nbt_ptr, C, momentum, unbias,
                              CUMULATIVE: tl.constexpr, UPDATE: tl.constexpr, BLOCK: tl.constexpr):
    # One program: it alone reads and bumps num_batches_tracked.
    nbt = tl.load(nbt_ptr) + 1
    tl.store(nbt_ptr, nbt)
    if CUMULATIVE:  # momentum=None: the cumulative moving average, factor 1 / num_batches_tracked
        factor = 1.0 / nbt.to(tl.float32)
    else:
        factor = momentum
    if UPDATE:
        for c0 in range(0, C, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            mask = cols < C
            mean = tl.load(mean_ptr + cols, mask=mask).to(tl.float32)
            var = tl.load(var_ptr + cols, mask=mask).to(tl.float32)
            rmean = tl.load(rmean_ptr + cols, mask=mask).to(tl.float32)
            rvar = tl.load(rvar_ptr + cols, mask=mask).to(tl.float32)
            rmean = (1.0 - factor) * rmean + factor * mean
            rvar = (1.0 - factor) * rvar + factor * (var * unbias)
            tl.store(rmean_ptr + cols, rmean.to(rmean_ptr.dtype.element_ty), mask=mask)
            tl.store(rvar_ptr + cols, rvar.to(rvar_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _channels(n, C, BLOCK: tl.constexpr):
    """This program's flat offsets into an (M, C) tensor, their mask and their channels."""
    base = tl.program_id(0).to(tl.int64) * BLOCK
    offs = base + tl.arange(0, BLOCK)
    c = ((base % C).to(tl.int32) + tl.arange(0, BLOCK)) % C  # one int64 modulo per program
    return offs, offs < n, c


@autotune(ELEMENTWISE_CONFIGS, key=["n", "C", "HAS_WEIGHT", "HAS_BIAS"], interpret=elementwise_tiles())
@triton.jit
def _bn_fwd_kernel(x_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, y_ptr, n, C, eps,
                   HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask, c = _channels(n, C, BLOCK)
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    mean = tl.load(mean_ptr + c).to(tl.float32)
    scale = tl.math.rsqrt(tl.load(var_ptr + c).to(tl.float32) + eps)
    if HAS_WEIGHT:
        scale *= tl.load(w_ptr + c).to(tl.float32)
    y = (x - mean) * scale  # center first: no cancellation when |mean| >> std
    if HAS_BIAS:
        y += tl.load(b_ptr + c).to(tl.float32)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _check_channels(t, name, C, device, optional=False):
    if optional and t is None:
        return
    check_tensor(t, name, ndim=1, device=device)
    check(t.shape[0] == C, f"{name}: expected shape ({C},), got {tuple(t.shape)}")


def _tiles(M):
    rows = max(_MIN_ROWS, triton.next_power_of_2(triton.cdiv(M, _MAX_TILES)))
    return rows, triton.cdiv(M, rows)


def batchnorm_stats(x):
    """x (M, C) -> (mean (C,), var (C,)) both float32, var biased (divided by M)."""
    check_tensor(x, "x", ndim=2)
    M, C = x.shape
    mean = torch.empty(C, device=x.device, dtype=torch.float32)
    var = torch.empty_like(mean)
    rows, n_tiles = _tiles(M)
    part = torch.empty((2, n_tiles, C), device=x.device, dtype=torch.float32)  # tile means, M2s
    if n_tiles and C:
        _bn_stats_partial_kernel[lambda meta: (n_tiles, triton.cdiv(C, meta["BLOCK_C"]))](
            x, part, M, C, rows, n_tiles)
    if C:  # M == 0 gives mean 0, var nan
        _bn_stats_merge_kernel[(triton.cdiv(C, _MERGE["BLOCK_C"]),)](x[:1], part, mean, var, M, C, rows, n_tiles,
                                                                     **_MERGE)  # reads row 0 only
    return sync_moments(mean, var, M)


def batchnorm_update_running(mean, var, running_mean, running_var, num_batches_tracked, momentum, count):
    """In place, one kernel: running_mean = (1-m) running_mean + m mean, running_var =
    (1-m) running_var + m var count/(count-1), num_batches_tracked += 1. momentum None is
    torch's cumulative average (m = 1/num_batches_tracked). count == 1 raises as torch
    does; count == 0 (an empty batch) leaves the running stats as they are."""
    check_tensor(mean, "mean", ndim=1)
    C = mean.shape[0]
    for t, name in ((var, "var"), (running_mean, "running_mean"), (running_var, "running_var")):
        _check_channels(t, name, C, mean.device)
    check(isinstance(num_batches_tracked, torch.Tensor) and num_batches_tracked.dtype == torch.int64
          and num_batches_tracked.dim() == 0 and num_batches_tracked.device == mean.device,
          f"num_batches_tracked: expected a 0-d int64 tensor on {mean.device}, got "
          f"{getattr(num_batches_tracked, 'dtype', type(num_batches_tracked).__name__)} "
          f"{tuple(getattr(num_batches_tracked, 'shape', ()))}")
    check(isinstance(count, int) and count >= 0, f"count: expected an int >= 0, got {count!r}")
    check(count != 1, f"batchnorm: expected more than 1 value per channel when training, got {count} "
                      f"value per channel for {C} channels")
    check(momentum is None or isinstance(momentum, (int, float)), f"momentum: expected a number or None, got "
                                                                  f"{momentum!r}")
    count = sync_total(count)  # the statistics' rows: every process's when synchronised
    _bn_update_running_kernel[(1,)](mean, var, running_mean, running_var, num_batches_tracked, C,
                                    float(momentum or 0.0), count / max(count - 1, 1),
                                    CUMULATIVE=momentum is None, UPDATE=count > 0 and C > 0, BLOCK=1024)
    # A kernel's write does not move the tensors' version counters as a torch op would; move them,
    # so that whatever keys on them (the folded eval weights of a conv block) sees the new values.
    for t in (running_mean, running_var, num_batches_tracked):
        increment_version(t)


def batchnorm_forward(x, mean, var, eps, weight, bias):
    """y = (x - mean) rsqrt(var + eps) weight + bias for x (M, C); mean, var (C,) fp32 (or
    any float dtype: running stats of a half-precision module); weight, bias (C,) or None."""
    check_tensor(x, "x", ndim=2)
    C = x.shape[1]
    for t, name, opt in ((mean, "mean", False), (var, "var", False), (weight, "weight", True), (bias, "bias", True)):
        _check_channels(t, name, C, x.device, opt)
    y = torch.empty_like(x)
    n = x.numel()
    if n:
        _bn_fwd_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](
            x, mean, var, x if weight is None else weight, x if bias is None else bias, y, n, C, float(eps),
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None)
    return y


def batchnorm_merge_stats(part, rows, M):
    """(mean (C,), var (C,)) float32, var biased, from Chan partials that another kernel's
    epilogue wrote (the conv forward with stats=True): part (2, n_tiles, C) fp32 holds each
    tile's mean and M2 (about that mean, no shift), tile t covering min(rows, M - t*rows) of
    the M rows, n_tiles = cdiv(M, rows). The merge is batchnorm_stats' with a zero shift."""
    check_tensor(part, "part", ndim=3, dtype=torch.float32)
    check(isinstance(rows, int) and rows >= 1 and isinstance(M, int) and M >= 0,
          f"rows, M: expected an int >= 1 and an int >= 0, got {rows!r}, {M!r}")
    _, n_tiles, C = part.shape
    check(part.shape[0] == 2 and n_tiles == triton.cdiv(M, rows),
          f"part: expected shape (2, {triton.cdiv(M, rows)}, C) for M={M} rows in tiles of {rows}, "
          f"got {tuple(part.shape)}")
    mean = torch.empty(C, device=part.device, dtype=torch.float32)
    var = torch.empty_like(mean)
    shift = torch.zeros(C, device=part.device, dtype=torch.float32)  # the merge adds back row 0 of its x
    if C:  # M == 0 gives mean 0, var nan
        _bn_stats_merge_kernel[(triton.cdiv(C, _MERGE["BLOCK_C"]),)](shift, part, mean, var, M, C, rows, n_tiles,
                                                                     **_MERGE)
    return sync_moments(mean, var, M)
