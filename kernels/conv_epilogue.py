"""The fused epilogue of the convolution forward kernel (conv.py): its `@triton.jit`
helpers (per-tile batch-norm statistics of the post-bias value; a non-overlapping pooling
window reduced in registers) and the launcher-side checks of its arguments. For pooling the
kernel's GEMM rows enumerate (pooled pixel, window tap) pairs, TAPS (the window's taps
rounded up to a power of two, at most 16) rows per pooled pixel, so that a tile of BLOCK_M
rows (a multiple of TAPS) holds whole windows; `pool_rows` maps rows to the conv pixels
they compute and `pool_reduce` folds each window's rows."""

import triton
import triton.language as tl

from ._common import check, check_tensor, nan_max
from .activation import act_code
from .window import geometry as _pool_geometry

# Codes for the POOL constexpr (0: no pooling).
POOL_MODES = {"max": 1, "avg": 2}
MAX_TAPS = 16  # rows per pooled pixel at most: BLOCK_M (>= 16, a power of two) stays a multiple of TAPS

_MAX = tl.constexpr(1)  # globals read inside @triton.jit code must be tl.constexpr

# The epilogue of a plain conv (and of every input-gradient launch): bias, if any, and nothing else.
PLAIN_EPILOGUE = {"res": None, "part": None, "args": (0.01, 0.01, 1, 1, 1, 1, 0, 0),
                  "meta": {"ACT": 0, "HAS_RES": False, "ACT2": 0, "POOL": 0, "TAPS": 1, "STATS": False}}


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
def pool_reduce(acc, valid, WINDOW, POOL: tl.constexpr, TAPS: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """(BLOCK_M // TAPS, BLOCK_N): each pooled pixel's max (NaN if any tap is NaN), or its sum /
    WINDOW (PyTorch's count_include_pad=True), over its TAPS rows; invalid rows count as -inf or 0."""
    if POOL == _MAX:
        acc = tl.where(valid[:, None], acc, float("-inf"))
        out = tl.reduce(tl.reshape(acc, (BLOCK_M // TAPS, TAPS, BLOCK_N)), 1, nan_max)
    else:
        acc = tl.where(valid[:, None], acc, 0.0)
        out = tl.sum(tl.reshape(acc, (BLOCK_M // TAPS, TAPS, BLOCK_N)), axis=1) / WINDOW
    return out


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


def epilogue_args(x, conv_shape, act, slope, residual, act2, slope2, pool, stats):
    """Validate the fused epilogue's arguments: (its kernel arguments, the output shape)."""
    n, oh, ow, k = conv_shape
    meta = {"ACT": act_code(act, "act"), "HAS_RES": residual is not None, "ACT2": act_code(act2, "act2"),
            "POOL": 0, "TAPS": 1, "STATS": stats}
    if residual is not None:
        check_tensor(residual, "residual", ndim=4, dtype=x.dtype, device=x.device)
        check(tuple(residual.shape) == conv_shape,
              f"residual: expected shape {conv_shape} (the conv output), got {tuple(residual.shape)}")
    check(isinstance(stats, bool), f"stats: expected a bool, got {stats!r}")
    check(not stats or (act == act2 == "none" and residual is None and pool is None),
          f"stats=True (the conv feeding a training-mode batch norm) needs act='none', act2='none', no "
          f"residual and no pool; got act={act!r}, act2={act2!r}, residual "
          f"{None if residual is None else tuple(residual.shape)}, pool={pool!r}")
    args = [float(slope), float(slope2), 1, 1, 1, 1, 0, 0]
    if pool is None:
        return {"res": residual, "part": None, "args": args, "meta": meta}, conv_shape
    check(isinstance(pool, (tuple, list)) and len(pool) == 5,
          f"pool: expected (mode, (kh, kw), (sh, sw), (ph, pw), (poh, pow)), got {pool!r}")
    mode, kernel, pstride, ppad, pout = pool
    try:  # pool.py's checks: mode, padding <= kernel / 2, pout the floor-mode output of (oh, ow)
        kernel, pstride, ppad = _pool_geometry(mode, kernel, pstride, ppad, (oh, ow), pout)
    except ValueError as err:
        raise ValueError(f"pool: {err}") from None
    check(pstride[0] >= kernel[0] and pstride[1] >= kernel[1], f"pool: only non-overlapping windows fuse "
          f"(stride >= kernel), got kernel {kernel} with stride {pstride}")
    check(kernel[0] * kernel[1] <= MAX_TAPS, f"pool window too large to fuse: {kernel[0]}x{kernel[1]} = "
          f"{kernel[0] * kernel[1]} taps, at most {MAX_TAPS}")
    meta.update(POOL=POOL_MODES[mode], TAPS=pool_taps(*kernel))
    return ({"res": residual, "part": None, "args": args[:2] + [*kernel, *pstride, *ppad], "meta": meta},
            (n, *_pool_hw((oh, ow), kernel, pstride, ppad), k))


def _pool_hw(hw, kernel, stride, padding):
    return tuple(max(0, (i + 2 * p - k) // s + 1) for i, k, s, p in zip(hw, kernel, stride, padding))
