"""The gate of a `gate { }` block (squeeze-and-excitation): y = x * g with x (N, H, W, C) and one
value g[n, c] per sample and channel, as custom ops. Forward reads x once and writes y; backward
reads dy and x once each, writes dx = dy * g and reduces dg[n, c] = sum over (h, w) of dy * x in
the same pass (fp32 accumulation), one program per sample and channel block walking its pixels."""

import torch
import triton
import triton.language as tl

from ._common import autotune, check, check_tensor, define

_CONFIGS = [triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=w)
            for p, c, w in ((128, 32, 4), (64, 64, 4), (32, 128, 4), (128, 64, 8))]
_TILES = {"BLOCK_P": ("hw", 16, 128), "BLOCK_C": ("c", 4, 128)}


@autotune(_CONFIGS, key=["hw", "c"], interpret=_TILES)
@triton.jit
def _gate_fwd_kernel(x_ptr, g_ptr, y_ptr, hw, c, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # x_ptr, y_ptr: (N, hw, c); g_ptr: (N, c). Grid: (pixel blocks, channel blocks, N)
    n = tl.program_id(2).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (p < hw)[:, None] & (ch < c)[None, :]
    offs = n * hw * c + p[:, None].to(tl.int64) * c + ch[None, :]
    g = tl.load(g_ptr + n * c + ch, mask=ch < c).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    tl.store(y_ptr + offs, (x * g[None, :]).to(y_ptr.dtype.element_ty), mask=mask)


@autotune(_CONFIGS, key=["hw", "c"], interpret=_TILES)
@triton.jit
def _gate_bwd_kernel(dy_ptr, x_ptr, g_ptr, dx_ptr, dg_ptr, hw, c, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # dy_ptr, x_ptr, dx_ptr: (N, hw, c); g_ptr, dg_ptr: (N, c). Grid: (channel blocks, N)
    n = tl.program_id(1).to(tl.int64)
    ch = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = ch < c
    g = tl.load(g_ptr + n * c + ch, mask=cmask).to(tl.float32)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    base = n * hw * c
    for start in range(0, hw, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        mask = (p < hw)[:, None] & cmask[None, :]
        offs = base + p[:, None].to(tl.int64) * c + ch[None, :]
        dy = tl.load(dy_ptr + offs, mask=mask).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
        tl.store(dx_ptr + offs, (dy * g[None, :]).to(dx_ptr.dtype.element_ty), mask=mask)
        acc += tl.sum(dy * x, axis=0)
    tl.store(dg_ptr + n * c + ch, acc.to(dg_ptr.dtype.element_ty), mask=cmask)


def _check(x, g, name):
    check_tensor(x, name, ndim=4)
    check_tensor(g, "g", dtype=x.dtype, device=x.device)
    n, c = x.shape[0], x.shape[3]
    check(g.numel() == n * c and g.shape[0] == n, f"gate: g has shape {tuple(g.shape)}, expected {n * c} values "
          f"(N={n}, C={c}) for {name} of shape {tuple(x.shape)}")


def gate_forward(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """y = x * g for x (N, H, W, C) and g (N, C) (or (N, 1, 1, C))."""
    _check(x, g, "x")
    y = torch.empty_like(x)
    n, h, w, c = x.shape
    if y.numel():
        grid = lambda meta: (triton.cdiv(h * w, meta["BLOCK_P"]), triton.cdiv(c, meta["BLOCK_C"]), n)
        _gate_fwd_kernel[grid](x, g, y, h * w, c)
    return y


def gate_backward(dy: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dg): dx = dy * g, and dg (g's shape) the sum over pixels of dy * x."""
    _check(x, g, "x")
    check_tensor(dy, "dy", ndim=4, dtype=x.dtype, device=x.device)
    check(dy.shape == x.shape, f"gate: dy has shape {tuple(dy.shape)}, x {tuple(x.shape)}")
    dx, dg = torch.empty_like(x), torch.empty_like(g)
    n, h, w, c = x.shape
    if dx.numel():
        _gate_bwd_kernel[lambda meta: (triton.cdiv(c, meta["BLOCK_C"]), n)](dy, x, g, dx, dg, h * w, c)
    return dx, dg


_backward = define("gate_backward", "(Tensor dy, Tensor x, Tensor g) -> (Tensor, Tensor)", gate_backward,
                   lambda dy, x, g: (torch.empty_like(x), torch.empty_like(g)))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _gate_grad(ctx, dy):
    x, g = ctx.saved_tensors
    return _backward(dy.contiguous(), x, g)


_gate = define("gate", "(Tensor x, Tensor g) -> Tensor", gate_forward, lambda x, g: torch.empty_like(x),
               _gate_grad, _setup)


def gate_layer(x, g, spec, state):
    """The join of a gate: x (N, H, W, C) scaled by its branch's g (N, 1, 1, C) or (N, C)."""
    return _gate(x, g.contiguous())
