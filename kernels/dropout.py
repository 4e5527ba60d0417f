"""Dropout, forward and backward, with a counter-based mask that is never stored:
element i (its int64 flat offset) is kept iff u >= p, where u is lane i % 4 of
`tl.rand4x(seed, i // 4)` (Philox; lane 0 is `tl.rand(seed, i // 4)`). One Philox call
serves four consecutive elements, and the mask depends only on (seed, i): never on BLOCK,
the autotuned config or the launch, so backward regenerates exactly forward's mask.
`dropout_keep` gives the same mask to any kernel (a fused epilogue) for arbitrary offsets.
dropout_layer runs a dropout layer alone, drawing its seed in training (state.seed())."""

import numbers

import torch
import triton
import triton.language as tl

from ..specs import Dropout
from ._common import autotune, check, check_tensor, define, elementwise_tiles

_CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((1024, 4), (2048, 8), (4096, 8))]


@triton.jit
def _pick(u0, u1, u2, u3, lane):
    return tl.where(lane == 0, u0, tl.where(lane == 1, u1, tl.where(lane == 2, u2, u3)))


@triton.jit
def dropout_keep(seed, offs, p):
    """The keep mask of the elements at int64 flat offsets `offs` (any shape)."""
    u0, u1, u2, u3 = tl.rand4x(seed, offs >> 2)
    return _pick(u0, u1, u2, u3, offs & 3) >= p


@autotune(_CONFIGS, key=["n", "DROP"], interpret=elementwise_tiles())
@triton.jit
def _dropout_kernel(x_ptr, y_ptr, n, p, scale, seed, DROP: tl.constexpr, BLOCK: tl.constexpr):
    # y = x * (keep ? scale : 0), viewed as (BLOCK/4, 4): a row is one Philox counter.
    GROUPS: tl.constexpr = BLOCK // 4
    group = tl.program_id(0).to(tl.int64) * GROUPS + tl.arange(0, GROUPS)  # (GROUPS,) int64
    lane = tl.arange(0, 4)
    offs = group[:, None] * 4 + lane[None, :]  # (GROUPS, 4)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    if DROP:
        u0, u1, u2, u3 = tl.rand4x(seed, group)
        u = _pick(u0[:, None], u1[:, None], u2[:, None], u3[:, None], lane[None, :])
        x = x * tl.where(u >= p, scale, 0.0)  # torch's x * mask * scale: dropped inf/nan give nan
    tl.store(y_ptr + offs, x.to(y_ptr.dtype.element_ty), mask=mask)


def check_dropout(p, seed):
    check(isinstance(p, numbers.Real) and not isinstance(p, bool) and 0 <= p <= 1,
          f"dropout: p must be a number in [0, 1], got {p!r}")
    check(isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and 0 <= seed < 2**63,
          f"dropout: seed must be an int in [0, 2**63), got {seed!r}")


def _run(x, p, seed, name):
    check_tensor(x, name)
    check_dropout(p, seed)
    y = torch.empty_like(x)
    n = x.numel()
    if n:
        scale = 0.0 if p == 1 else 1.0 / (1.0 - p)  # p == 1: everything dropped, as in torch
        _dropout_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](
            x, y, n, float(p), scale, int(seed), DROP=bool(p > 0))
    return y


def dropout_forward(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """y = x * mask / (1 - p), any shape; p == 0 gives a copy (made by the kernel), p == 1 zeros."""
    return _run(x, p, seed, "x")


def dropout_backward(dy: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """dx = dy * mask / (1 - p) with forward's mask regenerated from (seed, offset)."""
    return _run(dy, p, seed, "dy")


def define_masked(name: str, forward):
    """The custom op NAME(x, seed, p) -> forward(x, p, seed) for a mask drawn from the seed (dropout's,
    stochastic depth's): its gradient is the same op on dy, the mask regenerated, never stored. The
    seed is a 0-d int64 tensor: drawn in the traced graph, never baked into it as a constant."""
    def setup(ctx, inputs, output):
        _, seed, ctx.p = inputs
        ctx.save_for_backward(seed)

    def backward(ctx, dy):
        (seed,) = ctx.saved_tensors
        return op(dy.contiguous(), seed, ctx.p), None, None

    op = define(name, "(Tensor x, Tensor seed, float p) -> Tensor", lambda x, seed, p: forward(x, p, int(seed)),
                lambda x, seed, p: torch.empty_like(x), backward, setup)
    return op


def masked_layer(op, x, p: float, state):
    """A masked op's runner: the op in training with a fresh seed; in eval, or with p = 0, the
    identity (no kernel)."""
    if not state.training or p == 0:
        return x
    return op(x, state.seed(), p)


_dropout = define_masked("dropout", dropout_forward)


def dropout_layer(x, spec: Dropout, state):
    """In training, each value kept with probability 1 - p and scaled by 1 / (1 - p), the mask
    regenerated from (seed, element offset) in backward, never stored; in eval the identity."""
    return masked_layer(_dropout, x, spec.p, state)
