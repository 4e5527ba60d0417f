"""The triton backend's module: runs the launch steps of its Program (codegen.py) with the
step executor (steps.py) through the autograd Functions of kernels/."""

import torch

from ..codegen import lower
from ..kernels.activation import ActivationFn
from ..kernels.add import AddFn, ForkFn
from ..kernels.batchnorm import BatchNormFn
from ..kernels.conv_block import ConvBlockFn
from ..kernels.dense import DenseBlockFn
from ..kernels.dropout import DropoutFn
from ..kernels.layout import FlattenFn
from ..kernels.pool import GlobalAvgPoolFn, PoolFn
from ..kernels.softmax import CrossEntropyFn, SoftmaxFn
from .module import NetworkModule
from .steps import run_steps

FUNCTIONS = {f.__name__: f for f in (ActivationFn, AddFn, BatchNormFn, ConvBlockFn, CrossEntropyFn, DenseBlockFn,
                                     DropoutFn, FlattenFn, ForkFn, GlobalAvgPoolFn, PoolFn, SoftmaxFn)}


class TritonModule(NetworkModule):
    def __init__(self, net, fuse: bool):
        super().__init__(net, fuse)
        self.program = lower(net, self.plan)
        self.caches = {}  # group -> its folded eval weights (kernels/conv_block.py)
        self._by_name = dict(self.named_modules())  # layer name -> the module holding its parameters

    @property
    def steps(self):
        return self.program.forward

    def _run(self, x: torch.Tensor, logits: bool) -> torch.Tensor:
        steps = self.program.logits if logits else self.program.forward
        return run_steps(steps, x, self._by_name, FUNCTIONS, self.training, self.caches)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return CrossEntropyFn.apply(logits.contiguous(), target.contiguous())
