"""The fused epilogue of the convolution forward kernel (conv_kernel.py): its `@triton.jit`
helpers (per-tile batch-norm statistics of the post-bias value; a non-overlapping pooling
window reduced in registers; in the input gradient, a prologue's scale and shift gradients) and
the launcher-side checks of its arguments. For pooling the
kernel's GEMM rows enumerate (pooled pixel, window tap) pairs, TAPS (the window's taps
rounded up to a power of two, at most 16) rows per pooled pixel, so that a tile of BLOCK_M
rows (a multiple of TAPS) holds whole windows (specs.MAX_POOL_TAPS at most); `pool_rows` maps rows to the conv pixels
they compute and `pool_reduce` folds each window's rows."""

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from ..specs import MAX_POOL_TAPS, NO_ACT, Act, Window
from ._common import INTERPRET, check, check_tensor
from .activation import act_code, apply_act_grad
from .window import POOL_MODES, argmax_dtype, check_window

_MAX = tl.constexpr(1)  # globals read inside @triton.jit code must be tl.constexpr
_SUM_TILES = {"BLOCK_T": 8, "BLOCK_C": 128} if INTERPRET else {"BLOCK_T": 64, "BLOCK_C": 32}


@dataclass(frozen=True)
class Epilogue:
    """What the conv kernel's epilogue takes: a residual to add, the batch-statistics partials
    buffer, the activations' slopes, the pooling window's kernel, stride and padding, and the
    constexpr switches. The default is a plain conv's (and every input-gradient launch's):
    bias, if any, and nothing else."""

    res: object = None  # (N, OH, OW, K) tensor or None
    part: object = None  # (2, n_tiles, K) fp32 tensor or None
    argmax: object = None  # max pooling's window offsets (N, POH, POW, K), written for a backward, or None
    slopes: tuple = (0.01, 0.01)
    window: tuple = (1, 1, 1, 1, 0, 0)  # kh, kw, sh, sw, ph, pw
    meta: dict = field(default_factory=lambda: {"ACT": 0, "HAS_RES": False, "ACT2": 0, "POOL": 0, "TAPS": 1,
                                                "STATS": False, "ARGMAX": False, "PRO_GRADS": False})


PLAIN_EPILOGUE = Epilogue()


def pool_taps(kh: int, kw: int) -> int:
    """Rows per pooled pixel: the window's taps rounded up to a power of two."""
    return triton.next_power_of_2(kh * kw)


