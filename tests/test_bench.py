"""`cnndsl bench` without a GPU: the whole-network benchmark's plumbing on the CPU (the kernels
in Triton's interpreter, a fixed timer, torch.compile traced by dynamo only): every provider
and mode has its row, the roofline column is the plan's modelled bytes or FLOPs over the
ceilings measured in the run, eager channels_last and the fixed-gradient training step of a
network without class scores compute what eager NCHW does, the memory bound refuses a batch
before allocating, and the command line writes its CSV and plot. Marked `gpu`: the same on a
GPU with do_bench, plain and replayed as CUDA graphs."""

import csv
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import cnndsl
from cnndsl import bench, bench_report
from cnndsl.cli import build_parser, main
from cnndsl.plan import plan, traffic
from cnndsl.shapes import macs

from helpers import assert_close

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CLASSIFIER = """
network small
input 3x4x4
conv 4 3 pad=1 bias=false
batchnorm
relu
maxpool 2
flatten
dense 3
softmax
"""
BLOCK = """
network block
input 3x6x6
conv 4 3 pad=1 bias=false
batchnorm
relu
maxpool 2
"""


def fixed_timer(fn):
    """(median, p20, p80) = (2, 1, 3) ms; measure() has called `fn` once already."""
    return 2.0, 1.0, 3.0


SETUP = replace(bench.cpu_setup(), timer=fixed_timer, warmup=True)


def test_every_provider_and_mode_has_a_row_with_its_roofline():
    net = cnndsl.parse(CLASSIFIER)
    roof = {"copy_gb_s": 10.0, "matmul_tflop_s": 0.001, "copy_bytes": 1, "matmul_n": 1}
    rows = bench.run(net, 2, "fp32", setup=SETUP, roof=roof)
    assert [(r["provider"], r["mode"]) for r in rows] == [(p, m) for p in bench.PROVIDERS for m in bench.MODES]
    flops = 2 * 2 * sum(macs(net, n) for n in net.nodes[1:])
    for r in rows:
        moved = sum(traffic(net, g, 2, 4)[r["mode"]][0] for g in plan(net, True).groups)
        work = flops * (3 if r["mode"] == "training" else 1)
        floor = max(moved / 10.0 / 1e6, work / 0.001 / 1e9)
        assert (r["model_bytes"], r["flops"], r["median_ms"], r["p20_ms"], r["p80_ms"]) == (moved, work, 2, 1, 3)
        assert r["floor_ms"] == round(floor, 4) and r["roofline_pct"] == round(100 * floor / 2.0, 1)
        assert r["gpu"] == "cpu" and r["graph"] is False and r["shape"] == "2x3x4x4"
    text = bench_report.table(rows)
    assert text.splitlines()[0].split() == ["provider", "mode", "median", "ms", "p20", "p80", "TFLOP/s", "roofline",
                                            "vs", "eager"]
    assert "eager_cl  training" in text and "1.00x" in text and "both measured in this run" in text


def test_the_ceilings_are_measured_with_the_timer():
    roof = bench.ceilings(replace(SETUP, copy_bytes=1000, matmul_n=10), torch.float32)
    # 2,000 bytes moved in 2 ms; 2,000 FLOPs in 2 ms
    assert roof == {"copy_gb_s": 0.001, "matmul_tflop_s": 1e-06, "copy_bytes": 1000, "matmul_n": 10}


def _grads(src: str, provider: str):
    """The parameter gradients of one training step of `provider` (seeded weights and inputs)."""
    net = cnndsl.parse(src)
    model = bench.provider_model(net, provider, SETUP, torch.float32)
    step = bench.provider_step(model, provider, "training", *bench.inputs(net, 2, torch.float32, "cpu"), SETUP)
    step()
    return model, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("provider", ["eager_cl", "fused", "compile"])
@pytest.mark.parametrize("src", [CLASSIFIER, BLOCK], ids=["loss", "output-gradient"])
def test_a_training_step_computes_what_eager_does(src, provider):
    _, want = _grads(src, "eager")
    model, got = _grads(src, provider)
    assert want and got.keys() == want.keys()
    for name, g in got.items():
        assert_close(g, want[name], reduction=64, depth=8, name=name)
    if provider == "eager_cl":
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)


class _Small(bench.Setup):
    """A GPU with 1 GiB free."""

    def free_memory(self):
        return 1 << 30

    def device_name(self):
        return "a small GPU"


