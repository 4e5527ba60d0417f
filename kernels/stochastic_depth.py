"""Stochastic depth in row mode (torchvision's StochasticDepth(p, "row")), as custom ops: in
training each sample is kept with probability 1 - p and scaled by 1 / (1 - p), or zeroed whole;
the identity in eval. Sample n is kept iff tl.rand(seed, n) >= p (Philox), so backward regenerates
forward's mask from the seed and never stores it."""

import torch
import triton
import triton.language as tl

from ..specs import StochasticDepth
from ._common import autotune, check_tensor, elementwise_tiles
from .dropout import check_dropout, define_masked, masked_layer

_CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((1024, 4), (2048, 8), (4096, 8))]


@autotune(_CONFIGS, key=["per_sample"], interpret=elementwise_tiles("per_sample"))
@triton.jit
def _stochastic_depth_kernel(x_ptr, y_ptr, per_sample, p, scale, seed, BLOCK: tl.constexpr):
    # x_ptr, y_ptr: (N, per_sample). Grid: (blocks of a sample, N)
    n = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    base = n.to(tl.int64) * per_sample
    mask = offs < per_sample
    keep = tl.rand(seed, n) >= p
    x = tl.load(x_ptr + base + offs, mask=mask).to(tl.float32)
    tl.store(y_ptr + base + offs, (x * tl.where(keep, scale, 0.0)).to(y_ptr.dtype.element_ty), mask=mask)


def stochastic_depth_forward(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """y = x * keep[n] / (1 - p), one keep per sample (the first dimension); p == 1 zeros all."""
    check_tensor(x, "x")
    check_dropout(p, seed)
    y = torch.empty_like(x)
    if x.numel():
        per_sample = x.numel() // x.shape[0]
        scale = 0.0 if p == 1 else 1.0 / (1.0 - p)
        grid = lambda meta: (triton.cdiv(per_sample, meta["BLOCK"]), x.shape[0])
        _stochastic_depth_kernel[grid](x, y, per_sample, float(p), scale, int(seed))
    return y


_stochastic_depth = define_masked("stochastic_depth", stochastic_depth_forward)


def stochastic_depth_layer(x, spec: StochasticDepth, state):
    """In training, each sample kept whole with probability 1 - p (and scaled by 1 / (1 - p)) or
    zeroed; in eval the identity."""
    return masked_layer(_stochastic_depth, x, spec.p, state)
