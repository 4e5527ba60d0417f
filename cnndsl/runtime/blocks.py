"""The autograd Functions of fused groups (plan.RULES): a conv block (conv -> [bn] ->
[act] -> [+ shortcut] -> [act] -> [pool]) and a dense block ([flatten] -> dense -> [act]
-> [dropout] -> [softmax]). A group of one op runs through the same Function with its
other stages off, so fusing adds epilogue stages, not a second code path.

Without gradients (inference) a conv block is one kernel: batch norm is folded into the
conv's weight and bias (once per change of any of them, in `cache`) and the activation,
residual add and pool run in the conv's epilogue. With gradients it is the training
path: the conv writes z (and, in training, the batch statistics from its epilogue), one
epilogue pass normalises, activates, adds and pools, saving only z and a compact pool
argmax; backward recomputes the rest."""

import torch

from ..kernels.batchnorm import batchnorm_update_running
from ..kernels.conv import conv2d_backward_input, conv2d_backward_weight, conv2d_forward
from ..kernels.dense import (
    dense_backward_input,
    dense_backward_weight,
    dense_epilogue_backward,
    dense_forward,
)
from ..kernels.epilogue import epilogue_backward, epilogue_forward
from ..kernels.fold import bn_scale_shift, fold_conv
from ..kernels.softmax import softmax_backward


def _act(spec, key):
    return spec[key] if spec[key] is not None else ("none", 0.01)


def _folded(cache, w, b, bn_w, bn_b, mean, var, eps):
    """The conv weight and bias with eval-mode batch norm folded in, recomputed only when a
    tensor's version counter (bumped by every in-place update, e.g. an optimizer step) moves."""
    tensors = (w, b, bn_w, bn_b, mean, var)
    key = tuple((id(t), t.data_ptr(), t._version) if t is not None else None for t in tensors)
    if cache.get("key") != key:
        scale, shift = bn_scale_shift(mean, var, eps, bn_w, bn_b)
        cache["key"], cache["value"] = key, fold_conv(w, b, scale, shift)
    return cache["value"]


class ConvBlockFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, w, b, bn_w, bn_b, running_mean, running_var, num_batches_tracked,
                spec, training, grad, cache):  # x (N, H, W, C) -> (N, OH, OW, K) or pooled
        geometry = (spec["stride"], spec["padding"], spec["dilation"], spec["groups"])
        (act1, s1), (act2, s2), bn, pool = _act(spec, "act1"), _act(spec, "act2"), spec["bn"], spec["pool"]
        ctx.spec, ctx.geometry, ctx.has_bias = spec, geometry, b is not None
        if not grad and not (bn and training):  # inference: one kernel
            if bn:
                w, b = _folded(cache, w, b, bn_w, bn_b, running_mean, running_var, bn[0])
            return conv2d_forward(x, w, b, *geometry, spec["out_hw"], act1, s1, residual=residual,
                                  act2=act2, slope2=s2, pool=pool)
        scale = shift = mean = var = None
        if bn and training:
            z, mean, var = conv2d_forward(x, w, b, *geometry, spec["out_hw"], stats=True)
            batchnorm_update_running(mean, var, running_mean, running_var, num_batches_tracked, bn[1],
                                     z.numel() // z.shape[-1])
        else:
            z = conv2d_forward(x, w, b, *geometry, spec["out_hw"])
            if bn:
                mean, var = running_mean, running_var
        if bn:
            scale, shift = bn_scale_shift(mean, var, bn[0], bn_w, bn_b)
        if not spec["epilogue"]:
            y, argmax = z, None
        else:
            y, argmax = epilogue_forward(z, scale, shift, act1, s1, residual, act2, s2, pool)
        ctx.argmax = argmax  # int8 window offsets or None: not a graph tensor
        ctx.training = training
        ctx.save_for_backward(x, w, z, residual, scale, shift, mean, var, bn_w)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, z, residual, scale, shift, mean, var, bn_w = ctx.saved_tensors
        spec = ctx.spec
        (act1, s1), (act2, s2), bn = _act(spec, "act1"), _act(spec, "act2"), spec["bn"]
        dres = dbn_w = dbn_b = None
        dz = dy.contiguous()
        if spec["epilogue"]:
            stats = None
            need = bn_w is not None and (ctx.needs_input_grad[4] or ctx.needs_input_grad[5])
            if bn and (ctx.training or need):  # in eval, only for batch norm's parameter gradients
                stats = (mean, var, bn[0], bn_w, bn_w is not None, need, ctx.training)
            dz, dres, dbn_w, dbn_b = epilogue_backward(dz, z, scale, shift, act1, s1, residual, act2, s2,
                                                       spec["pool"], ctx.argmax, stats)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = conv2d_backward_input(dz, w, *ctx.geometry, tuple(x.shape[1:3]))
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            dw, db = conv2d_backward_weight(x, dz, tuple(w.shape), *ctx.geometry, ctx.has_bias)
        return dx, dres, dw, db, dbn_w, dbn_b, None, None, None, None, None, None, None


class DenseBlockFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, spec, seed, softmax, grad):  # (M, K) -> (M, N)
        act, slope = _act(spec, "act")
        p = spec["p"] if seed is not None else 0.0
        ctx.has_bias, ctx.act, ctx.p, ctx.seed, ctx.softmax = b is not None, (act, slope), p, seed or 0, softmax
        save = grad and act != "none"
        out = dense_forward(x, w, b, act, slope, p=p, seed=seed or 0, softmax=softmax, save_pre=save)
        y, pre = out if save else (out, None)
        ctx.save_for_backward(x, w, pre, y if softmax else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, pre, y = ctx.saved_tensors
        dy = dy.contiguous()
        if ctx.softmax:
            dy = softmax_backward(dy, y)
        if ctx.act[0] != "none" or ctx.p > 0:
            dy = dense_epilogue_backward(dy, pre, *ctx.act, ctx.p, ctx.seed)
        dx = dense_backward_input(dy, w) if ctx.needs_input_grad[0] else None
        dw, db = dense_backward_weight(dy, x, ctx.has_bias)
        return dx, dw, db, None, None, None, None
