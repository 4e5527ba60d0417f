"""The activations, each its own keyword: relu, leaky_relu (with its slope), sigmoid, tanh,
gelu, silu, relu6, hardswish, hardsigmoid. The kernels' maths is kernels/activation.py's; the
reference is torch's."""

from dataclasses import dataclass

from ..options import Option
from ..specs import Act
from .base import Kernels, Keyword, OpDef, same_shape


@dataclass(frozen=True)
class Activation:
    kind: str  # an activation name: kernels/activation.py ACTIVATIONS
    slope: float = 0.01  # leaky_relu only


def act(node) -> Act:
    """The Act a step's spec carries for an activation node."""
    return Act(node.attrs.kind, node.attrs.slope)


def _reference(layer, a, xs, training):
    import torch
    import torch.nn.functional as F
    torch_act = {"relu": F.relu, "leaky_relu": lambda x: F.leaky_relu(x, a.slope), "sigmoid": torch.sigmoid,
                 "tanh": torch.tanh, "gelu": F.gelu, "silu": F.silu, "relu6": F.relu6, "hardswish": F.hardswish,
                 "hardsigmoid": F.hardsigmoid}
    return torch_act[a.kind](xs[0])


def _word(kind: str, options=(), positional=0) -> Keyword:
    return Keyword(options, positional, (("kind", kind),))


ACTIVATION = OpDef(
    "activation", lambda v: Activation(v["kind"], v.get("slope", 0.01)), same_shape,
    keywords={"relu": _word("relu"), "leaky_relu": _word("leaky_relu", (Option("slope", "number", 0.01),), 1),
              "sigmoid": _word("sigmoid"), "tanh": _word("tanh"), "gelu": _word("gelu"), "silu": _word("silu"),
              "relu6": _word("relu6"), "hardswish": _word("hardswish"), "hardsigmoid": _word("hardsigmoid")},
    runner="activation.activation_layer",
    step=lambda net, node: (node.inputs, (), act(node)),
    kernels=Kernels(("activation_fwd",), ("activation_bwd",)),
    reference=_reference,
)
