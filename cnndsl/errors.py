"""The CnnError family: every syntax, name, argument and shape error carries a source
span and renders as `file:line:col: error: ...`, the source line, a caret under the
culprit, what was expected and a hint where one exists."""

import difflib
from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """1-based source positions; `end_column` is exclusive."""

    line: int
    column: int
    end_line: int
    end_column: int


class CnnError(Exception):
    """Base of every error cnndsl reports about a model or its inputs."""

    kind = "error"

    def __init__(self, message: str, span: Span | None = None, *, expected: str | None = None,
                 hint: str | None = None, source: str | None = None, filename: str | None = None):
        super().__init__(message)
        self.message, self.span, self.expected, self.hint = message, span, expected, hint
        self.source, self.filename = source, filename
        self.notes: list[str] = []

    @property
    def line(self) -> int | None:
        return self.span.line if self.span else None

    @property
    def column(self) -> int | None:
        return self.span.column if self.span else None

    def attach(self, source: str | None, filename: str | None) -> "CnnError":
        """Give the error the text it points into (the first attachment wins)."""
        if self.source is None:
            self.source, self.filename = source, filename
        return self

    def render(self) -> str:
        # Every part that can quote a file (its name, a line, a pickle global, a tensor key, a
        # folder name) goes through printable, so no file can move the cursor or retitle a terminal.
        where = printable(self.filename or ("<string>" if self.span else ""))
        if self.span:
            where += f":{self.span.line}:{self.span.column}"
        message = printable(self.message)
        out = [f"{where}: {self.kind}: {message}" if where else f"{self.kind}: {message}"]
        lines = self.source.split("\n") if self.source else []  # Lark counts only \n
        if self.span and 0 < self.span.line <= len(lines):
            text = printable(lines[self.span.line - 1].rstrip().expandtabs(1))
            end = self.span.end_column if self.span.end_line == self.span.line else len(text) + 1
            width = max(1, min(end, len(text) + 1) - self.span.column)
            column = self.span.column
            if max(len(text), column) > _SHOWN:  # a window of the line around the caret
                first = max(0, min(column - 1 - _SHOWN // 2, max(len(text), column) - _SHOWN))
                head, tail = ("...", 3) if first else ("", 0), "..." if first + _SHOWN < len(text) else ""
                text, column = head[0] + text[first:first + _SHOWN] + tail, column - first + head[1]
                width = min(width, _SHOWN)
            gutter = f"{self.span.line:>5} | "
            out += [gutter + text, " " * (len(gutter) - 2) + "| " + " " * (column - 1) + "^" * width]
        if self.expected:
            out.append(f"  expected: {printable(self.expected)}")
        out += [f"  note: {printable(n)}" for n in self.notes]
        if self.hint:
            out.append(f"  hint: {printable(self.hint)}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.render()


_SHOWN = 120  # characters of a source line an error shows


def printable(text) -> str:
    """Control and other non-printable characters as `?`, one for one (so carets stay aligned),
    so that a hostile file cannot send terminal escape sequences through an error message.
    Newlines and tabs too: cnndsl writes every message, hint and note on one line (where one quotes
    a library's multi-line exception, it quotes the first line), so a line break in one comes
    from a file or a stray exception text, and could forge a line of the error (a fake `hint:`)."""
    text = str(text)
    return text if text.isprintable() else "".join(c if c.isprintable() else "?" for c in text)


def terminal_safe(text) -> str:
    """A report of several lines (a summary, a progress line naming a path) made printable line
    by line: the line breaks kept, anything else non-printable `?`. For output that is not an
    error message, which names files and folders a user or a file chose."""
    return "\n".join(printable(line) for line in str(text).split("\n"))


class CnnSyntaxError(CnnError):
    """The text does not follow the grammar."""

    kind = "syntax error"


class CnnNameError(CnnError):
    """An unknown layer, option, block or name; a duplicate or recursive definition."""

    kind = "name error"


class CnnArgumentError(CnnError):
    """A value of the wrong type or range, or the wrong number of arguments."""

    kind = "argument error"


class CnnShapeError(CnnError):
    """Shapes that do not fit: a kernel larger than its input, a branch that differs."""

    kind = "shape error"


class CnnInputError(CnnError, ValueError):
    """Bad input at run time or on the command line: a missing file, a wrong tensor."""

    kind = "input error"


class CnnDataError(CnnError, ValueError):
    """A data set that cannot be read or does not fit the network: a missing, unknown or
    corrupt file, images of the wrong shape, labels out of range, NaN or inf values."""

    kind = "data error"


class CnnWeightsError(CnnError, ValueError):
    """Weights that cannot be loaded into a model: a missing, corrupt or unsafe file, or tensors
    whose number or shapes do not fit the model's."""

    kind = "weights error"


class CnnTrainError(CnnError):
    """Training that cannot go on: a loss that became NaN or infinite, a checkpoint that
    cannot be read, written or resumed."""

    kind = "training error"


class InterpreterWarning(UserWarning):
    """Kernels run in Triton's interpreter (no CUDA device): correct, but orders of magnitude slower.
    Warned once, when the first triton-backend model is compiled (the kernels are imported then),
    so that a filter set after `import cnndsl` silences it."""


def did_you_mean(word: str, choices) -> str | None:
    """A hint naming the closest choice, if any is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else None
