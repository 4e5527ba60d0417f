"""`cnndsl draw`: a picture of the network. Each layer is a node showing its name, its word in
the .cnn file and its output shape (with the parameters where it has any); edges follow the
data, so branches, concatenations and residual shortcuts show as they run; each fused group of
the plan (`cnndsl plan`) is a cluster, labelled with its rule and its kernels.

The text is Graphviz's DOT language, always; `-o net.svg` or `-o net.png` runs Graphviz's `dot`
on it, which must then be installed. Every string from the .cnn file is quoted and escaped."""

import shutil
import subprocess
from pathlib import Path

from . import ir
from .errors import CnnInputError
from .files import write_file
from .ops.base import fmt
from .plan import Plan
from .shapes import params
from .summary import _op

FORMATS = (".dot", ".gv", ".svg", ".png")
DOT_TIMEOUT_S = 120  # a network of thousands of layers renders in seconds


def _quote(text: str) -> str:
    """A DOT string: quotes and backslashes escaped, line breaks as DOT's \\n."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _label(net: ir.Network, node: ir.Node) -> str:
    if node.id == 0:
        return f"input\n{fmt(node.shape)}"
    count = params(net, node)
    extra = f"\n{count:,} params" if count else ""
    return f"{node.name}\n{_op(net, node)}\n{fmt(node.shape)}{extra}"


def dot(net: ir.Network, plan: Plan) -> str:
    """The DOT text of `net` with the fused groups of `plan` as clusters."""
    lines = [f"digraph {_quote(net.name)} {{", "  rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fillcolor="#f7f7f7", fontname="Helvetica", fontsize=10];',
             '  edge [color="#555555"];', f"  n0 [label={_quote(_label(net, net.nodes[0]))}, shape=ellipse];"]
    for i, group in enumerate(plan.groups):
        kernels = ", ".join(group.inference) or "no kernel"
        lines.append(f"  subgraph cluster_{i} {{")
        lines.append(f"    label={_quote(f'group {i}: {group.rule} ({kernels})')}; style=\"rounded,dashed\"; "
                     'color="#3b7dd8"; fontname="Helvetica"; fontsize=9;')
        lines += [f"    n{node.id} [label={_quote(_label(net, node))}];" for node in group.nodes]
        lines.append("  }")
    for node in net.nodes[1:]:
        lines += [f"  n{i} -> n{node.id};" for i in node.inputs]
    lines.append("}")
    return "\n".join(lines) + "\n"


def write(text: str, output: str | Path) -> Path:
    """`text` (DOT) to `output`: as it is for .dot/.gv, rendered by Graphviz's `dot` for .svg/.png."""
    output = Path(output)
    if output.suffix not in FORMATS:
        raise CnnInputError(f"draw: cannot tell the format of {output}; name it *.dot, *.svg or *.png")
    if output.suffix in (".dot", ".gv"):
        write_file(output, text)
        return output
    program = shutil.which("dot")
    if program is None:
        raise CnnInputError(f"draw: {output.suffix} needs Graphviz's `dot` program, which is not installed (apt "
                            "install graphviz, brew install graphviz or conda install graphviz); -o net.dot writes "
                            "the graph without it")
    try:
        run = subprocess.run([program, f"-T{output.suffix[1:]}"], input=text.encode(),
                             capture_output=True, timeout=DOT_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise CnnInputError(f"draw: Graphviz's dot took more than {DOT_TIMEOUT_S} s; write -o net.dot") from None
    if run.returncode != 0:
        raise CnnInputError(f"draw: Graphviz's dot failed: {run.stderr.decode(errors='replace').strip()[:300]}")
    write_file(output, run.stdout)  # (renamed over the target: a link planted there is replaced)
    return output
