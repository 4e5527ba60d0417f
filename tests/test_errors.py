"""Every kind of front-end error: its class, `.line`, `.column` and rendered message
(`file:line:col: kind: message`, the source line, a caret under the culprit, `expected:`,
`note:` and `hint:` lines)."""

import re

import pytest

import cnndsl
from cnndsl import (
    CnnArgumentError,
    CnnError,
    CnnInputError,
    CnnNameError,
    CnnShapeError,
    CnnSyntaxError,
)
from cnndsl.errors import Span
from cnndsl.parse import MISTAKES

H = "network a\ninput 1x8x8\n"
KINDS = {CnnSyntaxError: "syntax error", CnnNameError: "name error", CnnArgumentError: "argument error",
         CnnShapeError: "shape error", CnnInputError: "input error"}


def error_of(src, cls=CnnError):
    with pytest.raises(CnnError) as info:
        cnndsl.parse(src)
    err = info.value
    assert type(err) is cls, f"{type(err).__name__} instead of {cls.__name__}:\n{err}"
    return err


def caret(rendered):
    """(source line shown, caret column (1-based), caret width) from a rendered error."""
    lines = rendered.split("\n")
    for i, line in enumerate(lines[:-1]):
        if re.match(r"^ *\d+ \| ", line):
            start = line.index("| ") + 2
            below = lines[i + 1]
            assert below[:start].strip() == "|", rendered
            marks = below[start:]
            assert set(marks.strip()) == {"^"}, rendered
            return line[start:], len(marks) - len(marks.lstrip()) + 1, len(marks.strip())
    raise AssertionError(f"no source line and caret in:\n{rendered}")


def field(rendered, name):
    """The text of the `expected:`/`hint:` line, or None; the `note:` lines as a list."""
    found = [line.split(": ", 1)[1] for line in rendered.split("\n") if line.startswith(f"  {name}: ")]
    return found if name == "note" else (found[0] if found else None)


def check(err, line, column, culprit, *, message=None, expected=None, hint=None, filename="<string>"):
    """The common shape of a rendered error; `culprit` is the text the carets cover."""
    text = err.render()
    assert str(err) == text
    assert (err.line, err.column) == (line, column), text
    first = text.split("\n")[0]
    assert first.startswith(f"{filename}:{line}:{column}: {KINDS[type(err)]}: "), text
    if message is not None:
        assert message in first, text
    shown, col, width = caret(text)
    source_line = err.source.split("\n")[line - 1].rstrip()
    assert shown == source_line.expandtabs(1), text
    assert col == column, text
    if culprit is None:  # the end of the line
        assert col == len(shown) + 1 and width == 1, text
    else:
        assert shown[col - 1:col - 1 + width] == culprit, text
    if expected is not None:
        assert expected in (field(text, "expected") or ""), text
    if hint is not None:
        assert hint in (field(text, "hint") or ""), text
    return text


def test_the_error_family():
    for cls in KINDS:
        assert issubclass(cls, CnnError) and issubclass(cls, Exception)
    assert issubclass(CnnInputError, ValueError)
    assert cnndsl.CnnError is CnnError


def test_render_of_a_bare_error():
    err = CnnShapeError("boom", Span(2, 3, 2, 5), expected="this", hint="that")
    err.attach("network a\nab cdef gh\n", "f.cnn")
    err.notes.append("in block 'b' called at line 9")
    assert err.render() == ("f.cnn:2:3: shape error: boom\n"
                            "    2 | ab cdef gh\n"
                            "      |   ^^\n"
                            "  expected: this\n"
                            "  note: in block 'b' called at line 9\n"
                            "  hint: that")
    assert err.attach("other", "g.cnn").filename == "f.cnn"  # the first attachment wins


# --- syntax -------------------------------------------------------------------------------------


def test_unexpected_token():
    err = error_of(H + "conv 8 3 )\n", CnnSyntaxError)
    check(err, 3, 10, ")", message="unexpected ')'", expected="end of line")


def test_unexpected_end_of_input():
    err = error_of(H + "residual {\n  relu\n", CnnSyntaxError)
    check(err, 4, 7, None, message="unexpected end of input", expected="'}'",
          hint="a block ends with `}` on a line of its own")


def test_unexpected_end_of_input_without_newline():
    err = error_of("network a", CnnSyntaxError)
    check(err, 1, 10, None, message="unexpected end of input", expected="'input'")


