"""Layout changes between the NHWC feature maps the kernels keep and the (N, F) rows a dense
layer takes: flatten in PyTorch's C, H, W feature order (a copy, unless H = W = 1 where it is
a view) and its inverse for the gradient, and FlattenFn, a flatten layer alone. Views and
copies only: no arithmetic."""

import torch


def flatten(x: torch.Tensor, permute: bool) -> torch.Tensor:
    """(N, H, W, C) -> (N, C*H*W) in C, H, W order; permute=False only where H = W = 1."""
    if permute:
        x = x.permute(0, 3, 1, 2)
    return x.reshape(x.shape[0], -1)


def unflatten(dy: torch.Tensor, shape: tuple, permute: bool) -> torch.Tensor:
    """flatten's inverse: (N, C*H*W) -> (N, H, W, C) = shape, contiguous."""
    n, h, w, c = shape
    if permute:
        return dy.reshape(n, c, h, w).permute(0, 2, 3, 1).contiguous()
    return dy.reshape(shape)


class FlattenFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec, state):
        ctx.shape, ctx.permute = tuple(x.shape), spec.permute
        return flatten(x, spec.permute).contiguous()

    @staticmethod
    def backward(ctx, dy):
        return unflatten(dy.contiguous(), ctx.shape, ctx.permute), None, None
