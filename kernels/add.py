"""Elementwise add: the residual join in the unfused plan (add_layer), and the sum of the
gradients that meet where a value forks to several readers (fork)."""

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