def test_empty_source():
    err = error_of("", CnnSyntaxError)
    assert (err.line, err.column) == (1, 1)
    text = err.render()
    assert text.startswith("<string>:1:1: syntax error: unexpected end of input")
    assert field(text, "expected") == "'network'"


@pytest.mark.parametrize("src", ["", "\n\n# only a comment\n"])
def test_empty_source_has_the_header_hint(src):
    err = error_of(src, CnnSyntaxError)
    assert "network NAME" in (field(err.render(), "hint") or "")


def test_unexpected_character():
    err = error_of(H + "conv 8 3 @\n", CnnSyntaxError)
    check(err, 3, 10, "@", message="unexpected character '@'", expected="end of line")


def test_unexpected_character_unicode():
    err = error_of(H + "conv 8 3 stride=２\n", CnnSyntaxError)
    check(err, 3, 17, "２", message="unexpected character '２'", expected="a number")


def test_unexpected_character_after_a_tab():
    err = error_of(H + "\tconv 8 3 @\n", CnnSyntaxError)
    check(err, 3, 11, "@")


def test_missing_header():
    err = error_of("input 3x32x32\nconv 8 3\n", CnnSyntaxError)
    check(err, 1, 1, "input", message="unexpected 'input'", expected="'network'",
          hint="the file must start with `network NAME`, then `input CxHxW`")


def test_missing_input_line():
    err = error_of("network a\nconv 8 3\n", CnnSyntaxError)
    check(err, 2, 1, "conv", expected="'input'", hint="`input CxHxW` must follow the `network NAME` line")


def test_input_shape_with_spaces():
    err = error_of("network a\ninput 3 32 32\nrelu\n", CnnSyntaxError)
    check(err, 2, 7, "3", expected="dimensions such as 3x3", hint="e.g. `input 3x32x32`")


def test_stray_closing_brace():
    err = error_of(H + "relu\n}\n", CnnSyntaxError)
    check(err, 4, 1, "}", message="unexpected '}'")


def test_error_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.cnn"
    path.write_text(H + "relu\nconv 8 3 @\n")
    err = error_of(path, CnnSyntaxError)
    check(err, 4, 10, "@", filename=str(path))
    as_str = error_of(str(path), CnnSyntaxError)  # a str ending in .cnn is a path too
    assert as_str.render().startswith(f"{path}:4:10: syntax error: unexpected character '@'")


def test_explicit_filename_is_used():
    with pytest.raises(CnnNameError) as info:
        cnndsl.parse(H + "maxpol 2\n", filename="model.cnn")
    assert info.value.render().startswith("model.cnn:3:1: name error: unknown layer 'maxpol'")


# --- common mistakes get hints, at the top level and nested in a block -------------------------


MISTAKE_CASES = [(hint, example) for hint, examples in MISTAKES.items() for example in examples]


@pytest.mark.parametrize("hint, example", MISTAKE_CASES, ids=[f"{i}" for i in range(len(MISTAKE_CASES))])
def test_every_listed_mistake_gets_its_hint(hint, example):
    err = error_of(example, CnnSyntaxError)
    assert field(err.render(), "hint") == hint
    assert err.line is not None and err.column is not None


@pytest.mark.parametrize("src, line, column, culprit, hint", [
    ("residual {\n  relu\n}\nshortcut {\n  relu\n}\n", 6, 10, "{", "put `shortcut {` on the same line"),
    ("block b {\n  residual {\n    relu\n  }\n  shortcut {\n    relu\n  }\n}\nb\n", 7, 12, "{",
     "put `shortcut {` on the same line"),
    ("residual\n{\n  relu\n}\n", 3, 9, None, "put `{` at the end of the line"),
    ("block b(c)\n{\n  relu\n}\nb(1)\n", 3, 11, None, "put `{` at the end of the line"),
    ("block b {\n  residual\n  {\n    relu\n  }\n}\nb\n", 4, 11, None, "put `{` at the end of the line"),
    ("conv 8 3 stride: 2\n", 3, 16, ":", "options are written `name=value`"),
    ("block b {\n  conv 8 3 stride: 2\n}\nb\n", 4, 18, ":", "options are written `name=value`"),
    ("conv(8, 3\nrelu\n", 3, 10, None, "close the argument list with `)`"),
    ("b(64\n", 3, 5, None, "close the argument list with `)`"),
    ("block b {\n  b2(64, 2\n}\n", 4, 11, None, "close the argument list with `)`"),
    ("residual { relu }\n", 3, 12, "relu", "a block ends with `}` on a line of its own"),
    ("conv 8 3, relu\n", 3, 9, ",", "one layer per line"),
    ("relu; relu\n", 3, 5, ";", "one layer per line"),
    ("leaky_relu -0.1\n", 3, 12, "-", "no unary minus"),
    ("leaky_relu slope=-0.1\n", 3, 18, "-", "no unary minus"),
])
def test_mistake_hints_in_context(src, line, column, culprit, hint):
    err = error_of(H + src, CnnSyntaxError)
    check(err, line, column, culprit, hint=hint)


