"""batchnorm: batch normalization over channels (BatchNorm2d) or features (BatchNorm1d)."""

from dataclasses import dataclass

from ..options import Option
from ..specs import BatchNormSpec
from .base import Kernels, Keyword, OpDef, same_shape

PARAMS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")  # batchnorm_layer's order


@dataclass(frozen=True)
class BatchNorm:
    eps: float
    momentum: float
    affine: bool


def spec(node) -> BatchNormSpec:
    return BatchNormSpec(node.attrs.eps, node.attrs.momentum)


def _layer(net, node):
    a, shape = node.attrs, net.in_shape(node)
    return ("BatchNorm2d" if len(shape) == 3 else "BatchNorm1d", (shape[0],),
            {"eps": a.eps, "momentum": a.momentum, "affine": a.affine})


def _reference(layer, a, xs, training):
    return layer(xs[0])


BATCHNORM = OpDef(
    "batchnorm", lambda v: BatchNorm(v["eps"], v["momentum"], v["affine"]), same_shape,
    keywords={"batchnorm": Keyword((Option("eps", "positive", 1e-5), Option("momentum", "fraction", 0.1),
                                    Option("affine", "bool", True)))},
    params=lambda net, node: 2 * net.in_shape(node)[0] if node.attrs.affine else 0,
    buffers=lambda net, node: 2 * net.in_shape(node)[0],  # running mean and variance (num_batches_tracked not counted)
    layer=_layer,
    runner="batchnorm_layer.batchnorm_layer",
    step=lambda net, node: (node.inputs, tuple((node.name, p) for p in PARAMS), spec(node)),
    kernels=Kernels(("bn_stats", "bn_update_running", "bn_apply"), ("bn_bwd_reduce", "bn_bwd_apply"),
                    eval=("bn_apply",)),
    reference=_reference,
)
