"""cnndsl: a compiler from .cnn model files to fused Triton kernels.

    net = cnndsl.parse("examples/cifar_small.cnn")   # -> Network (checked IR)
    print(net.summary())
    model = cnndsl.compile(net, backend="triton")      # -> torch.nn.Module
    cnndsl.load_weights(model, "resnet18.pth")        # torchvision's weights, in declaration order

The front end (parse, check, summary) needs only lark; compiling needs torch."""

from .api import compile, load_ops, load_weights, parse
from .errors import (
                     CnnArgumentError,
                     CnnDataError,
                     CnnError,
                     CnnInputError,
                     CnnNameError,
                     CnnShapeError,
                     CnnSyntaxError,
                     CnnTrainError,
                     CnnWeightsError,
                     InterpreterWarning,
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
                     "CnnWeightsError",
                     "InterpreterWarning",
                     "Network",
                     "Op",
                     "Span",
                     "compile",
                     "load_ops",
                     "load_weights",
                     "parse",
]
__version__ = "0.1.0"