# --- names --------------------------------------------------------------------------------------


def test_unknown_layer_did_you_mean():
    err = error_of(H + "maxpol 2\n", CnnNameError)
    check(err, 3, 1, "maxpol", message="unknown layer 'maxpol'", expected="maxpool, avgpool",
          hint="did you mean 'maxpool'?")


def test_unknown_layer_in_a_block_body():
    err = error_of(H + "block b {\n  batchnrom\n}\nb\n", CnnNameError)
    text = check(err, 4, 3, "batchnrom", hint="did you mean 'batchnorm'?")
    assert field(text, "note") == ["in block 'b' called at line 6"]


def test_unknown_block_did_you_mean():
    err = error_of(H + "block basic(c) {\n  relu\n}\nbasc(64)\n", CnnNameError)
    check(err, 6, 1, "basc", message="unknown layer 'basc'", expected="a block defined with `block`",
          hint="did you mean 'basic'?")


def test_undefined_block_without_a_close_name():
    err = error_of(H + "qqq(4)\n", CnnNameError)
    text = check(err, 3, 1, "qqq", message="unknown layer 'qqq'")
    assert field(text, "hint") is None


def test_case_matters():
    err = error_of(H + "Conv 8 3\n", CnnNameError)
    check(err, 3, 1, "Conv", hint="did you mean 'conv'?")


def test_unknown_option_did_you_mean():
    err = error_of(H + "conv 8 3 strid=2\n", CnnNameError)
    check(err, 3, 10, "strid=2", message="conv has no option 'strid'",
          expected="filters, kernel, stride, pad, dilation, groups, bias", hint="did you mean 'stride'?")


def test_unknown_option_of_a_layer_without_options():
    err = error_of(H + "relu slope=0.1\n", CnnNameError)
    check(err, 3, 6, "slope=0.1", message="relu has no option 'slope'")


def test_undefined_word_did_you_mean():
    err = error_of(H + "conv 8 3 pad=sme\n", CnnNameError)
    check(err, 3, 14, "sme", message="undefined name 'sme' for option 'pad'", expected="`same` or `valid`",
          hint="did you mean 'same'?")
    err = error_of(H + "conv 8 3 bias=flase\n", CnnNameError)
    check(err, 3, 15, "flase", expected="true or false", hint="did you mean 'false'?")


def test_undefined_name_at_top_level():
    err = error_of(H + "conv c 3\n", CnnNameError)
    check(err, 3, 6, "c", message="undefined name 'c' for option 'filters'", expected="a positive integer")


def test_undefined_name_in_a_block():
    src = H + "block b(chans) {\n  conv chan 3\n}\nb(4)\n"
    err = error_of(src, CnnNameError)
    text = check(err, 4, 8, "chan", message="undefined name 'chan'", hint="did you mean 'chans'?")
    assert field(text, "note") == ["in block 'b' called at line 6"]


def test_undefined_name_in_arithmetic():
    err = error_of(H + "block b(c) {\n  conv c * k 3\n}\nb(4)\n", CnnNameError)
    text = check(err, 4, 12, "k", message="undefined name 'k'")
    assert field(text, "note") == ["in block 'b' called at line 6"]


def test_undefined_name_at_the_call_site():
    err = error_of(H + "block b(c) {\n  conv c 3\n}\nb(foo)\n", CnnNameError)
    check(err, 6, 3, "foo", message="undefined name 'foo'")


def test_undefined_name_in_a_repetition():
    err = error_of(H + "relu x n\n", CnnNameError)
    check(err, 3, 6, "x n", message="undefined name 'n' in repetition")


def test_recursive_block_direct():
    err = error_of(H + "block b {\n  relu\n  b\n}\nb\n", CnnNameError)
    text = check(err, 5, 3, "b", message="block 'b' calls itself (b -> b)",
                 hint="blocks cannot be recursive; use repetition `x N`")
    assert field(text, "note") == ["in block 'b' called at line 7"]


