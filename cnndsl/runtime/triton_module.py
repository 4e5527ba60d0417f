"""The triton backend's module: runs the launch steps of its Program (codegen.py) with the
step executor (steps.py) through the runners of kernels/ that the op registry and the fusion
rules name."""

import importlib

import torch

from ..codegen import lower, runner_of
from ..errors import CnnInputError
from ..ops import REGISTRY
from ..rules import RULES
from . import DTYPES
from .module import NetworkModule
from .steps import run_steps

# The executor's own (forking a value to several readers) and the loss's, with every op's and rule's.
_QUALIFIED = ("add.fork", "add.redirect", "softmax.cross_entropy", *(d.runner for d in REGISTRY.values() if d.runner),
              *(r.runner for r in RULES))
RUNNERS = {runner_of(q): getattr(importlib.import_module(f"..kernels.{q.rsplit('.', 1)[0]}", __package__),
                                 runner_of(q)) for q in _QUALIFIED}


class TritonModule(NetworkModule):
    def __init__(self, net, fuse: bool):
        super().__init__(net, fuse)
        self.program = lower(net, self.plan)
        self.caches = {}  # group -> its folded eval weights (kernels/conv_block.py)
        self._by_name = dict(self.named_modules())  # layer name -> the module holding its parameters

    def train(self, mode: bool = True):
        # (a write through `.data` moves no version counter, so the folded weights cannot see it;
        # switching modes, model.eval() included, folds afresh)
        self.caches.clear()
        return super().train(mode)

    def check_input(self, x) -> None:
        super().check_input(x)
        if self.dtype not in DTYPES or self.device.type not in ("cpu", "cuda"):
            raise CnnInputError(f"{self.net.name}: the model is {self.dtype} on {self.device} (model.to(...) moved "
                                "it); the kernels compute in float32, float16 or bfloat16 on a CPU or a CUDA GPU")

    @property
    def steps(self):
        return self.program.forward

    def _run(self, x: torch.Tensor, logits: bool) -> torch.Tensor:
        steps = self.program.logits if logits else self.program.forward
        return run_steps(steps, x, self._by_name, RUNNERS, self.training, self.caches)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return RUNNERS["cross_entropy"](logits.contiguous(), target.contiguous())
