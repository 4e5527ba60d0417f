"""NetworkModule: the torch.nn.Module both backends share. It owns the parameters
and BN buffers as real torch.nn layers in a tree that mirrors the qualified layer
names (so state dicts and parameter order match the hand-built torch.nn model), checks
inputs at the boundary, and implements forward/loss on top of a backend's `_run`."""

import torch
from torch import nn

from .. import ir
from ..codegen import layer_spec
from ..errors import CnnInputError
from ..ir import Op
from ..plan import plan as make_plan
from .steps import place


def make_layer(net: ir.Network, node: ir.Node) -> nn.Module | None:
    """The torch.nn layer that holds a node's parameters (None for parameter-free ops)."""
    spec = layer_spec(net, node)
    if spec is None:
        return None
    cls, args, kwargs = spec
    return getattr(nn, cls)(*args, **kwargs)


class _Scope(nn.Module):
    """A container for the layers under one name prefix (a block call, a residual)."""


def _place(root: nn.Module, name: str, layer: nn.Module) -> None:
    node = root
    for part in name.split("."):  # the front end refuses these names; a newer torch may add more
        if part not in node._modules and hasattr(node, part):
            raise CnnInputError(f"layer name {name!r}: {part!r} is an attribute of torch.nn.Module in torch "
                                f"{torch.__version__}; rename the layer")
        node = node._modules.get(part, _Scope())
    place(root, name, layer, _Scope)


class NetworkModule(nn.Module):
    """Base of the compiled model: parameters, boundary checks, forward and loss."""

    def __init__(self, net: ir.Network, fuse: bool):
        super().__init__()
        self.net = net
        self.plan = make_plan(net, fuse)
        self.layers: dict[int, nn.Module] = {}  # node id -> its torch.nn layer (also in the module tree)
        for node in net.nodes:
            layer = make_layer(net, node)
            if layer is not None:
                _place(self, node.name, layer)
                self.layers[node.id] = layer
        self._probe = torch.empty(0)  # follows .to(): the module's dtype and device
        self.frozen_bn: set[int] = set()  # batch norms kept in eval mode (finetune.freeze)

    def train(self, mode: bool = True):
        super().train(mode)
        for i in self.frozen_bn:  # on their running statistics, never updated, whatever the mode
            self.layers[i].train(False)
        return self

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._probe = fn(self._probe)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self._probe.dtype

    @property
    def device(self) -> torch.device:
        return self._probe.device

    def check_input(self, x) -> None:
        want = (*self.net.input_shape,)
        if not isinstance(x, torch.Tensor):
            raise CnnInputError(f"{self.net.name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.layout != torch.strided or x.is_nested:
            raise CnnInputError(f"{self.net.name}: expected a dense tensor, got a {x.layout} "
                                f"{'nested ' if x.is_nested else ''}tensor; convert it with x.to_dense()")
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise CnnInputError(f"{self.net.name}: expected input of shape [N, {', '.join(map(str, want))}], "
                                f"got {list(x.shape)}")
        if x.shape[0] == 0:
            raise CnnInputError(f"{self.net.name}: the batch is empty (shape {list(x.shape)})")
        if x.dtype != self.dtype:
            raise CnnInputError(f"{self.net.name}: expected dtype {self.dtype}, got {x.dtype}; "
                                f"convert the input with x.to({self.dtype}) or the model with model.to(...)")
        if x.device != self.device:
            raise CnnInputError(f"{self.net.name}: expected an input on {self.device}, got one on {x.device}")
        if self.training and x.shape[0] == 1:
            for node in self.net.nodes:
                shape = self.net.in_shape(node) if node.op is Op.BATCHNORM else None
                if shape is not None and (len(shape) == 1 or shape[1] * shape[2] == 1):
                    raise CnnInputError(f"{self.net.name}: {node.name} normalises one value per channel at "
                                        f"batch 1 in training; use a batch of 2 or more, or model.eval()")

    def check_target(self, target, n: int) -> None:
        if not isinstance(target, torch.Tensor) or target.dtype != torch.int64 or list(target.shape) != [n]:
            got = f"{target.dtype} {list(target.shape)}" if isinstance(target, torch.Tensor) else type(target).__name__
            raise CnnInputError(f"{self.net.name}: expected target class indices of dtype torch.int64 "
                                f"and shape [{n}], got {got}")
        if target.device != self.device:
            raise CnnInputError(f"{self.net.name}: expected the target on {self.device}, got {target.device}")
        classes = self.net.output_shape[0]
        # On the host, free; a GPU check would wait for the device, and a traced graph has no values.
        if target.device.type == "cpu" and not torch.compiler.is_compiling():
            bad = target.numpy()
            bad = bad[(bad < 0) | (bad >= classes)]
            if bad.size:
                raise CnnInputError(f"{self.net.name}: target class index {int(bad[0])} is outside [0, {classes}) "
                                    f"({bad.size} of {n} targets are)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, C, H, W] -> the network's output ([N, classes] probabilities if it ends in softmax)."""
        self.check_input(x)
        return self._run(x, logits=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The output before a final softmax (the output itself otherwise)."""
        self.check_input(x)
        return self._run(x, logits=True)

    def loss(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the logits against class indices `target` [N]."""
        return self.loss_and_logits(x, target)[0]

    def loss_and_logits(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits) from one forward pass: what a training loop reporting accuracy needs."""
        self.check_input(x)
        if len(self.net.output_shape) != 1:
            raise CnnInputError(f"{self.net.name}: loss needs class scores, but the output is "
                                f"{'x'.join(map(str, self.net.output_shape))}")
        self.check_target(target, x.shape[0])
        logits = self._run(x, logits=True)
        return self._loss(logits, target), logits

    def _run(self, x: torch.Tensor, logits: bool) -> torch.Tensor:
        raise NotImplementedError

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"network={self.net.name!r}, input={list(self.net.input_shape)}"


def last_uses(net: ir.Network) -> dict[int, int]:
    """node id -> id of the last node that reads it, so a runner can free values early."""
    last = {}
    for node in net.nodes:
        for i in node.inputs:
            last[i] = node.id
    return last
