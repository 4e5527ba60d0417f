"""`cnndsl fmt`: the canonical layout of a .cnn file.

- four spaces of indentation per open `{`; a line starting with `}` one level less;
- one space between words; none inside parentheses or before `,` `)` and a label's `:`; one
  after `,`; none around an option's `=`; one around `+ - * / //`; a repeat as `x2`, `x n` or
  `x (n - 1)`;
- a line continued with `\\` joined into one (a statement longer than the line limit, 1,000
  characters, broken with `\\` into lines of at most 100, at spaces); at most one blank line in a
  row, none at the start or the end, one newline at the end;
- every comment kept as written: a comment alone on its line indented with the code around it;
  in a run of consecutive code lines, the comments after code aligned in one column, two spaces
  after the longest code that has one.

The file must compile (the layout of a broken file is not guessed at), and the result must
compile to the same network (the identity that checkpoints use) with the same comments in the
same order: fmt checks both before it returns, so it cannot change what a file means. It is
idempotent: a formatted file formats to itself."""

import re

from .api import parse_text
from .errors import CnnError, CnnInputError
from .limits import MAX_LINE_CHARS
from .resume import network_identity

INDENT = "    "
WRAP = 100  # characters to a line where a statement longer than the line limit is broken
_TOKEN = re.compile(r"(?:(\d+(?:x\d+)+)|(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)|"
                    r"([A-Za-z_]\w*)|(//|[(){}=,:+\-*/]))")
_REPEAT = re.compile(r"x(?=[0-9(])|x(?=[ \t]+[A-Za-z_0-9(])")  # grammar/cnn.lark's REPEAT
_NO_REPEAT_AFTER = {"(", ",", "=", ":", "{", "+", "-", "*", "/", "//"}  # where `x` is a name, not a repeat


def _tokens(code: str, where: str) -> list[str]:
    """The code of one line as tokens; a repeat's `x` is a token of its own ("\0x", then its count)."""
    out, pos, end = [], 0, len(code.rstrip())
    while True:
        pos += len(code[pos:]) - len(code[pos:].lstrip(" \t"))
        if pos >= end:
            return out
        if out and out[-1] not in _NO_REPEAT_AFTER and _REPEAT.match(code, pos):
            out.append("\0x")  # a repeat, told apart from a name `x`
            pos += 1
            continue
        m = _TOKEN.match(code, pos)
        if m is None:
            raise CnnInputError(f"fmt: cannot read {where}: {code.strip()[:80]!r}")
        out.append(next(g for g in m.groups() if g is not None))
        pos = m.end()


def _join(tokens: list[str], indent: str = "", reserve: int = 0) -> str:
    """The tokens as one line; one longer than the line limit is broken with `\\` at spaces,
    WRAP characters to a line, its continuations indented one level more."""
    pieces = list(_pieces(tokens))
    text = "".join(sep + tok for sep, tok in pieces)
    if len(indent + text) + reserve <= MAX_LINE_CHARS:  # (reserve: a comment after it)
        return text
    text, line = "", len(indent)
    for i, (sep, tok) in enumerate(pieces):
        near_repeat = tok == "x" and sep or i and pieces[i - 1][1] == "x" and pieces[i - 1][0]
        if sep and line + len(sep + tok) + 2 > WRAP and line > len(indent) and not near_repeat:
            text += " \\\n" + indent + INDENT
            line, sep = len(indent + INDENT), ""
        text += sep + tok
        line += len(sep + tok)
    return text


def _pieces(tokens: list[str]):
    """(separator, text) per token: the canonical spacing."""
    for i, tok in enumerate(tokens):
        prev = tokens[i - 1] if i else None
        if tok == "\0x":
            yield ("" if prev is None else " "), "x"
            continue
        if prev is None or prev in ("(", "=") or tok in (",", ")", "=") or (tok == ":" and i == 1):
            sep = ""
        elif prev == "\0x":
            sep = "" if tok[0].isdigit() else " "  # x2, x n
        elif tok == "(" and (prev[0].isalpha() or prev[0] == "_"):
            sep = ""  # a call's or a block's parameters: conv_bn(64)
        else:
            sep = " "
        yield sep, tok


def _logical_lines(text: str) -> list[tuple[str, str | None]]:
    """(code, comment or None) per line, continued lines joined; the comment from its `#` on."""
    lines, pending = [], ""
    for raw in text.replace("\r\n", "\n").split("\n"):
        code, hash_, comment = raw.partition("#")
        if not hash_ and code.rstrip().endswith("\\"):
            pending += code.rstrip()[:-1] + " "
            continue
        lines.append((pending + code, "#" + comment.rstrip() if hash_ else None))
        pending = ""
    if pending:
        lines.append((pending, None))
    return lines


def _comments(text: str) -> list[str]:
    return [c for _, c in _logical_lines(text) if c is not None]


def format_source(text: str, filename: str = "<text>") -> str:
    """The canonical layout of `text` (a .cnn file that compiles)."""
    before = parse_text(text, filename=filename)
    rows, depth = [], 0  # (indent, code, comment)
    for number, (code, comment) in enumerate(_logical_lines(text), 1):
        tokens = _tokens(code, f"{filename} line {number}")
        if not tokens and comment is None:
            if rows and rows[-1] is not None:
                rows.append(None)  # one blank line
            continue
        level = depth - (1 if tokens and tokens[0] == "}" else 0)
        depth += tokens.count("{") - tokens.count("}")
        indent = INDENT * max(level, 0)
        rows.append((indent, _join(tokens, indent, len(comment) + 2 if comment else 0), comment))
    while rows and rows[-1] is None:
        rows.pop()
    out = _align(rows)
    result = "\n".join(out) + "\n"
    try:
        after = parse_text(result, filename=filename)
    except CnnError as err:  # (a limit: re-indented and aligned, the layout can outgrow a line or the file)
        raise CnnInputError(f"fmt: the canonical layout of {filename} would pass a limit of the language "
                            f"({err.message}); the file is left as it is") from None
    if network_identity(after) != network_identity(before) or _comments(result) != _comments(text) or \
            after.name != before.name:
        raise CnnInputError(f"fmt: the layout of {filename} could not be made canonical without changing it; "
                            "the file is left as it is (please report this)")
    return result


def _align(rows) -> list[str]:
    """The lines: in each run of consecutive code lines, the comments after code aligned two spaces
    after the longest code that has one."""
    out, i = [], 0
    while i < len(rows):
        if rows[i] is None or not rows[i][1]:  # a blank line, or a comment alone on its line
            out.append("" if rows[i] is None else rows[i][0] + rows[i][2])
            i += 1
            continue
        if "\n" in rows[i][1]:  # a line broken in several: its comment after its last line
            out.append(rows[i][0] + rows[i][1] + ("  " + rows[i][2] if rows[i][2] else ""))
            i += 1
            continue
        j = i
        while j < len(rows) and rows[j] is not None and rows[j][1] and "\n" not in rows[j][1]:
            j += 1
        width = max((len(r[0] + r[1]) for r in rows[i:j] if r[2]), default=0) + 2
        out += [(r[0] + r[1]).ljust(width) + r[2] if r[2] else r[0] + r[1] for r in rows[i:j]]
        i = j
    return out
