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
written (`Group.output_note` says, for every such block, whether and why); and in backward a block whose batch norm and activation
(or batch norm and shortcut) have gradients its conv's kernels can apply as they load dy and z
writes no dz (`Group.dz_on_load`, where that moves fewer bytes); a conv + relu + max pool
block pools in its GEMM in training as in inference, keeping y and the argmax but no z
(`Group.gemm_pool`)."""

from dataclasses import dataclass, replace

from . import ir
from .ir import Op
from .ops import REGISTRY
from .ops.activation import act
from .rules import BY_NAME, RULES, Rule
from .slabs import in_place
from .specs import H100, MIN_GEMM_K, Machine
from .traffic import group_bytes, input_grad_phases


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


GEMM_POOL_NOTE = "its conv pools in the GEMM: no z written; backward reads y and the argmax"


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
    dz_on_load: bool = False  # in backward, its conv's gradient kernels apply its batch norm and act as they load dy
    gemm_pool: bool = False  # in training too its GEMM pools; no z is kept, backward reads y and the argmax
    output_note: str | None = None  # for a conv block that could defer: whether its output is written, why
    into: int | None = None  # the concat whose output (slab) it writes its output into, zero-copy (slabs.py)
    # for a concat, each input's state (slabs.py): 0 copied in, 1 written in place by its group, 2 and its
    # gradient read in place in backward
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
            if g.dz_on_load:
                lines.append("       in backward: its conv's gradients compute dz as they load dy and z (no dz written)")
            if g.gemm_pool:
                lines.append(f"       in training: {GEMM_POOL_NOTE}")
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


def _deferral(net: ir.Network, readers, groups: list[Group]) -> dict[int, tuple[bool, str]]:
    """Group index -> (deferred, why) for each conv block with batch norm or an activation and no
    shortcut or pool, and each norm_act group. It defers where only the conv of another conv block reads its output, as
    that conv's input, with 16 or more channels per group or depthwise (fewer are padded with
    zeros, which normalising on load would not keep zero), or only a max pool of its own (a stem's
    3x3 stride 2 pool: its forward is the epilogue pass's code, its backward reads no input; a
    conv block's only)."""
    first = {g.nodes[0].id: g for g in groups if g.rule == "conv_block"}
    notes = {}
    for i, g in enumerate(groups):
        ops = {n.op for n in g.nodes}
        stages = ops & {Op.BATCHNORM, Op.ACTIVATION}
        if g.rule not in ("conv_block", "norm_act") or not stages or ops & {Op.ADD, Op.POOL}:
            continue
        out, rd = g.output, readers[g.output.id]
        if not rd:
            notes[i] = False, "its output is written: it is the network's output"
        elif len(rd) > 1:
            notes[i] = False, f"its output is written: {len(rd)} layers read it ({', '.join(r.name for r in rd)})"
        elif rd[0].op is Op.POOL and rd[0].attrs.mode == "max" and g.rule == "conv_block":  # the epilogue's code
            notes[i] = True, f"its output is not written: {rd[0].name} {_does(ops)} z as it loads it"
        elif rd[0].id not in first or rd[0].inputs[0] != out.id:
            notes[i] = False, f"its output is written: {rd[0].name} ({rd[0].op.value}) reads it, not a conv's input"
        else:
            c, conv = out.shape[0], rd[0].attrs
            cin_g, cout_g = c // conv.groups, conv.filters // conv.groups
            if cin_g < MIN_GEMM_K and not (cin_g == 1 and cout_g == 1):
                notes[i] = False, (f"its output is written: {rd[0].name} reads {cin_g} channels per group, padded "
                                   f"to 16 with zeros that normalising on load would not keep zero")
            else:
                loaded = "z" if g.rule == "conv_block" else "its input"  # (a norm_act group has no conv)
                notes[i] = True, f"its output is not written: {rd[0].name} {_does(ops)} {loaded} as it loads it"
    return notes


def _does(ops) -> str:
    return " and ".join(w for w, o in (("normalises", Op.BATCHNORM), ("activates", Op.ACTIVATION)) if o in ops)


def _dz_on_load(g: Group) -> bool:
    """Whether a conv block's backward runs on load: batch norm and/or an activation and nothing
    else after the conv, or batch norm added to a shortcut (then an activation; the gather pass
    writes da once, as the shortcut's gradient); no pool (its scatter is a pass of its own); 16
    or more output channels per group (fewer are padded with zeros, which dz on load would not
    keep); and where it moves fewer bytes: each of the input gradient's p stride phases reads dy
    and z where it read dz, so with a shortcut (whose gather pass then writes da once, as the
    shortcut's gradient, and batch norm's dz pass, 3 of z's size, goes) it pays for p <= 2; with
    batch norm and act1, or either alone (a dz pass of 3 goes, the sums read dy and z either way),
    for p = 1; a conv reading the network's input (a stem) has no input gradient, so any stride pays."""
    ops = [n.op for n in g.nodes]
    if g.rule != "conv_block" or not set(ops) & {Op.BATCHNORM, Op.ACTIVATION} or Op.POOL in ops:
        return False
    if Op.ADD in ops and (Op.BATCHNORM not in ops or Op.ACTIVATION in ops[:ops.index(Op.ADD)]):
        return False
    first = next(n for n in g.nodes if n.op is Op.CONV)
    conv, stem = first.attrs, first.inputs[0] == 0
    return conv.filters // conv.groups >= MIN_GEMM_K and (
        stem or input_grad_phases(conv) <= (2 if Op.ADD in ops else 1))


