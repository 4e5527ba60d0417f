"""Zero-copy concatenation, planned: which branches of a concat write their output straight into
their channel slice of its output (the slab, kernels/concat.py), and why the others are copied
in by the concat's own step. A branch's last group writes in place when it is a conv block,
whose conv or epilogue pass stores y with the slab's pixel stride, that writes y whole (it does
not hand z on to a reader, nor pool in its GEMM in training, keeping y for backward) and whose
output nothing but the concat reads (the slab is the only copy of it).

An input that is copied in because other layers read it too (DenseNet's: each layer's input is
concatenated with its new channels and read by the layer) gets its gradient summed from its
readers' by the fork's add kernel, or with cross-layer fusion by the layer's batch norm backward
as it writes its own (cross_layer.redirected): either reads its slice of the concat's gradient
where it lies, so backward copies nothing out for it. Each input's state (plan.Group.in_place): COPIED,
WRITTEN (by its group, its gradient copied out), WRITTEN_READ (and its gradient read in place) or
SUMMED (copied in, its gradient's slice read in place by the fork's sum)."""

from . import ir
from .ir import Op

COPIED, WRITTEN, WRITTEN_READ, SUMMED = 0, 1, 2, 3


def _copied(net: ir.Network, readers, group, value: int) -> str | None:
    """Why the concat copies `value` (the output of `group`, None for the network's input) into its
    slice, or None where the group writes it there itself."""
    node = net.nodes[value]
    if group is None:
        return f"{node.name} is the network's input"
    if len(readers[value]) > 1:
        return f"{node.name} is also read by {', '.join(r.name for r in readers[value] if r.op is not Op.CONCAT)}" \
            if any(r.op is not Op.CONCAT for r in readers[value]) else f"{node.name} is concatenated twice"
    if group.rule != "conv_block":
        return f"{node.name} comes from a {group.rule} step, not a conv block"
    if group.gemm_pool:
        return f"{node.name}'s conv pools in the GEMM in training, keeping y for backward"
    if group.deferred:
        return f"{node.name} is handed on as z"
    return None


def reads_slice(group) -> bool:
    """Whether a writer's backward reads its slice of the concat's gradient where it lies (rows a
    concat's channels apart) rather than a copy: a conv alone, whose gradient GEMMs read dy, or one
    whose batch norm and activation backward runs on load without a shortcut (dz_on_load: the
    batch-norm sums pass and both GEMMs read dy), not depthwise. The others' passes read dy whole."""
    ops = {n.op for n in group.nodes}
    conv = next(n for n in group.nodes if n.op is Op.CONV).attrs
    if conv.groups > 1 and conv.groups == conv.filters:  # depthwise (one input channel a group)
        return False
    return ops == {Op.CONV} or (group.dz_on_load and Op.ADD not in ops)


def _note(placed: list[str], copied: list[str], sliced: int, branches: int, summed: list[str]) -> str:
    """What `cnndsl plan` says of a concat: which branches write into its output, why the others are
    copied, and how many read their slice of its gradient in place (SUMMED ones: their fork's sum)."""
    one = len(placed) == 1
    if not copied:
        note = "zero-copy: every branch's last group writes into its channel slice, nothing is copied"
    elif placed:
        note = (f"zero-copy: {len(placed)} of {branches} branches write{'s' if one else ''} into "
                f"{'its channel slice' if one else 'their channel slices'} ({', '.join(placed)}); "
                f"copied: {'; '.join(copied)}")
    else:
        note = f"zero-copy: no branch writes into its channel slice; copied: {'; '.join(copied)}"
    summed = "".join(f"; the sum of {name}'s gradients reads its slice there" for name in summed)
    if sliced == branches:
        return note + f"; in backward, every branch reads its slice of the gradient in place{summed}"
    if sliced:
        return note + (f"; in backward, {sliced} of {branches} branches read{'s' if sliced == 1 else ''} "
                       f"{'its slice' if sliced == 1 else 'their slices'} of the gradient in place{summed}")
    return note + "; in backward, each branch's slice of the gradient is copied out"


def in_place(net: ir.Network, readers, groups) -> tuple[dict[int, int], dict[int, tuple[int, ...]], dict[int, str]]:
    """(group index -> the concat node whose slab it writes into; concat node id -> each input's
    state (COPIED, WRITTEN, WRITTEN_READ, SUMMED); and what `cnndsl plan` says of the concat: why
    the others are copied)."""
    index = {g.output.id: i for i, g in enumerate(groups)}
    into, flags, notes = {}, {}, {}
    for node in net.nodes:
        if node.op is not Op.CONCAT:
            continue
        placed, copied, states = [], [], []
        for value in node.inputs:
            i = index.get(value)
            why = _copied(net, readers, None if i is None else groups[i], value)
            if why is None:
                into[i] = node.id
                placed.append(net.nodes[value].name)
                states.append(WRITTEN_READ if reads_slice(groups[i]) else WRITTEN)
            else:
                copied.append(why)
                states.append(SUMMED if len(readers[value]) > 1 else COPIED)
        if not placed:  # no slab (kernels/concat.py copies every input into a new tensor and out again)
            states = [COPIED] * len(states)
        flags[node.id] = tuple(states)
        summed = [net.nodes[v].name for v, s in zip(node.inputs, states) if s == SUMMED]
        notes[node.id] = _note(placed, copied, sum(s in (WRITTEN_READ, SUMMED) for s in states), len(node.inputs),
                               summed)
    return into, flags, notes
