"""softmax: class scores as probabilities, the network's last layer (`model.loss` hands the
scores before it to the fused cross-entropy)."""

from dataclasses import dataclass

from ..errors import CnnShapeError
from .base import Kernels, Keyword, OpDef, fmt


@dataclass(frozen=True)
class Softmax:
    pass


def _shape(a, shape, span):
    if len(shape) != 1:
        raise CnnShapeError(f"softmax needs a flat input of class scores, got {fmt(shape)}", span,
                            hint="end the network with `flatten` and `dense CLASSES` before softmax")
    return shape


def _reference(layer, a, xs, training):
    import torch
    return torch.softmax(xs[0], dim=1)


SOFTMAX = OpDef(
    "softmax", lambda v: Softmax(), _shape,
    keywords={"softmax": Keyword()},
    runner="softmax.softmax_layer",
    kernels=Kernels(("softmax_fwd",), ("softmax_bwd",)),
    reference=_reference,
)
