"""concat: the join of parallel branches, their outputs side by side along channels (made by
`concat { branch { } ... }`, not by a keyword of its own); torch.cat(dim=1). Its shape rule is
the join's own (elaborate.py checks that the branches agree on height and width)."""

from dataclasses import dataclass

from ..specs import Concat as ConcatSpec
from .base import Kernels, OpDef, same_shape


@dataclass(frozen=True)
class Concat:
    pass


def spec(net, node) -> ConcatSpec:
    return ConcatSpec(tuple(net.nodes[i].shape[0] for i in node.inputs))


def _reference(layer, a, xs, training):
    import torch
    return torch.cat(xs, dim=1)


CONCAT = OpDef(
    "concat", lambda v: Concat(), same_shape,
    runner="concat.concat_layer",
    step=lambda net, node: (node.inputs, (), spec(net, node)),
    kernels=Kernels(("concat_fwd",), ("concat_bwd",)),
    note="a concat joins its branches in its output, where a branch's last conv block writes its own "
         "channel slice (zero-copy, the plan's `into`) and the concat copies in the others",
    reference=_reference,
)