def test_a_batch_beyond_the_free_memory_is_refused_before_allocating(monkeypatch):
    for allocating in ("compile", "ceilings"):
        monkeypatch.setattr(bench.api if allocating == "compile" else bench, allocating,
                            lambda *a, **k: pytest.fail("allocated before the check"))
    net = cnndsl.parse(EXAMPLES / "resnet18.cnn")
    with pytest.raises(cnndsl.CnnInputError) as err:
        bench.run(net, 64, "bf16", setup=_Small(device="cuda:0"))
    # 16.8 MB of bf16 outputs per image (cnndsl check: 33.5 MB in fp32) x 64 x 2, and 3 x 23.4 MB of weights
    assert ("bench: resnet18 at batch 64 in bf16 needs about 2.1 GiB on the GPU (every layer's output and its "
            "gradient, the weights three times), more than the 1.0 GiB free on a small GPU; use a smaller --batch"
            ) in str(err.value)


def _cli(tmp_path, *extra):
    src = tmp_path / "small.cnn"
    src.write_text(CLASSIFIER)
    return build_parser().parse_args(["bench", str(src), "--batch", "2", "--dtype", "fp32", *map(str, extra)])


def test_the_command_line_writes_csv_and_plot(tmp_path, capsys, monkeypatch):
    args = _cli(tmp_path, "--providers", "eager", "eager_cl", "--csv", tmp_path / "b.csv", "--plot", tmp_path / "b.png")
    assert (args.providers, args.groups, args.cuda_graph) == (["eager", "eager_cl"], False, False)
    monkeypatch.setattr(bench_report, "_pyplot", lambda: None)  # without matplotlib: a note, not an error
    for _ in range(2):
        assert bench.main(args, setup=SETUP) == 0
    out, err = capsys.readouterr()
    assert out.count("eager_cl  inference") == 2
    assert "no plot written to" in err and "matplotlib is not installed" in err
    with open(tmp_path / "b.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["provider"] for r in table] == ["eager", "eager", "eager_cl", "eager_cl"] * 2  # appended, one header
    assert {r["median_ms"] for r in table} == {"2.0"}


def test_a_csv_of_other_columns_is_refused(tmp_path):
    (tmp_path / "b.csv").write_text("network,group,name\nx,0,y\n")
    args = _cli(tmp_path, "--providers", "eager", "--csv", tmp_path / "b.csv")
    with pytest.raises(cnndsl.CnnInputError, match=r"--csv .*b\.csv: the file has 3 columns \(network, group, name"):
        bench.main(args, setup=SETUP)
    for text in (b"network,\xff\xfe\n", b"x" * 200_000 + b"\n"):  # not UTF-8; a field past csv's limit
        (tmp_path / "b.csv").write_bytes(text)
        with pytest.raises(cnndsl.CnnInputError, match=r"--csv .*b\.csv: not a CSV file of benchmark rows"):
            bench.main(args, setup=SETUP)


def test_the_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = bench.run(cnndsl.parse(CLASSIFIER), 2, "fp32", ("eager", "eager_cl"), setup=SETUP)
    assert bench_report.plot(tmp_path / "b.png", rows) is None
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("extra", "message"), [(["--groups", "--providers", "fused"], "--providers does not apply"),
                                                (["--cuda-graph"], "--cuda-graph needs a CUDA device, not cpu"),
                                                (["--batch", "0"], "--batch must be from 1 to 2,147,483,647, got 0")])
def test_bad_options_are_refused(tmp_path, extra, message):
    with pytest.raises(cnndsl.CnnInputError, match=message):
        bench.main(_cli(tmp_path, *extra), setup=SETUP)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine without a GPU's order of errors")
@pytest.mark.parametrize(("extra", "message"), [(["--groups", "--providers", "fused"], "--providers does not apply"),
                                                (["--batch", "0"], "--batch must be from 1 to 2,147,483,647, got 0")])
def test_bad_options_are_named_before_the_missing_gpu(tmp_path, capsys, extra, message):
    """Without a GPU the command line still names a bad option (docs/reliability.md), not the GPU."""
    src = tmp_path / "small.cnn"
    src.write_text(CLASSIFIER)
    assert main(["bench", str(src), *extra]) == 1
    err = capsys.readouterr().err
    assert f"input error: {message}" in err and "needs a CUDA GPU" not in err


def test_the_providers_option_offers_every_provider():
    bench_parser = build_parser()._subparsers._group_actions[0].choices["bench"]
    option = next(a for a in bench_parser._actions if a.dest == "providers")
    assert tuple(option.choices) == bench.PROVIDERS


@pytest.mark.gpu
@pytest.mark.parametrize("graph", [False, True], ids=["plain", "cuda-graph"])
def test_bench_on_the_gpu(graph):
    net = cnndsl.parse(EXAMPLES / "cifar_small.cnn")
    setup = bench.Setup(graph=graph, copy_bytes=1 << 26, matmul_n=2048)
    rows = bench.run(net, 32, "bf16", setup=setup)
    assert len(rows) == len(bench.PROVIDERS) * len(bench.MODES)
    assert all(0 < r["median_ms"] < 1000 and r["roofline_pct"] > 0 for r in rows), rows
    print(bench_report.table(rows), file=sys.stderr)
