"""The example networks against hand-built torch.nn models (tests/torch_models.py):
published parameter counts, per-node shapes seen in a reference forward pass, parameter
and buffer shapes in order, and equal outputs, losses, gradients and BN running stats
after loading the same weights."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cnndsl

import torch_models as tm
from helpers import assert_close

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAMES = ["lenet5", "cifar_small", "vgg16", "resnet18", "resnet50", "alexnet", "mobilenet_v2", "densenet121",
         "efficientnet_b0", "googlenet"]
SMALL = {"lenet5", "cifar_small"}
DROPOUT = {"vgg16", "alexnet"}
# The input side at which an ImageNet net is trained in the tests (default 32): AlexNet's pools would
# leave nothing of 32x32; DenseNet's batch norms over the 1x1 maps of its last block at 32x32
# amplify rounding so much that torch's own float32 is 14% off its float64.
SHRUNK = {"alexnet": 63, "densenet121": 64}


def example(name: str) -> Path:
    return EXAMPLES / f"{name}.cnn"


def traced_forward(model, x):
    """model(x) on the reference backend, recording the output shape of every node it runs
    and the input of a final softmax: (output, {node id: shape}, logits or None)."""
    assert hasattr(model, "_op"), "the reference module no longer runs node by node through _op"
    shapes, op, seen = {}, model._op, {}

    def record(node, xs):
        if node.op is cnndsl.Op.SOFTMAX:
            seen["logits"] = xs[0]
        y = op(node, xs)
        shapes[node.id] = tuple(y.shape)
        return y

    model._op = record
    try:
        out = model(x)
    finally:
        del model._op
    return out, shapes, seen.get("logits")


def check_node_shapes(net, shapes, n):
    """Every node ran, and its inferred shape (per sample) equals what torch computed."""
    for node in net.nodes[1:]:
        assert node.id in shapes, f"node {node.name} ({node.op.value}) did not run"
        assert shapes[node.id] == (n, *node.shape), f"{node.name}: inferred {node.shape}, torch {shapes[node.id]}"


def total_params(net) -> int:
    return net.to_json()["total_params"]


# --- one compiled model and one hand-built model per example, weights shared ----------------

@pytest.fixture(scope="module", params=NAMES)
def pair(request):
    name = request.param
    torch.manual_seed(1)
    ref = tm.randomize(tm.BUILDERS[name](), seed=1).eval()
    model = cnndsl.compile(example(name), backend="torch", device="cpu")
    tm.load_from(model, ref)
    model.eval()
    yield name, model, ref
    del model, ref


@pytest.fixture(scope="module")
def eval_run(pair):
    """One eval-mode forward of each model at its real input size (batch 2 for the small
    examples, 1 for the ImageNet ones), with every node's output shape recorded and the
    logits (the input of the final softmax) kept."""
    name, model, ref = pair
    n = 2 if name in SMALL else 1
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, *model.net.input_shape, generator=g)
    with torch.no_grad():
        probs, shapes, logits = traced_forward(model, x)
        expected = ref(x)
    return x, probs, logits, expected, shapes


def test_parameter_count_is_published(pair):
    name, model, ref = pair
    net = cnndsl.parse(example(name))
    assert total_params(net) == tm.PARAMS[name]
    assert sum(p.numel() for p in ref.parameters()) == tm.PARAMS[name]
    assert sum(p.numel() for p in model.parameters()) == tm.PARAMS[name]


def test_parse_accepts_path_str_and_text():
    by_path = cnndsl.parse(example("lenet5"))
    by_str = cnndsl.parse(str(example("lenet5")))
    by_text = cnndsl.parse(example("lenet5").read_text())
    assert by_path.nodes == by_str.nodes == by_text.nodes
    assert by_path.name == "lenet5" and by_path.input_shape == (1, 32, 32)


def test_parameters_and_buffers_in_order(pair):
    name, model, ref = pair
    for what in ("parameters", "buffers"):
        ours = [tuple(p.shape) for p in getattr(model, what)()]
        theirs = [tuple(p.shape) for p in getattr(ref, what)()]
        assert ours == theirs, f"{name}: {what} differ"
    ours = [tuple(v.shape) for v in model.state_dict().values()]
    theirs = [tuple(v.shape) for v in ref.state_dict().values()]
    assert ours == theirs
    bn = sum(b.numel() for n, b in model.named_buffers() if not n.endswith("num_batches_tracked"))
    assert bn == model.net.to_json()["bn_buffers"]


def test_node_shapes_match_a_reference_forward(pair, eval_run):
    _, model, _ = pair
    x, probs, _, _, shapes = eval_run
    check_node_shapes(model.net, shapes, x.shape[0])
    assert probs.shape == (x.shape[0], *model.net.output_shape)


def test_eval_outputs_match_torch(pair, eval_run):
    name, model, _ = pair
    x, probs, logits, expected, _ = eval_run
    depth = len(model.net.nodes)
    assert_close(logits, expected, reduction=4096, depth=depth, name=f"{name} logits")
    assert_close(probs, torch.softmax(expected, 1), reduction=4096, depth=depth, name=f"{name} probabilities")
    assert_close(probs.sum(1), torch.ones(x.shape[0]), name="probability sums")


# --- training: outputs, loss, gradients and running stats --------------------------------------

def shrunk(name: str) -> tuple[str, int, torch.nn.Module]:
    """The example's text, a batch size and a hand-built model; the ImageNet nets at 32x32
    input (63x63 for AlexNet, whose pools would leave nothing of 32x32; the same layers, the
    first dense layer of VGG and AlexNet then taking fewer features)."""
    text = example(name).read_text()
    if name in SMALL:
        return text, 4, tm.BUILDERS[name]()
    side = SHRUNK.get(name, 32)
    text = re.sub(r"^input 3x224x224", f"input 3x{side}x{side}", text, count=1, flags=re.MULTILINE)
    ref = tm.BUILDERS[name](image_size=side) if name in ("vgg16", "alexnet") else tm.BUILDERS[name]()
    return text, 2, ref


def assert_grads_close(name, model, ref, depth):
    """All gradients at once (one norm-wise comparison per parameter would cost seconds)."""
    pairs = list(zip(model.named_parameters(), ref.named_parameters(), strict=True))
    for (n1, p1), _ in pairs:
        assert p1.grad is not None, f"{name}: {n1} has no gradient"
    ours = torch.cat([p1.grad.flatten() for (_, p1), _ in pairs])
    theirs = torch.cat([p2.grad.flatten() for _, (_, p2) in pairs])
    try:
        assert_close(ours, theirs, reduction=4096, depth=2 * depth, name=f"{name} gradients")
    except AssertionError:  # name the culprits
        for (n1, p1), (_, p2) in pairs:
            assert_close(p1.grad, p2.grad, reduction=4096, depth=2 * depth, name=f"{name} grad {n1}")
        raise


def check_training(name, text, n, ref, modes=("train", "eval")):
    """Loss, every gradient and the BN running stats in train mode, then one SGD step and
    the same in eval mode; dropout nets are compared in train mode under the same RNG seed."""
    torch.manual_seed(3)
    tm.randomize(ref, seed=3)
    model = tm.load_from(cnndsl.compile(text, backend="torch", device="cpu"), ref)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(n, *model.net.input_shape, generator=g)
    target = torch.randint(0, model.net.output_shape[0], (n,), generator=g)
    depth = len(model.net.nodes)
    for mode in modes:
        model.train(mode == "train")
        ref.train(mode == "train")
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        loss = model.loss(x, target)
        torch.manual_seed(5)
        expected = F.cross_entropy(ref(x), target)
        assert_close(loss, expected, reduction=4096, depth=depth, name=f"{name} {mode} loss")
        loss.backward()
        expected.backward()
        assert_grads_close(f"{name} {mode}", model, ref, depth)
        if mode == "train":  # running statistics after the training forward
            for (n1, b1), (_, b2) in zip(model.named_buffers(), ref.named_buffers(), strict=True):
                assert_close(b1.float(), b2.float(), reduction=4096, depth=depth, name=f"{name} {n1}")
            with torch.no_grad():  # one SGD step on both; eval mode then runs the updated weights
                for p1, p2 in zip(model.parameters(), ref.parameters(), strict=True):
                    p1 -= 0.01 * p1.grad
                    p2 -= 0.01 * p2.grad


@pytest.mark.parametrize("name", NAMES)
def test_training_matches_torch(name):
    """Same layers as the example; the ImageNet nets at a small input size. Small nets in
    train and eval mode, ResNets in train mode, VGG (dropout) in eval mode; dropout under
    a shared seed in train mode is compared in test_reference.py."""
    text, n, ref = shrunk(name)
    modes = ("train", "eval") if name in SMALL else ("eval",) if name in DROPOUT else ("train",)
    check_training(name, text, n, ref, modes)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])  # the others at 224: test_eval_outputs_match_torch
def test_training_matches_torch_at_224(name):
    modes = ("eval",) if name in DROPOUT else ("train",)
    check_training(name, example(name).read_text(), 1, tm.BUILDERS[name](), modes=modes)


def commented_shapes(text: str):
    """(line number, shape) of each top-level statement whose comment is a shape: `# 64x56x56`
    or `# 25088`, the documented output of the network up to and including that line."""
    depth = 0
    for i, line in enumerate(text.splitlines(), 1):
        code, _, comment = line.partition("#")
        if depth == 0 and code.strip() and not code.lstrip().startswith(("network", "input", "block")):
            m = re.fullmatch(r"\s*(\d+(?:x\d+)*)\s*", comment)
            if m:
                yield i, tuple(int(v) for v in m.group(1).split("x"))
        depth += code.count("{") - code.count("}")


@pytest.mark.parametrize("name", NAMES)
def test_shape_comments_in_the_examples_are_right(name):
    """Cut the file after each commented line: the network so far ends in the commented shape."""
    text = example(name).read_text()
    lines = text.splitlines()
    found = list(commented_shapes(text))
    assert found, f"{name}.cnn documents no shapes"
    for lineno, shape in found:
        net = cnndsl.parse("\n".join(lines[:lineno]) + "\n")
        assert net.output_shape == shape, f"{name}.cnn:{lineno}: comment says {shape}, network gives {net.output_shape}"
