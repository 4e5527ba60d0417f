"""Dense (fully connected) layers: one tiled GEMM kernel on `tl.dot` with fp32 accumulation
and a fused bias + activation + dropout + softmax epilogue serves all three products through
its strides (y = x @ w.T forward, dx = dy @ w and dw = dy.T @ x backward), a column-sum kernel
gives the bias gradient; the launchers of the three passes (dense_block.py runs a dense block
through them)."""

import torch
import triton
import triton.language as tl

from ..specs import MAX_SOFTMAX_UNITS, NO_ACT, Act
from ._common import (
    ELEMENTWISE_CONFIGS,
    autotune,
    check,
    check_tensor,
    dot_dtype,
    dot_precision,
    elementwise_tiles,
    fits_shared_memory,
    gemm_config,
    nan_max,
)
from .activation import _NONE, NONE, act_code, apply_act, apply_act_grad
from .dropout import check_dropout, dropout_keep

# Tiles of fewer than 64 rows (batches under 64) swap the product's operands (SWAP: c^T = b^T a^T), so
# that the tile's columns take wgmma's 64-row side on Hopper, where 16 or 32 rows would fall back to
# mma.sync; they need 64 columns or more.
_CONFIGS = [gemm_config(*c, GROUP_M=8)
            for c in ((128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 3, 8), (128, 128, 32, 4, 4),
                      (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 4), (128, 32, 32, 4, 4),
                      (32, 128, 64, 4, 4), (32, 64, 64, 4, 4), (64, 32, 64, 4, 4), (16, 64, 128, 4, 4),
                      (16, 128, 64, 4, 4), (64, 16, 128, 4, 4),
                      # wide rows for a fused softmax over up to MAX_SOFTMAX_UNITS classes
                      (32, 256, 32, 3, 4), (16, 512, 64, 2, 4), (16, 1024, 16, 2, 8))]


def _prune(configs, named_args, **kwargs):
    """Drop tiles that overflow shared memory (fp32 operands at the largest tiles), then
    tiles far taller or wider than the product (small batches, few classes)."""
    size = named_args["a_ptr"].element_size()
    configs = [c for c in configs if fits_shared_memory(c, size)]
    rows = max(16, triton.next_power_of_2(named_args["M"]))
    cols = max(16, triton.next_power_of_2(named_args["N"]))
    if kwargs.get("SOFTMAX"):  # one tile holds the whole row
        return [c for c in configs if c.kwargs["BLOCK_N"] >= cols and c.kwargs["BLOCK_M"] <= rows] or \
            [c for c in configs if c.kwargs["BLOCK_N"] >= cols]
    return [c for c in configs if c.kwargs["BLOCK_M"] <= rows and c.kwargs["BLOCK_N"] <= cols] or configs


def _cols(args):
    """Columns per tile under the interpreter: all of a softmax row (the next power of two)."""
    return 2 * args["N"] - 1 if args["SOFTMAX"] else min(args["N"], 128)


@triton.jit
def _multiple(v, D: tl.constexpr):
    """v, known to Triton as a multiple of D (a power of two that the launcher found dividing it)."""
    return v // D * D


@autotune(_CONFIGS, key=["M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn", "HAS_BIAS", "ACT", "DROP",
                      "SOFTMAX"],
          interpret={"BLOCK_M": ("M", 16, 512), "BLOCK_N": (_cols, 16, 1024), "BLOCK_K": ("K", 16, 128)},
          prune_configs_by={"early_config_prune": _prune})
