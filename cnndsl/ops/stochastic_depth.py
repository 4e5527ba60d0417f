"""stochastic_depth: in training, zero a whole sample with probability p and scale the others by
1 / (1 - p); the identity in eval. torchvision's StochasticDepth(p, mode="row"), which EfficientNet
applies to a residual branch before the add."""

from dataclasses import dataclass

from ..options import Option
from ..specs import StochasticDepth as Spec
from .base import Kernels, Keyword, OpDef, same_shape


@dataclass(frozen=True)
class StochasticDepth:
    p: float


def _reference(layer, a, xs, training):
    import torch
    x = xs[0]
    if not training or a.p == 0:
        return x
    keep = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(1 - a.p)
    return x * (keep / (1 - a.p) if a.p < 1 else keep)


STOCHASTIC_DEPTH = OpDef(
    "stochastic_depth", lambda v: StochasticDepth(v["p"]), same_shape,
    keywords={"stochastic_depth": Keyword((Option("p", "probability", 0.2),), 1)},
    runner="stochastic_depth.stochastic_depth_layer",
    step=lambda net, node: (node.inputs, (), Spec(node.attrs.p)),
    kernels=Kernels(("stochastic_depth_fwd",), ("stochastic_depth_bwd",), eval=()),
    reference=_reference,
)
