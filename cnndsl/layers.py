"""The layer table: every layer keyword of the language as data — its op, its options
(name, kind, default) and how many may be given positionally — and the coercion of
argument values to each option kind, with the errors for wrong types and ranges."""

import math
from dataclasses import dataclass

from . import ir
from .errors import CnnArgumentError, CnnNameError, Span, did_you_mean
from .ir import Op
from .limits import MAX_SIZE

REQUIRED = object()
KERNEL = object()  # default of a pool's stride: the kernel size


@dataclass(frozen=True)
class Symbol:
    """A bare word that is not a parameter: `same`, `valid`, or a typo."""

    name: str
    span: Span


@dataclass(frozen=True)
class Option:
    name: str
    kind: str  # a key of COERCE
    default: object = REQUIRED


@dataclass(frozen=True)
class LayerSpec:
    op: Op
    options: tuple[Option, ...] = ()
    positional: int = 0  # the first `positional` options may be given without a name
    mode: str | None = None  # activation kind or pool mode


def _conv(v):
    pad, same = v["pad"], v["pad"] == "same"
    if same:  # PyTorch pads d*(k-1)//2 at the top/left and any remainder at the bottom/right
        pad = tuple(d * (k - 1) // 2 for d, k in zip(v["dilation"], v["kernel"]))
    return ir.Conv(v["filters"], v["kernel"], v["stride"], pad, v["dilation"], v["groups"], v["bias"], same)


_POOL = (Option("kernel", "pair"), Option("stride", "pair", KERNEL), Option("pad", "nonneg_pair", 0))

LAYERS: dict[str, LayerSpec] = {
    "conv": LayerSpec(Op.CONV, (Option("filters", "count"), Option("kernel", "pair"), Option("stride", "pair", 1),
                                Option("pad", "padding", 0), Option("dilation", "pair", 1),
                                Option("groups", "count", 1), Option("bias", "bool", True)), 2),
    "batchnorm": LayerSpec(Op.BATCHNORM, (Option("eps", "positive", 1e-5), Option("momentum", "fraction", 0.1),
                                          Option("affine", "bool", True))),
    "relu": LayerSpec(Op.ACTIVATION, mode="relu"),
    "leaky_relu": LayerSpec(Op.ACTIVATION, (Option("slope", "number", 0.01),), 1, mode="leaky_relu"),
    "sigmoid": LayerSpec(Op.ACTIVATION, mode="sigmoid"),
    "tanh": LayerSpec(Op.ACTIVATION, mode="tanh"),
    "gelu": LayerSpec(Op.ACTIVATION, mode="gelu"),
    "silu": LayerSpec(Op.ACTIVATION, mode="silu"),
    "maxpool": LayerSpec(Op.POOL, _POOL, 1, mode="max"),
    "avgpool": LayerSpec(Op.POOL, _POOL, 1, mode="avg"),
    "global_avgpool": LayerSpec(Op.GLOBAL_AVGPOOL),
    "flatten": LayerSpec(Op.FLATTEN),
    "dense": LayerSpec(Op.DENSE, (Option("units", "count"), Option("bias", "bool", True)), 1),
    "dropout": LayerSpec(Op.DROPOUT, (Option("p", "probability", 0.5),), 1),
    "softmax": LayerSpec(Op.SOFTMAX),
}


def build_attrs(spec: LayerSpec, v: dict) -> ir.Attrs:
    """Option values (already coerced) -> the op's frozen attributes."""
    match spec.op:
        case Op.CONV:
            return _conv(v)
        case Op.BATCHNORM:
            return ir.BatchNorm(v["eps"], v["momentum"], v["affine"])
        case Op.ACTIVATION:
            return ir.Activation(spec.mode, v.get("slope", 0.01))
        case Op.POOL:
            stride = v["kernel"] if v["stride"] is KERNEL else v["stride"]
            return ir.Pool(spec.mode, v["kernel"], stride, v["pad"])
        case Op.DENSE:
            return ir.Dense(v["units"], v["bias"])
        case Op.DROPOUT:
            return ir.Dropout(v["p"])
    return {Op.GLOBAL_AVGPOOL: ir.GlobalAvgPool, Op.FLATTEN: ir.Flatten, Op.SOFTMAX: ir.Softmax}[spec.op]()


# --- coercion of evaluated values (int, float, bool, tuple of ints, Symbol) -------------------

def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def show(x) -> str:
    """A value as the .cnn text writes it."""
    if isinstance(x, tuple):
        return "x".join(map(str, x))
    if isinstance(x, bool):
        return "true" if x else "false"
    return x.name if isinstance(x, Symbol) else repr(x)


def _pair(x, lo):
    if _is_int(x) and x >= lo:
        return (x, x)
    if isinstance(x, tuple) and len(x) == 2 and min(x) >= lo:
        return x
    return None


_KINDS = {  # kind: (accept(value) -> coerced or None, what is expected)
    "count": (lambda x: x if _is_int(x) and x > 0 else None, "a positive integer"),
    "pair": (lambda x: _pair(x, 1), "a positive integer or HxW, e.g. 3 or 3x5"),
    "nonneg_pair": (lambda x: _pair(x, 0), "a non-negative integer or HxW, e.g. 1 or 0x1"),
    "padding": (lambda x: (x.name if x.name == "same" else (0, 0) if x.name == "valid" else None)
                if isinstance(x, Symbol) else _pair(x, 0),
                "a non-negative integer, HxW, `same` or `valid`"),
    "positive": (lambda x: float(x) if _is_num(x) and 0 < x < math.inf else None, "a positive number"),
    "fraction": (lambda x: float(x) if _is_num(x) and 0 <= x <= 1 else None, "a number from 0 to 1"),
    "probability": (lambda x: float(x) if _is_num(x) and 0 <= x < 1 else None, "a number in [0, 1)"),
    "number": (lambda x: float(x) if _is_num(x) and math.isfinite(x) else None, "a finite number"),
    "bool": (lambda x: x if isinstance(x, bool) else None, "true or false"),
}
WORDS = {"same", "valid", "true", "false"}
_SIZES = {"count", "pair", "nonneg_pair", "padding"}  # option kinds that become tensor dimensions


def coerce(option: Option, value, span: Span, names=()):
    """Check and convert one argument; `names` are the parameters in scope, for hints."""
    accept, expected = _KINDS[option.kind]
    out = accept(value)
    if option.kind in _SIZES and isinstance(out, (int, tuple)) and (max(out) if isinstance(out, tuple) else out) > MAX_SIZE:
        raise CnnArgumentError(f"option {option.name!r} is {show(out)}, more than the largest size, {MAX_SIZE:,}",
                               span, expected=expected)
    if out is not None:
        return out
    if isinstance(value, Symbol) and value.name not in WORDS:
        hint = did_you_mean(value.name, list(names) + sorted(WORDS))
        raise CnnNameError(f"undefined name {value.name!r} for option {option.name!r}", span,
                           expected=expected, hint=hint)
    raise CnnArgumentError(f"option {option.name!r} cannot be {show(value)}", span, expected=expected)
