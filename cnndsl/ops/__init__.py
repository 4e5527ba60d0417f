"""The op registry: one definition (base.OpDef) per op kind of the IR, each in its own module
here, holding everything the stages need of it: the .cnn keywords and their options, its
attributes and shape rule, its parameter, buffer and multiply-add counts, the torch.nn layer
that holds its parameters, how the triton backend runs it alone (a runner of kernels/, its
step and the kernels it launches) and its reference implementation in torch.
Every per-op table of the compiler is derived from REGISTRY; tests/test_registry.py checks
that each op has the parts it needs. Adding a layer kind is a module here (or a keyword of an
existing one), its kernel, docs/language.md and tests: docs/architecture.md walks through it.

Nothing here imports torch when imported: the front end reads the registry without it."""

from dataclasses import dataclass, replace

from .activation import ACTIVATION
from .add import ADD
from .base import Keyword, OpDef, same_shape
from .batchnorm import BATCHNORM
from .concat import CONCAT
from .conv import CONV
from .dense import DENSE
from .dropout import DROPOUT
from .flatten import FLATTEN
from .gate import GATE
from .global_avgpool import GLOBAL_AVGPOOL
from .pool import POOL
from .softmax import SOFTMAX
from .stochastic_depth import STOCHASTIC_DEPTH


@dataclass(frozen=True)
class Input:
    """The network's input: node 0 of every network, made by the `input` line."""


INPUT = OpDef("input", lambda v: Input(), same_shape)

REGISTRY: dict[str, OpDef] = {d.op: d for d in (INPUT, CONV, BATCHNORM, ACTIVATION, POOL, GLOBAL_AVGPOOL, FLATTEN,
                                                DENSE, DROPOUT, STOCHASTIC_DEPTH, SOFTMAX, ADD,
                                                CONCAT, GATE)}

# Every .cnn layer word -> its Keyword (with `op` filled in), in the registry's order.
KEYWORDS: dict[str, Keyword] = {word: replace(kw, op=d.op) for d in REGISTRY.values()
                                for word, kw in d.keywords.items()}

__all__ = ["KEYWORDS", "REGISTRY", "Input", "Keyword", "OpDef"]