def test_recursive_block_indirect():
    src = H + "block a1 {\n  a2\n}\nblock a2 {\n  a3(1)\n}\nblock a3(c) {\n  a1\n}\na1\n"
    err = error_of(src, CnnNameError)
    text = check(err, 10, 3, "a1", message="block 'a1' calls itself (a1 -> a2 -> a3 -> a1)",
                 hint="blocks cannot be recursive")
    # innermost call first
    assert field(text, "note") == ["in block 'a3' called at line 7", "in block 'a2' called at line 4",
                                   "in block 'a1' called at line 12"]


def test_duplicate_block():
    err = error_of(H + "block b {\n  relu\n}\nblock b {\n  tanh\n}\nb\n", CnnNameError)
    check(err, 6, 7, "b", message="block 'b' is already defined at line 3")


def test_duplicate_block_even_if_never_called():
    err = error_of(H + "block b {\n  relu\n}\nblock b {\n  tanh\n}\nrelu\n", CnnNameError)
    assert (err.line, err.column) == (6, 7)


def test_block_with_a_layer_name():
    err = error_of(H + "block relu {\n  tanh\n}\nrelu\n", CnnNameError)
    check(err, 3, 7, "relu", message="block 'relu' has the name of a built-in layer",
          hint="choose another name for the block")


def test_duplicate_parameter():
    err = error_of(H + "block b(c, k, c) {\n  relu\n}\nb(1, 2, 3)\n", CnnNameError)
    check(err, 3, 15, "c", message="parameter 'c' appears twice in block 'b'")


def test_reserved_parameter_name():
    err = error_of(H + "block b(x) {\n  conv x 3\n}\nb(4)\n", CnnNameError)
    check(err, 3, 9, "x", message="reserved word")


def test_duplicate_layer_label():
    err = error_of(H + "c: relu\nc: relu\n", CnnNameError)
    check(err, 4, 1, "c: relu", message="duplicate layer name 'c'", hint="names must be unique")


def test_duplicate_label_in_a_block_and_with_an_automatic_name():
    err = error_of(H + "block b {\n  d: relu\n  d: tanh\n}\nb\n", CnnNameError)
    text = check(err, 5, 3, "d: tanh", message="duplicate layer name 'd'")
    assert field(text, "note") == ["in block 'b' called at line 7"]
    err = error_of(H + "relu\nrelu1: tanh\n", CnnNameError)
    check(err, 4, 1, "relu1: tanh", message="duplicate layer name 'relu1'")


@pytest.mark.parametrize("src, line", [
    ("residual {\n  add: relu\n}\n", 4),
    ("residual {\n  shortcut: relu\n}\n", 4),
    ("input: relu\n", 3),
    ("d: relu x2\nd: relu\n", 4),
])
def test_reserved_and_clashing_labels(src, line):
    err = error_of(H + src, CnnNameError)
    assert err.line == line
    assert "duplicate layer name" in err.render()


def test_nested_block_definition():
    src = H + "block outer {\n  block inner {\n    relu\n  }\n  relu\n}\nouter\n"
    err = error_of(src, CnnNameError)
    text = check(err, 4, 9, "inner", message="block 'inner' is defined inside another block or branch",
                 hint="define blocks at the top level of the file")
    assert field(text, "note") == []  # found where it is defined, before any call


def test_block_definition_inside_a_residual():
    err = error_of(H + "residual {\n  block inner {\n    relu\n  }\n  relu\n}\n", CnnNameError)
    check(err, 4, 9, "inner", hint="define blocks at the top level")


def test_nested_block_definition_in_an_uncalled_block():
    with pytest.raises(CnnNameError) as info:
        cnndsl.parse(H + "block outer {\n  block inner {\n    relu\n  }\n}\nrelu\n")
    assert (info.value.line, info.value.column) == (4, 9)


