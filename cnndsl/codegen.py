"""Codegen: a Plan -> its launch steps as plain data (specs.Step), one per group: the runner
(kernels/) that runs the group, the values it reads and writes, the parameters it takes and its
typed spec, each from the group's rule (rules.py) or, for a group of one op no rule covers,
from the op's definition (cnndsl/ops). `lower` gives a Program: the steps of `forward` and
those of `logits` (the network without its final softmax, which `loss` hands to the fused
cross-entropy). The runtime runs them (runtime/steps.py); `cnndsl emit` writes them out."""

from dataclasses import dataclass, replace

from . import ir
from .ops import REGISTRY
from .plan import Plan
from .rules import BY_NAME
from .slabs import SUMMED, WRITTEN, WRITTEN_READ
from .specs import Step


@dataclass(frozen=True)
class Program:
    forward: tuple[Step, ...]
    logits: tuple[Step, ...]  # forward without the final softmax: what `logits` and `loss` run


def layer_spec(net: ir.Network, node: ir.Node) -> tuple[str, tuple, dict] | None:
    """The torch.nn class (by name), positional and keyword arguments of the layer that holds
    a node's parameters; None for parameter-free ops. The runtime instantiates it, emit writes it."""
    return REGISTRY[node.op.value].layer(net, node)


def runner_of(qualified: str) -> str:
    """A runner's name from its "module.name" in kernels/."""
    return qualified.rsplit(".", 1)[-1]


def lower(net: ir.Network, plan: Plan) -> Program:
    """The launch steps of a plan, one per group, in execution order, for forward and logits."""
    steps = []
    deferred = {g.output.id: g for g in plan.groups if g.deferred}
    joins = {g.output.id: g.in_place for g in plan.groups if g.in_place}
    for g, group in enumerate(plan.groups):
        if group.rule in BY_NAME:
            rule = BY_NAME[group.rule]
            runner, (inputs, params, spec) = rule.runner, rule.step(net, group.nodes)
            flags = {"defer": group.deferred, "dz_on_load": group.dz_on_load, "gemm_pool": group.gemm_pool}
            if any(flags.values()):  # conv blocks (norm_act groups defer, and that only)
                spec = replace(spec, **{k: v for k, v in flags.items() if hasattr(spec, k)})
            if group.prologue:  # in training its input comes as the producer's z: the producer's act1 on load
                source = deferred[group.nodes[0].inputs[0]]
                spec = replace(spec, prologue=BY_NAME[source.rule].step(net, source.nodes)[2].act1)
        else:
            op = REGISTRY[group.nodes[0].op.value]
            runner, (inputs, params, spec) = op.runner, op.step(net, group.nodes[0])
        into = None
        if group.into is not None:  # its output goes into its channel slice of the concat's (zero-copy)
            join = net.nodes[group.into]
            k = join.inputs.index(group.output.id)
            into = (join.id, sum(net.nodes[i].shape[0] for i in join.inputs[:k]), join.shape[0],
                    joins[join.id][k] == WRITTEN_READ)
        elif any(group.in_place):  # a concat some of whose branches wrote into its output
            spec = replace(spec, in_place=tuple(f in (WRITTEN, WRITTEN_READ) for f in group.in_place),
                           grad_view=tuple(f == SUMMED for f in group.in_place))
            into = (group.output.id, 0, group.output.shape[0], False)
        redirected = None if group.redirects is None else tuple(inputs).index(group.redirects)
        steps.append(Step(g, group.output.name, runner_of(runner), tuple(inputs), group.output.id,
                          tuple(params), spec, into, group.token, redirected))
    logits = steps
    if net.ends_in_softmax:  # leave the final softmax to the cross-entropy
        last = steps[-1]
        logits = steps[:-1] if last.runner == "softmax_layer" else \
            [*steps[:-1], replace(last, spec=replace(last.spec, softmax=False))]
    return Program(tuple(steps), tuple(logits))
