"""Batch norm and the activation after it, with no conv before them, as one group (rules.py's
norm_act; kernels/norm_act.py): DenseNet's pre-activation layers, a batch norm after a pool, a
concatenation or a dense layer. The plan says so, a lone batch norm stays its own step, and
values, every gradient and the running statistics are the reference's, trained, evaluated and
with the batch norm frozen."""

import pytest
import torch
from test_examples import example

import cnndsl

from helpers import run_both

# After a pool (NHWC), after a concatenation (DenseNet's layer: deferred to the conv that reads it),
# after a dense layer ((N, C)), one without affine parameters. (No bias before a batch norm: its
# gradient is 0 up to rounding.)
NET = """
network norm_act
input 3x8x8
conv 8 3 pad=1 bias=false
maxpool 2
batchnorm
relu6
concat {
    branch { }
    branch {
        conv 8 1 bias=false
    }
}
batchnorm momentum=0.3
silu
conv 16 3 pad=1 bias=false
batchnorm affine=false
leaky_relu 0.2
global_avgpool
flatten
dense 12 bias=false
batchnorm eps=0.001
hardswish
dense 5
softmax
"""


def _groups(src, fuse=True):
    return [(g.rule, g.ops) for g in cnndsl.compile(src, fuse=fuse).plan.groups]


def test_the_plan_groups_batch_norm_and_its_activation():
    groups = _groups(NET)
    assert groups.count(("norm_act", ("batchnorm", "activation"))) == 3  # after the pool, the concat, the dense
    assert ("conv_block", ("conv", "batchnorm", "activation")) in groups  # after a conv: the conv block's
    group = next(g for g in cnndsl.compile(NET).plan.groups if g.rule == "norm_act")
    assert group.inference == ("bn_scale_shift", "epilogue_fwd")
    assert group.forward == ("bn_stats", "bn_update_running", "bn_scale_shift", "epilogue_fwd")
    assert group.backward == ("bn_bwd_reduce", "bn_bwd_merge", "bn_act_bwd")
    assert ("norm_act", ("batchnorm", "activation")) not in _groups(NET, fuse=False)


def test_the_conv_reading_it_normalises_and_activates_on_load():
    """Cross-layer fusion: in training the group after the concatenation writes no y; the conv
    reading it loads x through the prologue (its forward and weight gradient)."""
    groups = cnndsl.compile(NET).plan.groups
    i = next(i for i, g in enumerate(groups) if g.rule == "norm_act" and g.deferred)
    assert groups[i].forward == ("bn_stats", "bn_update_running", "bn_scale_shift")
    assert groups[i + 1].prologue and groups[i + 1].forward[0] == "prologue+conv_fwd+stats"
    assert groups[i].output_note == (f"its output is not written: {groups[i + 1].nodes[0].name} normalises and "
                                     f"activates its input as it loads it")
    assert [g.deferred for g in groups if g.rule == "norm_act"] == [False, True, False]
    assert not any(g.deferred for g in cnndsl.compile(NET, fuse="block").plan.groups)


def test_a_lone_batch_norm_is_its_own_step():
    src = NET.replace("batchnorm momentum=0.3\nsilu\n", "batchnorm momentum=0.3\n")
    assert ("batchnorm", ("batchnorm",)) in _groups(src)


def test_densenet_layers_normalise_and_activate_in_one_pass():
    plan = cnndsl.compile(example("densenet121")).plan
    assert sum(g.rule == "norm_act" for g in plan.groups) == 58 + 3 + 1  # 58 layers, 3 transitions, norm5


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_norm_act_matches_the_reference(train):
    run_both(NET, batch=3, train=train, steps=2 if train else 1, fuse=True)


def test_norm_act_in_bf16_step_by_step():
    run_both(NET, batch=2, dtype=torch.bfloat16, train=True, fuse=True)


def test_a_frozen_batch_norm_takes_gradients_through_its_running_statistics():
    """Transfer learning: the network trains with its batch norms in eval mode; the gradients
    flow through the running statistics, which stay as they are."""
    torch.manual_seed(0)
    ref = cnndsl.compile(NET, backend="torch")
    tri = cnndsl.compile(NET, backend="triton")
    tri.load_state_dict(ref.state_dict())
    x, target = torch.randn(2, 3, 8, 8), torch.tensor([1, 4])
    for m in (ref, tri):
        m.train()
        for layer in m.modules():
            if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
                layer.eval()
        m.loss(x, target).backward()
    for (name, a), b in zip(ref.named_parameters(), tri.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    for (name, a), b in zip(ref.named_buffers(), tri.buffers(), strict=True):
        assert torch.equal(a, b), name
