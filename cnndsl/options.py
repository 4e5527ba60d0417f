"""Layer options as data: an Option (name, kind, default), the values a .cnn argument can
hold (numbers, HxW pairs, true/false, the words `same`/`valid`, a Symbol for any other bare
word) and their coercion to each option kind, with the errors for wrong types and ranges."""

import math
from dataclasses import dataclass

from .errors import CnnArgumentError, CnnNameError, Span, did_you_mean
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
    kind: str  # a key of _KINDS
    default: object = REQUIRED


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
        shown = f"{out:,}" if isinstance(out, int) else show(out)
        raise CnnArgumentError(f"option {option.name!r} is {shown}, more than the largest size, {MAX_SIZE:,}",
                               span, expected=expected)
    if out is not None:
        return out
    if isinstance(value, Symbol) and value.name not in WORDS:
        hint = did_you_mean(value.name, list(names) + sorted(WORDS))
        raise CnnNameError(f"undefined name {value.name!r} for option {option.name!r}", span,
                           expected=expected, hint=hint)
    raise CnnArgumentError(f"option {option.name!r} cannot be {show(value)}", span, expected=expected)