def _gemm_pool(g: Group) -> bool:
    """Whether a conv block pools in its GEMM in training as in inference: conv, an activation whose
    gradient follows from its output (relu, leaky_relu: specs.Act.grad_from_output) or none, then a
    max pool (for an average, no activation: its backward spreads dy alone); nothing else. Its
    backward needs only the pooled y and the argmax, so z (the conv's output, the pool's input:
    4x y for a 2x2 window) is neither written, nor read by an epilogue pass, nor read back."""
    ops = [n.op for n in g.nodes]
    if g.rule != "conv_block" or Op.POOL not in ops or set(ops) - {Op.CONV, Op.ACTIVATION, Op.POOL}:
        return False
    acts = [act(n) for n in g.nodes if n.op is Op.ACTIVATION]
    if len(acts) > 1:
        return False
    if g.output.attrs.mode == "avg":
        return not acts
    return not acts or acts[0].grad_from_output


def _cross_layer(net: ir.Network, readers, groups: list[Group]) -> list[Group]:
    """The groups with cross-layer fusion applied: a deferred block's training forward launches no
    epilogue pass, its reader's conv kernels load through the prologue, and a dz-on-load block's
    backward writes no dz (its conv's gradient kernels compute it as they load dy and z)."""
    notes = _deferral(net, readers, groups)
    deferred_outputs = {groups[i].output.id for i, (on, _) in notes.items() if on}
    # batch norm's sums of a deferred block come from its reader's input gradient (bn_sums_in_reader)
    by_output = {g.output.id: g for g in groups}
    summed = {o for o in deferred_outputs if any(n.op is Op.BATCHNORM for n in by_output[o].nodes)}
    out = []
    for i, g in enumerate(groups):
        on, note = notes.get(i, (False, None))
        forward, backward = g.forward, g.backward
        if on:
            forward = tuple(k for k in forward if k != "epilogue_fwd")
        on_load, gemm_pool = _dz_on_load(g), _gemm_pool(g)
        if gemm_pool:
            forward = ("conv_fwd+pool",)
            backward = ("pool_bwd_from_y",) + tuple(k for k in backward if k.startswith("conv_bwd"))
        if on_load:
            ops = {n.op for n in g.nodes}
            sums = ("epilogue_bwd+bn_sums",) if Op.ADD in ops else ("bn_bwd_reduce",) if Op.BATCHNORM in ops else ()
            dz_name = lambda k: f"gate+dz_on_load+{k.removeprefix('gate+')}" if k.startswith("gate+") \
                else f"dz_on_load+{k}"
            backward = sums + (("bn_bwd_merge",) if Op.BATCHNORM in ops else ()) + tuple(
                dz_name(k) for k in backward if k.removeprefix("gate+").startswith("conv_bwd")) + (
                ("gate_bwd",) if Op.GATE in ops else ())  # (a gate's own pass, after its reader's)
        prologue = g.rule in ("conv_block", "pool") and g.nodes[0].inputs[0] in deferred_outputs
        if prologue:
            forward = tuple(f"prologue+{k}" if k.startswith(("conv_fwd", "pool_fwd")) else k for k in forward)
            backward = tuple(f"prologue+{k}" if k.endswith("conv_bwd_weight") else k for k in backward)
        if g.output.id in summed:
            backward = tuple("bn_sums_in_reader" if k == "bn_bwd_reduce" else k for k in backward)
        out.append(replace(g, forward=forward, backward=backward, deferred=on, prologue=prologue,
                           dz_on_load=on_load, gemm_pool=gemm_pool, output_note=note))
    return out


def _redirected(readers, groups: list[Group]) -> list[Group]:
    """The groups with the two gradients of each value that two conv blocks read, one as its conv's
    input and the other as its shortcut (its add's) or its conv's input too, summed in the first
    one's input gradient (Group.token, .redirects)."""
    first = {g.nodes[0].id: i for i, g in enumerate(groups) if g.rule == "conv_block"}
    adds = {n.id: i for i, g in enumerate(groups) if g.rule == "conv_block" for n in g.nodes if n.op is Op.ADD}
    out = list(groups)
    for p, g in enumerate(groups):
        v = g.output.id
        rd = readers.get(v, [])
        at = sorted({first[n.id] if n.op is Op.CONV and n.inputs[0] == v and n.id in first else adds.get(n.id, -1)
                     for n in rd})
        if len(rd) != 2 or len(at) != 2 or at[0] < 0 or groups[at[0]].nodes[0].inputs[0] != v:
            continue
        a, b = at  # (a conv block adding v to a conv of its own that reads v too has one index)
        if groups[a].into is not None or any(n.op is Op.GATE for n in groups[a].nodes):
            continue
        out[a], out[b] = replace(out[a], token=True), replace(out[b], redirects=v)
        out[p] = replace(out[p], backward=out[p].backward + ("fork_sum_in_reader",))
    return out


def _placed(g: Group, into: int | None, in_place: tuple[int, ...], note: str | None) -> Group:
    """A group with zero-copy concatenation applied (slabs.py): a concat whose branches all wrote into
    its output launches nothing forward, and nothing backward where they all read their slices of
    its gradient in place."""
    if note is None:
        return replace(g, into=into)
    done = all(f > 0 for f in in_place)
    return replace(g, in_place=in_place, into_note=note, reason=None, inference=() if done else g.inference,
                   forward=() if done else g.forward, backward=() if all(f == 2 for f in in_place) else g.backward)


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
        groups = _cross_layer(net, readers, groups)
    if fuse:
        into, flags, notes = in_place(net, readers, groups)
        groups = [_placed(g, into.get(i), flags.get(g.output.id, ()), notes.get(g.output.id))
                  for i, g in enumerate(groups)]
    if fuse is True:
        groups = _redirected(readers, groups)
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
