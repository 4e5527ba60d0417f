"""The step executor: runs a plan's launch steps (specs.Step) through the runners of kernels/,
NHWC inside and NCHW at the boundary. The triton backend's module runs this code, and
`cnndsl emit` copies it into every module it writes, so an emitted network runs exactly the
runtime's steps: there is no second implementation.

Every runner takes `(*inputs, *parameters, spec, state)`: the values the step reads (None for
an absent shortcut), the parameters and buffers its Step names, its spec and a StepState
saying whether the model trains, whether autograd records, where the step may keep state
across calls (the folded eval weights), the spec's text (what the custom ops take) and how to
draw a dropout seed. Runners call torch custom ops, so torch.compile traces a network's steps
into one graph."""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepState:
    training: bool
    grad: bool
    caches: dict  # every step's (a module's), by group
    group: int = 0
    text: str = ""  # the spec's, as the custom ops take it
    # a step that writes into a concat's output (Step.into): (the slab so far, or None before its
    # first writer, the first channel, the slab's channels, whether backward reads its slice in place)
    into: tuple | None = None
    token: bool = False  # (Step.token, with autograd recording) return (output, the input's gradient token)

    @property
    def cache(self) -> dict:
        """This step's state kept across calls (made on first use: a traced graph keeps none)."""
        return self.caches.setdefault(self.group, {})

    @staticmethod
    def seed() -> torch.Tensor:
        """A dropout seed, a 0-d int64 tensor from torch's CPU generator: follows torch.manual_seed,
        needs no device sync, and is drawn anew on every call of a compiled graph."""
        return torch.randint(2**31 - 1, (), device="cpu")


def place(root: torch.nn.Module, name: str, layer: torch.nn.Module, scope=torch.nn.Module) -> None:
    """Add `layer` under its dotted name (`layer1.0.conv1`), making `scope` modules on the way."""
    *path, leaf = name.split(".")
    for part in path:
        if part not in root._modules:
            root.add_module(part, scope())
        root = root._modules[part]
    root.add_module(leaf, layer)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the kernels run in: x's, or inside torch.autocast for x's device the autocast
    dtype when that is 16-bit and x fp32 (mixed precision: the fp32 parameters are the master
    copies, the kernels read 16-bit copies, and the gradients flow back to fp32 through the casts)."""
    kind = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(kind):
        dtype = torch.get_autocast_dtype(kind)
        if dtype in (torch.float16, torch.bfloat16):
            return dtype
    return x.dtype


def _cast(value, dtype: torch.dtype):
    """A parameter in the compute dtype and contiguous (a differentiable copy where it is not: a
    model moved to channels_last, a dense weight loaded transposed); buffers, the batch norms'
    running statistics, stay as they are (the kernels update them in any float dtype)."""
    if isinstance(value, torch.nn.Parameter):
        return (value.to(dtype) if value.dtype != dtype else value).contiguous()
    return value


def run_steps(steps, x, layers: dict, runners: dict, training: bool, caches: dict) -> torch.Tensor:
    """The output of `steps` for x (N, C, H, W): `layers` maps layer names to the modules holding
    the parameters, `runners` runner names to the runners, `caches` a step's group to its cache.
    A value read by k > 1 steps is handed out as k aliases whose gradients `fork` adds, except
    where its readers are a conv whose step returns a gradient token (Step.token) and a shortcut
    whose step `redirects` it: there the shortcut reads it through `redirect`, which sends its gradient
    to the token, and the conv's input gradient adds it. A step with `into` writes into the slab
    of a concat's output, the one tensor that every writer of that concat returns in turn
    (kernels/concat.py). Under torch.autocast the steps run in compute_dtype(x), and so does the
    output."""
    readers = {0: 0}
    for step in steps:
        for i in step.inputs:
            if i is not None:
                readers[i] = readers.get(i, 0) + 1
    grad = torch.is_grad_enabled()
    redirected = {step.inputs[0] for step in steps if step.token} if grad else set()
    values, slabs, tokens = {}, {}, {}

    def keep(i, value):
        k = readers.get(i, 0)
        values[i] = list(runners["fork"](value, k)) if k > 1 and i not in redirected else [value] * max(k, 1)

    dtype = compute_dtype(x)
    keep(0, x.permute(0, 2, 3, 1).to(dtype).contiguous())  # (N, H, W, C)
    out = values[0][0]
    for step in steps:
        inputs = [values[i].pop() if i is not None else None for i in step.inputs]
        if step.redirects is not None and grad:  # its shortcut's gradient goes to the conv that also reads it
            j = step.redirects
            inputs[j] = runners["redirect"](inputs[j], tokens.pop(step.inputs[j]))
        params = [_cast(getattr(layers[p[0]], p[1]), dtype) if p is not None else None for p in step.params]
        # a step trains unless a layer of it is held in eval mode (a frozen batch norm)
        trains = training and all(layers[p[0]].training for p in step.params if p is not None)
        into = None if step.into is None else (slabs.get(step.into[0]), *step.into[1:])
        state = StepState(trains, grad, caches, step.group, step.text, into, step.token and grad)
        out = runners[step.runner](*inputs, *params, step.spec, state)
        if state.token:
            out, tokens[step.inputs[0]] = out
        if step.into is not None:
            slabs[step.into[0]] = out
        if isinstance(out, torch.Tensor):  # else a block's deferred output, read by one conv or max pool (plan.py)
            out = out.contiguous()
        keep(step.output, out)
    return out.permute(0, 3, 1, 2).contiguous() if out.dim() == 4 else out