@triton.heuristics({"SWAP": lambda args: args["BLOCK_M"] < 64})
@triton.jit
def _matmul_kernel(a_ptr, b_ptr, bias_ptr, c_ptr, pre_ptr, M, N, K,
                   stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, slope, p, scale, seed,
                   HAS_BIAS: tl.constexpr, ACT: tl.constexpr, SAVE_PRE: tl.constexpr, DROP: tl.constexpr,
                   SOFTMAX: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                   A_KMAJOR: tl.constexpr, A_DIV: tl.constexpr, B_KMAJOR: tl.constexpr, B_DIV: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                   SWAP: tl.constexpr):
    # c (M, N) = softmax(dropout(act(a (M, K) @ b (K, N) + bias (N,)))), any strides; each epilogue
    # stage optional. SAVE_PRE also stores act's input (c's strides) for the backward pass;
    # DROP draws the mask of element m*N + n, as dropout.py does for a contiguous (M, N) tensor;
    # SOFTMAX needs the whole row in one tile (BLOCK_N >= N).
    # Triton proves an integer's divisibility by 16 only. A_DIV (B_DIV), a power of two from the
    # launcher, divides a's (b's) row stride and its bound along its contiguous axis (K where
    # A_KMAJOR, else M): with it, the rows of a 1000-class dy (1000 = 8 * 125) are known 16-byte
    # aligned and its tiles load by 16-byte cp.async.
    if A_KMAJOR:
        stride_am, K = _multiple(stride_am, A_DIV), _multiple(K, A_DIV)
    else:
        stride_ak, M = _multiple(stride_ak, A_DIV), _multiple(M, A_DIV)
    if B_KMAJOR:
        stride_bn, K = _multiple(stride_bn, B_DIV), _multiple(K, B_DIV)
    else:
        stride_bk, N = _multiple(stride_bk, B_DIV), _multiple(N, B_DIV)
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # GROUP_M row tiles sweep the columns together, so that their b tiles stay in L2
    in_group = GROUP_M * num_n
    first_m = pid // in_group * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + pid % in_group % group_rows
    pid_n = pid % in_group // group_rows
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_N, BLOCK_M) if SWAP else (BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(DOT_DTYPE)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0).to(DOT_DTYPE)
        if SWAP:
            acc = tl.dot(tl.trans(b), tl.trans(a), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if SWAP:
        acc = tl.trans(acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    c_offs = offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    mask = m_mask[:, None] & n_mask[None, :]
    if SAVE_PRE:
        tl.store(pre_ptr + c_offs, acc.to(pre_ptr.dtype.element_ty), mask=mask)
    acc = apply_act(acc, ACT, slope)
    if DROP:
        acc = acc * tl.where(dropout_keep(seed, offs_m[:, None] * N + offs_n[None, :], p), scale, 0.0)
    if SOFTMAX:
        acc = tl.where(n_mask[None, :], acc, float("-inf"))
        e = tl.exp(acc - tl.reduce(acc, 1, nan_max)[:, None])
        acc = e / tl.sum(e, axis=1)[:, None]
    tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@autotune([triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w)
           for bm, bn, w in ((32, 64, 4), (16, 128, 4), (64, 32, 4), (32, 128, 8), (8, 256, 4))],
          key=["M", "N"], interpret={"BLOCK_M": ("M", 16, 512), "BLOCK_N": ("N", 16, 128)})
@triton.jit
def _colsum_kernel(x_ptr, out_ptr, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # out (N,) = sum over the M rows of x (M, N), rows in a fixed order
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_m = tl.arange(0, BLOCK_M).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + offs_m
        acc += tl.load(x_ptr + rows[:, None] * N + offs_n[None, :], mask=(rows < M)[:, None] & n_mask[None, :],
                       other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_n, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=n_mask)


@autotune(ELEMENTWISE_CONFIGS, key=["n", "ACT", "DROP"], interpret=elementwise_tiles())
@triton.jit
def _epilogue_bwd_kernel(dy_ptr, pre_ptr, da_ptr, n, slope, p, scale, seed,
                         ACT: tl.constexpr, DROP: tl.constexpr, BLOCK: tl.constexpr):
    # da = act'(pre) * (dy * keep * scale): the dropout and activation backward in one pass
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    d = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if DROP:
        d = d * tl.where(dropout_keep(seed, offs, p), scale, 0.0)
    if ACT != _NONE:
        d = apply_act_grad(tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32), d, ACT, slope)
    tl.store(da_ptr + offs, d.to(da_ptr.dtype.element_ty), mask=mask)


def _layout(name, strides, k, other):
    """The {NAME}_KMAJOR, {NAME}_DIV constexprs of an operand read through `strides` (its
    non-reduced axis, then the reduction's): whether it is contiguous along the reduction (of k)
    or along its other axis (of `other` elements), and the largest power of two up to 16 that
    divides both its row stride and that bound (Triton knows 16 alone)."""
    kmajor = strides[1] == 1
    row, bound = (strides[0], k) if kmajor else (strides[1], other)
    return {f"{name}_KMAJOR": kmajor, f"{name}_DIV": min(16, _pow2(row), _pow2(bound))}


def _pow2(v: int) -> int:
    """The largest power of two dividing v (16 for 0)."""
    return v & -v if v else 16


def _matmul(a, a_strides, b, b_strides, c, k, bias=None, act=NONE, slope=0.01, pre=None, p=0.0, seed=0,
            softmax=False):
    """c (M, N) = act(a @ b + bias) (then dropout p, softmax) where a (M, K) and b (K, N) are read
    through their strides; `pre`, if given, receives act's input."""
    m, n = c.shape
    if c.numel() == 0:
        return c
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    _matmul_kernel[grid](a, b, bias if bias is not None else c, c, pre if pre is not None else c, m, n, k,
                         *a_strides, *b_strides, *c.stride(), float(slope), float(p),
                         0.0 if p == 1 else 1.0 / (1.0 - p), int(seed), HAS_BIAS=bias is not None, ACT=act,
                         SAVE_PRE=pre is not None, DROP=bool(p > 0), SOFTMAX=softmax,
                         DOT_DTYPE=dot_dtype(a.dtype), PRECISION=dot_precision(a.dtype),
                         **_layout("A", a_strides, k, m), **_layout("B", b_strides[::-1], k, n))
    return c


def dense_forward(x, w, bias, act: Act = NO_ACT, *, p=0.0, seed=0, softmax=False, save_pre=False):
    """y (M, N) = softmax(dropout(act(x @ w.T + bias))) for x (M, K), w (N, K) (PyTorch Linear layout),
    bias (N,) or None; act an Act (NO_ACT: none), dropout (p > 0, mask from `seed` as dropout.py
    draws it) and softmax (at most specs.MAX_SOFTMAX_UNITS columns) optional. With save_pre,
    returns (y, pre) where pre = x @ w.T + bias, which the backward pass needs."""
    check_tensor(x, "x", ndim=2)
    check_tensor(w, "w", ndim=2, dtype=x.dtype, device=x.device)
    m, k = x.shape
    n = w.shape[0]
    check(w.shape[1] == k, f"w: expected {k} input features (x is {tuple(x.shape)}), got shape {tuple(w.shape)}")
    if bias is not None:
        check_tensor(bias, "bias", ndim=1, dtype=x.dtype, device=x.device)
        check(bias.shape[0] == n, f"bias: expected shape ({n},), got {tuple(bias.shape)}")
    code = act_code(act)
    check_dropout(p, seed)
    check(not softmax or n <= MAX_SOFTMAX_UNITS,
          f"softmax: {n} columns exceed the {MAX_SOFTMAX_UNITS} one tile of the dense epilogue holds")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    pre = torch.empty_like(y) if save_pre else None
    # b[k, n] = w[n, k]: w read transposed through its strides
    _matmul(x, x.stride(), w, (w.stride(1), w.stride(0)), y, k, bias, code, act.slope, pre, p,
            seed, softmax)
    return (y, pre) if save_pre else y


def dense_epilogue_backward(dy, pre, act: Act = NO_ACT, p=0.0, seed=0):
    """The gradient at the GEMM's output of a fused dense block, from dy at its end: through
    dropout (the forward's mask, from `seed`) and act (at `pre`, the saved GEMM output)."""
    check_tensor(dy, "dy", ndim=2)
    code = act_code(act)
    if act != NO_ACT:
        check_tensor(pre, "pre", ndim=2, dtype=dy.dtype, device=dy.device)
        check(pre.shape == dy.shape, f"pre: expected shape {tuple(dy.shape)}, got {tuple(pre.shape)}")
    check_dropout(p, seed)
    da = torch.empty_like(dy)
    n = dy.numel()
    if n:
        _epilogue_bwd_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](
            dy, pre if pre is not None else dy, da, n, float(act.slope), float(p), 0.0 if p == 1 else 1.0 / (1.0 - p),
            int(seed), ACT=code, DROP=bool(p > 0))
    return da


