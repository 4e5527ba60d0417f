"""Syntax highlighting: the Pygments lexer (registered as the plugin `cnn`) tokenises every
example and every ```cnn block of the docs without an error token, and tells labels, options,
layer words, structure words, dimensions and repeats apart; the VS Code extension's TextMate
grammar is valid JSON whose patterns compile, and it starts `cnndsl lsp`."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pygments.lexers import get_lexer_by_name, get_lexer_for_filename
from pygments.token import Error, Keyword, Name, Number

import cnndsl
from cnndsl.errors import CnnError, CnnSyntaxError
from cnndsl.highlight import CnnLexer
from cnndsl.layers import LAYERS

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [(p.name, p.read_text()) for p in sorted((ROOT / "examples").glob("*.cnn"))] + [
    (f"{doc.name} block {i}", block)
    for doc in (ROOT / "docs" / "language.md", ROOT / "README.md")
    for i, block in enumerate(re.findall(r"```cnn\n(.*?)```", doc.read_text(), re.DOTALL))]


@pytest.mark.parametrize(("where", "text"), SOURCES, ids=[s[0] for s in SOURCES])
def test_no_error_token(where, text):
    """The docs' conventions: a fragment's `...branch...` stands for elided lines; a file that
    shows the error of a character outside the language has that one error token."""
    if text.startswith("# fragment"):
        text = re.sub(r"\.\.\.\w*\.\.\.", "", text)
    expected = []
    try:
        cnndsl.parse(text)
    except CnnSyntaxError as err:
        expected = re.findall(r"unexpected character '(.)'", str(err))
    except CnnError:
        pass
    bad = [v for t, v in CnnLexer().get_tokens(text) if t in Error]
    assert bad == expected, f"{where}: {bad[:5]}"


def test_what_is_not_the_language_is_an_error():
    assert [v for t, v in CnnLexer().get_tokens("conv 8 3 ; relu $\n") if t in Error] == [";", "$"]


def test_the_kinds_of_token():
    text = "stem: conv 64 3x3 stride=2 x2\nresidual {\n    relu  # here\n} x n - 1\n"
    tokens = [(t, v) for t, v in CnnLexer().get_tokens(text) if v.strip()]
    assert (Name.Label, "stem") in tokens and (Name.Builtin, "conv") in tokens
    assert (Number.Integer, "3x3") in tokens and (Name.Attribute, "stride") in tokens
    assert (Keyword, "residual") in tokens and (Name.Builtin, "relu") in tokens
    assert [v for t, v in tokens if t is Keyword.Pseudo] == ["x", "x"]  # the two repeats
    tokens = [(t, v) for t, v in CnnLexer().get_tokens("relu x (n - 1)\nrelu x(2)\n") if v.strip()]
    assert [v for t, v in tokens if t is Keyword.Pseudo] == ["x", "x"]


def test_the_plugin_is_registered():
    assert isinstance(get_lexer_by_name("cnn"), CnnLexer)
    assert isinstance(get_lexer_for_filename("resnet18.cnn"), CnnLexer)
    run = subprocess.run([sys.executable, "-m", "pygments", "-l", "cnn", "-f", "html", str(ROOT / "examples" /
                          "digits.cnn")], capture_output=True, text=True, check=False)
    assert run.returncode == 0 and '<span class="nb">conv</span>' in run.stdout, run.stderr


def test_the_vscode_extension():
    ext = ROOT / "editors" / "vscode"
    package = json.loads((ext / "package.json").read_text())
    assert package["contributes"]["languages"][0]["extensions"] == [".cnn"]
    grammar = json.loads((ext / package["contributes"]["grammars"][0]["path"]).read_text())
    assert grammar["scopeName"] == "source.cnn"
    patterns = [p["match"] for p in grammar["patterns"] if "match" in p]
    layers = next(p["match"] for p in grammar["patterns"] if p.get("name") == "support.function.layer.cnn")
    assert set(layers[len("\\b("):-len(")\\b")].split("|")) == set(LAYERS)  # every layer word, a new one too
    for pattern in patterns:
        re.compile(pattern)  # Oniguruma's syntax, kept to what Python's re reads the same way
    assert package["contributes"]["configuration"]["properties"]["cnndsl.command"]["default"] == ["cnndsl", "lsp"]
    assert 'getConfiguration("cnndsl").get("command"' in (ext / "extension.js").read_text()  # it starts that command
