"""AST -> IR: expand block calls (binding positional, keyword and default arguments),
repetitions and residual branches into a flat graph of ir.Nodes in declaration order,
naming every node, evaluating argument expressions and inferring each shape."""

import math
from functools import cache

from . import ast, ir
from .arith import Arithmetic
from .errors import (
    CnnArgumentError,
    CnnError,
    CnnNameError,
    CnnShapeError,
    CnnSyntaxError,
    did_you_mean,
)
from .ir import Op
from .layers import KERNEL, LAYERS, REQUIRED, WORDS, Symbol, coerce
from .limits import (
    MAX_DEPTH,
    MAX_EXPANSIONS,
    MAX_NAME_CHARS,
    MAX_NESTING,
    MAX_NODES,
    MAX_SIZE,
    MAX_VALUES,
)
from .names import Scope
from .ops import REGISTRY
from .shapes import infer


@cache
def _default(option):
    """An option's default, coerced once (a layer repeated 100,000 times needs it as often)."""
    return coerce(option, option.default, None)


RESERVED = {"network", "input", "block", "residual", "shortcut", "concat", "branch", "gate", "x"} | WORDS


class Bindings(dict):
    """A block's parameters' values (never changed once bound), and `key`: a small int, equal
    for equal bindings, that the caches use; a key of the bindings themselves would cost their
    length in every lookup (a block of thousands of parameters repeated thousands of times)."""

    __slots__ = ("key",)


