"""The kernels `cnndsl plan` lists for a network are the kernels it launches: every Triton kernel
launched by an eval forward (or a training step) is one the plan's inference (or forward and
backward) lists name, and every name in those lists launches. Recorded under Triton's
interpreter, for fused and unfused plans of networks that reach every rule and op."""

from pathlib import Path

import pytest
import torch

import cnndsl
import cnndsl.kernels

from helpers import launches
from test_triton_backend import BRANCHES, EVERYTHING, RESIDUAL

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# The plan's name of a kernel -> the Triton kernels (module.function) that carry it out.
CONV = {"conv_kernel._conv_kernel"}
BY_NAME = {
    "conv_fwd": CONV, "conv_fwd+stats": CONV, "conv_fwd+epilogue": CONV, "conv_fwd+pool": CONV, "conv_bwd_input": CONV,
    "conv_bwd_weight": {"conv_backward._conv_dw_kernel", "conv_backward._depthwise_dw_kernel",
                        "conv_backward._sum_splits_kernel"},
    "bn_fold": {"fold._scale_shift_kernel", "fold._fold_kernel"}, "bn_scale_shift": {"fold._scale_shift_kernel"},
    "bn_stats": {"batchnorm._bn_stats_partial_kernel", "batchnorm._bn_stats_merge_kernel"},
    "bn_merge_stats": {"batchnorm._bn_stats_merge_kernel"},
    "bn_update_running": {"batchnorm._bn_update_running_kernel"}, "bn_apply": {"batchnorm._bn_fwd_kernel"},
    "bn_bwd_reduce": {"batchnorm_backward._bn_bwd_partial_kernel", "batchnorm_backward._bn_bwd_merge_kernel"},
    "bn_sums_in_reader": {"conv_epilogue._sum_tiles_kernel"},  # (the tiles' sums from the reader's kernel)
    "fork_sum_in_reader": CONV,  # (the reader's input gradient adds the shortcut's gradient)
    "bn_bwd_merge": {"batchnorm_backward._bn_bwd_merge_kernel"}, "bn_bwd_apply": {"batchnorm_backward._bn_bwd_kernel"},
    "epilogue_fwd": {"epilogue._epilogue_fwd_kernel"}, "epilogue_bwd": {"epilogue_backward._epilogue_bwd_kernel"},
    "pool_bwd_from_y": {"epilogue_backward._epilogue_bwd_kernel"},
    "epilogue_bwd+bn_reduce": {"epilogue_backward._epilogue_bwd_kernel"},
    "epilogue_bwd+bn_sums": {"epilogue_backward._epilogue_bwd_kernel"},
    "activation_fwd": {"activation._activation_fwd_kernel"}, "activation_bwd": {"activation._activation_bwd_kernel"},
    "pool_fwd": {"epilogue._epilogue_fwd_kernel", "pool._avg_pool_fwd_kernel"}, "pool_bwd": {"pool._pool_bwd_kernel"},
    "global_avgpool_fwd": {"pool._global_avg_fwd_kernel"}, "global_avgpool_bwd": {"pool._global_avg_bwd_kernel"},
    "dense_bwd_input": {"dense._matmul_kernel"}, "dense_bwd_weight": {"dense._matmul_kernel", "dense._colsum_kernel"},
    "dense_epilogue_bwd": {"dense._epilogue_bwd_kernel"},
    "dropout_fwd": {"dropout._dropout_kernel"}, "dropout_bwd": {"dropout._dropout_kernel"},
    "softmax_fwd": {"softmax._softmax_fwd_kernel"}, "softmax_bwd": {"softmax._softmax_bwd_kernel"},
    "add_fwd": {"add._add_kernel"},
    "concat_fwd": {"concat._slice_copy_kernel"}, "concat_bwd": {"concat._slice_copy_kernel"},
    "gate_fwd": {"gate._gate_fwd_kernel"}, "gate_bwd": {"gate._gate_bwd_kernel"},
    "bn_act_bwd": {"epilogue_backward._bn_act_bwd_kernel"},
    "stochastic_depth_fwd": {"stochastic_depth._stochastic_depth_kernel"},
    "stochastic_depth_bwd": {"stochastic_depth._stochastic_depth_kernel"},
}
# What the executor and the loss launch besides the groups: ForkFn's sum of gradients (reading a concat's
# gradient's slice in place, _add_rows_kernel, where the value forks), the cross-entropy.
EXTRA = {"add._add_kernel", "add._add_rows_kernel", "softmax._ce_fwd_kernel", "softmax._mean_kernel",
         "softmax._ce_bwd_kernel"}


def _kernels(name: str) -> set:
    # cross-layer fusion: the same kernels, loading through the prologue or computing dz on load (or
    # scaling x by a gate)
    name = name.removeprefix("gate+").removeprefix("prologue+").removeprefix("dz_on_load+").removeprefix(
        "pooled_dz_on_load+")
    return BY_NAME.get(name) or ({"dense._matmul_kernel"} if name.startswith("dense_fwd") else set())


def _launches(run) -> set:
    """module.function of every Triton kernel `run()` launches."""
    return set(launches(run, lambda kernel, _: f"{kernel.fn.__module__.rsplit('.', 1)[-1]}.{kernel.fn.__name__}",
                        execute=False))


def _check(names: set, launched: set, extra: set, what: str) -> None:
    listed = set().union(*map(_kernels, names))
    assert all(_kernels(n) for n in names), f"{what}: the test knows no kernel for {sorted(n for n in names if not _kernels(n))}"
    unlisted = launched - listed - extra
    assert not unlisted, f"{what}: launched but not in the plan: {sorted(unlisted)}"
    silent = sorted(n for n in names if not _kernels(n) & launched)
    assert not silent, f"{what}: in the plan but never launched: {silent}"


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("src", [RESIDUAL, EVERYTHING, BRANCHES, (EXAMPLES / "digits.cnn").read_text()],
                         ids=["residual", "everything", "branches", "digits"])
def test_the_plan_lists_the_kernels_each_mode_launches(src, fuse):
    model = cnndsl.compile(src, backend="triton", fuse=fuse, device="cpu")
    net, groups = model.net, model.plan.groups
    x, target = torch.randn(2, *net.input_shape), torch.randint(0, net.output_shape[0], (2,))
    with torch.no_grad():
        model.eval()
        inference = _launches(lambda: model(x))
    _check({k for g in groups for k in g.inference}, inference, set(), "eval")
    model.train()
    training = _launches(lambda: model.loss(x.requires_grad_(), target).backward())
    names = {k for g in groups for k in g.forward + g.backward}
    if net.ends_in_softmax:  # model.loss hands the final softmax (alone or fused) to the cross-entropy
        names -= {"softmax_fwd", "softmax_bwd"}
    _check(names, training, EXTRA, "training")
