"""Whole networks on the GPU (skipped without CUDA): resnet18 at 224x224 batch 8 and
vgg16 at batch 2, fp32 and bf16, triton backend fused and unfused against the reference
backend for the output, the loss, every gradient and the BN running statistics (and in
eval the folded-BN inference output); cifar_small at batch 256 fused, train and eval.
fp32 compares the networks end to end; bf16 compares every launch step with float64 within
8 units in the last place, whatever the depth (helpers.run_both, layerwise.py)."""

from pathlib import Path

import pytest
import torch

from helpers import run_both

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.gpu
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("name", "batch", "train"), [("resnet18", 8, True), ("resnet18", 8, False),
                                                      ("vgg16", 2, False), ("cifar_small", 256, True),
                                                      ("cifar_small", 256, False)])
def test_network_on_gpu(name, batch, train, dtype, fuse):
    # vgg16 runs in eval only; training with dropout is compared by value in test_dropout_network.
    run_both(EXAMPLES / f"{name}.cnn", batch=batch, dtype=dtype, train=train, device="cuda", fuse=fuse)
