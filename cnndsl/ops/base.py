"""What the definition of an op kind holds (OpDef), the .cnn words that make it (Keyword), and
the checks its shape rules share. PyTorch's semantics, per sample, NCHW."""

from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import CnnShapeError, Span
from ..specs import window_out

Shape = tuple[int, ...]  # per sample: (C, H, W) or (F,)


@dataclass(frozen=True)
class Keyword:
    """A .cnn word that makes an op: its options, how many may be given by position, and the
    attribute values the word itself fixes (`maxpool`: mode "max"). `op` is filled in by the
    registry."""

    options: tuple = ()
    positional: int = 0
    preset: tuple = ()  # (attribute, value) pairs
    op: str = ""


@dataclass(frozen=True)
class Kernels:
    """The kernels an op launches when it runs alone, as `cnndsl plan` names them: in a training
    forward pass, in backward, and in a forward pass in eval where that differs (batch norm
    applies its running statistics; dropout is the identity)."""

    forward: tuple = ()
    backward: tuple = ()
    eval: tuple | None = None  # None: the training forward's

    @property
    def inference(self) -> tuple:
        return self.forward if self.eval is None else self.eval


def _zero(net, node) -> int:
    return 0


def _no_layer(net, node):
    return None


def _alone(net, node):
    """A step's inputs, parameters and spec when the op runs alone: its inputs, none, none."""
    return node.inputs, (), None


@dataclass(frozen=True)
class OpDef:
    """One op kind of the IR, everything every stage needs of it:

    - front end: `keywords` (the .cnn words that make it), `build` (coerced option values, the
      keyword's preset merged in -> the frozen attributes), `shape` (attributes, per-sample
      input shape, span -> output shape, or a CnnShapeError);
    - counts: `params`, `buffers` (batch norm's running statistics), `macs` (multiply-adds per
      sample), each (net, node) -> int;
    - parameters: `layer` (net, node) -> the torch.nn layer that holds them, as (class name,
      args, kwargs), or None;
    - triton backend, where the op runs alone (no fusion rule takes it): `runner`, the
      function of kernels/ that runs it (through its custom ops) as "module.name"; `step`
      (net, node) -> (inputs,
      parameters as (layer name, attribute) or None, spec); `kernels`, the kernels it
      launches (Kernels), as `cnndsl plan` shows them, and `note`, why it runs alone;
    - torch backend: `reference` (layer or None, attributes, input tensors, training) -> tensor,
      in plain torch ops, importing torch when it runs (the front end never imports torch)."""

    op: str
    build: Callable
    shape: Callable
    keywords: dict = field(default_factory=dict)
    params: Callable = _zero
    buffers: Callable = _zero
    macs: Callable = _zero
    layer: Callable = _no_layer
    runner: str | None = None
    step: Callable = _alone
    kernels: Kernels = Kernels()
    note: str | None = None
    reference: Callable | None = None


def fmt(shape: Shape) -> str:
    return "x".join(map(str, shape))


def spatial(what: str, shape: Shape, span: Span, hint: str | None = None) -> Shape:
    """The shape itself if it is CxHxW, else a CnnShapeError naming `what` needed one."""
    if len(shape) != 3:
        raise CnnShapeError(f"{what} needs a CxHxW input, got a flat input of {fmt(shape)} features",
                            span, expected="a CxHxW feature map", hint=hint)
    return shape


def window(what, size, kernel, stride, pad_total, dilation, axis, span) -> int:
    """The output size of a window over one axis (specs.window_out), refusing a window larger
    than the padded input."""
    extent = dilation * (kernel - 1) + 1
    if extent > size + pad_total:
        dil = f" (dilated extent {extent})" if dilation > 1 else ""
        raise CnnShapeError(f"{what} kernel {kernel}{dil} is larger than the padded input {axis} "
                            f"{size + pad_total} ({size} + padding {pad_total})", span,
                            hint="use a smaller kernel, more padding, or fewer downsampling layers before it")
    return window_out(size, kernel, stride, pad_total, dilation)


def same_shape(attrs, shape: Shape, span: Span) -> Shape:
    return shape


def numel(shape: Shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
