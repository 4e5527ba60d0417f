"""Shape rules (PyTorch semantics, per sample, NCHW), one function per op in a table,
and the per-node counts the summary reports: parameters, BN buffers, multiply-adds."""

from . import ir
from .errors import CnnShapeError, Span
from .ir import Op, Shape


def _fmt(shape: Shape) -> str:
    return "x".join(map(str, shape))


def _spatial(what: str, shape: Shape, span: Span, hint: str | None = None) -> Shape:
    if len(shape) != 3:
        raise CnnShapeError(f"{what} needs a CxHxW input, got a flat input of {_fmt(shape)} features",
                            span, expected="a CxHxW feature map", hint=hint)
    return shape


def _window(what, size, kernel, stride, pad_total, dilation, axis, span) -> int:
    """floor((size + pad_total - dilation*(kernel-1) - 1) / stride) + 1, checked."""
    extent = dilation * (kernel - 1) + 1
    if extent > size + pad_total:
        dil = f" (dilated extent {extent})" if dilation > 1 else ""
        raise CnnShapeError(f"{what} kernel {kernel}{dil} is larger than the padded input {axis} "
                            f"{size + pad_total} ({size} + padding {pad_total})", span,
                            hint="use a smaller kernel, more padding, or fewer downsampling layers before it")
    return (size + pad_total - extent) // stride + 1


def _conv(a: ir.Conv, shape, span):
    c, h, w = _spatial("conv", shape, span, hint="conv works on feature maps; it cannot follow flatten or dense")
    if a.same and a.stride != (1, 1):
        raise CnnShapeError(f"`pad=same` needs stride 1, got stride {_fmt(a.stride)}", span,
                            hint="PyTorch allows 'same' only for stride 1; give the padding, e.g. pad=1")
    for what, n in (("input channels", c), ("filters", a.filters)):
        if n % a.groups:
            raise CnnShapeError(f"groups={a.groups} must divide the {what} ({n})", span)
    pads = [d * (k - 1) if a.same else 2 * p for d, k, p in zip(a.dilation, a.kernel, a.padding)]
    oh = _window("conv", h, a.kernel[0], a.stride[0], pads[0], a.dilation[0], "height", span)
    ow = _window("conv", w, a.kernel[1], a.stride[1], pads[1], a.dilation[1], "width", span)
    return (a.filters, oh, ow)


def _pool(a: ir.Pool, shape, span):
    c, h, w = _spatial(f"{a.mode}pool", shape, span)
    for k, p in zip(a.kernel, a.padding):
        if 2 * p > k:
            raise CnnShapeError(f"{a.mode}pool padding {p} is more than half its kernel {k}", span,
                                hint="PyTorch requires pad <= kernel/2")
    oh = _window(f"{a.mode}pool", h, a.kernel[0], a.stride[0], 2 * a.padding[0], 1, "height", span)
    ow = _window(f"{a.mode}pool", w, a.kernel[1], a.stride[1], 2 * a.padding[1], 1, "width", span)
    return (c, oh, ow)


def _dense(a: ir.Dense, shape, span):
    if len(shape) != 1:
        raise CnnShapeError(f"dense needs a flat input, got a {_fmt(shape)} feature map", span,
                            expected="a flat vector of features", hint="insert `flatten` before dense")
    return (a.units,)


def _softmax(a, shape, span):
    if len(shape) != 1:
        raise CnnShapeError(f"softmax needs a flat input of class scores, got {_fmt(shape)}", span,
                            hint="end the network with `flatten` and `dense CLASSES` before softmax")
    return shape


def _flatten(a, shape, span):
    n = 1
    for d in shape:
        n *= d
    return (n,)


RULES = {  # op -> (attrs, per-sample input shape, span) -> per-sample output shape
    Op.CONV: _conv,
    Op.BATCHNORM: lambda a, s, span: s,
    Op.ACTIVATION: lambda a, s, span: s,
    Op.DROPOUT: lambda a, s, span: s,
    Op.POOL: _pool,
    Op.GLOBAL_AVGPOOL: lambda a, s, span: (_spatial("global_avgpool", s, span)[0], 1, 1),
    Op.FLATTEN: _flatten,
    Op.DENSE: _dense,
    Op.SOFTMAX: _softmax,
}


def infer(op: Op, attrs, shape: Shape, span: Span) -> Shape:
    """The output shape of `op` on a per-sample input `shape`; raises CnnShapeError."""
    out = RULES[op](attrs, shape, span)
    if min(out) <= 0:
        raise CnnShapeError(f"output size {_fmt(out)} is not positive", span)
    return out


def numel(shape: Shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def params(net: ir.Network, node: ir.Node) -> int:
    """Trainable parameters, counted as PyTorch does."""
    a, c = node.attrs, net.in_shape(node)[0] if node.inputs else 0
    if node.op is Op.CONV:
        return a.filters * (c // a.groups) * a.kernel[0] * a.kernel[1] + (a.filters if a.bias else 0)
    if node.op is Op.DENSE:
        return a.units * c + (a.units if a.bias else 0)
    if node.op is Op.BATCHNORM:
        return 2 * c if a.affine else 0
    return 0


def buffers(net: ir.Network, node: ir.Node) -> int:
    """BN running mean and variance (num_batches_tracked not counted)."""
    return 2 * net.in_shape(node)[0] if node.op is Op.BATCHNORM else 0


def macs(net: ir.Network, node: ir.Node) -> int:
    """Multiply-adds per sample of conv and dense (the GEMMs)."""
    a = node.attrs
    if node.op is Op.CONV:
        c = net.in_shape(node)[0]
        return numel(node.shape) * (c // a.groups) * a.kernel[0] * a.kernel[1]
    if node.op is Op.DENSE:
        return a.units * net.in_shape(node)[0]
    return 0
