"""Concatenation along channels, the join of a `concat` (torch.cat(dim=1) in NCHW): in NHWC each
input's rows (pixels) land in a channel slice of the output's rows, so forward copies each input
into its slice and backward copies each slice of dy out as its input's gradient, one strided 2-D
copy per input. Each pass reads and writes the concatenated size once."""

import torch
import triton
import triton.language as tl

from ..specs import Concat
from ._common import autotune, check, check_tensor, define

_CONFIGS = [triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=w)
            for p, c, w in ((256, 16, 4), (128, 32, 4), (64, 64, 4), (32, 128, 4), (64, 128, 8))]


def _prune(configs, named_args, **kwargs):
    """Channel blocks no wider than the slice (but at least 16: 16-byte rows of bf16)."""
    c = max(16, triton.next_power_of_2(named_args["cols"]))
    return [cf for cf in configs if cf.kwargs["BLOCK_C"] <= c] or configs[:1]


@autotune(_CONFIGS, key=["cols", "stride_src", "stride_dst"], prune_configs_by={"early_config_prune": _prune},
          interpret={"BLOCK_P": ("rows", 16, 256), "BLOCK_C": ("cols", 4, 128)})
@triton.jit
def _slice_copy_kernel(src_ptr, dst_ptr, rows, cols, stride_src, stride_dst,
                       BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # src_ptr: (rows, cols) with row stride stride_src; dst_ptr: (rows, cols) with row stride stride_dst
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (p < rows)[:, None] & (c < cols)[None, :]
    v = tl.load(src_ptr + p[:, None] * stride_src + c[None, :], mask=mask)
    tl.store(dst_ptr + p[:, None] * stride_dst + c[None, :], v, mask=mask)


def _copy(src: torch.Tensor, dst: torch.Tensor) -> None:
    """dst[...] = src for two (rows, cols) views whose rows are strided and columns contiguous."""
    rows, cols = src.shape
    if rows and cols:
        grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_P"]), triton.cdiv(cols, meta["BLOCK_C"]))
        _slice_copy_kernel[grid](src, dst, rows, cols, src.stride(0), dst.stride(0))


def concat_forward(xs: list[torch.Tensor]) -> torch.Tensor:
    """The inputs (N, H, W, C_i) (or (N, C_i)) side by side along their last dimension."""
    check(len(xs) >= 2, f"concat: expected at least two inputs, got {len(xs)}")
    for i, x in enumerate(xs):
        check_tensor(x, f"concat: input {i}", ndim=xs[0].dim(), dtype=xs[0].dtype, device=xs[0].device)
        check(x.shape[:-1] == xs[0].shape[:-1], f"concat: input {i} has shape {tuple(x.shape)}, input 0 "
              f"{tuple(xs[0].shape)}: all but the channels must agree")
    y = xs[0].new_empty((*xs[0].shape[:-1], sum(x.shape[-1] for x in xs)))
    flat, start = y.view(-1, y.shape[-1]), 0
    for x in xs:
        _copy(x.view(-1, x.shape[-1]), flat[:, start:start + x.shape[-1]])
        start += x.shape[-1]
    return y


def concat_backward(dy: torch.Tensor, channels: list[int]) -> list[torch.Tensor]:
    """The gradient of each input: its channel slice of dy (N, H, W, sum(channels)), made contiguous."""
    check_tensor(dy, "concat: dy")
    check(sum(channels) == dy.shape[-1], f"concat: dy has {dy.shape[-1]} channels, the inputs {sum(channels)}")
    flat, start, out = dy.view(-1, dy.shape[-1]), 0, []
    for c in channels:
        dx = dy.new_empty((*dy.shape[:-1], c))
        _copy(flat[:, start:start + c], dx.view(-1, c))
        out.append(dx)
        start += c
    return out


_backward = define("concat_backward", "(Tensor dy, int[] channels) -> Tensor[]", concat_backward,
                   lambda dy, channels: [dy.new_empty((*dy.shape[:-1], c)) for c in channels])


def _setup(ctx, inputs, output):
    ctx.channels = [x.shape[-1] for x in inputs[0]]


_concat = define("concat", "(Tensor[] xs) -> Tensor", concat_forward,
                 lambda xs: xs[0].new_empty((*xs[0].shape[:-1], sum(x.shape[-1] for x in xs))),
                 lambda ctx, dy: (_backward(dy.contiguous(), ctx.channels),), _setup)


def concat_layer(*args):
    """The join of a concat's branches, called as `(*args, spec, state)` with the branches as args."""
    *xs, spec, _state = args
    if not (isinstance(spec, Concat) and len(spec.channels) == len(xs)):  # formatted only on failure (traced)
        raise ValueError(f"concat: expected a Concat spec for {len(xs)} inputs, got {spec!r}")
    return _concat([x.contiguous() for x in xs])
