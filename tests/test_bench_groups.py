"""`cnndsl bench --groups` without a GPU: every fused group of the plan is timed fused, as the
same layers unfused and through eager PyTorch, on one input, with the same weights: a row per
group and mode in the plan's order, the three outputs agreeing (so the three are wired to the
same layers and weights), the modelled bytes of plan.traffic, and the table and CSV. Marked
`gpu`: the same on a GPU in bf16."""

import csv
import itertools
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import cnndsl
from cnndsl import bench, bench_groups, bench_report
from cnndsl.cli import build_parser
from cnndsl.plan import plan, traffic

# A conv block, a residual add with a projected shortcut, an overlapping max pool (a group of
# its own), a dense block with dropout and one with the softmax: the kinds of group the
# networks have. SMALL: two groups, for what needs no more.
NET = """
network groups
input 3x4x4
conv 4 3 pad=1 bias=false
batchnorm
relu
residual {
    conv 4 3 pad=1 bias=false
    batchnorm
} shortcut {
    conv 4 1 bias=false
    batchnorm
}
relu
maxpool 3 stride=2
flatten
dense 5
relu
dropout 0.5
dense 3
softmax
"""
SMALL = """
network small
input 3x4x4
conv 4 3 pad=1 bias=false
batchnorm
relu
flatten
dense 3
softmax
"""


def setup(*times):
    """The CPU setup with a timer that answers `times` in turn, over and over (fused, unfused and
    eager for each group); the group bench has called the timed function once already."""
    cycle = itertools.cycle(times)
    return replace(bench.cpu_setup(), timer=lambda fn: (ms := next(cycle), ms, ms))


@pytest.mark.parametrize(("src", "dtype"), [(NET, "fp32"), (SMALL, "bf16")], ids=["fp32", "bf16"])
def test_every_group_is_timed_three_ways_on_the_same_layers(src, dtype):
    net = cnndsl.parse(src)
    groups = cnndsl.compile(net, backend="triton", fuse="block").plan.groups  # (timed alone: block-level)
    rows = bench_groups.run_groups(net, 2, dtype, setup=setup(4.0, 8.0, 2.0))
    assert [(r["group"], r["mode"]) for r in rows] == [(i, m) for m in bench.MODES for i in range(len(groups))]
    assert [r["ops"] for r in rows[:len(groups)]] == ["+".join(g.ops) for g in groups]
    assert dtype == "bf16" or "conv+batchnorm+add+activation" in [r["ops"] for r in rows]
    for r in rows:
        g = groups[r["group"]]
        assert r["name"] == g.name
        assert (r["fused_ms"], r["unfused_ms"], r["eager_ms"], r["vs_unfused"], r["vs_eager"]) == (4, 8, 2, 2, 0.5)
        moved, unmoved = traffic(net, g, 2, 4 if dtype == "fp32" else 2)[r["mode"]]
        assert (r["bytes_fused"], r["bytes_unfused"], r["bytes_saved"]) == (moved, unmoved, unmoved - moved)
        dropout = "dropout" in r["ops"] and r["mode"] == "training"
        # fp32 agrees to rounding; bf16 (truncated by the interpreter) within a few units in the last place
        assert (r["err"] is None) if dropout else r["err"] < (1e-5 if dtype == "fp32" else 0.05), r


def test_a_wrong_layer_shows_in_err():
    """The agreement column is a check: a group whose unfused run takes other weights differs."""
    net = cnndsl.parse(NET)
    models = bench_groups._models(net, torch.float32, "cpu")
    for m in models:
        m.eval()
    step = models[0].program.forward[0]
    with torch.no_grad():
        next(models[1].parameters()).mul_(2)  # the first conv's weight, unfused only
    row = bench_groups._group_row(net, models, step, 2, "fp32", "inference", setup(1.0))
    assert row["err"] > 0.1


def test_the_command_line_prints_and_writes_group_rows(tmp_path, capsys):
    src = tmp_path / "g.cnn"
    src.write_text(SMALL)
    args = build_parser().parse_args(["bench", str(src), "--groups", "--batch", "2", "--dtype", "fp32",
                                      "--csv", str(tmp_path / "g.csv")])
    assert bench.main(args, setup=setup(1.0, 3.0, 2.0)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["#", "group", "layers", "mode"]
    assert lines[1].split()[:3] == ["0", "conv1..relu1", "conv+batchnorm+activation"]
    assert "inference: all groups" in "\n".join(lines) and "3.00x" in lines[1] and "2.00x" in lines[1]
    with open(tmp_path / "g.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2 * 2  # two groups, two modes
    assert table[0]["ops"] == "conv+batchnorm+activation" and table[0]["vs_unfused"] == "3.0"


def test_the_groups_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = bench_groups.run_groups(cnndsl.parse(SMALL), 2, "fp32", ("inference",), setup(1.0, 3.0, 2.0))
    assert bench_report.plot(tmp_path / "g.png", rows) is None
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.gpu
def test_groups_on_the_gpu():
    """Each group of cifar_small, fused and unfused, computes eager's output in bf16 on the GPU
    (a few bf16 roundings apart), and each is timed."""
    net = cnndsl.parse(Path(__file__).resolve().parent.parent / "examples" / "cifar_small.cnn")
    rows = bench_groups.run_groups(net, 32, "bf16", setup=bench.Setup(copy_bytes=1 << 26, matmul_n=2048))
    assert len(rows) == 2 * len(plan(net, True).groups)
    assert all(r["fused_ms"] > 0 and r["unfused_ms"] > 0 and r["eager_ms"] > 0 for r in rows), rows
    assert all(r["err"] is None or r["err"] < 0.05 for r in rows), rows
