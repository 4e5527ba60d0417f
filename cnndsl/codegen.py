"""Codegen: a Plan -> launch steps as plain data. Each step names the group it runs,
the op, the node whose parameters it uses, the values it reads and writes (node ids),
and its static specialisation (strides, paddings, output sizes, activation...), which
the runtime turns into kernel launches and `cnndsl emit` writes out as a literal."""

from dataclasses import dataclass

from . import ir
from .ir import Op
from .plan import Plan


@dataclass(frozen=True)
class Step:
    group: int
    op: str
    node: str
    inputs: tuple[int, ...]
    output: int
    static: tuple[tuple[str, object], ...]  # sorted (name, value) pairs: hashable, printable

    @property
    def kw(self) -> dict:
        return dict(self.static)


def _static(net: ir.Network, node: ir.Node) -> dict:
    a = node.attrs
    match node.op:
        case Op.CONV:
            return {"stride": a.stride, "padding": a.padding, "dilation": a.dilation, "groups": a.groups,
                    "out_hw": node.shape[1:]}
        case Op.BATCHNORM:
            return {"eps": a.eps, "momentum": a.momentum}
        case Op.ACTIVATION:
            return {"kind": a.kind, "slope": a.slope}
        case Op.POOL:
            return {"mode": a.mode, "kernel": a.kernel, "stride": a.stride, "padding": a.padding,
                    "out_hw": node.shape[1:]}
        case Op.FLATTEN:  # NHWC -> features in PyTorch's C, H, W order: a copy unless H = W = 1
            shape = net.in_shape(node)
            return {"permute": len(shape) == 3 and shape[1:] != (1, 1)}
        case Op.DROPOUT:
            return {"p": a.p}
    return {}


def layer_spec(net: ir.Network, node: ir.Node) -> tuple[str, tuple, dict] | None:
    """The torch.nn class (by name), positional and keyword arguments of the layer that holds
    a node's parameters; None for parameter-free ops. The runtime instantiates it, emit writes it."""
    a, shape = node.attrs, net.in_shape(node) if node.inputs else None
    if node.op is Op.CONV:
        pad = "same" if a.same else a.padding
        return "Conv2d", (shape[0], a.filters, a.kernel, a.stride, pad, a.dilation, a.groups, a.bias), {}
    if node.op is Op.BATCHNORM:
        return ("BatchNorm2d" if len(shape) == 3 else "BatchNorm1d", (shape[0],),
                {"eps": a.eps, "momentum": a.momentum, "affine": a.affine})
    if node.op is Op.DENSE:
        return "Linear", (shape[0], a.units, a.bias), {}
    return None


def lower(net: ir.Network, plan: Plan) -> tuple[Step, ...]:
    """The launch steps of a plan, in execution order."""
    return tuple(Step(g, n.op.value, n.name, n.inputs, n.id, tuple(sorted(_static(net, n).items())))
                 for g, group in enumerate(plan.groups) for n in group.nodes)
