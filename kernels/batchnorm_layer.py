"""A batch-norm layer alone, as custom ops over the launchers of batchnorm.py and
batchnorm_backward.py: in training, the batch statistics normalise (`batchnorm_train`,
differentiable, returning the statistics) and a second op updates the running ones in place
(`batchnorm_update_running`, a mutation, which a differentiable custom op may not be, and which
the conv block's training pass shares); in eval the running statistics normalise
(`batchnorm_eval`). x is viewed as (M, C) rows."""

import torch

from ..specs import BatchNormSpec
from ._common import absent, define, present
from .batchnorm import batchnorm_forward, batchnorm_stats, batchnorm_update_running
from .batchnorm_backward import batchnorm_backward, batchnorm_eval_backward


def _backward_impl(dy, x, mean, var, weight, eps, train, params):
    backward = batchnorm_backward if train else batchnorm_eval_backward
    dx, dw, db = backward(dy, x, mean, var, eps, weight, params)
    return dx, absent(x) if dw is None else dw, absent(x) if db is None else db


def _backward_fake(dy, x, mean, var, weight, eps, train, params):
    grads = params and weight is not None
    dw = weight.new_empty(weight.shape) if grads else absent(x)
    return torch.empty_like(x), dw, torch.empty_like(dw) if grads else absent(x)


_backward = define("batchnorm_backward", "(Tensor dy, Tensor x, Tensor mean, Tensor var, Tensor? weight, "
                   "float eps, bool train, bool params) -> (Tensor, Tensor, Tensor)", _backward_impl, _backward_fake)


def _grads(ctx, dy, train):
    x, mean, var, weight = ctx.saved_tensors
    params = weight is not None and (ctx.needs_input_grad[-3] or ctx.needs_input_grad[-2])
    dx, dw, db = _backward(dy.contiguous(), x, mean, var, weight, ctx.eps, train, params)
    return dx, present(dw), present(db)


def _train_setup(ctx, inputs, output):
    x, weight, _, ctx.eps = inputs
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(x, output[1], output[2], weight)


def _train_backward(ctx, dy, _mean, _var):
    dx, dw, db = _grads(ctx, dy, True)
    return dx, dw, db, None


def _train_impl(x, weight, bias, eps):
    mean, var = batchnorm_stats(x)
    return batchnorm_forward(x, mean, var, eps, weight, bias), mean, var


def _stats_fake(x, *args):
    stat = x.new_empty(x.shape[1], dtype=torch.float32)
    return torch.empty_like(x), stat, torch.empty_like(stat)


_train = define("batchnorm_train", "(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)",
                _train_impl, _stats_fake, _train_backward, _train_setup)


def _eval_setup(ctx, inputs, output):
    x, mean, var, weight, _, ctx.eps = inputs
    ctx.save_for_backward(x, mean, var, weight)


def _eval_backward(ctx, dy):
    dx, dw, db = _grads(ctx, dy, False)
    return dx, None, None, dw, db, None


_eval = define("batchnorm_eval", "(Tensor x, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps) -> "
               "Tensor", lambda x, mean, var, weight, bias, eps: batchnorm_forward(x, mean, var, eps, weight, bias),
               lambda x, *args: torch.empty_like(x), _eval_backward, _eval_setup)

update_running = define(
    "batchnorm_update_running", "(Tensor mean, Tensor var, Tensor(a!) running_mean, Tensor(b!) running_var, "
    "Tensor(c!) num_batches_tracked, float momentum, SymInt count) -> ()",
    batchnorm_update_running, lambda *args: None, mutates=("running_mean", "running_var", "num_batches_tracked"))


def batchnorm_layer(x, weight, bias, running_mean, running_var, num_batches_tracked, spec: BatchNormSpec, state):
    """A batch-norm layer over x viewed as (M, C) rows."""
    x2 = x.view(-1, x.shape[-1])
    if state.training:
        y, mean, var = _train(x2, weight, bias, spec.eps)
        update_running(mean, var, running_mean, running_var, num_batches_tracked, spec.momentum, x2.shape[0])
    else:
        y = _eval(x2, running_mean, running_var, weight, bias, spec.eps)
    return y.view(x.shape)
