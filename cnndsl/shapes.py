"""Shape rules and the per-node counts the summary reports (parameters, BN buffers,
multiply-adds), each the op's own (cnndsl/ops), PyTorch semantics, per sample, NCHW."""

from . import ir
from .errors import CnnShapeError, Span
from .ir import Op, Shape
from .ops import REGISTRY
from .ops.base import fmt, numel


def infer(op: Op, attrs, shape: Shape, span: Span) -> Shape:
    """The output shape of `op` on a per-sample input `shape`; raises CnnShapeError."""
    out = REGISTRY[op.value].shape(attrs, shape, span)
    if min(out) <= 0:
        raise CnnShapeError(f"output size {fmt(out)} is not positive", span)
    return out


def params(net: ir.Network, node: ir.Node) -> int:
    """Trainable parameters, counted as PyTorch does."""
    return REGISTRY[node.op.value].params(net, node)


def buffers(net: ir.Network, node: ir.Node) -> int:
    """Running statistics (batch norm's mean and variance; num_batches_tracked not counted)."""
    return REGISTRY[node.op.value].buffers(net, node)


def macs(net: ir.Network, node: ir.Node) -> int:
    """Multiply-adds per sample (the GEMMs: conv and dense)."""
    return REGISTRY[node.op.value].macs(net, node)


__all__ = ["buffers", "infer", "macs", "numel", "params"]
