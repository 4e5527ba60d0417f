"""A training step on the triton backend dispatches no aten compute op: only
allocation, copy and view ops. Every convolution, batch norm, pooling, GEMM, softmax,
activation, add, concatenation, gate and reduction runs as a Triton kernel. Nor does it format a
tensor (an error message built eagerly with a tensor's repr: on a GPU that copies the tensor to the
host, a synchronisation each launch, and the formatting hides from the dispatch mode)."""

import contextlib
import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cnndsl

from test_triton_backend import BRANCHES, RESIDUAL

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

ALLOWED = {  # allocation, copy, view, and reading metadata
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "zeros", "zeros_like",
    "ones_like", "fill", "zero", "copy", "_to_copy", "clone", "contiguous", "lift_fresh",
    "view", "_unsafe_view", "reshape", "permute", "as_strided", "expand", "t", "transpose",
    "alias", "detach", "slice", "select", "unsqueeze", "squeeze", "split", "unbind", "view_as",
    "_reshape_alias", "is_same_size",
    "randint",  # a dropout or stochastic-depth seed, drawn on the host (StepState.seed)
}


@contextlib.contextmanager
def _no_tensor_formatted(monkeypatch):
    """Fails the test with the stack of the first tensor formatted inside the block."""
    stacks = []
    format_tensor = torch._tensor_str._str

    def recording(self, *args, **kwargs):
        stacks.append("".join(traceback.format_stack(limit=6)[:-1]))
        return format_tensor(self, *args, **kwargs)

    monkeypatch.setattr(torch._tensor_str, "_str", recording)
    yield
    monkeypatch.undo()
    assert not stacks, f"{len(stacks)} tensors formatted on the hot path, the first at:\n{stacks[0]}"


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace != "cnndsl":  # cnndsl's custom ops: its kernels (what they dispatch is seen too)
            self.ops.add(func.overloadpacket.__name__.rstrip("_"))
        return func(*args, **(kwargs or {}))


def _skip_kernels(monkeypatch):
    """The launches are made and their arguments checked but the kernels skipped: what the ops
    dispatch does not depend on the values (test_hopper_speed.py: no launch depends on what a kernel
    computed), and the interpreter's own copies in and out of numpy are not the runtime's."""
    from triton.runtime.interpreter import InterpretedFunction
    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *args, **kwargs: None)


@pytest.mark.parametrize(("src", "fuse"), [(RESIDUAL, True), (RESIDUAL, False), (BRANCHES, True)],
                         ids=["residual-fused", "residual-unfused", "branches-fused"])
def test_training_step_runs_no_aten_compute(src, fuse, monkeypatch):
    _skip_kernels(monkeypatch)
    model = cnndsl.compile(src, backend="triton", fuse=fuse, device="cpu").train()
    x = torch.randn(2, *model.net.input_shape, requires_grad=True)
    target = torch.tensor([1, 3])
    with _no_tensor_formatted(monkeypatch), _Recorder() as rec:
        model(x)
        loss = model.loss(x, target)
        loss.backward()
        with torch.no_grad():  # inference too: the folded batch norm, the pool epilogue
            model.eval()(x)
    compute = sorted(rec.ops - ALLOWED)
    assert not compute, f"aten compute ops on the triton path: {compute}"
    # The recorder works: the reference backend shows its compute ops.
    ref = cnndsl.compile(src, backend="torch", device="cpu").train()
    with _Recorder() as rec:
        ref.loss(x, target).backward()
    assert {"convolution", "convolution_backward", "native_batch_norm"} <= rec.ops


@pytest.mark.parametrize("name", ["googlenet", "densenet121", "efficientnet_b0", "mobilenet_v2"])
def test_the_examples_dispatch_no_aten_compute(name, monkeypatch):
    """The ImageNet examples at full size, a training step and eval, fused (kernels skipped)."""
    _skip_kernels(monkeypatch)
    model = cnndsl.compile(EXAMPLES / f"{name}.cnn", backend="triton", device="cpu").train()
    x = torch.randn(2, *model.net.input_shape, requires_grad=True)
    target = torch.tensor([1, 3])
    with _no_tensor_formatted(monkeypatch), _Recorder() as rec:
        model.loss(x, target).backward()
        with torch.no_grad():
            model.eval()(x)
    compute = sorted(rec.ops - ALLOWED)
    assert not compute, f"{name}: aten compute ops on the triton path: {compute}"
