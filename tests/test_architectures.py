"""The classic architectures of the examples that the other network tests do not train (AlexNet,
MobileNetV2) on the triton backend against hand-built torch.nn models laid out as torchvision
builds them (tests/torch_models.py), their weights loaded in declaration order, each compared
with that model in float64 and held to the accuracy of the same model in float32.

Sized for the interpreter: a small input (the example with its input line rewritten), a batch of
2, fp32; AlexNet's hidden dense layers 512 wide rather than 4096. In eval mode (batch norm on its
running statistics, dropout the identity): in train mode, batch norm over a batch of 2 and maps
of 1x1 or 2x2 amplifies rounding until a relu6 at its kink goes one way in one implementation and
the other way in another (torch's own float32 is then off by percents, as often as the triton
backend). Train mode's batch norm, every activation and dropout are compared layer by layer in
tests/test_triton_backend.py and tests/kernels/, and these examples train on the reference
backend in tests/test_examples.py. MobileNetV2 fused; AlexNet fused and unfused."""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_examples import SHRUNK, shrunk

import cnndsl

import torch_models as tm
from helpers import rel_err, tolerance


def _problem(name):
    text, n, _ = shrunk(name)
    torch.manual_seed(0)
    if name == "alexnet":
        text, ref = text.replace("dense 4096", "dense 512"), tm.alexnet(SHRUNK["alexnet"], hidden=512)
    else:
        ref = tm.mobilenet_v2()
    return text, n, tm.randomize(ref, seed=3)


def _run(model, x, target, torch_model):
    """{what: tensor} of an eval-mode step: the loss, the input's and the parameters' gradients."""
    out = {}
    loss = lambda xs: F.cross_entropy(model(xs), target) if torch_model else model.loss(xs, target)
    model.eval()
    xs = x.clone().requires_grad_()
    out["eval loss"] = loss(xs)
    out["eval loss"].backward()
    out["input gradient"] = xs.grad
    out["gradients"] = torch.cat([p.grad.flatten() for p in model.parameters()])
    return out


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
@pytest.mark.parametrize(("name", "fuse"), [("alexnet", True), ("alexnet", False), ("mobilenet_v2", True)],
                         ids=["alexnet-fused", "alexnet-unfused", "mobilenet_v2-fused"])
def test_the_triton_backend_runs_the_architecture_as_torch(name, fuse):
    text, n, ref = _problem(name)
    model = tm.load_from(cnndsl.compile(text, fuse=fuse, device="cpu"), ref)
    exact = copy.deepcopy(ref).double()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(n, *model.net.input_shape, generator=g)
    target = torch.randint(0, model.net.output_shape[0], (n,), generator=g)
    ours, theirs, want = _run(model, x, target, False), _run(ref, x, target, True), _run(exact, x.double(), target, True)
    bound = tolerance(torch.float32, 4096, 2 * len(model.net.nodes))
    for what, w in want.items():
        err, torch_err = rel_err(ours[what].double(), w), rel_err(theirs[what].double(), w)
        assert err <= max(bound, 4 * torch_err), \
            f"{name} {what}: relative error {err:.3g} against float64 (torch's float32: {torch_err:.3g})"
