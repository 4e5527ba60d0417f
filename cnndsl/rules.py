"""The fusion rules as data: a rule is a chain of stages, each an op that may join the group when
its `fits` check passes (the planner, plan.py, grows a chain only through values nothing else
reads), with everything a fused group needs: the runner of kernels/ that runs it,
its launch step (inputs, parameters, typed spec) and the kernels it launches, which `cnndsl
plan` lists and traffic.py's byte model counts. A lone conv or dense layer runs through its
rule with every other stage off."""

import itertools
from collections.abc import Callable
from dataclasses import dataclass

from .ir import Network, Node, Op
from .ops.activation import act
from .ops.batchnorm import PARAMS as BN_PARAMS
from .ops.batchnorm import spec as bn_spec
from .ops.flatten import spec as flatten_spec
from .ops.pool import spec as window_spec
from .specs import (
    MAX_POOL_TAPS,
    MAX_SOFTMAX_UNITS,
    MIN_GEMM_K,
    NO_ACT,
    ConvBlock,
    ConvGeometry,
    DenseBlock,
    NormAct,
)


def _fits(net: Network, node: Node) -> None:
    return None


@dataclass(frozen=True)
class Stage:
    op: Op
    required: bool = False
    fits: Callable = _fits  # (net, node) -> None, or why the node cannot join


@dataclass(frozen=True)
class Rule:
    name: str
    stages: tuple[Stage, ...]
    runner: str  # the function of kernels/ that runs a group, "module.name"
    step: Callable  # (net, nodes) -> (inputs, params, spec)
    kernels: Callable  # ops of a fused group (more than its required op) -> (inference, forward, backward)
    alone: bool = True  # a lone op of its required stage runs through it (else as the op's own step)

    def fuses(self, ops) -> bool:
        """Whether a group of these ops runs stages beyond the rule's required op (and a flatten,
        which is a view into the dense block's input)."""
        return len([o for o in ops if o is not Op.FLATTEN]) > 1


# --- conv block: [gate] -> conv -> [batchnorm] -> [act] -> [+ shortcut] -> [act] -> [pool] -------------

def _pool_fits(net: Network, node: Node) -> str | None:
    a = node.attrs
    if a.stride[0] < a.kernel[0] or a.stride[1] < a.kernel[1]:
        return (f"its windows overlap ({a.kernel[0]}x{a.kernel[1]} stride {a.stride[0]}x{a.stride[1]}): the "
                f"conv epilogue would recompute conv outputs, so it runs as its own group")
    if a.kernel[0] * a.kernel[1] > MAX_POOL_TAPS:
        return f"its {a.kernel[0]}x{a.kernel[1]} window exceeds the {MAX_POOL_TAPS} taps a conv tile holds"
    window, in_hw = window_spec(node), net.in_shape(node)[1:]
    if window.past_padding(in_hw):
        return (f"ceil_mode=true gives it windows past the padded input ({in_hw[0]}x{in_hw[1]} -> "
                f"{window.out_hw[0]}x{window.out_hw[1]}), which the conv epilogue does not pool, so it runs "
                f"as its own group")
    if window.uneven(in_hw):
        return ("count_include_pad=false divides its border windows by their taps inside the input, which "
                "the conv epilogue does not, so it runs as its own group")
    return None


def _gate_fits(net: Network, node: Node) -> str | None:
    """A gate joins the conv that reads its output (which then reads x * g as it loads x) when that
    conv reads whole 16-channel groups: not a depthwise conv, nor one of fewer channels per group
    (padded with zeros to 16 first)."""
    reader = next((n for n in net.nodes if node.id in n.inputs), None)
    if reader is not None and reader.op is Op.CONV:
        cin_g = node.shape[0] // reader.attrs.groups
        if cin_g < MIN_GEMM_K:
            return (f"{reader.name} reads {cin_g} channel{'s' if cin_g > 1 else ''} per group; the conv applies "
                    f"a gate as it loads whole groups of 16 or more")
    return None


def _conv_step(net: Network, nodes: tuple[Node, ...]):
    """Inputs x, the shortcut (or None) and a gate's g (or None), the conv's and batch norm's
    parameters, the spec."""
    gate = nodes[0] if nodes[0].op is Op.GATE else None
    if gate is not None:
        nodes = nodes[1:]
    conv, chain, residual = nodes[0], {}, None
    for prev, n in itertools.pairwise(nodes):
        if n.op is Op.ADD:
            residual = next(i for i in n.inputs if i != prev.id)
        elif n.op is Op.ACTIVATION:
            chain["act2" if residual is not None or "act1" in chain else "act1"] = act(n)
        else:
            chain[n.op] = n
    a, bn, pool = conv.attrs, chain.get(Op.BATCHNORM), chain.get(Op.POOL)
    spec = ConvBlock(ConvGeometry(a.stride, a.padding, a.dilation, a.groups, conv.shape[1:]), bn and bn_spec(bn),
                     chain.get("act1", NO_ACT), residual is not None, chain.get("act2", NO_ACT),
                     pool and window_spec(pool))
    params = ((conv.name, "weight"), (conv.name, "bias"),
              *(((bn.name, p) for p in BN_PARAMS) if bn else (None,) * len(BN_PARAMS)))
    if gate is not None:  # the conv reads the gate's input x, scaled by g as it loads it
        return (gate.inputs[0], residual, gate.inputs[1]), params, spec
    return (conv.inputs[0], residual, None), params, spec


