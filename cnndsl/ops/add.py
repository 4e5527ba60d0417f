"""add: the join of a residual branch and its shortcut (made by `residual { } [shortcut { }]`,
not by a keyword of its own)."""

from dataclasses import dataclass

from .base import Kernels, OpDef, same_shape


@dataclass(frozen=True)
class Add:
    pass


ADD = OpDef(
    "add", lambda v: Add(), same_shape,
    runner="add.add_layer",
    kernels=Kernels(("add_fwd",)),
    reference=lambda layer, a, xs, training: xs[0] + xs[1],
)
