"""Numerical parity of one network on the device, as numbers: the triton backend (fused or
unfused) and the eager reference in the same dtype, each against the reference backend in
float64 on the same rounded weights and inputs, over one training step (the logits, the
loss, the input gradient, every parameter gradient, the BN running statistics after the
step) and the eval forward that follows (batch norm folded). Dropout applies the same masks
everywhere (tests/helpers.FixedDropout). `pytest -m gpu` is the pass/fail gate, group by
group; this records how far whole networks drift, next to how far cuDNN drifts.

Verdict: in fp32 (TF32 off) every triton error within the whole-network bound of the tests
(helpers.tolerance over the longest reduction and the depth); in bf16 within BF16_FACTOR
times eager's error on the same quantity, or within one bf16 kernel's bound."""

import sys
from pathlib import Path

import torch

import cnndsl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import FixedDropout, max_reduction, rel_err, tolerance

BF16_FACTOR = 2.0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _models(net, dtype, fuse: bool, device):
    """(float64 reference, eager in dtype, triton in dtype), all with the triton model's weights."""
    torch.manual_seed(0)
    ref = cnndsl.compile(net, backend="torch", device=device).to(torch.float64)  # compile takes no float64
    tri = cnndsl.compile(net, backend="triton", fuse=fuse, device=device, dtype=dtype)
    tri.load_state_dict(ref.state_dict())
    ref.load_state_dict(tri.state_dict())
    eager = cnndsl.compile(net, backend="torch", device=device, dtype=dtype)
    eager.load_state_dict(tri.state_dict())
    return ref, eager, tri


def _run(model, x, target, masks: FixedDropout, reference: bool) -> dict:
    """One training step's values, then the eval forward's output; a reference model applies
    the dropout masks that the triton model draws under `masks.fixed()`."""
    model.train()
    model.zero_grad(set_to_none=True)
    xi = x.to(model.dtype).clone().requires_grad_()
    if reference:
        model._op = masks.op
    try:
        with masks.fixed():
            loss, logits = model.loss_and_logits(xi, target)
        loss.backward()
        model.eval()
        with torch.no_grad(), masks.fixed():
            out = model(x.to(model.dtype))
    finally:
        model.__dict__.pop("_op", None)
    return {"logits": logits.detach(), "loss": loss.detach().reshape(1), "input_grad": xi.grad,
            "grads": {n: p.grad for n, p in model.named_parameters()},
            "buffers": dict(model.named_buffers()), "eval_output": out}


def _errors(got: dict, ref: dict) -> dict:
    errs = {k: rel_err(got[k], ref[k]) for k in ("logits", "loss", "input_grad", "eval_output")}
    grads = {n: rel_err(g, ref["grads"][n]) for n, g in got["grads"].items()}
    stats = {n: rel_err(b, ref["buffers"][n]) for n, b in got["buffers"].items() if b.is_floating_point()}
    counts = all(torch.equal(b.cpu(), ref["buffers"][n].cpu()) for n, b in got["buffers"].items()
                 if not b.is_floating_point())
    for key, table in (("param_grad", grads), ("bn_stats", stats)):
        worst = max(table, key=table.get, default=None)
        errs[key], errs[f"{key}_worst"] = (table[worst], worst) if worst else (0.0, None)
    return {**{k: v if isinstance(v, str) or v is None else float(f"{v:.3g}") for k, v in errs.items()},
            "batches_tracked_equal": counts}


NUMBERS = ("logits", "loss", "input_grad", "param_grad", "bn_stats", "eval_output")


def _verdict(net, batch: int, dtype_name: str, tri: dict, eager: dict) -> tuple[str, dict]:
    """("ok" or what exceeds its bound, {quantity: bound})."""
    if dtype_name == "fp32":
        bound = tolerance(torch.float32, max_reduction(net, batch), len(net.nodes))
        bounds = dict.fromkeys(NUMBERS, bound)
    else:
        floor = tolerance(torch.bfloat16, max_reduction(net, batch))
        bounds = {k: max(BF16_FACTOR * eager[k], floor) for k in NUMBERS}
    over = [f"{k} {tri[k]:.3g} > {bounds[k]:.3g}" for k in NUMBERS if not tri[k] <= bounds[k]]  # NaN fails too
    if not tri["batches_tracked_equal"]:
        over.append("num_batches_tracked differs")
    return ("ok" if not over else "check: " + "; ".join(over)), {k: float(f"{v:.3g}") for k, v in bounds.items()}


def parity(net, batch: int, dtype_name: str, fuse: bool, device: str) -> dict:
    ref, eager, tri = _models(net, DTYPES[dtype_name], fuse, device)
    torch.manual_seed(1)
    x = torch.randn(batch, *net.input_shape, device=device).to(DTYPES[dtype_name])
    target = torch.randint(0, net.output_shape[0], (batch,), device=device)
    runs = {name: _run(m, x, target, FixedDropout(tri, m if name != "triton" else ref, base=1), name != "triton")
            for name, m in (("ref", ref), ("eager", eager), ("triton", tri))}
    errs = {name: _errors(runs[name], runs["ref"]) for name in ("triton", "eager")}
    verdict, bounds = _verdict(net, batch, dtype_name, errs["triton"], errs["eager"])
    return {"network": net.name, "batch": batch, "dtype": dtype_name, "fuse": fuse, "device": device,
            **errs, "bounds": bounds, "verdict": verdict}
