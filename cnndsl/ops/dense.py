"""dense: a fully connected layer (PyTorch's Linear), run by the dense_block rule (rules.py)."""

from dataclasses import dataclass

from ..errors import CnnShapeError
from ..options import Option
from .base import Kernels, Keyword, OpDef, fmt


@dataclass(frozen=True)
class Dense:
    units: int
    bias: bool


def _shape(a: Dense, shape, span):
    if len(shape) != 1:
        raise CnnShapeError(f"dense needs a flat input, got a {fmt(shape)} feature map", span,
                            expected="a flat vector of features", hint="insert `flatten` before dense")
    return (a.units,)


DENSE = OpDef(
    "dense", lambda v: Dense(v["units"], v["bias"]), _shape,
    keywords={"dense": Keyword((Option("units", "count"), Option("bias", "bool", True)), 1)},
    params=lambda net, node: node.attrs.units * net.in_shape(node)[0] + (node.attrs.units if node.attrs.bias else 0),
    macs=lambda net, node: node.attrs.units * net.in_shape(node)[0],
    layer=lambda net, node: ("Linear", (net.in_shape(node)[0], node.attrs.units, node.attrs.bias), {}),
    kernels=Kernels(("dense_fwd",), ("dense_bwd_input", "dense_bwd_weight")),
    reference=lambda layer, a, xs, training: layer(xs[0]),
)
