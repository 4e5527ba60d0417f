"""One torch.autograd.Function per kind of single-op group (conv and dense blocks live in
blocks.py), each running Triton launchers forward and backward on NHWC tensors (flat
tensors are (N, F)). Nothing here computes with torch ops: torch is used for
allocation, views and layout copies only."""

import torch

from ..kernels.activation import activation_backward, activation_forward
from ..kernels.add import add_forward
from ..kernels.batchnorm import (
    batchnorm_backward,
    batchnorm_eval_backward,
    batchnorm_forward,
    batchnorm_stats,
    batchnorm_update_running,
)
from ..kernels.dropout import dropout_backward, dropout_forward
from ..kernels.pool import (
    global_avgpool_backward,
    global_avgpool_forward,
    pool_backward,
    pool_forward,
)
from ..kernels.softmax import (
    cross_entropy_backward,
    cross_entropy_forward,
    softmax_backward,
    softmax_forward,
)


class BatchNormFn(torch.autograd.Function):
    """x viewed as (M, C) rows; training uses batch statistics and updates the running ones."""

    @staticmethod
    def forward(ctx, x, w, b, running_mean, running_var, num_batches_tracked, eps, momentum, training):
        shape = x.shape
        x2 = x.view(-1, shape[-1])  # (M, C)
        if training:
            mean, var = batchnorm_stats(x2)
            batchnorm_update_running(mean, var, running_mean, running_var, num_batches_tracked,
                                     momentum, x2.shape[0])
        else:
            mean, var = running_mean, running_var
        ctx.save_for_backward(x2, mean, var, w)
        ctx.eps, ctx.training, ctx.has_weight = eps, training, w is not None
        return batchnorm_forward(x2, mean, var, eps, w, b).view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, mean, var, w = ctx.saved_tensors
        shape, dy2 = dy.shape, dy.contiguous().view(x2.shape)
        need = ctx.has_weight and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        bwd = batchnorm_backward if ctx.training else batchnorm_eval_backward
        dx, dw, db = bwd(dy2, x2, mean, var, ctx.eps, w, need)
        return dx.view(shape), dw, db, None, None, None, None, None, None


class ActivationFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kind, slope):
        ctx.save_for_backward(x)
        ctx.kind, ctx.slope = kind, slope
        return activation_forward(x, kind, slope)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return activation_backward(x, dy.contiguous(), ctx.kind, ctx.slope), None, None


class PoolFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mode, kernel, stride, padding, out_hw):
        y, argmax = pool_forward(x, mode, kernel, stride, padding, out_hw)
        ctx.argmax = argmax  # int8 window offsets (max) or None (avg): not a graph tensor
        ctx.geometry, ctx.in_hw = (mode, kernel, stride, padding), tuple(x.shape[1:3])
        return y

    @staticmethod
    def backward(ctx, dy):
        mode, kernel, stride, padding = ctx.geometry
        dx = pool_backward(dy.contiguous(), mode, ctx.argmax, kernel, stride, padding, ctx.in_hw)
        return dx, None, None, None, None, None


class GlobalAvgPoolFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # (N, H, W, C) -> (N, 1, 1, C)
        ctx.in_hw = tuple(x.shape[1:3])
        return global_avgpool_forward(x)

    @staticmethod
    def backward(ctx, dy):
        return global_avgpool_backward(dy.contiguous(), ctx.in_hw)


class DropoutFn(torch.autograd.Function):
    """The mask is regenerated from (seed, element offset) in backward, never stored."""

    @staticmethod
    def forward(ctx, x, p, seed):
        ctx.p, ctx.seed = p, seed
        return dropout_forward(x, p, seed)

    @staticmethod
    def backward(ctx, dy):
        return dropout_backward(dy.contiguous(), ctx.p, ctx.seed), None, None


class SoftmaxFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = softmax_forward(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return softmax_backward(dy.contiguous(), y)


class CrossEntropyFn(torch.autograd.Function):
    """Mean cross-entropy of logits against class indices, softmax and its gradient fused."""

    @staticmethod
    def forward(ctx, logits, target):
        loss, lse = cross_entropy_forward(logits, target)
        ctx.save_for_backward(logits, target, lse)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        logits, target, lse = ctx.saved_tensors
        return cross_entropy_backward(dloss.contiguous(), logits, target, lse), None


class AddFn(torch.autograd.Function):
    """The residual join: y = branch + shortcut; both receive dy."""

    @staticmethod
    def forward(ctx, a, b):
        return add_forward(a, b)

    @staticmethod
    def backward(ctx, dy):
        return dy, dy


class ForkFn(torch.autograd.Function):
    """Hands one value to k consumers as k aliases, and sums their gradients with the
    add kernel, so that autograd's engine never accumulates with a torch op."""

    @staticmethod
    def forward(ctx, x, k):
        ctx.k = k
        return tuple(x.view_as(x) for _ in range(k))

    @staticmethod
    def backward(ctx, *grads):
        total = None
        for g in grads:
            if g is not None:
                total = g.contiguous() if total is None else add_forward(total, g.contiguous())
        return total, None
