"""The fusion planner (plan.RULES): one test per rule and per reason a chain stops, the
cifar_small group counts, `model.plan` against `cnndsl plan`, and generated networks
covering every optional stage of every rule, fused = unfused = reference."""

import json
import random
from pathlib import Path

import pytest
import torch

import cnndsl
from cnndsl.cli import main
from cnndsl.plan import plan
from cnndsl.summary import MAX_LABEL, short_label

from helpers import run_both

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _groups(src, fuse=True):
    return [g.ops for g in plan(cnndsl.parse(src), fuse).groups]


def _net(*layers, shape="3x8x8"):
    return "network t\ninput " + shape + "\n" + "\n".join(layers) + "\n"


def test_conv_block_takes_every_stage():
    src = _net("conv 4 3 pad=1", "residual {", "conv 4 3 pad=1", "batchnorm", "relu", "conv 4 3 pad=1",
               "batchnorm", "}", "relu", "maxpool 2", "flatten", "dense 3")
    groups = plan(cnndsl.parse(src)).groups
    assert [g.ops for g in groups] == [
        ("conv",), ("conv", "batchnorm", "activation"), ("conv", "batchnorm", "add", "activation", "pool"),
        ("flatten", "dense")]
    assert [g.rule for g in groups] == ["conv_block", "conv_block", "conv_block", "dense_block"]
    assert groups[2].inference == ("bn_fold", "conv_fwd+epilogue")


def test_projection_shortcut_runs_before_the_add():
    src = _net("conv 4 3", "residual {", "conv 8 3 stride=2 pad=1", "relu", "conv 8 3 pad=1", "} shortcut {",
               "conv 8 1 stride=2", "batchnorm", "}", "tanh", "flatten", "dense 3")
    ops = _groups(src)
    # the shortcut's group (conv+batchnorm) comes before the branch's last conv, whose epilogue adds it
    assert ops[2:4] == [("conv", "batchnorm"), ("conv", "add", "activation")]


def test_dense_block_takes_activation_dropout_and_softmax():
    src = _net("flatten", "dense 10", "leaky_relu 0.1", "dropout 0.5", "dense 5", "softmax")
    assert _groups(src) == [("flatten", "dense", "activation", "dropout"), ("dense", "softmax")]


def test_flatten_is_a_view_of_a_1x1_map():
    src = _net("global_avgpool", "flatten", "dense 4")
    g = plan(cnndsl.parse(src)).groups
    assert [x.ops for x in g] == [("global_avgpool",), ("flatten", "dense")]
    assert g[1].inference == ("dense_fwd",)


@pytest.mark.parametrize(("pool", "words"), [("maxpool 3 stride=2 pad=1", "overlap"),
                                             ("avgpool 2 stride=1", "overlap"),
                                             ("maxpool 5", "exceeds the 16 taps")])
def test_a_pool_that_cannot_fuse_is_its_own_group(pool, words):
    src = _net("conv 4 3 pad=1", "relu", pool, "flatten", "dense 3", shape="3x10x10")
    groups = plan(cnndsl.parse(src)).groups
    assert [g.ops for g in groups][:2] == [("conv", "activation"), ("pool",)]
    assert words in groups[0].reason and "pool1" in groups[0].reason


def test_a_wide_softmax_is_its_own_group():
    groups = plan(cnndsl.parse(_net("flatten", "dense 1500", "softmax"))).groups
    assert [g.ops for g in groups] == [("flatten", "dense"), ("softmax",)]
    assert "1500 classes exceed" in groups[0].reason


def test_a_value_read_twice_ends_the_chain():
    src = _net("conv 4 3 pad=1", "batchnorm", "residual {", "relu", "conv 4 3 pad=1", "}", "flatten", "dense 3")
    groups = plan(cnndsl.parse(src)).groups
    assert groups[0].ops == ("conv", "batchnorm")
    assert "also read by" in groups[0].reason


def test_unfused_plan_is_one_op_per_group():
    net = cnndsl.parse(EXAMPLES / "resnet18.cnn")
    groups = plan(net, fuse=False).groups
    assert [g.nodes[0].id for g in groups] == [n.id for n in net.nodes[1:]]
    assert all(len(g.nodes) == 1 and g.reason is None for g in groups)


def test_cifar_small_fuses_to_at_most_six_groups():
    net = cnndsl.parse(EXAMPLES / "cifar_small.cnn")
    fused, unfused = plan(net, True).groups, plan(net, False).groups
    assert len(fused) <= 6 and len(unfused) >= 10, (len(fused), len(unfused))
    assert len(fused) == 5 and len(unfused) == 13


