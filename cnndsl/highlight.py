"""Syntax highlighting of .cnn files: a Pygments lexer, registered as the plugin `cnn` (so that
`pygmentize -l cnn net.cnn` works once cnndsl is installed, and Markdown renderers built on
Pygments colour ```cnn blocks). Its tokens follow grammar/cnn.lark; the layer words come from the
op registry, so a new layer kind is highlighted without touching this file. The VS Code
extension in editors/vscode/ has a TextMate grammar with the same rules."""

from typing import ClassVar

from pygments.lexer import RegexLexer, bygroups, words
from pygments.token import (
    Comment,
    Keyword,
    Name,
    Number,
    Operator,
    Punctuation,
    Whitespace,
)

from .layers import LAYERS

STRUCTURE = ("network", "input", "residual", "shortcut", "concat", "branch", "gate", "block")


class CnnLexer(RegexLexer):
    name = "cnn"
    aliases = ("cnn", "cnndsl")
    filenames = ("*.cnn",)
    mimetypes = ("text/x-cnn",)
    url = "https://github.com/cnndsl/cnndsl"

    tokens: ClassVar[dict] = {  # anything else is an Error token: the tests hold the docs to that
        "root": [
            (r"#.*?$", Comment.Single),
            (r"\\\r?\n", Whitespace),  # a line continued
            (r"\s+", Whitespace),
            (r"([A-Za-z_]\w*)(\s*)(:)", bygroups(Name.Label, Whitespace, Punctuation)),  # `name:` labels a layer
            (r"([A-Za-z_]\w*)(\s*)(=)", bygroups(Name.Attribute, Whitespace, Operator)),  # an option
            (words(STRUCTURE, suffix=r"\b"), Keyword),
            (words(LAYERS, suffix=r"\b"), Name.Builtin),
            (r"(?<=[\w)\s])x(?=[\d(])|(?<=[\w)\s])x(?=[ \t]+[\w(])", Keyword.Pseudo),  # `x2`, `x n`, `x (n)`
            (r"\d+(x\d+)+\b", Number.Integer),  # dimensions: 3x3, 1x28x28
            (r"(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?", Number),
            (r"[A-Za-z_]\w*", Name),
            (r"[-+*/]", Operator),
            (r"[(){},]", Punctuation),
        ],
    }
