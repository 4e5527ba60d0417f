"""Elementwise add: the residual join in the unfused plan (add_layer), and the sum of the
gradients that meet where a value forks to several readers (fork); or, where a value's two
readers are a conv and a shortcut (cross-layer fusion), the shortcut's gradient routed to the
conv's input gradient, which adds it in its epilogue (redirect)."""

import torch
import triton
import triton.language as tl

from ._common import (
    ELEMENTWISE_CONFIGS,
    ROW_CONFIGS,
    autotune,
    check,
    check_tensor,
    define,
    elementwise_tiles,
    prune_rows,
    row_stride,
)


@autotune(ELEMENTWISE_CONFIGS, key=["n"], interpret=elementwise_tiles())
@triton.jit
def _add_kernel(a_ptr, b_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask).to(tl.float32)
    tl.store(y_ptr + offs, (a + b).to(y_ptr.dtype.element_ty), mask=mask)


@autotune(ROW_CONFIGS, key=["cols", "stride_a", "stride_b"], prune_configs_by={"early_config_prune": prune_rows},
          interpret={"BLOCK_P": ("rows", 16, 256), "BLOCK_C": ("cols", 4, 128)})
@triton.jit
def _add_rows_kernel(a_ptr, b_ptr, y_ptr, rows, cols, stride_a, stride_b,
                     BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # a_ptr, b_ptr: (rows, cols) with row strides stride_a, stride_b (a channel slice: a concat's
    # gradient); y_ptr: (rows, cols) contiguous
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (p < rows)[:, None] & (c < cols)[None, :]
    a = tl.load(a_ptr + p[:, None] * stride_a + c[None, :], mask=mask).to(tl.float32)
    b = tl.load(b_ptr + p[:, None] * stride_b + c[None, :], mask=mask).to(tl.float32)
    tl.store(y_ptr + p[:, None] * cols + c[None, :], (a + b).to(y_ptr.dtype.element_ty), mask=mask)


def add_forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b, contiguous, for two tensors of one shape and dtype, each contiguous or a channel
    slice of one (_common.even_rows: a concat's gradient, read where it lies): reads 2n, writes n."""
    check_tensor(a, "a", rows=True)
    check_tensor(b, "b", dtype=a.dtype, device=a.device, rows=True)
    check(a.shape == b.shape, f"add: shapes differ, {tuple(a.shape)} and {tuple(b.shape)}")
    y = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    n = a.numel()
    if not n:
        return y
    if a.is_contiguous() and b.is_contiguous():
        _add_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](a, b, y, n)
    else:
        cols = a.shape[-1]
        rows = n // cols
        grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_P"]), triton.cdiv(cols, meta["BLOCK_C"]))
        _add_rows_kernel[grid](a, b, y, rows, cols, row_stride(a), row_stride(b))
    return y


_add = define("add", "(Tensor a, Tensor b) -> Tensor", add_forward, lambda a, b: a.new_empty(a.shape),
              lambda ctx, dy: (dy, dy), lambda ctx, inputs, output: None)


def add_layer(a, b, spec, state):
    """The residual join: y = branch + shortcut; both receive dy."""
    return _add(a, b)


class _Fork(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, k):
        return tuple(x.view_as(x) for _ in range(k))

    @staticmethod
    def backward(ctx, *grads):
        # (a gradient may be a channel slice of a concat's, slabs.SUMMED: the add reads it in place)
        total = None
        for g in grads:
            if g is not None:
                total = g if total is None else _add(total, g)
        return None if total is None else total.contiguous(), None


def fork(x, k: int) -> tuple:
    """One value handed to k readers as k aliases, their gradients summed with the add kernel
    (so that autograd's engine never accumulates with a torch op)."""
    return _Fork.apply(x, k)


class _Redirect(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, token):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return None, grad


def redirect(x, token):
    """x as its shortcut reads it, that reader's gradient sent to `token` (x's conv reader's output of
    x's shape, conv_block.py's) instead of to x: the conv adds it to x's gradient as its input
    gradient's GEMM writes that, and no pass sums x's two gradients (2 reads and a write fewer)."""
    return _Redirect.apply(x, token)