@triton.jit
def pool_rows(offs_m, m_mask, GH, GW, OH, OW, PKH, PKW, pool_sh, pool_sw, pool_ph, pool_pw,
              TAPS: tl.constexpr):
    """Row i is tap t = i % TAPS (window offset (t // PKW, t % PKW)) of pooled pixel i // TAPS
    of the (N, GH, GW) pooled grid. Returns the conv pixel (n, oh, ow) that each row computes
    and whether it is real: t < PKH*PKW and (oh, ow) inside the (OH, OW) conv output (rows
    in the pool's padding are not)."""
    p = offs_m // TAPS
    t = offs_m % TAPS
    n = p // (GH * GW)
    oh = (p // GW) % GH * pool_sh - pool_ph + t // PKW
    ow = p % GW * pool_sw - pool_pw + t % PKW
    valid = m_mask & (t < PKH * PKW) & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
    return n, oh, ow, valid


@triton.jit
def _flip(bits):
    """An fp32 bit pattern <-> an int32 ordered as the floats (negative floats' magnitude bits
    reversed): an involution."""
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _ordered_max(v):
    """The max over axis 1 of fp32 v without NaN, as an integer max of order-preserving keys: a
    float max would compile to a NaN-dropping max.f32 and a reduce with nan_max (whose NaN the
    caller handles) costs Triton's interpreter ten times as much."""
    return _flip(tl.max(_flip(v.to(tl.int32, bitcast=True)), axis=1)).to(tl.float32, bitcast=True)


@triton.jit
def pool_reduce(acc, valid, WINDOW, POOL: tl.constexpr, TAPS: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """(BLOCK_M // TAPS, BLOCK_N): each pooled pixel's max (NaN if any tap is NaN), or its sum /
    WINDOW (PyTorch's count_include_pad=True), over its TAPS rows; invalid rows count as -inf or 0."""
    if POOL == _MAX:
        v = tl.reshape(tl.where(valid[:, None], acc, float("-inf")), (BLOCK_M // TAPS, TAPS, BLOCK_N))
        out = tl.where(tl.max((v != v).to(tl.int32), axis=1) > 0, float("nan"), _ordered_max(v))  # noqa: PLR0124
    else:
        acc = tl.where(valid[:, None], acc, 0.0)
        out = tl.sum(tl.reshape(acc, (BLOCK_M // TAPS, TAPS, BLOCK_N)), axis=1) / WINDOW
    return out


@triton.jit
def pool_argmax(acc, best, valid, TAPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_M // TAPS, BLOCK_N) int32: the tap t = r*PKW + s (pool.py's argmax code) that each pooled
    pixel's maximum `best` (pool_reduce's) comes from, as torch and epilogue.py pick it: the first
    valid tap holding it, or the last NaN where there is one (their scan takes strictly greater
    values or NaNs)."""
    v = tl.reshape(acc, (BLOCK_M // TAPS, TAPS, BLOCK_N))
    ok = tl.reshape(tl.broadcast_to(valid[:, None], (BLOCK_M, BLOCK_N)), (BLOCK_M // TAPS, TAPS, BLOCK_N))
    t = tl.arange(0, TAPS)[None, :, None]
    first = tl.min(tl.where(ok & (v == best[:, None, :]), t, TAPS), axis=1)
    last_nan = tl.max(tl.where(ok & (v != v), t, -1), axis=1)  # noqa: PLR0124 - v != v: v is NaN
    return tl.where(last_nan >= 0, last_nan, first)


@triton.jit
def tile_stats(acc, m_mask, n_mask, part_ptr, col, M, COUT, BLOCK_M: tl.constexpr):
    """Chan partials of this tile's rows (row tile program_id(0), its valid rows m_mask) per
    column col: the mean at part[0, tile, col] and M2, the sum of squared deviations from that
    mean (two passes over the registers), at part[1, tile, col]; part is (2, cdiv(M, BLOCK_M),
    COUT) fp32 and tile t holds min(BLOCK_M, M - t*BLOCK_M) rows."""
    tile = tl.program_id(0).to(tl.int64)
    count = tl.minimum(M - tile * BLOCK_M, BLOCK_M).to(tl.float32)
    mean = tl.sum(tl.where(m_mask[:, None], acc, 0.0), axis=0) / count
    d = tl.where(m_mask[:, None], acc - mean[None, :], 0.0)
    m2 = tl.sum(d * d, axis=0)
    n_tiles = tl.cdiv(M, BLOCK_M)
    tl.store(part_ptr + tile * COUT + col, mean, mask=n_mask)
    tl.store(part_ptr + (n_tiles + tile) * COUT + col, m2, mask=n_mask)


@triton.jit
def tile_prologue_grads(dx, z_ptrs, mask, scale_ptr, shift_ptr, col, n_mask, ACT: tl.constexpr, slope, part_ptr,
                        tile, T_MAX, C):
    """Per-tile partials of the gradients of a prologue's scale and shift (prologue.py), from dx
    (fp32, rows x columns col), the input gradient of the conv that read y = act(z scale + shift):
    with g = dx act'(z scale + shift), dshift = sum g and dscale = sum g z over the rows; they are
    the sums batch norm's backward takes (its pass over dy and z: 2 reads of z's size, against
    the one read of z here). part (2, T_MAX, C) fp32: part[0, tile, col], part[1, tile, col]."""
    z = tl.load(z_ptrs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + col, mask=n_mask, other=0.0)
    shift = tl.load(shift_ptr + col, mask=n_mask, other=0.0)
    g = tl.where(mask, apply_act_grad(z * scale[None, :] + shift[None, :], dx, ACT, slope), 0.0)
    tl.store(part_ptr + tile * C + col, tl.sum(g, axis=0), mask=n_mask)
    tl.store(part_ptr + (T_MAX + tile) * C + col, tl.sum(g * z, axis=0), mask=n_mask)


@triton.jit
def _sum_tiles_kernel(part_ptr, dshift_ptr, dscale_ptr, T, T_MAX, C,  # part (2, T_MAX, C): its first T tiles
                      BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    sum_g = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    sum_gz = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    for t0 in range(0, T, BLOCK_T):  # a fixed order: deterministic
        t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        mask = (t < T)[:, None] & cmask[None, :]
        sum_g += tl.load(part_ptr + t[:, None] * C + cols[None, :], mask=mask, other=0.0)
        sum_gz += tl.load(part_ptr + (T_MAX + t)[:, None] * C + cols[None, :], mask=mask, other=0.0)
    tl.store(dshift_ptr + cols, tl.sum(sum_g, axis=0), mask=cmask)
    tl.store(dscale_ptr + cols, tl.sum(sum_gz, axis=0), mask=cmask)


def sum_tiles(part, tiles: int):
    """(dscale, dshift), each (C,) fp32: tile_prologue_grads' partials (part (2, T_MAX, C)) of the
    first `tiles` tiles summed in a fixed order."""
    c = part.shape[2]
    dshift = torch.empty(c, dtype=torch.float32, device=part.device)
    dscale = torch.empty_like(dshift)
    if c:
        _sum_tiles_kernel[(triton.cdiv(c, _SUM_TILES["BLOCK_C"]),)](part, dshift, dscale, tiles, part.shape[1], c,
                                                                    **_SUM_TILES)
    return dscale, dshift


def epilogue_args(x, conv_shape, act: Act, residual, act2: Act, pool: Window | None, stats: bool,
                  argmax: bool = False):
    """Validate the fused epilogue's arguments: (its Epilogue, the output shape); `argmax`: a max
    pool also writes its argmax (Epilogue.argmax, allocated here) for a backward."""
    n, oh, ow, k = conv_shape
    meta = {"ACT": act_code(act, "act"), "HAS_RES": residual is not None, "ACT2": act_code(act2, "act2"),
            "POOL": 0, "TAPS": 1, "STATS": stats, "ARGMAX": argmax, "PRO_GRADS": False}
    if residual is not None:
        check_tensor(residual, "residual", ndim=4, dtype=x.dtype, device=x.device)
        check(tuple(residual.shape) == conv_shape,
              f"residual: expected shape {conv_shape} (the conv output), got {tuple(residual.shape)}")
    check(isinstance(stats, bool), f"stats: expected a bool, got {stats!r}")
    check(not argmax or (pool is not None and pool.mode == "max"),
          f"argmax=True needs max pooling, got pool={pool!r}")
    check(not stats or (act == act2 == NO_ACT and residual is None and pool is None),
          f"stats=True (the conv feeding a training-mode batch norm) needs act='none', act2='none', no "
          f"residual and no pool; got act={act.kind!r}, act2={act2.kind!r}, residual "
          f"{None if residual is None else tuple(residual.shape)}, pool={pool!r}")
    slopes = (float(act.slope), float(act2.slope))
    if pool is None:
        return Epilogue(residual, slopes=slopes, meta=meta), conv_shape
    check_window(pool, (oh, ow), "pool")
    check(not pool.overlaps, f"pool: only non-overlapping windows fuse (stride >= kernel), got kernel "
                             f"{pool.kernel} with stride {pool.stride}")
    check(pool.taps <= MAX_POOL_TAPS, f"pool window too large to fuse: {pool.kernel[0]}x{pool.kernel[1]} = "
                                      f"{pool.taps} taps, at most {MAX_POOL_TAPS}")
    meta.update(POOL=POOL_MODES[pool.mode], TAPS=pool_taps(*pool.kernel))
    y_shape = (n, *pool.out_hw, k)
    arg = x.new_empty(y_shape, dtype=argmax_dtype(pool.taps)) if argmax else None
    return Epilogue(residual, None, arg, slopes, (*pool.kernel, *pool.stride, *pool.padding), meta), y_shape
