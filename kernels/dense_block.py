"""A dense block, [flatten] -> dense -> act -> [dropout] -> [softmax], as one custom op over
dense.py's launchers: forward one GEMM with the stages in its epilogue; backward softmax's,
one pass for the activation and dropout, then the two GEMMs."""

import torch

from ..specs import NO_ACT, DenseBlock, decode
from ._common import absent, define, present
from .dense import (
    dense_backward_input,
    dense_backward_weight,
    dense_epilogue_backward,
    dense_forward,
)
from .layout import flatten
from .softmax import softmax_backward


def _block_impl(x, w, b, seed, spec, p, save_pre):
    s = decode(spec)
    out = dense_forward(x, w, b, s.act, p=p, seed=int(seed), softmax=s.softmax, save_pre=save_pre)
    return out if save_pre else (out, absent(x))


def _block_fake(x, w, b, seed, spec, p, save_pre):
    y = x.new_empty((x.shape[0], w.shape[0]))
    return y, torch.empty_like(y) if save_pre else absent(x)


def _block_backward_impl(dy, x, w, pre, y, seed, spec, p, has_bias, input_grad):
    s = decode(spec)
    if s.softmax:
        dy = softmax_backward(dy, y)
    if s.act != NO_ACT or p > 0:
        dy = dense_epilogue_backward(dy, present(pre), s.act, p, int(seed))
    dx = dense_backward_input(dy, w) if input_grad else absent(x)
    dw, db = dense_backward_weight(dy, x, has_bias)
    return dx, dw, absent(x) if db is None else db


def _block_backward_fake(dy, x, w, pre, y, seed, spec, p, has_bias, input_grad):
    return (torch.empty_like(x) if input_grad else absent(x), torch.empty_like(w),
            w.new_empty(w.shape[0]) if has_bias else absent(x))


_block_backward = define(
    "dense_block_backward", "(Tensor dy, Tensor x, Tensor w, Tensor pre, Tensor y, Tensor seed, str spec, float p, "
    "bool has_bias, bool input_grad) -> (Tensor, Tensor, Tensor)", _block_backward_impl, _block_backward_fake)


def _setup(ctx, inputs, output):
    x, w, b, seed, ctx.spec, ctx.p, _ = inputs
    ctx.has_bias = b is not None
    ctx.save_for_backward(x, w, output[1], output[0], seed)


def _backward(ctx, dy, _):
    x, w, pre, y, seed = ctx.saved_tensors
    dx, dw, db = _block_backward(dy.contiguous(), x, w, pre, y, seed, ctx.spec, ctx.p, ctx.has_bias,
                                 ctx.needs_input_grad[0])
    return present(dx), dw, present(db), None, None, None, None


_block = define("dense_block", "(Tensor x, Tensor w, Tensor? b, Tensor seed, str spec, float p, bool save_pre) -> "
                "(Tensor, Tensor)", _block_impl, _block_fake, _backward, _setup)


def dense_block(x, w, b, spec: DenseBlock, state):
    """A dense block, [flatten] -> dense -> act -> [dropout] -> [softmax]; a lone dense layer has
    every other stage off. Forward is one GEMM with the stages in its epilogue, saving the GEMM
    output where an activation needs it; backward runs softmax's, then one pass for the
    activation and dropout (the mask regenerated from the seed), then the two GEMMs. Dropout
    draws its seed in training from torch's CPU generator (state.seed())."""
    if spec.flatten is not None:  # views and a copy: autograd's own
        x = flatten(x, spec.flatten.permute).contiguous()
    p = spec.p if state.training else 0.0
    seed = state.seed() if p > 0 else _NO_SEED
    return _block(x, w, b, seed, state.text, p, state.grad and spec.act != NO_ACT)[0]


_NO_SEED = torch.zeros((), dtype=torch.int64)