def _bn_only(ops) -> bool:
    """Batch norm is the block's only stage after the conv: its backward needs no epilogue pass."""
    return Op.BATCHNORM in ops and not set(ops) & {Op.ACTIVATION, Op.ADD, Op.POOL}


def _bn_act_only(ops) -> bool:
    """Batch norm and one activation are the block's only stages after the conv."""
    return Op.BATCHNORM in ops and ops.count(Op.ACTIVATION) == 1 and not set(ops) & {Op.ADD, Op.POOL}


BN_ACT_BACKWARD = ("bn_bwd_reduce", "bn_bwd_merge", "bn_act_bwd")


def _conv_kernels(ops):
    if Op.GATE in ops:  # the conv scales x by g as it loads it, forward and weight gradient; the gradient of
        # x * g (the input gradient's GEMM) goes through the gate's backward pass
        inference, forward, backward = _conv_kernels(tuple(o for o in ops if o is not Op.GATE))
        gated = lambda k: f"gate+{k}" if k.startswith(("conv_fwd", "conv_bwd_weight")) else k
        return (*inference[:-1], gated(inference[-1])), tuple(map(gated, forward)), (*map(gated, backward),
                                                                                     "gate_bwd")
    bn = Op.BATCHNORM in ops
    train_fwd = ("conv_fwd+stats", "bn_merge_stats", "bn_update_running", "bn_scale_shift", "epilogue_fwd") if bn \
        else ("conv_fwd", "epilogue_fwd")
    train_bwd = ("epilogue_bwd+bn_reduce", "bn_bwd_merge", "bn_bwd_apply") if bn else ("epilogue_bwd",)
    if _bn_only(ops):
        train_bwd = ("bn_bwd_reduce", "bn_bwd_merge", "bn_bwd_apply")
    elif _bn_act_only(ops):  # batch norm's sums through act1's gradient, then dz: no pass writes da
        train_bwd = BN_ACT_BACKWARD
    fold = ("bn_fold",) if bn else ()  # once per weight change, not per call
    return fold + ("conv_fwd+epilogue",), train_fwd, train_bwd + ("conv_bwd_input", "conv_bwd_weight")


CONV_BLOCK = Rule(
    "conv_block",
    (Stage(Op.GATE, fits=_gate_fits), Stage(Op.CONV, True), Stage(Op.BATCHNORM), Stage(Op.ACTIVATION),
     Stage(Op.ADD), Stage(Op.ACTIVATION), Stage(Op.POOL, fits=_pool_fits)),
    "conv_block.conv_block", _conv_step, _conv_kernels)


# --- dense block: [flatten] -> dense -> [act] -> [dropout] -> [softmax] --------------------------------

def _softmax_fits(net: Network, node: Node) -> str | None:
    units = node.shape[0]
    if units > MAX_SOFTMAX_UNITS:
        return f"{units} classes exceed the {MAX_SOFTMAX_UNITS} columns the dense epilogue holds"
    return None


def _dense_step(net: Network, nodes: tuple[Node, ...]):
    by_op = {n.op: n for n in nodes}
    flatten, dense, drop, activation = (by_op.get(o) for o in (Op.FLATTEN, Op.DENSE, Op.DROPOUT, Op.ACTIVATION))
    spec = DenseBlock(flatten and flatten_spec(net, flatten), act(activation) if activation else NO_ACT,
                      drop.attrs.p if drop else 0.0, Op.SOFTMAX in by_op)
    return nodes[0].inputs, ((dense.name, "weight"), (dense.name, "bias")), spec


def _dense_kernels(ops):
    epi = "+".join(o.value for o in ops if o in (Op.ACTIVATION, Op.DROPOUT, Op.SOFTMAX))
    bwd = ("softmax_bwd",) if Op.SOFTMAX in ops else ()
    if Op.ACTIVATION in ops or Op.DROPOUT in ops:
        bwd += ("dense_epilogue_bwd",)
    return (f"dense_fwd+{epi}",), (f"dense_fwd+{epi}",), bwd + ("dense_bwd_input", "dense_bwd_weight")


DENSE_BLOCK = Rule(
    "dense_block",
    (Stage(Op.FLATTEN), Stage(Op.DENSE, True), Stage(Op.ACTIVATION), Stage(Op.DROPOUT),
     Stage(Op.SOFTMAX, fits=_softmax_fits)),
    "dense_block.dense_block", _dense_step, _dense_kernels)

# --- batch norm and activation: batchnorm -> activation, with no conv before them -----------------------

def _norm_act_step(net: Network, nodes: tuple[Node, ...]):
    bn, activation = nodes
    return bn.inputs, tuple((bn.name, p) for p in BN_PARAMS), NormAct(bn_spec(bn), act(activation))


# the conv block's epilogue pass without the conv: y = act(x scale + shift) in one pass; backward, batch
# norm's sums through the activation's gradient, then dx, recomputing it (a lone batch norm is the
# batchnorm op's own step)
NORM_ACT = Rule(
    "norm_act", (Stage(Op.BATCHNORM, True), Stage(Op.ACTIVATION, True)), "norm_act.norm_act", _norm_act_step,
    lambda ops: (("bn_scale_shift", "epilogue_fwd"), ("bn_stats", "bn_update_running", "bn_scale_shift", "epilogue_fwd"),
                 BN_ACT_BACKWARD), alone=False)

RULES = (CONV_BLOCK, DENSE_BLOCK, NORM_ACT)
BY_NAME = {r.name: r for r in RULES}
