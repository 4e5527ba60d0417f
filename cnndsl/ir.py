"""The IR: a typed graph in topological order. Each Node is one op (an op kind of the registry,
cnndsl/ops) with its frozen attributes (the op module's dataclass), the ids of its inputs, its
per-sample output shape (C, H, W) or (F,), a qualified name (`layer1.0.conv1`) and the span of
the .cnn text it came from. Residual branches are ADD nodes with two inputs. No torch here."""

import enum
from dataclasses import dataclass, field

from .errors import Span
from .ops import REGISTRY

Shape = tuple[int, ...]  # per sample: (C, H, W) or (F,)
Pair = tuple[int, int]


# The op kinds: one per definition of the registry (cnndsl/ops), `input` among them.
Op = enum.Enum("Op", [(name.upper(), name) for name in REGISTRY])


@dataclass(frozen=True)
class Node:
    id: int
    op: Op
    attrs: object  # the op's frozen attributes (cnndsl/ops/<op>.py)
    inputs: tuple[int, ...]
    shape: Shape
    name: str
    span: Span | None
    keyword: str  # the .cnn word that made it: conv, maxpool, relu, residual, ...


@dataclass(frozen=True)
class Network:
    """A checked network: nodes in topological (= declaration) order, node 0 the input."""

    name: str
    input_shape: Shape
    nodes: tuple[Node, ...]
    source: str = field(default="", repr=False, compare=False)
    filename: str | None = field(default=None, compare=False)

    @property
    def output(self) -> Node:
        return self.nodes[-1]

    @property
    def output_shape(self) -> Shape:
        return self.nodes[-1].shape

    def in_shape(self, node: Node) -> Shape:
        """Shape of a node's first input."""
        return self.nodes[node.inputs[0]].shape

    @property
    def ends_in_softmax(self) -> bool:
        return self.output.op is Op.SOFTMAX

    def summary(self) -> str:
        from .summary import summary_table
        return summary_table(self)

    def to_json(self) -> dict:
        from .summary import summary_json
        return summary_json(self)
