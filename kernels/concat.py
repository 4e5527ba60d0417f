"""Concatenation along channels, the join of a `concat` (torch.cat(dim=1) in NCHW): in NHWC each
input's rows (pixels) land in a channel slice of the output's rows, so forward copies each input
into its slice and backward copies each slice of dy out as its input's gradient, one strided 2-D
copy per input. Each pass reads and writes the concatenated size once.

Zero-copy (the plan's `Group.into`): a branch whose last group is a conv block writes its output
straight into its channel slice of the concat's output, the slab, which the executor allocates
at the first such writer (StepState.into); the join then copies in only the other branches. In
autograd each write is a function of the slab that marks it dirty (as an in-place copy into a
slice does), so the slab's gradient passes back through every writer, each taking its slice.
A copied-in input that other layers read too takes its slice of the slab's gradient as a view:
the fork's add, or the reading batch norm's backward (a gradient token), reads it there
(slabs.SUMMED)."""

import torch
import triton
import triton.language as tl

from ..specs import Concat
from ._common import ROW_CONFIGS, autotune, check, check_tensor, define, prune_rows


@autotune(ROW_CONFIGS, key=["cols", "stride_src", "stride_dst"], prune_configs_by={"early_config_prune": prune_rows},
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


def _slice_impl(x, offset: int, channels: int):
    """Channels [offset, offset + channels) of x (..., C) contiguous, copied out contiguous."""
    flat = x.view(-1, x.shape[-1])
    out = x.new_empty((*x.shape[:-1], channels))
    _copy(flat[:, offset:offset + channels], out.view(-1, channels))
    return out


# channels [offset, offset + channels) of x (N, H, W, C) contiguous: a slab's gradient, taken by a writer
take_slice = define("concat_slice", "(Tensor x, int offset, int channels) -> Tensor", _slice_impl,
                    lambda x, offset, channels: x.new_empty((*x.shape[:-1], channels)))


def _place_impl(x, slab, offset: int):
    """slab[..., offset:offset + C] = x for x (..., C) and a contiguous slab."""
    check_tensor(x, "concat: input", ndim=slab.dim(), dtype=slab.dtype, device=slab.device)
    c = x.shape[-1]
    _copy(x.view(-1, c), slab.view(-1, slab.shape[-1])[:, offset:offset + c])


def concat_forward(xs: list[torch.Tensor]) -> torch.Tensor:
    """The inputs (N, H, W, C_i) (or (N, C_i)) side by side along their last dimension."""
    check(len(xs) >= 2, f"concat: expected at least two inputs, got {len(xs)}")
    for i, x in enumerate(xs):
        check_tensor(x, f"concat: input {i}", ndim=xs[0].dim(), dtype=xs[0].dtype, device=xs[0].device)
        check(x.shape[:-1] == xs[0].shape[:-1], f"concat: input {i} has shape {tuple(x.shape)}, input 0 "
              f"{tuple(xs[0].shape)}: all but the channels must agree")
    y = xs[0].new_empty((*xs[0].shape[:-1], sum(x.shape[-1] for x in xs)))
    start = 0
    for x in xs:
        _place_impl(x, y, start)
        start += x.shape[-1]
    return y


def concat_backward(dy: torch.Tensor, channels: list[int]) -> list[torch.Tensor]:
    """The gradient of each input: its channel slice of dy (N, H, W, sum(channels)), made contiguous."""
    check_tensor(dy, "concat: dy")
    check(sum(channels) == dy.shape[-1], f"concat: dy has {dy.shape[-1]} channels, the inputs {sum(channels)}")
    starts = [sum(channels[:i]) for i in range(len(channels))]
    return [_slice_impl(dy, start, c) for start, c in zip(starts, channels)]


_backward = define("concat_backward", "(Tensor dy, int[] channels) -> Tensor[]", concat_backward,
                   lambda dy, channels: [dy.new_empty((*dy.shape[:-1], c)) for c in channels])


def _setup(ctx, inputs, output):
    ctx.channels = [x.shape[-1] for x in inputs[0]]


_concat = define("concat", "(Tensor[] xs) -> Tensor", concat_forward,
                 lambda xs: xs[0].new_empty((*xs[0].shape[:-1], sum(x.shape[-1] for x in xs))),
                 lambda ctx, dy: (_backward(dy.contiguous(), ctx.channels),), _setup)


_place = define("concat_place", "(Tensor x, Tensor(a!) slab, int offset) -> ()", _place_impl,
                lambda x, slab, offset: None, mutates=("slab",))


class _Place(torch.autograd.Function):
    """The slab with x copied into its channels from `offset` (a branch that cannot write there
    itself). x's gradient is its slice of the slab's, copied out, or with view=True that slice where
    it lies: x forks to other readers, and the sum of its gradients (add.fork) reads it in place."""

    @staticmethod
    def forward(ctx, slab, x, offset, view):
        _place(x, slab, offset)
        ctx.mark_dirty(slab)
        ctx.offset, ctx.channels, ctx.view = offset, x.shape[-1], view
        return slab

    @staticmethod
    def backward(ctx, dslab):
        dx = None
        if ctx.needs_input_grad[1]:
            dslab = dslab.contiguous()
            dx = dslab[..., ctx.offset:ctx.offset + ctx.channels] if ctx.view else \
                take_slice(dslab, ctx.offset, ctx.channels)
        return dslab, dx, None, None


def slab_of(state, like: torch.Tensor, hw) -> torch.Tensor:
    """The slab a step writes into (StepState.into: the slab or None, offset, channels, ...), allocated
    (N, *hw, channels) in like's dtype by its first writer."""
    slab, _, channels = state.into[:3]
    return like.new_empty((like.shape[0], *hw, channels)) if slab is None else slab


def concat_layer(*args):
    """The join of a concat's branches, called as `(*args, spec, state)` with the branches as args;
    the inputs spec.in_place marks are already in the slab."""
    *xs, spec, state = args
    if not (isinstance(spec, Concat) and len(spec.channels) == len(xs)):  # formatted only on failure (traced)
        raise ValueError(f"concat: expected a Concat spec for {len(xs)} inputs, got {spec!r}")
    if not any(spec.in_place) or state.into is None:  # (None: a step run alone, as `bench --groups` does)
        return _concat([x.contiguous() for x in xs])
    slab, offset = state.into[0], 0  # a writer has run: the slab exists
    for x, c, placed, view in zip(xs, spec.channels, spec.in_place, spec.grad_view or (False,) * len(xs)):
        if not placed:
            x = x.contiguous()
            if torch.is_grad_enabled():
                slab = _Place.apply(slab, x, offset, view)
            else:
                _place(x, slab, offset)
        offset += c
    return slab
