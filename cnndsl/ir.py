"""The IR: a typed graph in topological order. Each Node is one op with frozen
attributes, the ids of its inputs, its per-sample output shape (C, H, W) or (F,),
a qualified name (`layer1.0.conv1`) and the span of the .cnn text it came from.
Residual branches are ADD nodes with two inputs. No torch here."""

import enum
from dataclasses import dataclass, field

from .errors import Span

Shape = tuple[int, ...]  # per sample: (C, H, W) or (F,)
Pair = tuple[int, int]


class Op(enum.Enum):
    INPUT = "input"
    CONV = "conv"
    BATCHNORM = "batchnorm"
    ACTIVATION = "activation"
    POOL = "pool"
    GLOBAL_AVGPOOL = "global_avgpool"
    FLATTEN = "flatten"
    DENSE = "dense"
    DROPOUT = "dropout"
    SOFTMAX = "softmax"
    ADD = "add"


@dataclass(frozen=True)
class Input:
    pass


@dataclass(frozen=True)
class Conv:
    filters: int
    kernel: Pair
    stride: Pair
    padding: Pair  # top/left; PyTorch 'same' pads any odd remainder at the bottom/right
    dilation: Pair
    groups: int
    bias: bool
    same: bool = False  # padding came from `pad=same`


@dataclass(frozen=True)
class BatchNorm:
    eps: float
    momentum: float
    affine: bool


@dataclass(frozen=True)
class Activation:
    kind: str  # relu, leaky_relu, sigmoid, tanh, gelu, silu
    slope: float = 0.01  # leaky_relu only


@dataclass(frozen=True)
class Pool:
    mode: str  # max or avg
    kernel: Pair
    stride: Pair
    padding: Pair


@dataclass(frozen=True)
class GlobalAvgPool:
    pass


@dataclass(frozen=True)
class Flatten:
    pass


@dataclass(frozen=True)
class Dense:
    units: int
    bias: bool


@dataclass(frozen=True)
class Dropout:
    p: float


@dataclass(frozen=True)
class Softmax:
    pass


@dataclass(frozen=True)
class Add:
    pass


Attrs = Input | Conv | BatchNorm | Activation | Pool | GlobalAvgPool | Flatten | Dense | Dropout | Softmax | Add


@dataclass(frozen=True)
class Node:
    id: int
    op: Op
    attrs: Attrs
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
