"""`cnndsl bench --groups`: which fusion pays, and by how much. Every fused group of the plan
is timed on its own, on one random input of the right shape, three ways: its launch step
(the fused runner, as the network runs it), the same layers' steps of the unfused plan one
after another, and the same layers through the reference backend's per-node ops (eager
PyTorch, cuDNN on a GPU, NCHW). Inference runs without gradients in eval mode; training
runs the forward and the backward of the group's output against a fixed random gradient,
for the group's inputs (not the network's input, which needs none) and its parameters.

The three share weights, and each row says how far the fused and unfused outputs are from
eager's (`err`, the larger relative difference; None for a group with dropout, whose masks
differ), so a row whose wiring is wrong shows it. Bytes are plan.traffic's model. A group run
alone writes its own output: a concat's zero-copy (its branches writing into its output, which
the byte model counts) is not reproduced here, its row times a copy of every branch."""

import torch

from . import api
from .bench import DTYPES, MODES, Setup, check_memory, measure, versions
from .ir import Op
from .plan import traffic
from .runtime.steps import StepState
from .runtime.triton_module import RUNNERS


def _value(net, node_id: int, batch: int, dtype, device) -> torch.Tensor:
    """A random value of node `node_id` as the triton runtime holds it: NHWC, or (N, features)."""
    shape = net.nodes[node_id].shape
    inside = (batch, *shape[1:], shape[0]) if len(shape) == 3 else (batch, *shape)
    return torch.randn(inside, device=device).to(dtype)


def _nchw(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 3, 1, 2) if t.dim() == 4 else t


def _run_steps(model, steps, values: dict, training: bool) -> tuple[torch.Tensor, list]:
    """The steps' output from `values` (node id -> NHWC tensor) and the parameters they use: the
    step executor's loop (runtime/steps.py) over a piece of a network."""
    values, used = dict(values), []
    for step in steps:
        ps = [getattr(model._by_name[p[0]], p[1]) if p is not None else None for p in step.params]
        used += [p for p in ps if isinstance(p, torch.nn.Parameter)]
        state = StepState(training, torch.is_grad_enabled(), model.caches, step.group, step.text)
        inputs = [values[i] if i is not None else None for i in step.inputs]
        values[step.output] = RUNNERS[step.runner](*inputs, *ps, step.spec, state).contiguous()
    return values[steps[-1].output], used


def _run_eager(ref, nodes, values: dict) -> tuple[torch.Tensor, list]:
    """The nodes through the reference backend's ops, from NCHW `values`, and their parameters."""
    values = dict(values)
    for node in nodes:
        values[node.id] = ref._op(node, [values[i] for i in node.inputs])
    used = [p for n in nodes if n.id in ref.layers for p in ref.layers[n.id].parameters()]
    return values[nodes[-1].id], used


def _timed(run, inputs: dict, dy, training: bool):
    """The callable to time: `run(inputs)` without gradients, or with the backward of its output
    against `dy` for every input and parameter that needs a gradient."""
    if not training:
        def infer():
            with torch.no_grad():
                return run(inputs)[0]
        return infer
    wrt_inputs = [t for t in inputs.values() if t.requires_grad]

    def step():
        out, used = run(inputs)
        wrt = wrt_inputs + [p for p in used if p.requires_grad]
        if wrt and out.requires_grad:
            torch.autograd.grad(out, wrt, dy, allow_unused=True)
        return out
    return step


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _models(net, dtype, device):
    """The fused, unfused and reference modules with the fused one's weights. A group is timed on
    its own, so block-level: cross-layer fusion hands a block's z to the next group, which would
    not run here."""
    torch.manual_seed(0)
    fused = api.compile(net, backend="triton", fuse="block", device=device, dtype=dtype)
    unfused = api.compile(net, backend="triton", fuse=False, device=device, dtype=dtype)
    ref = api.compile(net, backend="torch", device=device, dtype=dtype)
    return fused, unfused, ref


def _group_row(net, models, step, batch: int, dtype_name: str, mode: str, setup: Setup) -> dict:
    fused, unfused, ref = models
    dtype, training = DTYPES[dtype_name], mode == "training"
    group = fused.plan.groups[step.group]
    by_output = {s.output: s for s in unfused.program.forward}
    chain = [by_output[n.id] for n in group.nodes]
    ext = [i for i in dict.fromkeys(step.inputs) if i is not None]
    nhwc = {i: _value(net, i, batch, dtype, setup.device).requires_grad_(training and i != 0) for i in ext}
    nchw = {i: _nchw(t.detach()).contiguous().requires_grad_(t.requires_grad) for i, t in nhwc.items()}
    out = _value(net, group.output.id, batch, dtype, setup.device)
    runs = {"fused": (lambda v: _run_steps(fused, [step], v, training), nhwc, out),
            "unfused": (lambda v: _run_steps(unfused, chain, v, training), nhwc, out),
            "eager": (lambda v: _run_eager(ref, group.nodes, v), nchw, _nchw(out).contiguous())}
    times, outputs = {}, {}
    for name, (run, inputs, dy) in runs.items():
        fn = _timed(run, inputs, dy, training)
        outputs[name] = fn()  # also the call before the timing
        times[name] = measure(fn, setup, warm=True)[0]
    dropout = any(n.op is Op.DROPOUT for n in group.nodes) and training
    err = None if dropout else max(_rel(_nchw(outputs[k]), outputs["eager"]) for k in ("fused", "unfused"))
    moved, unmoved = traffic(net, group, batch, dtype.itemsize)[mode]
    return {"network": net.name, "group": step.group, "name": group.name, "ops": "+".join(group.ops), "mode": mode,
            "dtype": dtype_name, "batch": batch, "fused_ms": round(times["fused"], 4),
            "unfused_ms": round(times["unfused"], 4), "eager_ms": round(times["eager"], 4),
            "vs_unfused": round(times["unfused"] / times["fused"], 2), "vs_eager": round(times["eager"] / times["fused"], 2),
            "bytes_fused": moved, "bytes_unfused": unmoved, "bytes_saved": unmoved - moved,
            "err": None if err is None else float(f"{err:.3g}"), **versions(setup)}


def run_groups(net, batch: int, dtype_name: str, modes=MODES, setup: Setup | None = None) -> list[dict]:
    """One row per fused group and mode, in the plan's order."""
    setup = setup or Setup()
    check_memory(net, batch, dtype_name, setup, "training" in modes)
    models = _models(net, DTYPES[dtype_name], setup.device)
    rows = []
    for mode in modes:
        for m in models[1:]:  # the same weights and running statistics at the start of each mode
            m.load_state_dict(models[0].state_dict())
        for m in models:
            m.train(mode == "training")
        rows += [_group_row(net, models, step, batch, dtype_name, mode, setup) for step in models[0].program.forward]
    setup.release()
    return rows
