"""Codegen: a Plan -> launch steps as plain data, one per group. Each step names the
group it runs, its rule (or op), the values it reads and writes (node ids), and its
static specialisation (strides, paddings, output sizes, which epilogue stages run, the
nodes holding its parameters), which the runtime turns into kernel launches and
`cnndsl emit` writes out as a literal."""

import itertools
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


def _act(node: ir.Node | None):
    return None if node is None else (node.attrs.kind, node.attrs.slope)


def _conv_block(net: ir.Network, nodes: tuple[ir.Node, ...]) -> tuple[tuple[int, ...], dict]:
    """External inputs (x, then the shortcut if the block adds one) and the block's specialisation."""
    conv, chain = nodes[0], {}
    seen_add, residual = False, ()
    for prev, n in itertools.pairwise(nodes):
        if n.op is Op.ADD:
            seen_add, residual = True, tuple(i for i in n.inputs if i != prev.id)[:1]
        elif n.op is Op.ACTIVATION:
            chain["act2" if seen_add or "act1" in chain else "act1"] = n
        else:
            chain[n.op] = n
    bn, pool = chain.get(Op.BATCHNORM), chain.get(Op.POOL)
    spec = {**_static(net, conv), "conv": conv.id, "bn_node": bn and bn.id,
            "bn": bn and (bn.attrs.eps, bn.attrs.momentum), "act1": _act(chain.get("act1")),
            "act2": _act(chain.get("act2")), "epilogue": len(nodes) > 1,
            "pool": pool and (pool.attrs.mode, pool.attrs.kernel, pool.attrs.stride, pool.attrs.padding,
                              pool.shape[1:])}
    return conv.inputs + residual, spec


def _dense_block(net: ir.Network, nodes: tuple[ir.Node, ...]) -> tuple[tuple[int, ...], dict]:
    by_op = {n.op: n for n in nodes}
    flatten, dense, drop = by_op.get(Op.FLATTEN), by_op[Op.DENSE], by_op.get(Op.DROPOUT)
    spec = {"dense": dense.id, "flatten": None if flatten is None else _static(net, flatten)["permute"],
            "act": _act(by_op.get(Op.ACTIVATION)), "p": drop.attrs.p if drop else 0.0,
            "softmax": Op.SOFTMAX in by_op}
    return nodes[0].inputs, spec


BLOCKS = {"conv_block": _conv_block, "dense_block": _dense_block}


def lower(net: ir.Network, plan: Plan) -> tuple[Step, ...]:
    """The launch steps of a plan, one per group, in execution order."""
    steps = []
    for g, group in enumerate(plan.groups):
        if group.rule in BLOCKS:
            inputs, spec = BLOCKS[group.rule](net, group.nodes)
            steps.append(Step(g, group.rule, group.output.name, inputs, group.output.id, tuple(sorted(spec.items()))))
        else:
            n = group.nodes[0]
            steps.append(Step(g, n.op.value, n.name, n.inputs, n.id, tuple(sorted(_static(net, n).items()))))
    return tuple(steps)
