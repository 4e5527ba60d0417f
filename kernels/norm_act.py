"""Batch norm and the activation after it with no conv before them (DenseNet's pre-activation
layers and transitions; a batch norm after a pool, a concatenation or a dense layer), as custom
ops over the conv block's epilogue kernels without the conv. Training: the batch statistics (one
pass over x), then y = act(x scale + shift) in one pass (epilogue.py); backward, batch norm's sums
of g = dy act'(x scale + shift) (dy and x in) and one pass writing dx (dy and x in:
epilogue_backward.py's batch norm and activation alone). Eval: the running statistics' scale and shift, then the same
pass. For x of t bytes: 3t forward (stats, x in and y out) and 5t backward, where batch norm then
the activation each alone move 5t (stats, x in and out twice) and 8t (batch norm's 2t + 3t, the
activation's 3t).
Deferred (cross-layer fusion, spec.defer: only a conv reads y) the training forward is the
statistics alone (t): the conv computes y from x, scale and shift as it loads (a Deferred, as a
conv block's), and its input gradient, y's, comes back through the same backward."""

import torch

from ..specs import NO_ACT, decode
from ._common import absent, define, present
from .batchnorm import batchnorm_stats
from .batchnorm_layer import update_running
from .conv_block import Deferred, grad_token
from .epilogue import epilogue_forward
from .epilogue_backward import BatchNormBackward, epilogue_backward
from .fold import bn_scale_shift


def _nhwc(x):
    """x (N, H, W, C), or (N, C) as (N, 1, 1, C): the epilogue kernels' layout."""
    return x if x.dim() == 4 else x.view(x.shape[0], 1, 1, x.shape[-1])


def _normalise(x, scale, shift, s):
    """act1(x scale + shift) in one pass."""
    y, _ = epilogue_forward(_nhwc(x), scale, shift, s.act1, None, NO_ACT, None)
    return y.view(x.shape)


def _stats_impl(x, weight, bias, spec):
    """(mean, var, scale, shift), fp32 (C,): the batch statistics and batch norm's affine with them."""
    mean, var = batchnorm_stats(x.view(-1, x.shape[-1]))
    return mean, var, *bn_scale_shift(mean, var, decode(spec).bn.eps, weight, bias)


def _save(ctx, x, weight, bias, spec, train, mean, var, scale, shift):
    """What backward reads, saved by the three ops (training, eval and the deferring one)."""
    ctx.has_bias, ctx.train, ctx.spec = bias is not None, train, spec
    ctx.save_for_backward(x, scale, shift, mean, var, weight)


def _backward_impl(dy, x, scale, shift, mean, var, weight, dscale, dshift, add, has_bias, spec, train, params):
    s = decode(spec)
    bn = BatchNormBackward(mean, var, s.bn.eps, weight, has_bias, params, train,
                           None if dscale is None or dshift is None else (dscale, dshift))
    dx, _, dw, db = epilogue_backward(_nhwc(dy), _nhwc(x), scale, shift, s.act1, None, NO_ACT, None, None, bn,
                                      None if add is None else _nhwc(add))
    return dx.view(x.shape), absent(x) if dw is None else dw, absent(x) if db is None else db


def _backward_fake(dy, x, scale, shift, mean, var, weight, dscale, dshift, add, has_bias, spec, train, params):
    grads = params and weight is not None
    return torch.empty_like(x), weight.new_empty(weight.shape) if grads else absent(x), \
        weight.new_empty(weight.shape) if grads and has_bias else absent(x)


_backward = define("norm_act_backward", "(Tensor dy, Tensor x, Tensor scale, Tensor shift, Tensor mean, Tensor var, "
                   "Tensor? weight, Tensor? dscale, Tensor? dshift, Tensor? add, bool has_bias, str spec, bool train, "
                   "bool params) -> (Tensor, Tensor, Tensor)",
                   _backward_impl, _backward_fake)


def _grads(ctx, dy, need_weight, need_bias, dscale=None, dshift=None, add=None):
    """(dx, dweight, dbias) for dy; dscale, dshift: the sums of a deferred y's reader (_Defer); add:
    x's gradient token's (x's gradient from its other reader), added to dx as it is written."""
    x, scale, shift, mean, var, weight = ctx.saved_tensors
    params = weight is not None and (need_weight or need_bias)
    dx, dw, db = _backward(dy.contiguous(), x, scale, shift, mean, var, weight, dscale, dshift, add, ctx.has_bias,
                           ctx.spec, ctx.train, params)
    return dx, present(dw), present(db)


# --- training: the batch statistics normalise ----------------------------------------------------

def _train_impl(x, weight, bias, spec):
    mean, var, scale, shift = _stats_impl(x, weight, bias, spec)
    return _normalise(x, scale, shift, decode(spec)), mean, var, scale, shift


def _train_fake(x, weight, bias, spec):
    stat = x.new_empty(x.shape[-1], dtype=torch.float32)
    return torch.empty_like(x), stat, torch.empty_like(stat), torch.empty_like(stat), torch.empty_like(stat)


