"""conv: a 2-D convolution (PyTorch's Conv2d), run by the conv_block rule (rules.py)."""

from dataclasses import dataclass

from ..errors import CnnArgumentError, CnnShapeError
from ..options import Option
from ..specs import MAX_CONV_TAPS
from .base import Kernels, Keyword, OpDef, fmt, numel, spatial, window

Pair = tuple[int, int]


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


def _build(v) -> Conv:
    pad, same = v["pad"], v["pad"] == "same"
    if same:  # PyTorch pads d*(k-1)//2 at the top/left and any remainder at the bottom/right
        pad = tuple(d * (k - 1) // 2 for d, k in zip(v["dilation"], v["kernel"]))
    return Conv(v["filters"], v["kernel"], v["stride"], pad, v["dilation"], v["groups"], v["bias"], same)


def _shape(a: Conv, shape, span):
    c, h, w = spatial("conv", shape, span, hint="conv works on feature maps; it cannot follow flatten or dense")
    if max(a.kernel) > MAX_CONV_TAPS:
        raise CnnArgumentError(f"option 'kernel' is {fmt(a.kernel)}, more than {MAX_CONV_TAPS} taps on an axis", span,
                               hint="a larger receptive field comes from dilation or from stacking convs")
    if a.same and a.stride != (1, 1):
        raise CnnShapeError(f"`pad=same` needs stride 1, got stride {fmt(a.stride)}", span,
                            hint="PyTorch allows 'same' only for stride 1; give the padding, e.g. pad=1")
    for what, n in (("input channels", c), ("filters", a.filters)):
        if n % a.groups:
            raise CnnShapeError(f"groups={a.groups} must divide the {what} ({n})", span)
    pads = [d * (k - 1) if a.same else 2 * p for d, k, p in zip(a.dilation, a.kernel, a.padding)]
    oh = window("conv", h, a.kernel[0], a.stride[0], pads[0], a.dilation[0], "height", span)
    ow = window("conv", w, a.kernel[1], a.stride[1], pads[1], a.dilation[1], "width", span)
    return (a.filters, oh, ow)


def _layer(net, node):
    a, c = node.attrs, net.in_shape(node)[0]
    return "Conv2d", (c, a.filters, a.kernel, a.stride, "same" if a.same else a.padding, a.dilation, a.groups,
                      a.bias), {}


def _reference(layer, a, xs, training):
    return layer(xs[0])


CONV = OpDef(
    "conv", _build, _shape,
    keywords={"conv": Keyword((Option("filters", "count"), Option("kernel", "pair"), Option("stride", "pair", 1),
                               Option("pad", "padding", 0), Option("dilation", "pair", 1),
                               Option("groups", "count", 1), Option("bias", "bool", True)), 2)},
    params=lambda net, node: (node.attrs.filters * (net.in_shape(node)[0] // node.attrs.groups)
                              * node.attrs.kernel[0] * node.attrs.kernel[1] + (node.attrs.filters if node.attrs.bias else 0)),
    macs=lambda net, node: (numel(node.shape) * (net.in_shape(node)[0] // node.attrs.groups)
                            * node.attrs.kernel[0] * node.attrs.kernel[1]),
    layer=_layer,
    kernels=Kernels(("conv_fwd",), ("conv_bwd_input", "conv_bwd_weight")),
    reference=_reference,
)
