"""Silent wrong answers the probes found: NaN must propagate exactly as in torch through every
path (standalone and fused kernels, training and inference, with and without autograd), and
an eval forward must see the running statistics of the training forwards before it (the
folded conv + batch-norm weights are recomputed when a kernel writes them). The GPU side of
the NaN rule (no NaN-dropping max in the compiled kernels) is checked by test_hopper_compile."""

import pytest
import torch

import cnndsl

H = "network n\ninput 2x4x4\n"
CHAINS = {
    "conv-relu-maxpool": "conv 3 1x1\nrelu\nmaxpool 2\n",  # the case: one fused inference kernel
    "conv-bn-relu-maxpool": "conv 3 1x1\nbatchnorm\nrelu\nmaxpool 2\n",
    "conv-leaky-avgpool": "conv 3 3x3 pad=1\nleaky_relu 0.2\navgpool 2\n",
    "conv-relu-residual-relu": "conv 2 1x1\nrelu\nresidual {\n  conv 2 3x3 pad=1\n  relu\n}\nrelu\n",
    "maxpool": "maxpool 2\n",
    "relu": "relu\n",
    "dense-softmax": "flatten\ndense 4\nrelu\ndense 3\nsoftmax\n",
}
MODES = ["train", "eval-no-grad", "eval-grad"]


def _pair(src, fuse):
    torch.manual_seed(0)
    tri = cnndsl.compile(src, fuse=fuse)
    ref = cnndsl.compile(src, backend="torch")
    ref.load_state_dict(tri.state_dict())
    return tri, ref


def _forward(model, x, mode):
    model.train(mode == "train")
    with torch.set_grad_enabled(mode != "eval-no-grad"):
        return model(x.clone().requires_grad_(mode != "eval-no-grad"))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("chain", CHAINS, ids=list(CHAINS))
def test_a_nan_pixel_gives_nan_where_torch_does(chain, fuse, mode):
    tri, ref = _pair(H + CHAINS[chain], fuse)
    x = torch.randn(2, 2, 4, 4)
    x[0, 0, 1, 1] = float("nan")
    got, want = _forward(tri, x, mode), _forward(ref, x, mode)
    assert torch.isnan(want).any()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"NaN at {torch.isnan(got).nonzero().tolist()}, " \
                                                              f"torch: {torch.isnan(want).nonzero().tolist()}"
    finite = ~torch.isnan(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_a_nan_weight_makes_the_loss_nan(fuse):
    """What the trainer's NaN stop relies on: a NaN anywhere in the weights reaches the loss."""
    tri, _ = _pair(H + "conv 3 1x1\nrelu\nmaxpool 2\nflatten\ndense 3\n", fuse)
    with torch.no_grad():
        tri.conv1.weight[0, 0, 0, 0] = float("nan")
    loss = tri.loss(torch.randn(2, 2, 4, 4), torch.tensor([0, 1]))
    assert torch.isnan(loss)


BN_NET = H + "conv 4 3x3 pad=1\nbatchnorm\nrelu\nflatten\ndense 3\n"


def _eval(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("grad", [True, False], ids=["train-forward", "recalibration-no-grad"])
def test_eval_after_a_training_forward_uses_the_new_running_statistics(grad):
    """A cached fold of the running statistics must not outlive a training forward that moved
    them (no optimizer step between, so no weight changed)."""
    tri, ref = _pair(BN_NET, fuse=True)
    x = torch.randn(4, 2, 4, 4) * 3 + 1
    for model in (tri, ref):
        _eval(model, x)  # folds batch norm into the conv weights
        model.train()
        with torch.set_grad_enabled(grad):
            for _ in range(3):  # e.g. batch-norm recalibration over a few batches
                model(x)
    torch.testing.assert_close(tri.batchnorm1.running_mean, ref.batchnorm1.running_mean)
    torch.testing.assert_close(_eval(tri, x), _eval(ref, x), rtol=1e-5, atol=1e-5)


def test_running_statistics_written_by_a_kernel_move_their_version_counters():
    tri, _ = _pair(BN_NET, fuse=True)
    before = [b._version for b in tri.batchnorm1.buffers()]
    tri.train()(torch.randn(4, 2, 4, 4))
    assert all(b._version > v for b, v in zip(tri.batchnorm1.buffers(), before))
