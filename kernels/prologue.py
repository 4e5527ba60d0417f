"""Cross-layer fusion's load-side stage: a conv whose input is the previous block's batch-norm
input z (not its output y = act(z scale + shift)) normalises and activates each tile of z as it
loads it, in the forward GEMM's A operand (conv.py) and the weight gradient's input operand
(conv_backward.py). y is then never written: per block, a training forward saves the epilogue
pass that read z and wrote y, and the next conv reads z where it read y (the same bytes).

The conv zero-pads y, not z: rows outside the image (and padded channels) are set to 0 after
the activation, whose value at z = 0 is act(shift), not 0."""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..specs import Act
from ._common import check, check_tensor
from .activation import act_code, apply_act


@dataclass(frozen=True)
class Prologue:
    """y = act(z scale[c] + shift[c]) on load: scale and shift (C,) fp32 per input channel, or
    both None (a block without batch norm: y = act(z))."""

    scale: torch.Tensor | None
    shift: torch.Tensor | None
    act: Act


def prologue_args(p: Prologue | None, x: torch.Tensor, cin_g: int, depthwise: bool) -> dict:
    """The kernels' prologue arguments (scale and shift pointers, slope, PROLOGUE, PRO_AFFINE, PRO_ACT), after
    checking p against the conv input x (N, H, W, C). Groups of fewer than 16 channels (padded with
    zeros, which the prologue would not keep zero) take none; the planner never asks for it."""
    if p is None:
        return {"pro_scale_ptr": x, "pro_shift_ptr": x, "pro_slope": 0.0, "PROLOGUE": False, "PRO_AFFINE": False,
                "PRO_ACT": 0}
    check(isinstance(p, Prologue), f"prologue: expected a Prologue, got {p!r}")
    check((p.scale is None) == (p.shift is None), "prologue: scale and shift must be given together")
    c = x.shape[3]
    for name, t in (("prologue scale", p.scale), ("prologue shift", p.shift)):
        if t is not None:
            check_tensor(t, name, ndim=1, dtype=torch.float32, device=x.device)
            check(t.shape[0] == c, f"{name}: expected shape ({c},) for x of shape {tuple(x.shape)}, got "
                                   f"{tuple(t.shape)}")
    check(depthwise or cin_g >= 16, f"prologue: needs 16 or more channels per group (or a depthwise conv), got {cin_g}")
    affine = p.scale is not None
    return {"pro_scale_ptr": p.scale if affine else x, "pro_shift_ptr": p.shift if affine else x,
            "pro_slope": float(p.act.slope), "PROLOGUE": True, "PRO_AFFINE": affine,
            "PRO_ACT": act_code(p.act, "prologue act")}


@triton.jit
def apply_prologue(a, scale_ptr, shift_ptr, ch, ch_ok, row_ok, AFFINE: tl.constexpr, ACT: tl.constexpr, slope,
                   EVEN: tl.constexpr):
    """act(a scale[ch] + shift[ch]) (act(a) without AFFINE) in fp32 for a tile a (rows, channels ch),
    0 where a row or a channel is not real (the conv's zero padding of y); EVEN: every channel is."""
    v = a.to(tl.float32)
    keep = row_ok[:, None]
    if AFFINE:
        if EVEN:
            scale = tl.load(scale_ptr + ch)
            shift = tl.load(shift_ptr + ch)
        else:
            scale = tl.load(scale_ptr + ch, mask=ch_ok, other=0.0)
            shift = tl.load(shift_ptr + ch, mask=ch_ok, other=0.0)
        v = v * scale[None, :] + shift[None, :]
    if not EVEN:
        keep = keep & ch_ok[None, :]
    return tl.where(keep, apply_act(v, ACT, slope), 0.0)
