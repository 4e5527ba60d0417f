"""Dropout in training compared by value on whole networks: the triton backend's seeds are
fixed and its keep masks recovered from the dropout kernel, so that a reference applying
the same masks must agree on the output, the loss and every gradient, with dropout fused
into a dense block (dense -> act -> dropout) or run as its own layer, on flat features and
on an NHWC feature map."""

import pytest
import torch
import torch.nn.functional as F

import cnndsl
from cnndsl.runtime.steps import StepState

from helpers import assert_close, dropout_keep, run_both

NET = """
network drop
input 2x6x6
conv 4 3
relu
dropout 0.3
flatten
dense 12
relu
dropout 0.5
dense 5
softmax
"""

HAND = "network hand\ninput 2x5x5\nconv 3 3\nflatten\ndense 16\nrelu\ndropout 0.4\ndense 4\n"

FUSE = pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])


@FUSE
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_network_with_dropout_trains_like_the_reference(fuse, dtype):
    run_both(NET, batch=3, dtype=dtype, train=True, fuse=fuse, steps=2)


@FUSE
def test_dropout_network_against_torch_by_hand(fuse, monkeypatch):
    """conv -> flatten -> dense -> relu -> dropout -> dense written out in torch (float64) with
    the mask the kernel draws from the seed the runtime is given; model.loss draws it once."""
    seeds = [4321]
    monkeypatch.setattr(StepState, "seed", staticmethod(lambda: torch.tensor(seeds.pop())))
    model = cnndsl.compile(HAND, backend="triton", fuse=fuse, device="cpu").train()
    x, target = torch.randn(6, 2, 5, 5), torch.tensor([0, 3, 1, 2, 3, 0])
    xi = x.clone().requires_grad_()
    loss = model.loss(xi, target)
    loss.backward()
    assert not seeds, "the dropout layer drew no seed"
    keep = dropout_keep((6, 16), 0.4, 4321)
    assert 0.3 < keep.float().mean() < 0.9
    w = {n: p.detach().double().requires_grad_() for n, p in model.named_parameters()}
    xd = x.double().requires_grad_()
    h = F.conv2d(xd, w["conv1.weight"], w["conv1.bias"]).flatten(1)
    h = F.relu(F.linear(h, w["dense1.weight"], w["dense1.bias"])) * keep / 0.6
    expected = F.cross_entropy(F.linear(h, w["dense2.weight"], w["dense2.bias"]), target)
    expected.backward()
    assert_close(loss.reshape(1), expected.reshape(1), reduction=75, depth=6, name="loss")
    assert_close(xi.grad, xd.grad, reduction=75, depth=6, name="input grad")
    for name, p in model.named_parameters():
        assert_close(p.grad, w[name].grad, reduction=75, depth=6, name=f"grad {name}")
