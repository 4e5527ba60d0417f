"""A conv block, conv -> [batch norm] -> act1 -> [+ shortcut] -> act2 -> [pool], as one autograd
Function; a lone conv runs through it with every other stage off, so fusing adds epilogue
stages, not a second code path.

Without gradients (inference) the block is one kernel: batch norm is folded into the conv's
weight and bias (recomputed only when one of them changes: `state.cache` keys the fold on the
tensors' version counters, which every in-place update moves, a kernel's write of the running
statistics included) and the activations, the residual add and the pool run in the conv's
epilogue. With gradients it is the training path: the conv writes z (and, in training, the
batch statistics from its epilogue), one epilogue pass (epilogue.py) normalises, activates,
adds and pools, saving only z and a compact pool argmax; backward recomputes the rest."""

import torch

from ..specs import ConvBlock
from .batchnorm import batchnorm_update_running
from .conv import conv2d_backward_input, conv2d_backward_weight, conv2d_forward
from .epilogue import BatchNormBackward, epilogue_backward, epilogue_forward
from .fold import bn_scale_shift, fold_conv


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
                spec: ConvBlock, state):  # x (N, H, W, C) -> (N, OH, OW, K) or pooled
        bn, geometry = spec.bn, spec.geometry
        ctx.spec, ctx.has_bias, ctx.training = spec, b is not None, state.training
        if not state.grad and not (bn and state.training):  # inference: one kernel
            if bn:
                w, b = _folded(state.cache, w, b, bn_w, bn_b, running_mean, running_var, bn.eps)
            return conv2d_forward(x, w, b, geometry, spec.act1, residual=residual, act2=spec.act2, pool=spec.pool)
        scale = shift = mean = var = None
        if bn and state.training:
            z, mean, var = conv2d_forward(x, w, b, geometry, stats=True)
            batchnorm_update_running(mean, var, running_mean, running_var, num_batches_tracked, bn.momentum,
                                     z.numel() // z.shape[-1])
        else:
            z = conv2d_forward(x, w, b, geometry)
            if bn:
                mean, var = running_mean, running_var
        if bn:
            scale, shift = bn_scale_shift(mean, var, bn.eps, bn_w, bn_b)
        if not spec.epilogue:
            y, argmax = z, None
        else:
            y, argmax = epilogue_forward(z, scale, shift, spec.act1, residual, spec.act2, spec.pool)
        ctx.argmax = argmax  # int8 window offsets or None: not a graph tensor
        ctx.save_for_backward(x, w, z, residual, scale, shift, mean, var, bn_w)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, z, residual, scale, shift, mean, var, bn_w = ctx.saved_tensors
        spec = ctx.spec
        dres = dbn_w = dbn_b = None
        dz = dy.contiguous()
        if spec.epilogue:
            stats = None
            need = bn_w is not None and (ctx.needs_input_grad[4] or ctx.needs_input_grad[5])
            if spec.bn and (ctx.training or need):  # in eval, only for batch norm's parameter gradients
                stats = BatchNormBackward(mean, var, spec.bn.eps, bn_w, bn_w is not None, need, ctx.training)
            dz, dres, dbn_w, dbn_b = epilogue_backward(dz, z, scale, shift, spec.act1, residual, spec.act2,
                                                       spec.pool, ctx.argmax, stats)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = conv2d_backward_input(dz, w, spec.geometry, tuple(x.shape[1:3]))
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            dw, db = conv2d_backward_weight(x, dz, tuple(w.shape), spec.geometry, ctx.has_bias)
        return dx, dres, dw, db, dbn_w, dbn_b, None, None, None, None, None
