"""Cross-layer fusion's planning (plan.py calls it with fuse=True): which blocks defer their epilogue
to their reader (`Group.deferred`, the reader's `prologue`) and say why in `Group.output_note`;
which compute dz on load in backward (`dz_on_load`) or pool in their GEMM (`gemm_pool`, and then
whether their gradients route the pooled dy to dz on load too); where a deferred block's batch-norm
sums come from its reader's input gradient (`bn_sums_in_reader`); and where a value's two gradients,
from two conv blocks (or a deferring batch norm and a concat), are summed in the first one's
backward (`token`, `redirects`: `fork_sum_in_reader`)."""

from __future__ import annotations  # (Group: plan.py's, which imports this module)

from dataclasses import replace
from typing import TYPE_CHECKING

from . import ir
from .ir import Op
from .ops.activation import act
from .specs import MIN_GEMM_K
from .traffic import input_grad_phases

if TYPE_CHECKING:
    from .plan import Group


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
    return _wide(g) and (first.inputs[0] == 0 or input_grad_phases(first.attrs) <= (2 if Op.ADD in ops else 1))


def _wide(g: Group) -> bool:
    """Whether a block's conv has 16 or more output channels per group, as dz on load needs (fewer
    are padded with zeros, which no GEMM reads as dz on load; a depthwise conv has one)."""
    conv = next(n for n in g.nodes if n.op is Op.CONV).attrs
    return conv.filters // conv.groups >= MIN_GEMM_K


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


def cross_layer(net: ir.Network, readers, groups: list[Group]) -> list[Group]:
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
            # with 16+ channels its gradient GEMMs read the pooled dy, argmax and y (each a quarter of
            # dz or less for a 2x2 window) where they read dz, and the pass that wrote dz goes
            forward, on_load = ("conv_fwd+pool",), _wide(g)
            convs = tuple(k for k in backward if k.startswith("conv_bwd"))
            backward = tuple(f"pooled_dz_on_load+{k}" for k in convs) if on_load else ("pool_bwd_from_y",) + convs
        elif on_load:
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


def redirected(readers, groups: list[Group]) -> list[Group]:
    """The groups with the two gradients of each value that two layers read summed in the first
    one's backward (Group.token, .redirects): two conv blocks, one reading it as its conv's input
    and the other as its shortcut (its add's) or its conv's input too, summed in the first one's
    input gradient; or a deferring batch norm and activation (DenseNet's) and a concat that copies
    it, whose gradient slice the batch norm's backward pass adds as it writes its own (bn_act_bwd)."""
    first = {g.nodes[0].id: i for i, g in enumerate(groups) if g.rule == "conv_block"}
    first.update({g.nodes[0].id: i for i, g in enumerate(groups) if g.rule == "norm_act" and g.deferred
                  and "bn_act_bwd" in g.backward})
    adds = {n.id: i for i, g in enumerate(groups) if g.rule == "conv_block" for n in g.nodes if n.op is Op.ADD}
    adds.update({g.output.id: i for i, g in enumerate(groups) if g.output.op is Op.CONCAT})
    out = list(groups)
    for p, g in enumerate(groups):
        v = g.output.id
        rd = readers.get(v, [])
        at = sorted({first[n.id] if n.op in (Op.CONV, Op.BATCHNORM) and n.inputs[0] == v and n.id in first
                     else adds.get(n.id, -1) for n in rd})
        if len(rd) != 2 or len(at) != 2 or at[0] < 0 or groups[at[0]].nodes[0].inputs[0] != v:
            continue
        a, b = at  # (a conv block adding v to a conv of its own that reads v too has one index)
        if groups[a].into is not None or any(n.op is Op.GATE for n in groups[a].nodes):
            continue
        # a concat's gradient slice goes to a norm_act's bn_act_bwd only (a conv block's epilogue would copy
        # it whole first), and the concat must come second: it sends, it holds no token
        if groups[a].output.op is Op.CONCAT or (groups[a].rule == "norm_act") != (groups[b].output.op is Op.CONCAT):
            continue
        out[a], out[b] = replace(out[a], token=True), replace(out[b], redirects=v)
        out[p] = replace(out[p], backward=out[p].backward + ("fork_sum_in_reader",))
    return out
