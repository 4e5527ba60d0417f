"""The classic architectures of the examples that the other network tests do not train (AlexNet,
MobileNetV2) on the triton backend against hand-built torch.nn models laid out as torchvision
builds them (tests/torch_models.py), their weights loaded in declaration order, each compared
with that model in float64 and held to the accuracy of the same model in float32.

Sized for the interpreter: a small input (the example with its input line rewritten), a batch of
2, fp32; AlexNet's hidden dense layers 512 wide rather than 4096. Gradients are compared in eval
mode: in train mode, batch norm over a batch of 2 and maps of 2x2 amplifies rounding until a
relu6 at its kink goes one way in one implementation and the other in another (torch's own
float32 is then off by percents, as often as the triton backend), so train mode is compared by
its loss and running statistics. MobileNetV2 at 40x40 (its last batch norms see 2x2 maps) fused;
AlexNet (dropout: compared in eval mode) fused and unfused. tests/test_examples.py checks the
full-size examples on the reference backend, train-mode gradients included."""

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
        text, ref = text.replace("input 3x32x32", "input 3x40x40"), tm.mobilenet_v2()
    return text, n, tm.randomize(ref, seed=3)


def _run(model, x, target, torch_model):
    """{what: tensor} of a train-mode forward (loss, running statistics), then an eval-mode step
    (loss, input and parameter gradients, logits)."""
    out = {}
    loss = lambda xs: F.cross_entropy(model(xs), target) if torch_model else model.loss(xs, target)
    if any(True for _ in model.buffers()):
        model.train()
        with torch.no_grad():
            out["train loss"] = loss(x)
        out["running statistics"] = torch.cat([b.flatten().double() for b in model.buffers()])
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
