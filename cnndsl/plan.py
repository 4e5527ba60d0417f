"""Planning: group the IR's ops into the kernels that run them, by the fusion rules of
rules.py (data: a chain of stages, each an op that may join the group when its `fits` check
passes); a chain only grows through values that nothing else reads. fuse=False is the same
planner with every group cut to one op, fuse="block" stops at block-level fusion. Groups run in
the order of their last node, so the shortcut of a residual add is ready before the group that
adds it in its epilogue.

Cross-layer fusion (fuse=True): a conv block with batch norm or an activation (and no shortcut
or pool) whose output only the next conv (or a max pool alone) reads defers its epilogue in
training: it hands that reader its z and batch norm's per-channel scale and shift, and the
reader normalises and activates each tile as it loads it, so the block's output is never
written (`Group.output_note` says, for every such block, whether and why); and in backward a
block whose batch norm and activation (or batch norm and shortcut) have gradients its conv's
kernels can apply as they load dy and z writes no dz (`Group.dz_on_load`, where that moves
fewer bytes); a conv + relu + max pool block pools in its GEMM in training as in inference,
keeping y and the argmax but no z (`Group.gemm_pool`), and its conv's gradient kernels route
the pooled dy to dz as they load it (`dz_on_load` too: no dz written); a deferred block's
batch-norm sums come from its reader's input gradient, and a value two conv blocks read has its
two gradients summed in the first one's (cross_layer.py decides each)."""

from dataclasses import dataclass, replace

from . import ir
from .cross_layer import cross_layer, redirected
from .ir import Op
from .ops import REGISTRY
from .rules import BY_NAME, RULES, Rule
from .slabs import SUMMED, WRITTEN, WRITTEN_READ, in_place
from .specs import H100, Machine
from .traffic import group_bytes


