"""Text -> AST: the Lark LALR parser over grammar/cnn.lark, a Transformer that builds
the frozen dataclasses of ast.py with source spans, and the translation of Lark's
errors into CnnSyntaxError, naming common mistakes with `match_examples`."""

from functools import cache
from importlib import resources

from lark import Lark, Token, v_args
from lark.exceptions import (
    UnexpectedCharacters,
    UnexpectedEOF,
    UnexpectedInput,
    UnexpectedToken,
    VisitError,
)
from lark.visitors import Transformer_NonRecursive

from . import ast
from .errors import CnnSyntaxError, Span
from .limits import MAX_DIGITS, MAX_LINE_CHARS, MAX_OPERATORS, MAX_SOURCE_CHARS

# Common mistakes, each shown by snippets that fail at the same parser state.
MISTAKES = {
    "the file must start with `network NAME`, then `input CxHxW`": [
        "input 3x32x32\n", "conv 8 3\n", "\nrelu\n", "\n", "# c\ninput 3x32x32\n", "\ninput 3x32x32\n"],
    "`input CxHxW` must follow the `network NAME` line": [
        "network a\nconv 8 3\n", "network a\nrelu\n"],
    "write the input shape as CxHxW, e.g. `input 3x32x32`": [
        "network a\ninput 3 32 32\n", "network a\ninput 32\n", "network a\ninput\n"],
    "put `shortcut {` on the same line as the `}` that closes the residual branch": [
        "network a\ninput 1x8x8\nresidual {\nrelu\n}\nshortcut {\nrelu\n}\n"],
    "put `{` at the end of the line that opens the block": [
        "network a\ninput 1x8x8\nresidual\n{\nrelu\n}\n",
        "network a\ninput 1x8x8\nblock b(c)\n{\nrelu\n}\n"],
    "a block ends with `}` on a line of its own": [
        "network a\ninput 1x8x8\nresidual {\nrelu\n", "network a\ninput 1x8x8\nblock b {\nrelu\n",
        "network a\ninput 1x8x8\nresidual { relu }\n"],
    "options are written `name=value`, with no spaces around `=` needed": [
        "network a\ninput 1x8x8\nconv 8 3 stride: 2\n", "network a\ninput 1x8x8\nconv 8 3 stride = \n"],
    "close the argument list with `)`": [
        "network a\ninput 1x8x8\nb(64\n", "network a\ninput 1x8x8\nb(64, 2\n"],
    "one layer per line": [
        "network a\ninput 1x8x8\nconv 8 3, relu\n", "network a\ninput 1x8x8\nrelu; relu\n"],
    "a layer's arguments are all bare or all in one parenthesised list, which `(` right after its name "
    "opens; so a bare argument cannot begin with `(`: write `conv(8, (k - 1) // 2)`, or name the option "
    "(`pad=(k - 1) // 2`)": [
        "network a\ninput 1x8x8\nconv (2) 3\n", "network a\ninput 1x8x8\nconv (1 + 1) k\n",
        "network a\ninput 1x8x8\nconv (8) stride=2\n", "network a\ninput 1x8x8\nconv 8 (2)\n",
        "network a\ninput 1x8x8\nconv 8 3 (1)\n"],
    "there is no unary minus: write `0 - x`, or a positive value": [
        "network a\ninput 1x8x8\nleaky_relu -0.1\n", "network a\ninput 1x8x8\nleaky_relu slope=-1\n",
        "network a\ninput 1x8x8\nleaky_relu(-0.1)\n", "network a\ninput 1x8x8\nrelu x 0 - -1\n",
        "network a\ninput 1x8x8\nleaky_relu 0.1 * -1\n", "network a\ninput 1x8x8\nblock b(s=-1) {\nrelu\n}\n"],
}

_FRIENDLY = {"NAME": "a name", "NUMBER": "a number", "DIMS": "dimensions such as 3x3",
             "_NL": "end of line", "$END": "end of input", "REPEAT": "a repetition `x N`", "repeat": "a repetition `x N`"}



def _short(tok: Token) -> Token:
    if len(tok) > MAX_DIGITS:
        raise CnnSyntaxError(f"number too large ({len(tok)} characters)", _token_span(tok))
    return tok


def _span(meta) -> Span:
    return Span(meta.line, meta.column, meta.end_line, meta.end_column)


def _token_span(tok: Token) -> Span:
    return Span(tok.line, tok.column, tok.end_line, tok.end_column)


class _Shortcut(tuple):
    """Marks the shortcut branch among a residual's children."""


