"""The triton backend's module: runs a plan's launch steps through the autograd
Functions of functions.py, NHWC inside, NCHW at the boundary."""

import torch

from ..codegen import Step, lower
from ..ir import Op
from . import blocks
from . import functions as fn
from .module import NetworkModule


def _conv_block(m, step: Step, x, residual=None):
    k = step.kw
    conv = m.layers[k["conv"]]
    bn = m.layers[k["bn_node"]] if k["bn_node"] is not None else None
    bn_args = (bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked) if bn else (None,) * 5
    return blocks.ConvBlockFn.apply(x, residual, conv.weight, conv.bias, *bn_args, k, m.training,
                                    torch.is_grad_enabled(), m.caches.setdefault(step.group, {}))


def _dense_block(m, step: Step, x, logits=False):
    k = step.kw
    layer = m.layers[k["dense"]]
    if k["flatten"] is not None:
        x = _flatten(x, k["flatten"])
    seed = _seed() if m.training and k["p"] > 0 else None
    return blocks.DenseBlockFn.apply(x, layer.weight, layer.bias, k, seed, k["softmax"] and not logits,
                                     torch.is_grad_enabled())


def _seed() -> int:
    return int(torch.randint(2**31 - 1, (), device="cpu"))  # follows torch.manual_seed; CPU, no sync


def _batchnorm(m, step: Step, x):
    bn = m.layers[step.output]
    k = step.kw
    return fn.BatchNormFn.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                                k["eps"], k["momentum"], m.training)


def _pool(m, step: Step, x):
    k = step.kw
    return fn.PoolFn.apply(x, k["mode"], k["kernel"], k["stride"], k["padding"], k["out_hw"])


def _flatten(x, permute: bool):  # (N, H, W, C) -> (N, C*H*W) in C, H, W order; a view when H = W = 1
    if permute:
        x = x.permute(0, 3, 1, 2)
    return x.reshape(x.shape[0], -1)


def _dropout(m, step: Step, x):
    if not m.training or step.kw["p"] == 0:
        return x
    return fn.DropoutFn.apply(x, step.kw["p"], _seed())


RUNNERS = {  # Op value -> (module, step, *inputs) -> output
    "conv_block": _conv_block,
    "dense_block": _dense_block,
    Op.BATCHNORM.value: _batchnorm,
    Op.ACTIVATION.value: lambda m, s, x: fn.ActivationFn.apply(x, s.kw["kind"], s.kw["slope"]),
    Op.POOL.value: _pool,
    Op.GLOBAL_AVGPOOL.value: lambda m, s, x: fn.GlobalAvgPoolFn.apply(x),
    Op.FLATTEN.value: lambda m, s, x: _flatten(x, s.kw["permute"]),
    Op.DROPOUT.value: _dropout,
    Op.SOFTMAX.value: lambda m, s, x: fn.SoftmaxFn.apply(x),
    Op.ADD.value: lambda m, s, a, b: fn.AddFn.apply(a, b),
}


class TritonModule(NetworkModule):
    def __init__(self, net, fuse: bool):
        super().__init__(net, fuse)
        self.steps = lower(net, self.plan)
        self.caches = {}  # group -> its folded eval weights (see blocks._folded)
        self._readers = {}  # node id -> how many steps read it
        for step in self.steps:
            for i in step.inputs:
                self._readers[i] = self._readers.get(i, 0) + 1

    def _run(self, x: torch.Tensor, logits: bool) -> torch.Tensor:
        values = {0: [x.permute(0, 2, 3, 1).contiguous()]}  # (N, H, W, C)
        self._fork(values, 0)
        skip_softmax = logits and self.net.ends_in_softmax
        steps = self.steps[:-1] if skip_softmax and self.steps[-1].op == Op.SOFTMAX.value else self.steps
        for step in steps:
            args = [values[i].pop() for i in step.inputs]
            if step.op == "dense_block" and step is self.steps[-1]:
                out = _dense_block(self, step, *args, logits=skip_softmax)
            else:
                out = RUNNERS[step.op](self, step, *args)
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
        return fn.CrossEntropyFn.apply(logits.contiguous(), target.contiguous())