def _train_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    _save(ctx, *inputs, True, *output[1:])


def _train_backward(ctx, dy, *_):
    return (*_grads(ctx, dy, ctx.needs_input_grad[1], ctx.needs_input_grad[2]), None)


_train = define("norm_act_train", "(Tensor x, Tensor? weight, Tensor? bias, str spec) -> (Tensor, Tensor, Tensor, "
                "Tensor, Tensor)", _train_impl, _train_fake, _train_backward, _train_setup)


# --- eval (or a frozen batch norm): the running statistics normalise -------------------------------

def _eval_impl(x, mean, var, weight, bias, spec, token):
    s = decode(spec)
    scale, shift = bn_scale_shift(mean, var, s.bn.eps, weight, bias)
    return _normalise(x, scale, shift, s), scale, shift, grad_token(x, token)


def _eval_fake(x, mean, var, weight, bias, spec, token):
    stat = x.new_empty(x.shape[-1], dtype=torch.float32)
    return torch.empty_like(x), stat, torch.empty_like(stat), grad_token(x, token)


def _eval_setup(ctx, inputs, output):
    x, mean, var, weight, bias, spec, token = inputs
    ctx.mark_non_differentiable(*output[1:3], *(() if token else output[3:]))
    ctx.set_materialize_grads(False)
    _save(ctx, x, weight, bias, spec, False, mean, var, *output[1:3])


def _eval_backward(ctx, dy, _scale, _shift, dtoken):
    if dy is None:
        return (None,) * 7
    dx, dw, db = _grads(ctx, dy, ctx.needs_input_grad[3], ctx.needs_input_grad[4], add=dtoken)
    return dx, None, None, dw, db, None, None


# (token: also x's gradient token, as in training, where a frozen batch norm's layer forks)
_eval = define("norm_act_eval", "(Tensor x, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, str spec, "
               "bool token) -> (Tensor, Tensor, Tensor, Tensor)", _eval_impl, _eval_fake, _eval_backward, _eval_setup)


# --- cross-layer fusion: y handed on unwritten (its reader conv normalises and activates on load) ------

_stats = define("norm_act_stats", "(Tensor x, Tensor? weight, Tensor? bias, str spec) -> (Tensor, Tensor, Tensor, "
                "Tensor)", _stats_impl, lambda x, weight, bias, spec: _train_fake(x, weight, bias, spec)[1:])


class _Defer(torch.autograd.Function):
    """x, scale and shift as the group's y, views: the reader conv computes y from them as it loads
    (the Deferred's z, scale and shift), and hands back y's gradient and those of scale and shift
    (batch norm's sums: conv.conv2d_backward_input), which batch norm's and the activation's
    backward turn into x's (the same pass as a written y's, less the sums'). With `token`, also
    x's gradient token (conv_block.grad_token): the gradient of x's other reader (a concat that copies
    x, kernels/add.py's redirect) arrives there and is added to dx in that pass, where it lies (a
    channel slice of the concat's gradient)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, scale, shift, spec, token):
        _save(ctx, x, weight, bias, spec, True, mean, var, scale, shift)
        ctx.set_materialize_grads(False)  # scale's and shift's: None where the reader computed none
        tok = grad_token(x, token)
        if not token:
            ctx.mark_non_differentiable(tok)
        return x.view_as(x), scale.view_as(scale), shift.view_as(shift), tok

    @staticmethod
    def backward(ctx, dy, dscale, dshift, dtoken):
        if dy is None:  # (y unused; then so is the token, read only where y is)
            return (None,) * 9
        return (*_grads(ctx, dy, ctx.needs_input_grad[1], ctx.needs_input_grad[2], dscale, dshift, dtoken),
                *(None,) * 6)


def norm_act(x, weight, bias, running_mean, running_var, num_batches_tracked, spec, state):
    """act(batch norm(x)) for x (N, H, W, C) or (N, C); with spec.defer, in training, a Deferred
    (kernels/conv_block.py) of x and the scale and shift, for the conv that reads it, and with
    state.token (the plan's Group.token) x's gradient token besides (_Defer)."""
    if not state.training:
        y, _, _, token = _eval(x, running_mean, running_var, weight, bias, state.text, state.token)
        return (y, token) if state.token else y
    if spec.defer:
        detach = lambda t: None if t is None else t.detach()  # (the gradients go through _Defer)
        mean, var, scale, shift = _stats(x.detach(), detach(weight), detach(bias), state.text)
        y, scale, shift, token = _Defer.apply(x, weight, bias, mean, var, scale, shift, state.text, state.token)
    else:
        y, mean, var, _, _ = _train(x, weight, bias, state.text)
    update_running(mean, var, running_mean, running_var, num_batches_tracked, spec.bn.momentum,
                   x.numel() // max(x.shape[-1], 1))
    if not spec.defer:
        return y
    y = Deferred(y, scale, shift, spec.act1)
    return (y, token) if state.token else y
