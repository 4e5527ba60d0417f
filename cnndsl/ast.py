"""The AST: frozen dataclasses built by parse.py, one per grammar rule, each with the
source span it came from. Values are expressions, evaluated during elaboration."""

from dataclasses import dataclass

from .errors import Span


@dataclass(frozen=True)
class Number:
    value: int | float
    span: Span


@dataclass(frozen=True)
class Dims:
    """`3x3`, `3x32x32`."""

    values: tuple[int, ...]
    span: Span


@dataclass(frozen=True)
class Ref:
    """A bare word: a block parameter, or a symbol such as `same`, `true`."""

    name: str
    span: Span


@dataclass(frozen=True)
class BinOp:
    op: str  # one of + - * / //
    left: "Expr"
    right: "Expr"
    span: Span
    operators: int = 1  # in the whole expression (so also its nesting depth's bound)


Expr = Number | Dims | Ref | BinOp


@dataclass(frozen=True)
class Arg:
    name: str | None  # None for a positional argument
    value: Expr
    span: Span


@dataclass(frozen=True)
class Repeat:
    """`x N`: N an expression, e.g. `x 2` or `x n - 1` inside a block."""

    count: "Expr"
    span: Span


@dataclass(frozen=True)
class Layer:
    """A layer or a block call: `[label:] NAME args [x N]`."""

    name: str
    args: tuple[Arg, ...]
    label: str | None
    repeat: Repeat | None
    span: Span
    name_span: Span


@dataclass(frozen=True)
class Residual:
    """`residual { body } [shortcut { ... }] [x N]`: body(x) + shortcut(x)."""

    body: tuple["Stmt", ...]
    shortcut: tuple["Stmt", ...] | None
    label: str | None
    repeat: Repeat | None
    span: Span


@dataclass(frozen=True)
class Branch:
    """`branch { body }` of a concat: body(x), or x itself when the body is empty."""

    body: tuple["Stmt", ...]
    span: Span


@dataclass(frozen=True)
class Concat:
    """`concat { branch { ... } ... } [x N]`: the branches' outputs side by side along channels."""

    branches: tuple[Branch, ...]
    label: str | None
    repeat: Repeat | None
    span: Span


@dataclass(frozen=True)
class Gate:
    """`gate { body } [x N]`: x * body(x), body(x) one value per channel (squeeze-and-excitation)."""

    body: tuple["Stmt", ...]
    label: str | None
    repeat: Repeat | None
    span: Span


@dataclass(frozen=True)
class Param:
    name: str
    default: Expr | None
    span: Span


@dataclass(frozen=True)
class Block:
    """`block NAME(params) { body }`: a parameterised macro of statements."""

    name: str
    params: tuple[Param, ...]
    body: tuple["Stmt", ...]
    span: Span
    name_span: Span


Stmt = Layer | Residual | Concat | Gate | Block


@dataclass(frozen=True)
class Program:
    name: str
    input: Dims
    stmts: tuple[Stmt, ...]
    span: Span