# --- arguments ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layer, culprit, message, expected", [
    ("conv 8 3 stride=1.5", "1.5", "option 'stride' cannot be 1.5", "a positive integer or HxW"),
    ("conv 8 3 bias=3", "3", "option 'bias' cannot be 3", "true or false"),
    ("conv 8 3 bias=same", "same", "option 'bias' cannot be same", "true or false"),
    ("conv 8 3 pad=true", "true", "option 'pad' cannot be true", "`same` or `valid`"),
    ("conv 8 3x3x3", "3x3x3", "option 'kernel' cannot be 3x3x3", "3 or 3x5"),
    ("conv 8 same", "same", "option 'kernel' cannot be same", None),
    ("conv 8.0 3", "8.0", "option 'filters' cannot be 8.0", "a positive integer"),
    ("conv 0 3", "0", "option 'filters' cannot be 0", "a positive integer"),
    ("conv 8 0", "0", "option 'kernel' cannot be 0", None),
    ("conv 8 3 stride=0x1", "0x1", "option 'stride' cannot be 0x1", None),
    ("conv 8 3 dilation=0", "0", "option 'dilation' cannot be 0", None),
    ("conv 8 3 groups=0", "0", "option 'groups' cannot be 0", None),
    ("dropout 1.0", "1.0", "option 'p' cannot be 1.0", "a number in [0, 1)"),
    ("dropout p=1", "1", "option 'p' cannot be 1", None),
    ("batchnorm momentum=2", "2", "option 'momentum' cannot be 2", "a number from 0 to 1"),
    ("batchnorm eps=0", "0", "option 'eps' cannot be 0", "a positive number"),
    ("batchnorm affine=1", "1", "option 'affine' cannot be 1", "true or false"),
    ("maxpool 0", "0", "option 'kernel' cannot be 0", None),
    ("leaky_relu true", "true", "option 'slope' cannot be true", "a finite number"),
    ("flatten\ndense 10 bias=no", "no", "undefined name 'no'", "true or false"),
])
def test_wrong_value_type_or_range(layer, culprit, message, expected):
    err = error_of(H + layer + "\n", CnnNameError if "undefined" in message else CnnArgumentError)
    line = 3 + layer.count("\n")
    last = layer.split("\n")[-1]
    col = last.rindex(culprit) + 1
    check(err, line, col, culprit, message=message, expected=expected)


def test_too_many_positional_arguments_to_a_layer():
    err = error_of(H + "conv 8 3 1\n", CnnArgumentError)
    check(err, 3, 10, "1", message="conv takes 2 positional arguments, got 3",
          expected="conv FILTERS KERNEL then name=value options")
    err = error_of(H + "conv 8 3 1 1 1 1 1 1\n", CnnArgumentError)
    check(err, 3, 10, "1", message="conv takes 2 positional arguments, got 8")
    err = error_of(H + "relu 1\n", CnnArgumentError)
    check(err, 3, 6, "1", message="relu takes 0 positional arguments, got 1")
    err = error_of(H + "leaky_relu(0.1, 0.2)\n", CnnArgumentError)
    check(err, 3, 17, "0.2", message="leaky_relu takes 1 positional argument, got 2")


def test_too_many_positional_arguments_to_a_block():
    err = error_of(H + "block b(c) {\n  conv c 3\n}\nb(4, 5)\n", CnnArgumentError)
    check(err, 6, 6, "5", message="b takes 1 positional argument, got 2")


def test_missing_block_argument():
    err = error_of(H + "block b(c, k=3) {\n  conv c k\n}\nb(k=1)\n", CnnArgumentError)
    check(err, 6, 1, "b(k=1)", message="block 'b' needs argument 'c'", expected="b(c, k)")


def test_missing_layer_option():
    err = error_of(H + "conv 8\n", CnnArgumentError)
    check(err, 3, 1, "conv 8", message="conv needs 'kernel'", expected="conv FILTERS KERNEL")
    err = error_of(H + "flatten\ndense bias=false\n", CnnArgumentError)
    check(err, 4, 1, "dense bias=false", message="dense needs 'units'")


def test_unknown_block_parameter():
    err = error_of(H + "block b(c) {\n  conv c 3\n}\nb(d=4)\n", CnnNameError)
    check(err, 6, 3, "d=4", message="b has no parameter 'd'", expected="c")


def test_argument_given_twice():
    err = error_of(H + "conv 8 3 pad=1 pad=2\n", CnnArgumentError)
    check(err, 3, 16, "pad=2", message="'pad' is given twice")
    err = error_of(H + "conv 8 3 filters=4\n", CnnArgumentError)
    check(err, 3, 10, "filters=4", message="'filters' is given twice")
    err = error_of(H + "block b(c) {\n  conv c 3\n}\nb(1, c=2)\n", CnnArgumentError)
    check(err, 6, 6, "c=2", message="'c' is given twice")


@pytest.mark.parametrize("src, culprit, message", [
    ("relu x 0\n", "x 0", "repetition count must be a positive integer, got 0"),
    ("relu x 2.5\n", "x 2.5", "got 2.5"),
    ("relu x 1 - 3\n", "x 1 - 3", "got -2"),
    ("block b(n) {\n  relu x n - 1\n}\nb(1)\n", "x n - 1", "got 0"),
])
def test_bad_repetition_count(src, culprit, message):
    err = error_of(H + src, CnnArgumentError)
    line = 3 + src.split("x ")[0].count("\n")
    check(err, line, src.split("\n")[line - 3].index("x") + 1, culprit, message=message)


