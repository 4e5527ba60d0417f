"""gate: a value scaled per sample and channel by a branch computed from it (squeeze-and-excitation;
made by `gate { }`, not by a keyword of its own): y = x * g, g of shape (N, C, 1, 1) or (N, C).
Its shape is its first input's (elaborate.py checks the branch's)."""

from dataclasses import dataclass

from .base import Kernels, OpDef, same_shape


@dataclass(frozen=True)
class Gate:
    pass


def _reference(layer, a, xs, training):
    x, g = xs
    return x * g.reshape(g.shape[0], g.shape[1], 1, 1)


GATE = OpDef(
    "gate", lambda v: Gate(), same_shape,
    runner="gate.gate_layer",
    kernels=Kernels(("gate_fwd",), ("gate_bwd",)),
    note="a gate joins the conv block of the conv that reads it, when that conv reads 16 or more channels "
         "per group (not a depthwise conv) and nothing else reads the gate (the conv scales x by g as it loads "
         "it); else it runs as its own pass",
    reference=_reference,
)