def _kernels(rule: str, ops: tuple[Op, ...]) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(inference, training forward, training backward) kernels of a group: its rule's where it
    fuses, else each op's own (the registry's), backward in reverse order."""
    if rule in BY_NAME and BY_NAME[rule].fuses(ops):
        return BY_NAME[rule].kernels(ops)
    inference, fwd, bwd = (), (), ()
    for op in ops:
        k = REGISTRY[op.value].kernels
        inference, fwd, bwd = inference + k.inference, fwd + k.forward, k.backward + bwd
    return inference, fwd, bwd


def training_notes(g) -> list[str]:
    """What `cnndsl plan --train` says under a group whose conv pools in its GEMM (gemm_pool) or
    computes dz on load: what its backward reads in place of z and dz (a max pool's y and argmax; an
    average pool's backward needs the pooled dy alone)."""
    avg = g.gemm_pool and g.output.attrs.mode == "avg"  # (a GEMM-pooling group ends in its pool)
    pooled = "the pooled dy" if avg else "the pooled dy, argmax and y"
    notes = [f"its conv pools in the GEMM: no z written; backward reads {'no argmax or y' if avg else 'y and the argmax'}"
             ] if g.gemm_pool else []
    if g.dz_on_load:
        notes.append("its backward writes no dz: its conv's gradients compute it as they load "
                     f"{pooled if g.gemm_pool else 'dy and z'}")
    return notes


@dataclass(frozen=True)
class Group:
    rule: str  # a RULES name, or the op's name for a group of one op no rule covers
    nodes: tuple[ir.Node, ...]
    inference: tuple[str, ...]  # kernels of a forward pass without gradients (eval)
    forward: tuple[str, ...]  # kernels of a training forward pass
    backward: tuple[str, ...]
    reason: str | None = None  # why the next op did not join, where a rule could have taken it
    deferred: bool = False  # in training, its output goes to the next conv (or max pool) as z, scale and shift
    prologue: bool = False  # its conv's (or pool's) input is a deferred group's output (normalised on load)
    dz_on_load: bool = False  # in backward, its conv's gradient kernels compute dz as they load dy (z, or y, argmax)
    gemm_pool: bool = False  # in training too its GEMM pools; no z is kept (backward: training_notes)
    output_note: str | None = None  # for a conv block that could defer: whether its output is written, why
    into: int | None = None  # the concat whose output (slab) it writes its output into, zero-copy (slabs.py)
    # for a concat, each input's state (slabs.py): 0 copied in, 1 written in place by its group, 2 and its
    # gradient read in place in backward, 3 copied in and its gradient read in place by its fork's sum
    in_place: tuple[int, ...] = ()
    into_note: str | None = None  # for a concat: which branches write into its slab, why the others are copied
    # where a value forks to a conv and a shortcut (cross-layer): the conv's group returns a gradient token
    # for its input (token), the shortcut's group sends that input's gradient there (redirects: its id), and
    # the conv's input gradient adds it (the value's group lists fork_sum_in_reader, not a sum of the two)
    token: bool = False
    redirects: int | None = None

    @property
    def name(self) -> str:
        return self.nodes[0].name if len(self.nodes) == 1 else f"{self.nodes[0].name}..{self.nodes[-1].name}"

    @property
    def ops(self) -> tuple[str, ...]:
        return tuple(n.op.value for n in self.nodes)

    @property
    def output(self) -> ir.Node:
        return self.nodes[-1]


@dataclass(frozen=True)
class Plan:
    network: str
    groups: tuple[Group, ...]
    fused: bool
    cross_layer: bool = False  # whether blocks defer their epilogue to the next conv (fuse=True)

    @property
    def level(self) -> str:
        """The fusion level: "fused" (cross-layer, the default), "fused, block-level" or "unfused"."""
        return "fused" if self.cross_layer else "fused, block-level" if self.fused else "unfused"

    def __str__(self) -> str:
        lines = [f"plan for {self.network}: {len(self.groups)} groups ({self.level})"]
        for i, g in enumerate(self.groups):
            kernels = ", ".join(g.inference) or no_kernel(g.into_note)
            lines.append(f"  {i:>3}  {g.name:<28} {'+'.join(g.ops):<34} {kernels}")
            if g.reason:
                lines.append(f"       not fused further: {g.reason}")
            if g.output_note:
                lines.append(f"       in training: {g.output_note}")
            lines += [f"       in training: {note}" for note in training_notes(g)]
            if g.into_note:
                lines.append(f"       {g.into_note}")
        return "\n".join(lines)


def no_kernel(zero_copy) -> str:
    """What a plan shows for a group that launches nothing: a concat whose branches wrote into its
    output (zero-copy), or a view."""
    return "(no kernel: its branches wrote it)" if zero_copy else "(view, no kernel)"


def _readers(net: ir.Network) -> dict[int, list[ir.Node]]:
    readers = {n.id: [] for n in net.nodes}
    for n in net.nodes:
        for i in n.inputs:
            readers[i].append(n)
    return readers


def _match(net: ir.Network, readers, start: ir.Node, rule: Rule, taken: set) -> tuple[list, str | None] | None:
    """The longest chain from `start` that `rule` covers (None if its first required stage
    does not match), and why the chain stopped where a later stage had the next op."""
    chain, reason, stages = [], None, list(rule.stages)
    node = start
    while node is not None and stages:
        i = next((k for k, s in enumerate(stages) if s.op is node.op), None)
        if i is None or any(s.required for s in stages[:i]) or node.id in taken:
            break
        why = stages[i].fits(net, node)
        if why is not None:
            reason = f"{node.name} ({node.op.value}) does not fuse: {why}"
            break
        chain.append(node)
        stages = stages[i + 1:]
        nxt = readers[node.id]
        if len(nxt) != 1:
            if len(nxt) > 1 and any(r.op is s.op for r in nxt for s in stages):
                reason = f"the output of {node.name} is also read by {', '.join(r.name for r in nxt[1:])}"
            break
        node = nxt[0]
    if any(s.required for s in stages) or not chain:
        return None
    return chain, reason


def _rule_of(node: ir.Node) -> str:
    """The rule a group of this one op runs under: the one whose required stage it is."""
    return next((r.name for r in RULES if r.alone for s in r.stages if s.required and s.op is node.op),
                node.op.value)


def _placed(g: Group, into: int | None, in_place: tuple[int, ...], note: str | None) -> Group:
    """A group with zero-copy concatenation applied (slabs.py): a concat whose branches all wrote into
    its output launches nothing forward, and nothing backward where they all read their slices of
    its gradient in place."""
    if note is None:
        return replace(g, into=into)
    done = all(f in (WRITTEN, WRITTEN_READ) for f in in_place)
    read = all(f in (WRITTEN_READ, SUMMED) for f in in_place)
    return replace(g, in_place=in_place, into_note=note, reason=None, inference=() if done else g.inference,
                   forward=() if done else g.forward, backward=() if read else g.backward)


def plan(net: ir.Network, fuse: bool | str = True) -> Plan:
    """Group the network's ops: greedily, in node order, the longest chain a rule covers; with
    fuse=True, blocks then defer their epilogue to the next conv where they can (cross-layer)."""
    if not (fuse is True or fuse is False or fuse == "block"):
        raise ValueError(f"fuse: expected True (cross-layer), \"block\" or False, got {fuse!r}")
    readers, taken, groups = _readers(net), set(), []
    for node in net.nodes[1:]:
        if node.id in taken:
            continue
        best = None
        for rule in RULES:
            found = _match(net, readers, node, rule, taken)
            if found and (best is None or len(found[0]) > len(best[1])):
                best = (rule.name, *found)
        if best is None or not fuse:
            rule, chain, reason = _rule_of(node), [node], REGISTRY[node.op.value].note if fuse else None
        else:
            rule, chain, reason = best
        taken.update(n.id for n in chain)
        groups.append(Group(rule, tuple(chain), *_kernels(rule, tuple(n.op for n in chain)), reason))
    groups.sort(key=lambda g: g.output.id)
    if fuse is True:
        groups = cross_layer(net, readers, groups)
    if fuse:
        into, flags, notes = in_place(net, readers, groups)
        groups = [_placed(g, into.get(i), flags.get(g.output.id, ()), notes.get(g.output.id))
                  for i, g in enumerate(groups)]
    if fuse is True:
        groups = redirected(readers, groups)
    return Plan(net.name, tuple(groups), fused=bool(fuse), cross_layer=fuse is True)


def traffic(net: ir.Network, group: Group, batch: int, itemsize: int,
            machine: Machine = H100) -> dict[str, tuple[int, int]]:
    """The bytes a group moves through memory, {mode: (fused, unfused)} for "inference" and
    "training" (forward + backward): its kernels' (traffic.py's model of each kernel in its
    lists), and those of its ops run alone; `machine` sizes the conv weight gradient's split."""
    fused = {"inference": group_bytes(net, group.nodes, group.inference, batch, itemsize, False, machine,
                                      group.in_place),
             "training": group_bytes(net, group.nodes, group.forward + group.backward, batch, itemsize, True,
                                     machine, group.in_place)}
    unfused = {"inference": 0, "training": 0}
    for n in group.nodes:
        inference, forward, backward = _kernels(_rule_of(n), (n.op,))
        unfused["inference"] += group_bytes(net, (n,), inference, batch, itemsize, False, machine)
        unfused["training"] += group_bytes(net, (n,), forward + backward, batch, itemsize, True, machine)
    return {mode: (fused[mode], unfused[mode]) for mode in fused}