@v_args(meta=True)
class _ToAst(Transformer_NonRecursive):
    def start(self, meta, children):
        name, dims, *stmts = children
        return ast.Program(str(name), dims, tuple(stmts), _span(meta))

    def network(self, meta, children):
        return children[0]

    def input(self, meta, children):
        return self.dims(meta, children)

    def layer(self, meta, children):
        label, name, args, repeat = children
        return ast.Layer(str(name), args, label, repeat, _span(meta), _token_span(name))

    def label(self, meta, children):
        return str(children[0])

    def paren_args(self, meta, children):
        return tuple(a for a in children if a is not None)

    bare_args = paren_args

    def keyword_arg(self, meta, children):
        return ast.Arg(str(children[0]), children[1], _span(meta))

    def positional_arg(self, meta, children):
        return ast.Arg(None, children[0], _span(meta))

    def dims(self, meta, children):
        tok = _short(children[0])
        return ast.Dims(tuple(int(v) for v in tok.split("x")), _token_span(tok))

    def number(self, meta, children):
        tok = _short(children[0])
        value = int(tok) if tok.isdigit() else float(tok)
        return ast.Number(value, _token_span(tok))

    def ref(self, meta, children):
        return ast.Ref(str(children[0]), _token_span(children[0]))

    def _binop(op):
        def build(self, meta, children):
            left, right = children
            operators = 1 + getattr(left, "operators", 0) + getattr(right, "operators", 0)
            if operators > MAX_OPERATORS:
                raise CnnSyntaxError(f"expression too long: more than {MAX_OPERATORS} operators", _span(meta))
            return ast.BinOp(op, left, right, _span(meta), operators)
        return build

    add, sub, mul, div, floordiv = _binop("+"), _binop("-"), _binop("*"), _binop("/"), _binop("//")

    def residual(self, meta, children):
        label, *stmts, shortcut, repeat = children
        return ast.Residual(tuple(stmts), None if shortcut is None else tuple(shortcut),
                            label, repeat, _span(meta))

    def shortcut(self, meta, children):
        return _Shortcut(children)

    def concat(self, meta, children):
        label, *branches, repeat = children
        return ast.Concat(tuple(branches), label, repeat, _span(meta))

    def gate(self, meta, children):
        label, *stmts, repeat = children
        return ast.Gate(tuple(stmts), label, repeat, _span(meta))

    def branch(self, meta, children):
        return ast.Branch(tuple(children), _span(meta))

    def block(self, meta, children):
        name, params, *stmts = children
        return ast.Block(str(name), params or (), tuple(stmts), _span(meta), _token_span(name))

    def params(self, meta, children):
        return tuple(p for p in children if p is not None)

    def param(self, meta, children):
        return ast.Param(str(children[0]), children[1], _span(meta))

    def repeat(self, meta, children):
        return ast.Repeat(children[1], _span(meta))


@cache
def _parser() -> Lark:
    grammar = resources.files("cnndsl.grammar").joinpath("cnn.lark").read_text()
    return Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True)


def _describe(parser: Lark, names) -> str:
    shown = set()
    for name in names:
        if name in _FRIENDLY:
            shown.add(_FRIENDLY[name])
            continue
        pattern = parser.get_terminal(name).pattern
        shown.add(f"'{pattern.value}'" if pattern.type == "str" else name.lower())
    return ", ".join(sorted(shown))


def _where(err: UnexpectedInput):
    """What identifies a mistake: the LALR state and the offending token's type (Lark's own
    match_examples also compares the stack depth, so it misses a mistake nested one level
    deeper than its example)."""
    if isinstance(err, UnexpectedToken):
        return ("token", err.state.position, err.token.type)
    if isinstance(err, UnexpectedCharacters):
        return ("char", err.char, frozenset(err.allowed or ()))
    return ("eof", tuple(sorted(getattr(err, "expected", ()) or ())))


def _match_mistake(err: UnexpectedInput) -> str | None:
    where = _where(err)
    for hint, examples in MISTAKES.items():
        for example in examples:
            try:
                _parser().parse(example)
            except UnexpectedInput as other:
                if _where(other) == where:
                    return hint
    return None


def _syntax_error(err: UnexpectedInput, text: str) -> CnnSyntaxError:
    parser = _parser()
    hint = _match_mistake(err)
    if isinstance(err, UnexpectedCharacters):
        char = text[err.pos_in_stream] if err.pos_in_stream < len(text) else "?"
        span = Span(err.line, err.column, err.line, err.column + 1)
        return CnnSyntaxError(f"unexpected character {char!r}", span,
                              expected=_describe(parser, err.allowed) if err.allowed else None, hint=hint)
    tok = err.token if isinstance(err, (UnexpectedToken, UnexpectedEOF)) else None
    expected = _describe(parser, getattr(err, "expected", ()) or ())
    if tok is None or tok.type == "$END" or tok.line is None:
        body = text.rstrip("\r\n")
        last = body.count("\n") + 1
        col = len(body.split("\n")[-1].rstrip("\r")) + 1
        return CnnSyntaxError("unexpected end of input", Span(last, col, last, col + 1),
                              expected=expected, hint=hint)
    what = "end of line" if tok.type == "_NL" else repr(str(tok))
    width = 1 if tok.type == "_NL" else max(1, len(str(tok)))
    span = Span(tok.line, tok.column, tok.line, tok.column + width)
    return CnnSyntaxError(f"unexpected {what}", span, expected=expected, hint=hint)


def _check_size(text: str) -> None:
    """The source and each of its lines within MAX_SOURCE_CHARS and MAX_LINE_CHARS."""
    if len(text) > MAX_SOURCE_CHARS:
        raise CnnSyntaxError(f"the text is too long: {len(text):,} characters, at most {MAX_SOURCE_CHARS:,}",
                             Span(1, 1, 1, 2), hint="use blocks and repetition (`x N`) instead of writing layers out")
    for number, line in enumerate(text.split("\n"), 1):
        if len(line) > MAX_LINE_CHARS:
            column = MAX_LINE_CHARS + 1
            raise CnnSyntaxError(f"line {number} is too long: {len(line):,} characters, at most {MAX_LINE_CHARS:,}",
                                 Span(number, column, number, column + 1),
                                 hint="split it with `\\` at the end of a line")


def parse_program(text: str, filename: str | None = None) -> ast.Program:
    """Parse .cnn source text into an ast.Program; raises CnnSyntaxError."""
    text = text.removeprefix("\ufeff")  # a byte-order mark from editors that write one
    try:
        _check_size(text)
    except CnnSyntaxError as err:
        raise err.attach(text, filename) from None
    source = text if text.endswith("\n") else text + "\n"
    try:
        tree = _parser().parse(source)
        return _ToAst().transform(tree)
    except UnexpectedInput as err:
        raise _syntax_error(err, source).attach(text, filename) from None
    except VisitError as err:
        if isinstance(err.orig_exc, CnnSyntaxError):
            raise err.orig_exc.attach(text, filename) from None
        raise
