"""The classic architectures of the examples that the other network tests do not train
(MobileNetV2, DenseNet-121, GoogLeNet, EfficientNet-B0) on the triton backend against hand-built torch.nn models laid out as
torchvision builds them (tests/torch_models.py), their weights loaded in declaration order, each
compared with that model in float64 and held to the accuracy of the same model in float32.

Sized for the interpreter: a small input (the example with its input line rewritten), a batch of
2, fp32; DenseNet with one layer per
dense block; GoogLeNet without three of its nine Inception modules, EfficientNet-B0 and MobileNetV2
with one block a stage but the second's two, at batch 1 (the same kinds of layers; the full
networks run on the reference backend in tests/test_examples.py). Fused; DenseNet also unfused
(the unfused kernels of the other layers are compared in tests/test_triton_backend.py). GoogLeNet, EfficientNet-B0 and MobileNetV2 in eval mode only
(batch norm on its running statistics, dropout the identity): in train mode, batch norm over a batch of 2 and maps of 1x1 or
2x2 amplifies rounding until a relu6 at its kink goes one way in one implementation and the other
way in another (torch's own float32 is then off by percents, as often as the triton backend).
Train mode's batch norm, every activation and dropout are compared layer by layer in
tests/test_triton_backend.py and tests/kernels/, and these examples train on the reference
backend in tests/test_examples.py. DenseNet fused in train mode too (zero-copy concatenation,
its pre-activation batch norms normalising on load in the conv that reads them): loss, gradients
and running statistics after the training forward, then eval mode after one SGD step (train mode
with concatenation unfused in tests/test_triton_backend.py's BRANCHES)."""

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from test_examples import example, shrunk

import cnndsl

import torch_models as tm
from helpers import rel_err, tolerance

DENSE_BLOCKS = (1, 1, 1, 1)  # layers per dense block in the test's DenseNet


def densenet_text(blocks, side: int) -> str:
    """examples/densenet121.cnn with `blocks` layers per dense block at a side x side input."""
    text = re.sub(r"^input 3x224x224", f"input 3x{side}x{side}", example("densenet121").read_text(), flags=re.MULTILINE)
    counts = iter(blocks)
    text = re.sub(r"dense_layer x\d+", lambda m: f"dense_layer x{next(counts)}", text)
    c = 64
    for i, n in enumerate(blocks[:-1], 1):
        c = (c + 32 * n) // 2
        text = re.sub(rf"transition{i}: transition\(\d+\)", f"transition{i}: transition({c})", text)
    return text


def fewer_layers(name: str, text: str) -> str:
    """GoogLeNet without inception4b, 4c and 5a (each keeps its input's channels); EfficientNet-B0
    and MobileNetV2 with one block a stage but the second's two (one adds its input back): the same
    kinds of layers."""
    if name == "googlenet":
        return re.sub(r"^inception(4[bc]|5a):.*\n", "", text, flags=re.MULTILINE)
    if name == "mobilenet_v2":
        return re.sub(r"^inverted\((?!24\)).*\n", "", text, flags=re.MULTILINE)
    return re.sub(r"^mbconv\((?!24,).*\n", "", text, flags=re.MULTILINE)


def _problem(name):
    """The example's text rewritten for the test, its batch, and the torch model."""
    torch.manual_seed(0)
    if name == "densenet121":
        text, n, ref = densenet_text(DENSE_BLOCKS, 64), 2, tm.DenseNet(blocks=DENSE_BLOCKS)
    else:  # GoogLeNet, EfficientNet-B0, MobileNetV2: eval only, a batch of 1
        text, _, ref = shrunk(name)
        text, n = fewer_layers(name, text), 1
        if name == "googlenet":
            del ref.inception4b, ref.inception4c, ref.inception5a
        elif name == "mobilenet_v2":  # torchvision's features 5-6, 8-10, 12-13 and 15-16 add their input back
            ref[0] = torch.nn.Sequential(*[m for i, m in enumerate(ref[0]) if i not in {5, 6, 8, 9, 10, 12, 13, 15, 16}])
        else:
            for i, stage in enumerate(ref.features[1:-1], 1):
                del stage[2 if i == 2 else 1:]
    return text, n, tm.randomize(ref, seed=3)


def _run(model, x, target, torch_model, modes):
    """{what: tensor} of each mode's step: the loss, the input's and the parameters' gradients; after
    a training step, the running statistics, then one SGD step (eval mode then runs the new weights)."""
    out = {}
    for mode in modes:
        model.train(mode == "train")
        model.zero_grad(set_to_none=True)
        xs = x.clone().requires_grad_()
        loss = F.cross_entropy(model(xs), target) if torch_model else model.loss(xs, target)
        loss.backward()
        out[f"{mode} loss"], out[f"{mode} input gradient"] = loss, xs.grad
        out[f"{mode} gradients"] = torch.cat([p.grad.flatten() for p in model.parameters()])
        if mode == "train":
            stats = [b.flatten() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))]
            out["running statistics"] = torch.cat(stats)
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.01 * p.grad
    return out


# (AlexNet's layers, plain conv, relu, pool and dense, are every other network test's: its count and
# torchvision's layout are tests/test_examples.py's)
CASES = [("mobilenet_v2", True, ("eval",)),
         ("densenet121", True, ("train", "eval")), ("densenet121", False, ("eval",)),
         ("googlenet", True, ("eval",)), ("efficientnet_b0", True, ("eval",))]


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
@pytest.mark.parametrize(("name", "fuse", "modes"), CASES,
                         ids=[f"{n}-{'fused' if f else 'unfused'}" for n, f, _ in CASES])
def test_the_triton_backend_runs_the_architecture_as_torch(name, fuse, modes):
    text, n, ref = _problem(name)
    model = tm.load_from(cnndsl.compile(text, fuse=fuse, device="cpu"), ref)
    exact = copy.deepcopy(ref).double()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(n, *model.net.input_shape, generator=g)
    target = torch.randint(0, model.net.output_shape[0], (n,), generator=g)
    ours = _run(model, x, target, False, modes)
    theirs = _run(ref, x, target, True, modes)
    want = _run(exact, x.double(), target, True, modes)
    bound = tolerance(torch.float32, 4096, 2 * len(model.net.nodes))
    for what, w in want.items():
        err, torch_err = rel_err(ours[what].double(), w), rel_err(theirs[what].double(), w)
        assert err <= max(bound, 4 * torch_err), \
            f"{name} {what}: relative error {err:.3g} against float64 (torch's float32: {torch_err:.3g})"


def test_the_test_densenet_is_densenet121_with_fewer_layers():
    """The rewrite keeps the example's layers: at (6, 12, 24, 16) it is the example itself."""
    full = cnndsl.parse(densenet_text((6, 12, 24, 16), 224))
    assert full.nodes == cnndsl.parse(example("densenet121")).nodes
    small = cnndsl.parse(densenet_text(DENSE_BLOCKS, 64))
    ref = tm.DenseNet(blocks=DENSE_BLOCKS)
    assert small.to_json()["total_params"] == sum(p.numel() for p in ref.parameters())
