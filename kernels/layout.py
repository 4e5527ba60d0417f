"""Layout changes between the NHWC feature maps the kernels keep and the (N, F) rows a dense
layer takes: flatten in PyTorch's C, H, W feature order (a copy, unless H = W = 1 where it is
a view), and flatten_layer, a flatten layer alone. Views and copies only: no arithmetic, and
autograd differentiates them itself."""

import torch

from ..specs import Flatten


def flatten(x: torch.Tensor, permute: bool) -> torch.Tensor:
    """(N, H, W, C) -> (N, C*H*W) in C, H, W order; permute=False only where H = W = 1."""
    if permute:
        x = x.permute(0, 3, 1, 2)
    return x.reshape(x.shape[0], -1)


def flatten_layer(x, spec: Flatten, state):
    """A flatten layer alone: views and a copy, which autograd differentiates itself."""
    return flatten(x, spec.permute)
