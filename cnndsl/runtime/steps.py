"""The step executor: runs a plan's launch steps (specs.Step) through the autograd Functions of
kernels/, NHWC inside and NCHW at the boundary. The triton backend's module runs this code, and
`cnndsl emit` copies it into every module it writes, so an emitted network runs exactly the
runtime's steps: there is no second implementation.

Every Function takes `(*inputs, *parameters, spec, state)`: the values the step reads (None
for an absent shortcut), the parameters and buffers its Step names, its frozen spec and a
StepState saying whether the model trains, whether autograd records, where the step may keep
state across calls (the folded eval weights) and how to draw a dropout seed."""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepState:
    training: bool
    grad: bool
    cache: dict  # this step's, kept across calls

    @staticmethod
    def seed() -> int:
        """A dropout seed from torch's CPU generator: follows torch.manual_seed, no device sync."""
        return int(torch.randint(2**31 - 1, (), device="cpu"))


def place(root: torch.nn.Module, name: str, layer: torch.nn.Module, scope=torch.nn.Module) -> None:
    """Add `layer` under its dotted name (`layer1.0.conv1`), making `scope` modules on the way."""
    *path, leaf = name.split(".")
    for part in path:
        if part not in root._modules:
            root.add_module(part, scope())
        root = root._modules[part]
    root.add_module(leaf, layer)


def run_steps(steps, x, layers: dict, functions: dict, training: bool, caches: dict) -> torch.Tensor:
    """The output of `steps` for x (N, C, H, W): `layers` maps layer names to the modules holding
    the parameters, `functions` Function names to the Functions, `caches` a step's group to its
    cache. A value read by k > 1 steps is handed out as k aliases whose gradients ForkFn adds."""
    readers = {0: 0}
    for step in steps:
        for i in step.inputs:
            if i is not None:
                readers[i] = readers.get(i, 0) + 1
    grad = torch.is_grad_enabled()
    values = {}

    def keep(i, value):
        k = readers.get(i, 0)
        values[i] = list(functions["ForkFn"].apply(value, k)) if k > 1 else [value]

    keep(0, x.permute(0, 2, 3, 1).contiguous())  # (N, H, W, C)
    out = values[0][0]
    for step in steps:
        inputs = [values[i].pop() if i is not None else None for i in step.inputs]
        params = [getattr(layers[p[0]], p[1]) if p is not None else None for p in step.params]
        state = StepState(training, grad, caches.setdefault(step.group, {}))
        out = functions[step.function].apply(*inputs, *params, step.spec, state).contiguous()
        keep(step.output, out)
    return out.permute(0, 3, 1, 2).contiguous() if out.dim() == 4 else out
