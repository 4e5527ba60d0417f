"""Codegen: a Plan -> its launch steps as plain data (specs.Step), one per group, each naming
the autograd Function that runs the group, the values it reads and writes, the parameters it
takes and its typed spec. `lower` gives a Program: the steps of `forward` and those of
`logits` (the network without its final softmax, which `loss` hands to the fused
cross-entropy). The runtime runs them (runtime/steps.py); `cnndsl emit` writes them out."""

import itertools
from dataclasses import dataclass, replace

from . import ir
from .ir import Op
from .plan import Plan
from .specs import (
    NO_ACT,
    Act,
    BatchNormSpec,
    ConvBlock,
    ConvGeometry,
    DenseBlock,
    Dropout,
    Flatten,
    Step,
    Window,
)


@dataclass(frozen=True)
class Program:
    forward: tuple[Step, ...]
    logits: tuple[Step, ...]  # forward without the final softmax: what `logits` and `loss` run


def _act(node: ir.Node | None) -> Act:
    return NO_ACT if node is None else Act(node.attrs.kind, node.attrs.slope)


def _window(node: ir.Node) -> Window:
    a = node.attrs
    return Window(a.mode, a.kernel, a.stride, a.padding, node.shape[1:])


def _flatten(net: ir.Network, node: ir.Node) -> Flatten:
    shape = net.in_shape(node)  # NHWC -> features in PyTorch's C, H, W order: a copy unless H = W = 1
    return Flatten(len(shape) == 3 and shape[1:] != (1, 1))


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


_BN_PARAMS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _conv_block(net: ir.Network, nodes: tuple[ir.Node, ...]):
    """(function, inputs: x and the shortcut (or None), params, spec) of a conv block."""
    conv, chain = nodes[0], {}
    residual = None
    for prev, n in itertools.pairwise(nodes):
        if n.op is Op.ADD:
            residual = next(i for i in n.inputs if i != prev.id)
        elif n.op is Op.ACTIVATION:
            chain["act2" if residual is not None or "act1" in chain else "act1"] = n
        else:
            chain[n.op] = n
    a, bn, pool = conv.attrs, chain.get(Op.BATCHNORM), chain.get(Op.POOL)
    spec = ConvBlock(ConvGeometry(a.stride, a.padding, a.dilation, a.groups, conv.shape[1:]),
                     bn and BatchNormSpec(bn.attrs.eps, bn.attrs.momentum), _act(chain.get("act1")),
                     residual is not None, _act(chain.get("act2")), pool and _window(pool))
    params = ((conv.name, "weight"), (conv.name, "bias"),
              *(((bn.name, p) for p in _BN_PARAMS) if bn else (None,) * len(_BN_PARAMS)))
    return "ConvBlockFn", (conv.inputs[0], residual), params, spec


def _dense_block(net: ir.Network, nodes: tuple[ir.Node, ...]):
    by_op = {n.op: n for n in nodes}
    flatten, dense, drop = by_op.get(Op.FLATTEN), by_op[Op.DENSE], by_op.get(Op.DROPOUT)
    spec = DenseBlock(flatten and _flatten(net, flatten), _act(by_op.get(Op.ACTIVATION)),
                      drop.attrs.p if drop else 0.0, Op.SOFTMAX in by_op)
    return "DenseBlockFn", nodes[0].inputs, ((dense.name, "weight"), (dense.name, "bias")), spec


BLOCKS = {"conv_block": _conv_block, "dense_block": _dense_block}


def _single(net: ir.Network, node: ir.Node):
    """(function, inputs, params, spec) of a group of one op no rule covers."""
    a = node.attrs
    match node.op:
        case Op.BATCHNORM:
            return ("BatchNormFn", node.inputs, tuple((node.name, p) for p in _BN_PARAMS),
                    BatchNormSpec(a.eps, a.momentum))
        case Op.ACTIVATION:
            return "ActivationFn", node.inputs, (), _act(node)
        case Op.POOL:
            return "PoolFn", node.inputs, (), _window(node)
        case Op.GLOBAL_AVGPOOL:
            return "GlobalAvgPoolFn", node.inputs, (), None
        case Op.FLATTEN:
            return "FlattenFn", node.inputs, (), _flatten(net, node)
        case Op.DROPOUT:
            return "DropoutFn", node.inputs, (), Dropout(a.p)
        case Op.SOFTMAX:
            return "SoftmaxFn", node.inputs, (), None
        case Op.ADD:
            return "AddFn", node.inputs, (), None
    raise AssertionError(node.op)


def lower(net: ir.Network, plan: Plan) -> Program:
    """The launch steps of a plan, one per group, in execution order, for forward and logits."""
    steps = []
    for g, group in enumerate(plan.groups):
        if group.rule in BLOCKS:
            function, inputs, params, spec = BLOCKS[group.rule](net, group.nodes)
        else:
            function, inputs, params, spec = _single(net, group.nodes[0])
        steps.append(Step(g, group.output.name, function, tuple(inputs), group.output.id, tuple(params), spec))
    logits = steps
    if net.ends_in_softmax:  # leave the final softmax to the cross-entropy
        last = steps[-1]
        logits = steps[:-1] if last.function == "SoftmaxFn" else \
            [*steps[:-1], replace(last, spec=replace(last.spec, softmax=False))]
    return Program(tuple(steps), tuple(logits))