@pytest.mark.parametrize("expr, culprit, message", [
    ("c / 0", "c / 0", "division by zero"),
    ("c / 3", "c / 3", "4 / 3 is not a whole number"),
    ("c * same", "same", "cannot use same in arithmetic"),
    ("c + k", "k", "cannot use 3x3 in arithmetic"),
    ("c + true", "true", "cannot use true in arithmetic"),
])
def test_bad_arithmetic(expr, culprit, message):
    err = error_of(H + f"block b(c, k=3x3) {{\n  conv {expr} 3\n}}\nb(4)\n", CnnArgumentError)
    check(err, 4, 8 + expr.index(culprit), culprit, message=message)


def test_bad_input_shape():
    err = error_of("network a\ninput 1x8x8x8\nrelu\n", CnnArgumentError)
    check(err, 2, 7, "1x8x8x8", message="input must be CxHxW with positive sizes", expected="input 3x32x32")
    err = error_of("network a\ninput 0x8x8\nrelu\n", CnnArgumentError)
    check(err, 2, 7, "0x8x8")


# --- shapes -------------------------------------------------------------------------------------


def test_kernel_larger_than_padded_input():
    err = error_of(H + "conv 8 9\n", CnnShapeError)
    check(err, 3, 1, "conv 8 9", message="conv kernel 9 is larger than the padded input height 8",
          hint="use a smaller kernel, more padding")
    err = error_of(H + "conv 8 3x9 pad=1x0\n", CnnShapeError)
    check(err, 3, 1, "conv 8 3x9 pad=1x0", message="kernel 9 is larger than the padded input width 8")
    err = error_of(H + "conv 8 3 dilation=4\n", CnnShapeError)
    check(err, 3, 1, "conv 8 3 dilation=4", message="(dilated extent 9)")


def test_pooling_past_a_one_pixel_map():
    err = error_of(H + "maxpool 2\nmaxpool 2\nmaxpool 2\nmaxpool 2\n", CnnShapeError)
    check(err, 6, 1, "maxpool 2", message="maxpool kernel 2 is larger than the padded input height 1")


def test_non_positive_output_size():
    # The window check above keeps every size of a valid layer positive; the final guard in
    # shapes.infer still reports a zero size (here 0 filters, which the argument check blocks).
    from cnndsl import shapes
    from cnndsl.ir import Op
    from cnndsl.ops.conv import Conv
    span = Span(3, 1, 3, 9)
    with pytest.raises(CnnShapeError) as info:
        shapes.infer(Op.CONV, Conv(0, (3, 3), (1, 1), (0, 0), (1, 1), 1, True), (1, 8, 8), span)
    assert "output size 0x6x6 is not positive" in str(info.value)
    assert info.value.span == span


def test_dense_on_an_unflattened_input():
    err = error_of(H + "conv 4 3\ndense 10\n", CnnShapeError)
    check(err, 4, 1, "dense 10", message="dense needs a flat input, got a 4x6x6 feature map",
          expected="a flat vector of features", hint="insert `flatten` before dense")


@pytest.mark.parametrize("layer", ["conv 4 3", "maxpool 2", "avgpool 2", "global_avgpool"])
def test_spatial_layer_on_a_flat_input(layer):
    err = error_of(H + "flatten\n" + layer + "\n", CnnShapeError)
    check(err, 4, 1, layer, message="needs a CxHxW input, got a flat input of 64 features")


def test_residual_branch_changes_the_shape():
    err = error_of("network a\ninput 4x8x8\nresidual {\n  conv 8 3 stride=2 pad=1\n}\n", CnnShapeError)
    check(err, 3, 1, "residual {", message="residual branch ends in 8x4x4 but its input is 4x8x8",
          hint="add a projection: `} shortcut {` with `conv 8 1x1 stride=2 bias=false` and `batchnorm`")


def test_residual_branch_changes_channels_only():
    err = error_of(H + "residual {\n  conv 4 3 pad=1\n}\n", CnnShapeError)
    check(err, 3, 1, "residual {", message="ends in 4x8x8 but its input is 1x8x8",
          hint="`conv 4 1x1 stride=1 bias=false`")


