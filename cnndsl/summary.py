"""The torchinfo-style summary of a Network: a table of layers with output shapes,
parameters and multiply-adds, totals, BN buffers counted apart; and the same as JSON."""

from . import ir
from .plan import no_kernel
from .shapes import buffers, macs, numel, params

_BYTES_FP32 = 4


def _totals(net: ir.Network) -> dict:
    nodes = net.nodes[1:]
    return {
        "total_params": sum(params(net, n) for n in nodes),
        "bn_buffers": sum(buffers(net, n) for n in nodes),
        "macs": sum(macs(net, n) for n in nodes),
        "activation_bytes": _BYTES_FP32 * sum(numel(n.shape) for n in net.nodes),
    }


def _op(net: ir.Network, n: ir.Node) -> str:
    """The summary's op column: the layer's word; a join names its operands' channels."""
    if n.op is ir.Op.ADD:
        return "add"
    if n.op is ir.Op.CONCAT:
        return "concat(" + " + ".join(str(net.nodes[i].shape[0]) for i in n.inputs) + ")"
    return n.keyword


def summary_json(net: ir.Network) -> dict:
    """One JSON-able dict: name, input, layers, totals (per sample where it applies)."""
    layers = [{"name": n.name, "op": "add" if n.op is ir.Op.ADD else n.keyword,
               "output_shape": list(n.shape), "params": params(net, n), "macs": macs(net, n),
               "inputs": [net.nodes[i].name for i in n.inputs], "line": n.span.line if n.span else None}
              for n in net.nodes[1:]]
    return {"name": net.name, "input": list(net.input_shape), "output": list(net.output_shape),
            "layers": layers, **_totals(net)}


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def summary_table(net: ir.Network) -> str:
    rows = [(n.name, _op(net, n), "x".join(map(str, n.shape)),
             f"{params(net, n):,}", f"{macs(net, n):,}") for n in net.nodes]
    head = ("Layer", "Op", "Output shape", "Params", "Mult-adds")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    fmt = "  ".join(f"{{:{'<' if i < 3 else '>'}{w}}}" for i, w in enumerate(widths))
    rule = "=" * len(fmt.format(*head))
    t = _totals(net)
    lines = [(f"network {net.name}: input {'x'.join(map(str, net.input_shape))} -> "
             f"output {'x'.join(map(str, net.output_shape))}"), rule, fmt.format(*head), "-" * len(rule),
             *(fmt.format(*r) for r in rows), rule,
             f"Total params: {t['total_params']:,}",
             f"BN buffers (running mean and variance, not trained): {t['bn_buffers']:,}",
             f"Mult-adds per sample: {_human(t['macs'])}",
             f"Activation memory per sample (fp32 outputs): {_human(t['activation_bytes'], 'B')}"]
    return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f}"


def plan_json(net: ir.Network, fused, unfused, batch: int, itemsize: int, train: bool) -> dict:
    """`cnndsl plan --json`: the fused groups, their kernels and modelled bytes, and the totals
    of both plans."""
    from .plan import traffic
    mode = "training" if train else "inference"
    groups = []
    redirecting = {h.redirects: h.name for h in fused.groups if h.redirects is not None}
    for g in fused.groups:
        moved = traffic(net, g, batch, itemsize)[mode]
        groups.append({"name": g.name, "rule": g.rule, "ops": list(g.ops),
                       "kernels": list(g.forward + g.backward if train else g.inference),
                       "bytes": moved[0], "unfused_bytes": moved[1], "not_fused_further": g.reason,
                       "deferred": g.deferred, "training_output": g.output_note, "dz_on_load": g.dz_on_load,
                       "gemm_pool": g.gemm_pool, "into": None if g.into is None else net.nodes[g.into].name,
                       "zero_copy": g.into_note,
                       # (training) the reader whose gradient of the same input its input gradient adds
                       "adds_gradient_of": redirecting.get(g.nodes[0].inputs[0]) if g.token else None})
    return {"network": net.name, "mode": mode, "fusion": fused.level, "batch": batch, "bytes_per_element": itemsize,
            "groups": groups, "fused_groups": len(fused.groups), "unfused_groups": len(unfused.groups),
            "fused_kernels": sum(len(g["kernels"]) for g in groups),
            "unfused_kernels": sum(len(g.forward + g.backward if train else g.inference) for g in unfused.groups),
            "bytes": sum(g["bytes"] for g in groups), "unfused_bytes": sum(g["unfused_bytes"] for g in groups)}


