"""The reference backend: the IR run op by op with plain torch ops (cuDNN on a GPU), each op's
reference implementation from its definition (cnndsl/ops). It is the oracle of the tests and
the eager baseline of the benchmarks."""

import torch
import torch.nn.functional as F

from .ops import REGISTRY
from .runtime.module import NetworkModule, last_uses


class ReferenceModule(NetworkModule):
    def _run(self, x: torch.Tensor, logits: bool) -> torch.Tensor:
        nodes = self.net.nodes[:-1] if logits and self.net.ends_in_softmax else self.net.nodes
        last, values = last_uses(self.net), {0: x}
        for node in nodes[1:]:
            values[node.id] = self._op(node, [values[i] for i in node.inputs])
            for i in set(node.inputs):  # (a value may be read twice: `concat { branch { } branch { } }`)
                if last[i] == node.id:
                    del values[i]
        return values[nodes[-1].id]

    def _op(self, node, xs: list[torch.Tensor]) -> torch.Tensor:
        return REGISTRY[node.op.value].reference(self.layers.get(node.id), node.attrs, xs, self.training)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target)
