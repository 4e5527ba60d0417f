"""dropout: zero each value with probability p in training, scaling the rest by 1 / (1 - p);
the identity in eval."""

from dataclasses import dataclass

from ..options import Option
from ..specs import Dropout as DropoutSpec
from .base import Kernels, Keyword, OpDef, same_shape


@dataclass(frozen=True)
class Dropout:
    p: float


def _reference(layer, a, xs, training):
    import torch.nn.functional as F
    return F.dropout(xs[0], a.p, training)


DROPOUT = OpDef(
    "dropout", lambda v: Dropout(v["p"]), same_shape,
    keywords={"dropout": Keyword((Option("p", "probability", 0.5),), 1)},
    runner="dropout.dropout_layer",
    step=lambda net, node: (node.inputs, (), DropoutSpec(node.attrs.p)),
    kernels=Kernels(("dropout_fwd",), ("dropout_bwd",), eval=()),
    reference=_reference,
)
