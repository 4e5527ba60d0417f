"""The arithmetic of .cnn arguments: `+ - * / //` over integers and numbers, evaluated in a block
call's bindings, and repetition counts; each operator evaluated counts against MAX_EVALUATIONS,
so that repetitions and block calls cannot multiply a file's arithmetic without bound."""

import math

from . import ast
from .errors import CnnArgumentError, CnnNameError, did_you_mean
from .layers import WORDS, Symbol, show
from .limits import MAX_EVALUATIONS, MAX_INT, MAX_NODES


class Arithmetic:
    def __init__(self):
        self.evaluated = 0  # operators evaluated so far

    def eval(self, e: ast.Expr, env: dict):
        if isinstance(e, ast.Number):
            return e.value
        if isinstance(e, ast.Dims):
            return e.values
        if isinstance(e, ast.Ref):
            if e.name in env:
                return env[e.name]
            return {"true": True, "false": False}.get(e.name, Symbol(e.name, e.span))
        self.spend(1, e.span)
        left, right = self.eval(e.left, env), self.eval(e.right, env)
        for side, value in ((e.left, left), (e.right, right)):
            if isinstance(value, Symbol) and value.name not in WORDS:
                raise CnnNameError(f"undefined name {value.name!r}", value.span, hint=did_you_mean(value.name, env))
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise CnnArgumentError(f"cannot use {show(value)} in arithmetic", side.span, expected="a number")
        if e.op == "//":
            if not (isinstance(left, int) and isinstance(right, int)):
                side, value = (e.left, left) if not isinstance(left, int) else (e.right, right)
                raise CnnArgumentError(f"`//` divides integers and rounds down; {show(value)} is not an integer",
                                       side.span, expected="an integer")
            if right == 0:
                raise CnnArgumentError("division by zero", e.span)
            return left // right
        if e.op == "/":
            if right == 0:
                raise CnnArgumentError("division by zero", e.span)
            if isinstance(left, int) and isinstance(right, int):
                if left % right:
                    raise CnnArgumentError(f"{left} / {right} is not a whole number", e.span)
                return left // right
            return left / right
        out = {"+": left + right, "-": left - right, "*": left * right}[e.op]
        if isinstance(out, int) and abs(out) >= MAX_INT or isinstance(out, float) and not math.isfinite(out):
            raise CnnArgumentError("value too large", e.span)
        return out

    def spend(self, n: int, span) -> None:
        """Count n operators evaluated (a call's bound parameters count one each)."""
        self.evaluated += n
        if self.evaluated > MAX_EVALUATIONS:
            raise CnnArgumentError(f"expanding the network evaluates more than {MAX_EVALUATIONS:,} arithmetic "
                                   "operators", span, hint="check the repetition counts and the block calls' "
                                   "arguments")

    def count(self, rep: ast.Repeat | None, env: dict) -> int:
        if rep is None:
            return 1
        n = self.eval(rep.count, env)
        if isinstance(n, Symbol) and n.name not in WORDS:
            raise CnnNameError(f"undefined name {n.name!r} in repetition", rep.span, hint=did_you_mean(n.name, env))
        if isinstance(n, int) and n > MAX_NODES:
            raise CnnArgumentError(f"repetition count {n:,} is more than the {MAX_NODES:,} layers a network may have",
                                   rep.span)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise CnnArgumentError(f"repetition count must be a positive integer, got {show(n)}", rep.span)
        return n