def test_residual_shortcut_has_another_shape():
    src = "network a\ninput 4x8x8\nresidual {\n  conv 8 3 stride=2 pad=1\n} shortcut {\n  conv 8 1\n}\n"
    err = error_of(src, CnnShapeError)
    text = check(err, 3, 1, "residual {", message="residual branch ends in 8x4x4 but its shortcut ends in 8x8x8")
    assert field(text, "hint") is None


def test_empty_residual():
    err = error_of(H + "residual {\n}\n", CnnShapeError)
    check(err, 3, 1, "residual {", message="a residual branch needs at least one layer")


def test_softmax_not_last():
    err = error_of(H + "flatten\nsoftmax\ndense 3\nrelu\n", CnnShapeError)
    check(err, 4, 1, "softmax", message="softmax must be the last layer",
          hint="2 layer(s) follow it; move softmax to the end")


def test_softmax_on_a_feature_map():
    err = error_of(H + "softmax\n", CnnShapeError)
    check(err, 3, 1, "softmax", message="softmax needs a flat input", hint="`dense CLASSES` before softmax")


def test_same_padding_with_stride():
    err = error_of(H + "conv 8 3 stride=2 pad=same\n", CnnShapeError)
    check(err, 3, 1, "conv 8 3 stride=2 pad=same", message="`pad=same` needs stride 1, got stride 2x2",
          hint="give the padding, e.g. pad=1")
    err = error_of(H + "conv 8 3 stride=1x2 pad=same\n", CnnShapeError)
    assert "got stride 1x2" in str(err)


def test_groups_must_divide_channels_and_filters():
    err = error_of("network a\ninput 3x8x8\nconv 8 3 groups=2\n", CnnShapeError)
    check(err, 3, 1, "conv 8 3 groups=2", message="groups=2 must divide the input channels (3)")
    err = error_of("network a\ninput 4x8x8\nconv 6 3 groups=4\n", CnnShapeError)
    check(err, 3, 1, "conv 6 3 groups=4", message="groups=4 must divide the filters (6)")


def test_pool_padding_more_than_half_the_kernel():
    err = error_of(H + "maxpool 3 pad=2\n", CnnShapeError)
    check(err, 3, 1, "maxpool 3 pad=2", message="maxpool padding 2 is more than half its kernel 3",
          hint="pad <= kernel/2")
    err = error_of(H + "avgpool 2x4 pad=0x3\n", CnnShapeError)
    check(err, 3, 1, "avgpool 2x4 pad=0x3", message="avgpool padding 3 is more than half its kernel 4")


def test_count_include_pad_is_avgpool_only():
    err = error_of(H + "maxpool 2 count_include_pad=false\n", CnnArgumentError)
    check(err, 3, 1, "maxpool 2 count_include_pad=false",
          message="count_include_pad=false is for avgpool only: maxpool never counts padding",
          hint="remove count_include_pad=false, or use avgpool")
    assert cnndsl.parse(H + "avgpool 2 count_include_pad=false\n").nodes[1].attrs.count_include_pad is False
    err = error_of(H + "avgpool 2 ceil_mode=1\n", CnnArgumentError)
    check(err, 3, 21, "1", message="option 'ceil_mode' cannot be 1", expected="true or false")


def test_network_without_layers():
    err = error_of(H, CnnShapeError)
    assert (err.line, err.column) == (2, 7)  # at the input shape, after which layers are expected
    assert "the network has no layers" in str(err)
    assert field(str(err), "expected") == "at least one layer after `input`"
    err = error_of(H + "block b {\n  relu\n}\n", CnnShapeError)
    assert "no layers" in str(err)


def test_shape_error_inside_nested_blocks_has_notes_innermost_first():
    src = H + "block inner(k) {\n  conv 4 k\n}\nblock outer {\n  relu\n  inner(9)\n}\nstem: outer\n"
    err = error_of(src, CnnShapeError)
    text = check(err, 4, 3, "conv 4 k", message="conv kernel 9 is larger")
    assert field(text, "note") == ["in block 'inner' called at line 8", "in block 'outer' called at line 10"]


def test_error_in_the_second_copy_of_a_repetition():
    err = error_of(H + "conv 1 5 x 2\n", CnnShapeError)
    check(err, 3, 1, "conv 1 5 x 2", message="conv kernel 5 is larger than the padded input height 4")


# --- files --------------------------------------------------------------------------------------


def test_missing_file():
    with pytest.raises(CnnInputError) as info:
        cnndsl.parse("nope.cnn")
    err = info.value
    assert (err.line, err.column) == (None, None)
    text = err.render()
    assert "nope.cnn" in text and "no such file" in text
    assert "Traceback" not in text and "|" not in text