def _padded_columns(t):
    """t (M, N) row-major, or a copy with its columns padded with zeros to a multiple of 8 (16
    bytes of a 16-bit dtype). A tile of dy read along its columns (the weight gradient's) needs
    16-byte aligned rows for 16-byte cp.async (the kernel's A_DIV tells Triton that 1000 classes
    have them); 10 classes do not: there the copy (M x N, one pass over the logits' gradient)
    saves loads of 2 or 4 bytes."""
    if t.shape[1] % 8 == 0:
        return t
    padded = t.new_zeros((t.shape[0], triton.cdiv(t.shape[1], 8) * 8))
    padded[:, :t.shape[1]] = t
    return padded


def dense_backward_input(dy, w):
    """dx (M, K) = dy @ w for dy (M, N) and w (N, K)."""
    check_tensor(dy, "dy", ndim=2)
    check_tensor(w, "w", ndim=2, dtype=dy.dtype, device=dy.device)
    m, n = dy.shape
    check(w.shape[0] == n, f"w: expected {n} output features (dy is {tuple(dy.shape)}), got shape {tuple(w.shape)}")
    dx = torch.empty((m, w.shape[1]), dtype=dy.dtype, device=dy.device)
    return _matmul(dy, dy.stride(), w, w.stride(), dx, n)


def dense_backward_weight(dy, x, need_bias_grad):
    """(dw (N, K) = dy.T @ x, db (N,) = dy summed over rows or None), both in x.dtype,
    for dy (M, N) and x (M, K)."""
    check_tensor(x, "x", ndim=2)
    check_tensor(dy, "dy", ndim=2, dtype=x.dtype, device=x.device)
    m, k = x.shape
    n = dy.shape[1]
    check(dy.shape[0] == m, f"dy: expected {m} rows (x is {tuple(x.shape)}), got shape {tuple(dy.shape)}")
    # a[n, m] = dy[m, n]: dy read transposed (its columns padded); the reduction runs over the M rows
    a = _padded_columns(dy)
    dw = torch.empty((a.shape[1], k), dtype=x.dtype, device=x.device)
    _matmul(a, (a.stride(1), a.stride(0)), x, x.stride(), dw, m)
    dw = dw[:n].contiguous()  # a copy only where dy's columns were padded
    db = None
    if need_bias_grad:
        db = torch.empty(n, dtype=x.dtype, device=x.device)
        if n:
            _colsum_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](dy, db, m, n)
    return dw, db
