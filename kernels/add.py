"""Elementwise add: the residual join in the unfused plan (add_layer), and the sum of the
gradients that meet where a value forks to several readers (fork); or, where a value's two
readers are a conv and a shortcut (cross-layer fusion), the shortcut's gradient routed to the
conv's input gradient, which adds it in its epilogue (redirect)."""

import torch
import triton
import triton.language as tl

from ._common import (
    ELEMENTWISE_CONFIGS,
    autotune,
    check,
    check_tensor,
    define,
    elementwise_tiles,
)


@autotune(ELEMENTWISE_CONFIGS, key=["n"], interpret=elementwise_tiles())
@triton.jit
def _add_kernel(a_ptr, b_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask).to(tl.float32)
    tl.store(y_ptr + offs, (a + b).to(y_ptr.dtype.element_ty), mask=mask)


def add_forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b for two contiguous tensors of one shape and dtype: reads 2n, writes n elements."""
    check_tensor(a, "a")
    check_tensor(b, "b", dtype=a.dtype, device=a.device)
    check(a.shape == b.shape, f"add: shapes differ, {tuple(a.shape)} and {tuple(b.shape)}")
    y = torch.empty_like(a)
    n = a.numel()
    if n:
        _add_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](a, b, y, n)
    return y


_add = define("add", "(Tensor a, Tensor b) -> Tensor", add_forward, lambda a, b: torch.empty_like(a),
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
        total = None
        for g in grads:
            if g is not None:
                total = g.contiguous() if total is None else _add(total, g.contiguous())
        return total, None


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
