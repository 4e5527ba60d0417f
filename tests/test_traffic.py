"""The byte model (cnndsl/traffic.py, `cnndsl plan`'s MB) counts what the kernels move: every
Triton launch of one training step (input images without a gradient, as in training) is
recorded under the interpreter with the kernels skipped (tests/hopper.py: no launch depends on
what a kernel computed), and the sizes of the tensors each launch reads and writes add up to
the plan's figure within 10%, fused (cross-layer), block-level and unfused. A tensor a launch
takes counts once per launch (an argument standing in for an absent one aliases another and
counts once, at that one's share), except where a launch touches part of it: a conv input
gradient's stride phase writes its own pixels of dx (and reads z there, for a deferred batch
norm's sums), reads only its taps of w, and reads nothing of dy without a tap."""

import collections
from pathlib import Path

import pytest
import torch
from test_cross_layer import CHAIN

import cnndsl
from cnndsl.plan import traffic
from cnndsl.specs import INTERPRETER

from test_triton_backend import BRANCHES, EVERYTHING, RESIDUAL

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _launch_bytes(kernel, args, kwargs) -> int:
    values = {**dict(zip(kernel.arg_names, args)), **kwargs}
    share = {}
    if kernel.fn.__name__ == "_conv_kernel":  # one stride phase of an input gradient (all of it otherwise)
        share = {"y_ptr": 1.0 if values["POOL"] else values["GH"] * values["GW"] / (values["OH"] * values["OW"]),
                 "w_ptr": values["RC"] * values["SC"] / (values["R"] * values["S"]),
                 "x_ptr": float(values["RC"] * values["SC"] > 0), "gp_z_ptr": float(values["RC"] * values["SC"] > 0)}
        share["res_ptr"] = share["y_ptr"]  # read at dst's pixels: the residual, or z (PRO_GRADS)
    seen = {}
    for name, value in values.items():
        if isinstance(value, torch.Tensor) and value.numel():
            size = value.numel() * value.element_size() * share.get(name, 1.0)
            # an argument standing in for an absent one (dst for the bias, the gate, ...) takes the share
            # of the one it aliases
            pick = min if share and value.data_ptr() in seen else max
            seen[value.data_ptr()] = pick(seen.get(value.data_ptr(), 0), size)
    return sum(seen.values())


def _recorded(model, batch) -> float:
    from triton.runtime.interpreter import InterpretedFunction
    total = [0.0]

    def record(self, *args, grid, warmup, **kwargs):
        if not warmup:
            total[0] += _launch_bytes(self, args, kwargs)
    x = torch.randn(batch, *model.net.input_shape).to(model.dtype)
    target = torch.randint(0, model.net.output_shape[0], (batch,))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(InterpretedFunction, "run", record)
        model.train()
        model.loss(x, target).backward()
    return total[0]


# The examples (tiny networks such as the tests' are dominated by the per-channel vectors the model
# leaves out); the batch is small, the tensors as large as training's (224x224 for the ImageNet ones).
@pytest.mark.parametrize("fuse", [True, "block", False], ids=["fused", "block", "unfused"])
@pytest.mark.parametrize("name", sorted(p.stem for p in EXAMPLES.glob("*.cnn")))
def test_the_byte_model_adds_up_what_the_launches_move(name, fuse):
    batch = 2
    torch.manual_seed(0)
    model = cnndsl.compile(EXAMPLES / f"{name}.cnn", backend="triton", fuse=fuse, device="cpu").to(torch.bfloat16)
    modelled = sum(traffic(model.net, g, batch, 2, INTERPRETER)["training"][0 if fuse else 1]
                   for g in model.plan.groups)
    recorded = _recorded(model, batch)
    assert abs(recorded / modelled - 1) <= 0.10, f"{name}: recorded {recorded / 1e6:.3f} MB, modelled " \
                                                 f"{modelled / 1e6:.3f} MB"


def test_every_kernel_the_plans_list_has_a_model():
    from cnndsl.plan import plan
    from cnndsl.traffic import KERNEL_BYTES
    named = collections.Counter()
    for src in [CHAIN, RESIDUAL, EVERYTHING, BRANCHES, *sorted(EXAMPLES.glob("*.cnn"))]:
        net = cnndsl.parse(src) if isinstance(src, str) else cnndsl.parse(src.read_text())
        for fuse in (True, "block", False):
            for g in plan(net, fuse).groups:
                for k in g.inference + g.forward + g.backward:
                    named[k.removeprefix("prologue+").removeprefix("gate+")] += 1  # as kernel_bytes reads them
    unknown = [k for k in named if k not in KERNEL_BYTES and not k.startswith("dense_fwd")]
    assert not unknown, unknown


@pytest.mark.parametrize("fuse", [True, "block"], ids=["fused", "block"])
def test_no_group_moves_more_fused_than_unfused(fuse):
    from cnndsl.plan import plan
    for path in sorted(EXAMPLES.glob("*.cnn")):
        net = cnndsl.parse(path.read_text())
        for g in plan(net, fuse).groups:
            fused, unfused = traffic(net, g, 64, 2)["training"]
            assert fused <= unfused, f"{path.stem} {g.name}: {fused:,} bytes fused, {unfused:,} unfused"
