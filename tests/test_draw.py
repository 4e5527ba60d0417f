"""`cnndsl draw`: the DOT text of every example parses as DOT (pydot), has a node per layer and an
edge per input, each fused group of the plan as one cluster holding exactly its layers; names are
escaped; .svg/.png go through Graphviz's dot where it is installed, with a clear error where not."""

import shutil
from pathlib import Path

import pydot
import pytest

import cnndsl
from cnndsl.cli import main
from cnndsl.draw import dot
from cnndsl.plan import plan

# branches (googlenet), dense concatenation (densenet121), gates (efficientnet_b0), shortcuts (resnet18)
EXAMPLES = [Path(__file__).resolve().parents[1] / "examples" / f"{name}.cnn"
            for name in ("digits", "resnet18", "googlenet", "densenet121", "efficientnet_b0")]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_group_is_one_cluster(path):
    net = cnndsl.parse(path)
    fused = plan(net, True)
    groups = fused.groups
    graph, = pydot.graph_from_dot_data(dot(net, fused))
    clusters = graph.get_subgraphs()
    assert len(clusters) == len(groups)
    for cluster, group in zip(clusters, groups):
        assert [n.get_name() for n in cluster.get_nodes()] == [f"n{node.id}" for node in group.nodes]
    edges = {(e.get_source(), e.get_destination()) for e in graph.get_edges()}
    assert edges == {(f"n{i}", f"n{node.id}") for node in net.nodes[1:] for i in node.inputs}


def test_labels_show_shapes_and_strings_are_escaped():
    net = cnndsl.parse('network q\ninput 1x8x8\nstem: conv 4 3 pad=1\nflatten\ndense 2\n')
    text = dot(net, plan(net, False))
    assert '"stem\\nconv\\n4x8x8\\n40 params"' in text
    assert 'digraph "q"' in text and "cluster_" in text


def test_the_command_line_writes_dot_and_renders_with_graphviz(tmp_path, capsys):
    src = EXAMPLES[0]
    assert main(["draw", str(src), "-o", str(tmp_path / "net.dot")]) == 0
    assert pydot.graph_from_dot_file(str(tmp_path / "net.dot"))
    assert main(["draw", str(src), "--no-fuse"]) == 0 and "digraph" in capsys.readouterr().out
    if shutil.which("dot") is None:
        assert main(["draw", str(src), "-o", str(tmp_path / "net.svg")]) == 1
        assert "needs Graphviz's `dot` program" in capsys.readouterr().err
    else:
        assert main(["draw", str(src), "-o", str(tmp_path / "net.svg")]) == 0
        assert (tmp_path / "net.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    assert main(["draw", str(src), "-o", str(tmp_path / "net.pdf")]) == 1
    assert "name it *.dot, *.svg or *.png" in capsys.readouterr().err
