"""The triton backend's module: runs a plan's launch steps through the autograd
Functions of functions.py, NHWC inside, NCHW at the boundary."""

import torch

from ..codegen import Step, lower
from ..ir import Op
from . import functions as fn
from .module import NetworkModule


def _conv(m, step: Step, x):
    layer = m.layers[step.output]
    k = step.kw
    return fn.ConvFn.apply(x, layer.weight, layer.bias, k["stride"], k["padding"], k["dilation"], k["groups"],
                           k["out_hw"])


def _batchnorm(m, step: Step, x):
    bn = m.layers[step.output]
    k = step.kw
    return fn.BatchNormFn.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                                k["eps"], k["momentum"], m.training)


def _pool(m, step: Step, x):
    k = step.kw
    return fn.PoolFn.apply(x, k["mode"], k["kernel"], k["stride"], k["padding"], k["out_hw"])


def _flatten(m, step: Step, x):  # (N, H, W, C) -> (N, C*H*W) in C, H, W order
    if step.kw["permute"]:
        x = x.permute(0, 3, 1, 2)
    return x.reshape(x.shape[0], -1)


def _dense(m, step: Step, x):
    layer = m.layers[step.output]
    return fn.DenseFn.apply(x, layer.weight, layer.bias)


def _dropout(m, step: Step, x):
    if not m.training or step.kw["p"] == 0:
        return x
    seed = int(torch.randint(2**31 - 1, (), device="cpu"))  # follows torch.manual_seed; CPU, no sync
    return fn.DropoutFn.apply(x, step.kw["p"], seed)


RUNNERS = {  # Op value -> (module, step, *inputs) -> output
    Op.CONV.value: _conv,
    Op.BATCHNORM.value: _batchnorm,
    Op.ACTIVATION.value: lambda m, s, x: fn.ActivationFn.apply(x, s.kw["kind"], s.kw["slope"]),
    Op.POOL.value: _pool,
    Op.GLOBAL_AVGPOOL.value: lambda m, s, x: fn.GlobalAvgPoolFn.apply(x),
    Op.FLATTEN.value: _flatten,
    Op.DENSE.value: _dense,
    Op.DROPOUT.value: _dropout,
    Op.SOFTMAX.value: lambda m, s, x: fn.SoftmaxFn.apply(x),
    Op.ADD.value: lambda m, s, a, b: fn.AddFn.apply(a, b),
}


class TritonModule(NetworkModule):
    def __init__(self, net, fuse: bool):
        super().__init__(net, fuse)
        self.steps = lower(net, self.plan)
        self._readers = {}  # node id -> how many steps read it
        for step in self.steps:
            for i in step.inputs:
                self._readers[i] = self._readers.get(i, 0) + 1

    def _run(self, x: torch.Tensor, logits: bool) -> torch.Tensor:
        steps = self.steps[:-1] if logits and self.net.ends_in_softmax else self.steps
        values = {0: [x.permute(0, 2, 3, 1).contiguous()]}  # (N, H, W, C)
        self._fork(values, 0)
        for step in steps:
            out = RUNNERS[step.op](self, step, *(values[i].pop() for i in step.inputs))
            values[step.output] = [out.contiguous()]
            self._fork(values, step.output)
        out = values[steps[-1].output][0]
        return out.permute(0, 3, 1, 2).contiguous() if out.dim() == 4 else out

    def _fork(self, values, i):
        """A value read by k > 1 steps is handed out as k aliases whose gradients add in a kernel."""
        k = self._readers.get(i, 0)
        if k > 1:
            values[i] = list(fn.ForkFn.apply(values[i][0], k))

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return fn.CrossEntropyFn.apply(logits.contiguous(), target)