class _Builder:
    def __init__(self, program: ast.Program):
        self.program = program
        self.nodes: list[ir.Node] = []
        self.blocks: dict[str, ast.Block] = {}
        self.expanded = 0  # statements expanded so far, against MAX_EXPANSIONS
        self.checked: dict = {}  # (statement, arguments, input shape) -> (attrs, shape), see layer()
        self.bound: dict = {}  # (block call, arguments) -> its parameters' values, see call()
        self.name_chars = 0  # of every layer's name so far, bounded by MAX_NAME_CHARS
        self.keys: dict = {}  # typed bindings -> Bindings.key
        self.arith = Arithmetic()
        for stmt in program.stmts:
            if isinstance(stmt, ast.Block):
                self._define(stmt)

    def _define(self, block: ast.Block):
        if block.name in LAYERS or block.name in RESERVED:
            raise CnnNameError(f"block {block.name!r} has the name of a built-in layer or word", block.name_span,
                               hint="choose another name for the block")
        if block.name in self.blocks:
            first = self.blocks[block.name].span.line
            raise CnnNameError(f"block {block.name!r} is already defined at line {first}", block.name_span)
        todo = list(block.body)
        while todo:  # a block defined anywhere inside this one, even if it is never called
            s = todo.pop()
            if isinstance(s, ast.Block):
                raise CnnNameError(f"block {s.name!r} is defined inside another block or branch",
                                   s.name_span, hint="define blocks at the top level of the file")
            if isinstance(s, ast.Residual):
                todo += [*s.body, *(s.shortcut or ())]
            if isinstance(s, ast.Concat):
                todo += [t for b in s.branches for t in b.body]
            if isinstance(s, ast.Gate):
                todo += s.body
        seen = set()
        for p in block.params:
            if p.name in RESERVED:
                raise CnnNameError(f"parameter {p.name!r} of block {block.name!r} is a reserved word", p.span,
                                   hint="choose another parameter name")
            if p.name in seen:
                raise CnnNameError(f"parameter {p.name!r} appears twice in block {block.name!r}", p.span)
            seen.add(p.name)
        self.blocks[block.name] = block

    def add(self, op, attrs, inputs, shape, name, span, keyword) -> int:
        self.project(len(self.nodes), 0, span)  # the layers with this one (nodes[0] is the input, not a layer)
        _check_values(shape, keyword, span)
        self.name_chars += len(name)
        if self.name_chars > MAX_NAME_CHARS:  # (each holds the labels of the block calls it is in)
            raise CnnNameError(f"the layers' names add up to more than {MAX_NAME_CHARS:,} characters (each name "
                               "holds the labels of the block calls it is in)", span, hint="use shorter labels")
        self.nodes.append(ir.Node(len(self.nodes), op, attrs, tuple(inputs), shape, name, span, keyword))
        return len(self.nodes) - 1

    # --- statements ----------------------------------------------------------------------------
    def stmts(self, stmts, cur: int, env: dict, scope: Scope, stack: tuple, nesting: int = 0) -> int:
        """Expand `stmts` after node `cur`; `stack` holds the block calls around them and
        `nesting` counts the residual branches around them."""
        for stmt in stmts:
            if isinstance(stmt, ast.Block):
                if stack or scope.prefix:
                    raise CnnNameError(f"block {stmt.name!r} is defined inside another block or branch",
                                       stmt.name_span, hint="define blocks at the top level of the file")
                continue
            reps = self.arith.count(stmt.repeat, env)
            layers, expanded = len(self.nodes) - 1, self.expanded
            for i in range(reps):
                if i == 1:  # every repetition makes what the first made: past a bound, say so now
                    self.project(layers + (len(self.nodes) - 1 - layers) * reps,
                                 expanded + (self.expanded - expanded) * reps, stmt.span)
                self.expand(1, stmt.span)
                label = stmt.label if stmt.label is None or reps == 1 else f"{stmt.label}.{i}"
                if isinstance(stmt, ast.Residual):
                    cur = self.residual(stmt, cur, env, scope.name(label, "residual", stmt.span), stack, nesting)
                elif isinstance(stmt, ast.Concat):
                    cur = self.concat(stmt, cur, env, scope.name(label, "concat", stmt.span), stack, nesting)
                elif isinstance(stmt, ast.Gate):
                    cur = self.gate(stmt, cur, env, scope.name(label, "gate", stmt.span), stack, nesting)
                elif stmt.name in LAYERS:
                    cur = self.layer(stmt, cur, env, scope.name(label, stmt.name, stmt.span))
                elif stmt.name in self.blocks:
                    cur = self.call(stmt, cur, env, scope.name(label, stmt.name, stmt.span), stack, nesting)
                else:
                    raise CnnNameError(f"unknown layer {stmt.name!r}", stmt.name_span,
                                       expected="a layer (" + ", ".join(LAYERS) + ") or a block defined with `block`",
                                       hint=did_you_mean(stmt.name, [*LAYERS, *self.blocks]))
        return cur

    def expand(self, n: int, span) -> None:
        """Count n statements (or a concat's branches) expanded: empty ones make no layers but still cost work."""
        self.expanded += n
        self.project(0, self.expanded, span)

    @staticmethod
    def project(layers: int, expanded: int, span) -> None:
        """Refuse a network of more layers or expanded statements than the bounds: as they come (add,
        expand), or as a repetition foresees them after its first."""
        if layers > MAX_NODES:
            raise CnnArgumentError(f"the network expands to more than {MAX_NODES:,} layers", span,
                                   hint="check the repetition counts")
        if expanded > MAX_EXPANSIONS:
            raise CnnArgumentError(f"the network expands to more than {MAX_EXPANSIONS:,} statements "
                                   "(layers, block calls, residuals and concat branches, each repetition counted)",
                                   span, hint="check the repetition counts and the blocks they call")

    def bind(self, params, args, env, owner: str, what: str, positional: int):
        """Match arguments to named parameters: the first `positional` by position, then
        keywords. `what` is "option" (a layer's) or "parameter" (a block's)."""
        names = [p.name for p in params]
        out, where = {}, {}
        given = [a for a in args if a.name is None]
        if len(given) > positional:
            shown = names[:positional]
            raise CnnArgumentError(f"{owner} takes {positional} positional argument{'s' if positional != 1 else ''}"
                                   f", got {len(given)}", given[positional].span,
                                   expected=f"{owner} {' '.join(n.upper() for n in shown)}".rstrip()
                                   + (" then name=value options" if what == "option" and len(names) > positional
                                      else ""))
        for p, a in zip(params, given):
            out[p.name], where[p.name] = self.arith.eval(a.value, env), a.value.span
        for a in args:
            if a.name is None:
                continue
            if a.name not in names:
                raise CnnNameError(f"{owner} has no {what} {a.name!r}", a.span,
                                   expected=", ".join(names) or f"no {what}s", hint=did_you_mean(a.name, names))
            if a.name in out:
                raise CnnArgumentError(f"{owner}: {a.name!r} is given twice", a.span)
            out[a.name], where[a.name] = self.arith.eval(a.value, env), a.value.span
        return out, where

    def bindings(self, values: dict) -> Bindings:
        env = Bindings(values)
        env.key = self.keys.setdefault(_typed(values), len(self.keys))
        return env

    def layer(self, stmt: ast.Layer, cur: int, env: Bindings, name: str) -> int:
        # The same statement with the same arguments on the same input (a repeated block) is
        # checked once: attributes and shape depend on nothing else.
        key = (id(stmt), env.key, self.nodes[cur].shape)
        if key not in self.checked:
            self.checked[key] = self._check_layer(stmt, env, self.nodes[cur].shape)
        attrs, shape = self.checked[key]
        return self.add(Op(LAYERS[stmt.name].op), attrs, [cur], shape, name, stmt.span, stmt.name)

    def _check_layer(self, stmt: ast.Layer, env: dict, in_shape) -> tuple:
        spec = LAYERS[stmt.name]
        values, where = self.bind(spec.options, stmt.args, env, stmt.name, "option", spec.positional)
        for opt in spec.options:
            if opt.name in values:
                values[opt.name] = coerce(opt, values[opt.name], where[opt.name], env)
            elif opt.default is KERNEL:
                values[opt.name] = KERNEL
            elif opt.default is not REQUIRED:
                values[opt.name] = _default(opt)
            else:
                raise CnnArgumentError(f"{stmt.name} needs {opt.name!r}", stmt.span,
                                       expected=f"{stmt.name} " + " ".join(o.name.upper() for o in
                                                                            spec.options[:spec.positional]))
        attrs = REGISTRY[spec.op].build({**dict(spec.preset), **values})
        return attrs, infer(Op(spec.op), attrs, in_shape, stmt.span)

    def call(self, stmt: ast.Layer, cur: int, env: Bindings, name: str, stack: tuple, nesting: int) -> int:
        block = self.blocks[stmt.name]
        if block.name in stack:
            chain = " -> ".join((*stack, block.name))
            raise CnnNameError(f"block {block.name!r} calls itself ({chain})", stmt.name_span,
                               hint="blocks cannot be recursive; use repetition `x N`")
        if len(stack) >= MAX_DEPTH:
            raise CnnNameError(f"block calls are nested more than {MAX_DEPTH} deep", stmt.name_span)
        # The same call with the same arguments (a repeated block) binds once: its values depend on nothing else.
        key = (id(stmt), env.key)
        if key not in self.bound:
            self.arith.spend(len(block.params), stmt.span)  # (binding work grows with the parameters too)
            self.bound[key] = self.bindings(self._bind_call(stmt, block, env))
        try:
            return self.stmts(block.body, cur, self.bound[key], Scope(name), (*stack, block.name), nesting)
        except CnnError as err:
            err.notes.append(f"in block {block.name!r} called at line {stmt.span.line}")
            raise

    def _bind_call(self, stmt: ast.Layer, block: ast.Block, env: dict) -> dict:
        inner, where = self.bind(block.params, stmt.args, env, block.name, "parameter", len(block.params))
        for param, value in inner.items():
            if isinstance(value, Symbol) and value.name not in WORDS:
                raise CnnNameError(f"undefined name {value.name!r} in the call of {block.name!r}", where[param],
                                   hint=did_you_mean(value.name, [*env, *WORDS]))
        for p in block.params:
            if p.name not in inner:
                if p.default is None:
                    raise CnnArgumentError(f"block {block.name!r} needs argument {p.name!r}", stmt.span,
                                           expected=f"{block.name}(" + ", ".join(q.name for q in block.params) + ")")
                value = self.arith.eval(p.default, inner)
                if isinstance(value, Symbol) and value.name not in WORDS:
                    raise CnnNameError(f"the default of {p.name!r} uses {value.name!r}, which is not an earlier "
                                       f"parameter of block {block.name!r}", value.span,
                                       hint=did_you_mean(value.name, inner))
                inner[p.name] = value
        return inner

    def residual(self, stmt: ast.Residual, cur: int, env: dict, name: str, stack: tuple, nesting: int) -> int:
        if not stmt.body:
            raise CnnShapeError("a residual branch needs at least one layer", stmt.span)
        _check_nesting(stmt, nesting)
        scope = Scope(name, {"add", "shortcut"})
        branch = self.stmts(stmt.body, cur, env, scope, stack, nesting + 1)
        short = cur
        if stmt.shortcut:
            short = self.stmts(stmt.shortcut, cur, env, Scope(f"{name}.shortcut"), stack, nesting + 1)
        b, s = self.nodes[branch].shape, self.nodes[short].shape
        if b != s:
            fmt = "x".join
            what = "its shortcut ends in" if stmt.shortcut else "its input is"
            hint = None
            if not stmt.shortcut and len(b) == 3 and len(s) == 3 and s[1] % b[1] == 0:
                st = s[1] // b[1]
                hint = (f"add a projection: `}} shortcut {{` with `conv {b[0]} 1x1 stride={st} bias=false` "
                        "and `batchnorm`")
            raise CnnShapeError(f"residual branch ends in {fmt(map(str, b))} but {what} {fmt(map(str, s))}",
                                stmt.span, hint=hint)
        return self.add(Op.ADD, REGISTRY["add"].build({}), [branch, short], b, f"{name}.add", stmt.span, "residual")


    def concat(self, stmt: ast.Concat, cur: int, env: dict, name: str, stack: tuple, nesting: int) -> int:
        if len(stmt.branches) < 2:
            raise CnnShapeError(f"a concat needs at least two branches, got {len(stmt.branches)}", stmt.span,
                                expected="`branch { ... }` lines inside `concat { }`; `branch { }` is the input itself")
        _check_nesting(stmt, nesting)
        self.expand(len(stmt.branches), stmt.span)
        ends = [self.stmts(b.body, cur, env, Scope(f"{name}.branch{i}"), stack, nesting + 1)
                for i, b in enumerate(stmt.branches, 1)]
        shapes = [self.nodes[e].shape for e in ends]
        if any(len(s) != 3 for s in shapes) or len({s[1:] for s in shapes}) > 1:
            each = "; ".join(f"branch {i} (line {b.span.line}) ends in {'x'.join(map(str, s))}"
                             for i, (b, s) in enumerate(zip(stmt.branches, shapes), 1))
            flat = any(len(s) != 3 for s in shapes)
            raise CnnShapeError(("concat joins CxHxW feature maps" if flat else
                                 "concat branches must agree on height and width") + f": {each}", stmt.span,
                                hint=None if flat else "give every branch the same strides and padding "
                                "(a 3x3 conv keeps the size with pad=1, a 5x5 with pad=2)")
        shape = (sum(s[0] for s in shapes), *shapes[0][1:])
        return self.add(Op.CONCAT, REGISTRY["concat"].build({}), ends, shape, f"{name}.concat", stmt.span, "concat")


    def gate(self, stmt: ast.Gate, cur: int, env: dict, name: str, stack: tuple, nesting: int) -> int:
        if not stmt.body:
            raise CnnShapeError("a gate needs at least one layer", stmt.span,
                                expected="layers that compute one value per channel, e.g. global_avgpool, "
                                         "conv, relu, conv, sigmoid")
        _check_nesting(stmt, nesting)
        x = self.nodes[cur].shape
        if len(x) != 3:
            raise CnnShapeError(f"a gate scales the channels of a CxHxW feature map, got a flat input of "
                                f"{x[0]} features", stmt.span)
        end = self.stmts(stmt.body, cur, env, Scope(name, {"gate"}), stack, nesting + 1)
        g = self.nodes[end].shape
        if g not in ((x[0], 1, 1), (x[0],)):
            shown = "x".join(map(str, g))
            raise CnnShapeError(f"a gate's layers must end in one value per channel of its input, "
                                f"{x[0]}x1x1 (or {x[0]}), but end in {shown}", stmt.span,
                                hint="start the gate with global_avgpool and end it with a conv or dense layer "
                                     f"of {x[0]} outputs and a sigmoid")
        return self.add(Op.GATE, REGISTRY["gate"].build({}), [cur, end], x, f"{name}.gate", stmt.span, "gate")


