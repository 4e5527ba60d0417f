"""The triton backend against the reference backend, whole networks under the
interpreter: outputs, loss, input and parameter gradients, BN running statistics."""

from pathlib import Path

import pytest
import torch

from helpers import run_both

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

RESIDUAL = """
network two_blocks
input 3x9x9
conv 8 3 pad=1 bias=false
batchnorm
relu
residual {
    conv 8 3 pad=1 bias=false
    batchnorm
    relu
    conv 8 3 pad=1 bias=false
    batchnorm
}
relu
residual {
    conv 16 3 stride=2 pad=1 bias=false
    batchnorm
    leaky_relu 0.1
    conv 16 3 pad=1 bias=false
    batchnorm
} shortcut {
    conv 16 1 stride=2 bias=false
    batchnorm
}
gelu
global_avgpool
flatten
dense 5
softmax
"""

EVERYTHING = """
network everything
input 5x11x13
conv 6 3x5 stride=2 pad=1x2 dilation=1 groups=1
conv 6 2x4 pad=same
conv 12 3 pad=2 dilation=2 groups=3 bias=false
batchnorm affine=false momentum=0.3
sigmoid
conv 12 3 pad=1 groups=12
tanh
maxpool 3 stride=2 pad=1
avgpool 2x3 stride=1 pad=1
silu
flatten
dropout 0.3
dense 7 bias=false
batchnorm eps=0.001
relu
dense 4
"""


@pytest.mark.parametrize(("name", "train"), [("cifar_small", True), ("lenet5", True), ("lenet5", False)],
                         ids=["cifar_small-train", "lenet5-train", "lenet5-eval"])
def test_example(name, train):
    run_both(EXAMPLES / f"{name}.cnn", batch=2, train=train)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_residual_network(train):
    run_both(RESIDUAL, batch=3, train=train, steps=2 if train else 1)


def test_every_layer_kind_batch_1_eval():
    run_both(EVERYTHING, batch=1, train=False)


def test_every_layer_kind_train():
    _ref, tri = run_both(EVERYTHING.replace("dropout 0.3\n", ""), batch=3, train=True)
    assert int(tri.state_dict()["batchnorm1.num_batches_tracked"]) == 2  # model(x) and model.loss(x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    run_both(RESIDUAL, batch=2, dtype=dtype, train=True)


def test_dropout_train_matches_its_mask():
    """In training, dropout's mask differs from torch's RNG; the output must still be the
    input scaled by 1/(1-p) or zero, with the gradient following the same mask."""
    import cnndsl
    net = cnndsl.parse("network d\ninput 2x4x4\nflatten\ndropout 0.5\n")
    model = cnndsl.compile(net, backend="triton", device="cpu").train()
    x = torch.randn(64, 2, 4, 4, requires_grad=True)
    y = model(x)
    y.backward(torch.ones_like(y))
    kept = y != 0
    flat = x.detach().flatten(1)
    assert 0.35 < kept.float().mean() < 0.65
    torch.testing.assert_close(y[kept], 2 * flat[kept])
    torch.testing.assert_close(x.grad.flatten(1), 2 * kept.float())
    model.eval()
    torch.testing.assert_close(model(x.detach()), flat)
