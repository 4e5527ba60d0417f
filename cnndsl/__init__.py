"""cnndsl: a compiler from .cnn model files to fused Triton kernels.

    net = cnndsl.parse("examples/cifar_small.cnn")   # -> Network (checked IR)
    print(net.summary())
    model = cnndsl.compile(net, backend="triton")      # -> torch.nn.Module

The front end (parse, check, summary) needs only lark; compiling needs torch."""

from .api import compile, parse
from .errors import (
                     CnnArgumentError,
                     CnnDataError,
                     CnnError,
                     CnnInputError,
                     CnnNameError,
                     CnnShapeError,
                     CnnSyntaxError,
                     CnnTrainError,
                     Span,
)
from .ir import Network, Op

__all__ = [
                     "CnnArgumentError",
                     "CnnDataError",
                     "CnnError",
                     "CnnInputError",
                     "CnnNameError",
                     "CnnShapeError",
                     "CnnSyntaxError",
                     "CnnTrainError",
                     "Network",
                     "Op",
                     "Span",
                     "compile",
                     "parse",
]
__version__ = "0.1.0"
