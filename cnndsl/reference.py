"""The reference backend: the IR run op by op with plain torch ops (cuDNN on a GPU).
It is the oracle of the tests and the eager baseline of the benchmarks."""

import torch
import torch.nn.functional as F

from . import ir
from .ir import Op
from .runtime.module import NetworkModule, last_uses

_ACTIVATIONS = {
    "relu": lambda x, a: F.relu(x),
    "leaky_relu": lambda x, a: F.leaky_relu(x, a.slope),
    "sigmoid": lambda x, a: torch.sigmoid(x),
    "tanh": lambda x, a: torch.tanh(x),
    "gelu": lambda x, a: F.gelu(x),
    "silu": lambda x, a: F.silu(x),
}


class ReferenceModule(NetworkModule):
    def _op(self, node: ir.Node, xs: list[torch.Tensor]) -> torch.Tensor:
        a, x = node.attrs, xs[0]
        match node.op:
            case Op.CONV | Op.BATCHNORM | Op.DENSE:
                return self.layers[node.id](x)
            case Op.ACTIVATION:
                return _ACTIVATIONS[a.kind](x, a)
            case Op.POOL:
                pool = F.max_pool2d if a.mode == "max" else F.avg_pool2d
                return pool(x, a.kernel, a.stride, a.padding)
            case Op.GLOBAL_AVGPOOL:
                return F.adaptive_avg_pool2d(x, 1)
            case Op.FLATTEN:
                return x.flatten(1)
            case Op.DROPOUT:
                return F.dropout(x, a.p, self.training)
            case Op.SOFTMAX:
                return torch.softmax(x, dim=1)
            case Op.ADD:
                return x + xs[1]
        raise AssertionError(f"no reference for {node.op}")

    def _run(self, x: torch.Tensor, logits: bool) -> torch.Tensor:
        nodes = self.net.nodes[:-1] if logits and self.net.ends_in_softmax else self.net.nodes
        last, values = last_uses(self.net), {0: x}
        for node in nodes[1:]:
            values[node.id] = self._op(node, [values[i] for i in node.inputs])
            for i in node.inputs:
                if last[i] == node.id:
                    del values[i]
        return values[nodes[-1].id]

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target)