def test_model_plan_is_the_cli_plan(capsys):
    model = cnndsl.compile(EXAMPLES / "cifar_small.cnn", device="cpu")
    assert main(["plan", str(EXAMPLES / "cifar_small.cnn"), "--json", "--train", "--batch", "8"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert [g["name"] for g in j["groups"]] == [g.name for g in model.plan.groups]
    assert [g["kernels"] for g in j["groups"]] == [list(g.forward + g.backward) for g in model.plan.groups]
    assert j["fused_groups"] == 5 and j["unfused_groups"] == 13 and j["mode"] == "training"
    assert 0 < j["bytes"] < j["unfused_bytes"]
    assert j["fused_kernels"] < j["unfused_kernels"]


def test_plan_table_says_why(capsys):
    assert main(["plan", str(EXAMPLES / "resnet18.cnn")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan for resnet18 (inference, batch 1, 4-byte elements): 23 fused groups (70 unfused)")
    assert "not fused further: maxpool1 (pool) does not fuse: its windows overlap" in out
    assert "total MB moved" in out


@pytest.mark.parametrize(("name", "label"), [
    ("conv1", "conv1"), ("conv1..relu1", "conv1..relu1"),
    ("inception3a.concat1.branch2.conv_bn1.conv..inception3a.concat1.branch2.conv_bn1.relu1",
     "inception3a.concat1.branch2.conv_bn1.conv..relu1"),
    ("a.b.x..a.c.y", "a.b.x..c.y"),
    ("block" + ".inner" * 20 + ".conv..block" + ".inner" * 20 + ".relu", "block.inner.inne....inner.inner.inner.conv..relu")])
def test_the_table_labels_a_group_by_its_first_layer_and_where_its_last_leaves_it(name, label):
    assert short_label(name) == label and len(label) <= MAX_LABEL


def test_the_plan_table_tells_googlenets_branches_apart(capsys):
    assert main(["plan", str(EXAMPLES / "googlenet.cnn")]) == 0
    rows = [line.split()[1] for line in capsys.readouterr().out.splitlines()[2:] if line[:6].strip().isdigit()]
    assert "inception3a.concat1.branch2.conv_bn1.conv..relu1" in rows and len(set(rows)) == len(rows)


def test_plan_rejects_a_bad_batch(capsys):
    assert main(["plan", str(EXAMPLES / "lenet5.cnn"), "--batch", "0"]) == 1
    assert "--batch must be from 1 to 2,147,483,647, got 0" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_bench_needs_a_gpu(capsys):
    assert main(["bench", str(EXAMPLES / "lenet5.cnn")]) == 1
    assert "cnndsl bench needs a CUDA GPU" in capsys.readouterr().err


ACTS = ["relu", "leaky_relu 0.2", "sigmoid", "tanh", "gelu", "silu"]


def _generated(seed: int) -> str:
    """A small network whose conv and dense blocks each take a random subset of their rule's
    optional stages; every stage appears across the seeds used below."""
    r = random.Random(seed)
    lines = ["conv 6 3 pad=1"]
    for _ in range(2):
        # a conv's bias before training batch norm has a zero gradient: compared as noise, so none
        bn = r.random() < 0.6
        body = ["conv 6 3 pad=1" + (" bias=false" if bn else ""), *(["batchnorm"] if bn else []),
                *([r.choice(ACTS)] if r.random() < 0.7 else [])]
        if r.random() < 0.6:
            lines += ["residual {", *body, "conv 6 3 pad=1 bias=false", "batchnorm", "}"]
        else:
            lines += body
        if r.random() < 0.7:
            lines.append(r.choice(ACTS))
        if r.random() < 0.5:
            lines.append(r.choice(["maxpool 2", "avgpool 2", "maxpool 1x2", "avgpool 3 stride=1 pad=1"]))
    lines += ["flatten", "dense 9", r.choice(ACTS), "dropout 0.4", "dense 5"]
    if r.random() < 0.5:
        lines.append("softmax")
    return _net(*lines, shape="2x7x8")


SEEDS = range(6)


def test_generated_networks_cover_every_stage():
    ops = {op for s in SEEDS for g in plan(cnndsl.parse(_generated(s))).groups if len(g.ops) > 1
           for op in g.ops}
    assert ops == {"conv", "batchnorm", "activation", "add", "pool", "flatten", "dense", "dropout", "softmax"}


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_generated_network_fused_equals_reference(seed, train):
    run_both(_generated(seed), batch=2, train=train, fuse=True, seed=seed)  # dropout too: the same masks