def _check_nesting(stmt, nesting: int) -> None:
    """Residual, concat and gate branches (through block calls too) nest at most MAX_NESTING deep."""
    if nesting >= MAX_NESTING:
        raise CnnSyntaxError(f"residual and concat branches are nested more than {MAX_NESTING} deep", stmt.span)


def _typed(env: dict) -> tuple:
    """A block's bindings as a cache key: with each value's type, since 8, 8.0 and true are equal
    keys to Python but not the same argument (8.0 is no filter count); a float by its bits, since
    -0.0 and 0.0 are equal too (a leaky_relu's slope)."""
    return tuple((k, type(v), v.hex() if isinstance(v, float) else v) for k, v in env.items())


def _check_values(shape: tuple, keyword: str, span) -> None:
    """One image's tensor at a layer: every size and the number of values bounded (a concat of
    concats doubles its channels at each repetition; padding grows a map without parameters)."""
    values = math.prod(shape)
    if max(shape, default=0) > MAX_SIZE or values > MAX_VALUES:
        raise CnnShapeError(f"{keyword} makes a {'x'.join(map(str, shape))} tensor per image, {values:,} values, "
                            f"more than the {MAX_VALUES:,} a layer may hold", span)


def _check_input(dims: ast.Dims):
    if len(dims.values) != 3 or min(dims.values) < 1:
        raise CnnArgumentError(f"input must be CxHxW with positive sizes, got {'x'.join(map(str, dims.values))}",
                               dims.span, expected="e.g. `input 3x32x32`")
    if max(dims.values) > MAX_SIZE:
        raise CnnArgumentError(f"input size {max(dims.values):,} is more than the largest size, {MAX_SIZE:,}",
                               dims.span)


def elaborate(program: ast.Program, source: str = "", filename: str | None = None) -> ir.Network:
    """Expand and check a parsed program into an ir.Network; raises CnnError."""
    _check_input(program.input)
    b = _Builder(program)
    b.add(Op.INPUT, REGISTRY["input"].build({}), [], program.input.values, "input", program.input.span, "input")
    b.stmts(program.stmts, 0, b.bindings({}), Scope("", {"input"}), ())
    if len(b.nodes) == 1:
        raise CnnShapeError("the network has no layers", program.input.span,
                            expected="at least one layer after `input`")
    for node in b.nodes[:-1]:
        if node.op is Op.SOFTMAX:
            raise CnnShapeError("softmax must be the last layer", node.span,
                                hint=f"{len(b.nodes) - 1 - node.id} layer(s) follow it; move softmax to the end")
    return ir.Network(program.name, program.input.values, tuple(b.nodes), source, filename)