MAX_LABEL = 48  # characters of a group's name in the plan's table (--json has it whole)


def short_label(name: str) -> str:
    """A group's name for the plan's table: "first..last" with the last layer's dotted path written
    from where it leaves the first's (`b.c1.conv..b.c1.relu1` -> `b.c1.conv..relu1`), then cut in
    the middle to MAX_LABEL characters (a name's start says where, its end which layer)."""
    first, sep, last = name.partition("..")
    if sep:
        a, b = first.split("."), last.split(".")
        common = next((i for i, (x, y) in enumerate(zip(a[:-1], b[:-1])) if x != y), min(len(a), len(b)) - 1)
        name = f"{first}..{'.'.join(b[common:])}"
    if len(name) <= MAX_LABEL:
        return name
    head = MAX_LABEL // 3
    return f"{name[:head]}...{name[-(MAX_LABEL - head - 3):]}"


def group_labels(names) -> tuple[list[str], int]:
    """The short_labels of groups' names and the width of a table's column of them (its heading, "group")."""
    labels = [short_label(n) for n in names]
    return labels, max(map(len, ["group", *labels]))


def plan_table(net: ir.Network, fused, unfused, batch: int, itemsize: int, train: bool) -> str:
    """`cnndsl plan`: one row per fused group with its ops, kernels and modelled MB moved."""
    from .plan import training_notes
    j = plan_json(net, fused, unfused, batch, itemsize, train)
    level = "" if j["fusion"] == "fused" else ", block-level fusion"  # the default level goes unsaid
    lines = [(f"plan for {net.name} ({j['mode']}{level}, batch {batch}, {itemsize}-byte elements): "
              f"{j['fused_groups']} fused groups ({j['unfused_groups']} unfused), "
              f"{j['fused_kernels']} kernels ({j['unfused_kernels']} unfused)"),
             ""]
    labels, width = group_labels(g["name"] for g in j["groups"])
    lines[-1] = f"  {'#':>3}  {'group':<{width}} {'ops':<36} {'MB fused':>9} {'unfused':>9}  kernels"
    for i, (g, group, label) in enumerate(zip(j["groups"], fused.groups, labels)):
        lines.append(f"  {i:>3}  {label:<{width}} {'+'.join(g['ops'])[:36]:<36} {_mb(g['bytes']):>9} "
                     f"{_mb(g['unfused_bytes']):>9}  {', '.join(g['kernels']) or no_kernel(g['zero_copy'])}")
        if g["not_fused_further"]:
            lines.append(f"       not fused further: {g['not_fused_further']}")
        if train and g["training_output"]:
            lines.append(f"       {g['training_output']}")
        if train:
            lines += [f"       {note}" for note in training_notes(group)]
        if train and g["adds_gradient_of"]:
            where = "input gradient" if "conv" in g["ops"] else "backward pass"  # (a norm_act group's: bn_act_bwd)
            lines.append(f"       its {where} adds {g['adds_gradient_of']}'s gradient of the same input: "
                         "no pass sums the two")
        if g["into"]:
            lines.append(f"       zero-copy: writes its output into its channel slice of {g['into']}")
        if g["zero_copy"]:
            lines.append(f"       {g['zero_copy']}")
    lines.append(f"  total MB moved: {_mb(j['bytes'])} fused, {_mb(j['unfused_bytes'])} unfused "
                 f"({j['unfused_bytes'] / max(j['bytes'], 1):.2f}x); a model: each kernel reads its inputs "
                 "and writes its outputs once (docs/fusion.md)")
    return "\n".join(lines)