def test_missing_file_as_a_path(tmp_path):
    with pytest.raises(CnnInputError, match="no such file"):
        cnndsl.parse(tmp_path / "missing.cnn")


def test_directory_and_binary_file(tmp_path):
    folder = tmp_path / "dir.cnn"
    folder.mkdir()
    with pytest.raises(CnnInputError) as info:
        cnndsl.parse(folder)
    assert str(folder) in str(info.value)
    binary = tmp_path / "binary.cnn"
    binary.write_bytes(b"network a\xff\ninput 1x8x8\nrelu\n")
    with pytest.raises(CnnInputError) as info:
        cnndsl.parse(binary)
    assert "UTF-8" in str(info.value) and str(binary) in str(info.value)


def test_not_a_path_or_text():
    with pytest.raises(CnnInputError, match="int"):
        cnndsl.parse(42)


# --- known bugs ---------------------------------------------------------------------------------


def test_unexpected_end_of_input_with_crlf():
    err = error_of((H + "residual {\n  relu\n").replace("\n", "\r\n"), CnnSyntaxError)
    check(err, 4, 7, None, message="unexpected end of input")


def test_default_that_refers_to_a_later_parameter():
    err = error_of(H + "block b(c=d, d=2) {\n  conv c 3\n}\nb\n", CnnNameError)
    text = check(err, 3, 11, "d", message="'d'")
    assert field(text, "hint") != "did you mean 'd'?"


@pytest.mark.parametrize("layer", ["leaky_relu 1e400", "leaky_relu 1e400 - 1e400", "batchnorm eps=1e400"])
def test_non_finite_numbers(layer):
    error_of(H + layer + "\n", CnnArgumentError)


@pytest.mark.parametrize("odd", ["\u2028", "\x0c", "\x85", "\x1c", "\r"])
def test_render_shows_the_right_line_after_an_odd_line_break_in_a_comment(odd):
    err = error_of(f"network a # one{odd}two\ninput 1x8x8\nmaxpol 2\n", CnnNameError)
    check(err, 3, 1, "maxpol")


@pytest.mark.parametrize("src", ["relu x same\n", "block b(c) {\n  relu x c\n}\nb(valid)\n"])
def test_word_as_a_repetition_count(src):
    err = error_of(H + src, CnnArgumentError)
    assert "repetition count must be a positive integer" in err.message


# --- hostile text in messages (security review, finding 11) -------------------------------------

ESCAPES = "\x1b]0;PWNED-TITLE\x07\x1b[2J\x1b[31m"  # retitle the terminal, clear it, turn red
SHOWN = "?]0;PWNED-TITLE??[2J?[31m"


def test_render_cleans_every_part_of_an_error():
    err = CnnInputError(f"bad {ESCAPES}key\tx", Span(1, 1, 1, 2), expected=f"e{ESCAPES}",
                        hint="h\x9b1A\nhint: forged", source="relu\n", filename=f"f{ESCAPES}.cnn")
    err.notes.append(f"in block {ESCAPES}")
    assert err.render().split("\n") == [
        f"f{SHOWN}.cnn:1:1: input error: bad {SHOWN}key?x", "    1 | relu", "      | ^", f"  expected: e{SHOWN}",
        f"  note: in block {SHOWN}", "  hint: h?1A?hint: forged"]  # a line break in a hint forges no line


def test_a_pickle_global_name_cannot_reach_the_terminal():
    from pathlib import Path

    from cnndsl.pickles import read_pickle
    with pytest.raises(CnnError) as info:
        read_pickle(Path("data_batch_1"), b"\x80\x02c" + ESCAPES.encode() + b"evil\nsystem\n.", 1 << 20)
    assert f"refusing to unpickle {SHOWN}evil.system" in str(info.value)


def test_a_state_dict_key_cannot_reach_the_terminal():
    torch = pytest.importorskip("torch")
    model = cnndsl.compile("network n\ninput 1x4x4\nconv 2 3\nflatten\ndense 2\n", backend="torch", device="cpu")
    state = {ESCAPES + name: tensor for name, tensor in model.state_dict().items()}
    state[ESCAPES + "conv1.weight"] = torch.zeros(5)
    with pytest.raises(CnnError) as info:
        cnndsl.load_weights(model, state)
    assert "\x1b" not in str(info.value) and f"{SHOWN}conv1.weight" in str(info.value)
