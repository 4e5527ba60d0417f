"""flatten: a feature map as one row of features, in PyTorch's C, H, W order."""

from dataclasses import dataclass

from ..specs import Flatten as FlattenSpec
from .base import Keyword, OpDef, numel


@dataclass(frozen=True)
class Flatten:
    pass


def spec(net, node) -> FlattenSpec:
    """NHWC -> features in C, H, W order: a copy unless H = W = 1 (a view)."""
    shape = net.in_shape(node)
    return FlattenSpec(len(shape) == 3 and shape[1:] != (1, 1))


FLATTEN = OpDef(
    "flatten", lambda v: Flatten(), lambda a, s, span: (numel(s),),
    keywords={"flatten": Keyword()},
    runner="layout.flatten_layer",
    step=lambda net, node: (node.inputs, (), spec(net, node)),
    reference=lambda layer, a, xs, training: xs[0].flatten(1),
)
