"""`cnndsl fmt`: canonical layout, idempotent on every example and every ```cnn block of the docs
that compiles, the network unchanged (its identity) and every comment kept; a file that does not
compile is refused and left alone; --check changes nothing."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cnndsl
from cnndsl.cli import main
from cnndsl.errors import CnnError
from cnndsl.fmt import format_source
from cnndsl.resume import network_identity

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.cnn"))


def _compiles(text):
    try:
        cnndsl.parse(text)
    except CnnError:
        return False
    return True


DOC_BLOCKS = [b for b in re.findall(r"```cnn\n(.*?)```", (ROOT / "docs" / "language.md").read_text(), re.DOTALL)
              if b.lstrip().startswith("network") and _compiles(b)]


@pytest.mark.parametrize("text", [p.read_text() for p in EXAMPLES] + DOC_BLOCKS,
                         ids=[p.stem for p in EXAMPLES] + [f"doc{i}" for i in range(len(DOC_BLOCKS))])
def test_idempotent_and_the_same_network(text):
    once = format_source(text)
    assert format_source(once) == once
    assert network_identity(cnndsl.parse(once)) == network_identity(cnndsl.parse(text))
    assert [line.split("#", 1)[1] for line in once.splitlines() if "#" in line] == \
        [line.split("#", 1)[1] for line in text.splitlines() if "#" in line]


def test_the_examples_are_canonical():
    assert all(format_source(p.read_text()) == p.read_text() for p in EXAMPLES)


MESSY = """

network  messy   # a network
input 3x8x8
# blocks
block cb( c ,s=1 ){
conv c   3 stride = s pad=1   # the conv
        relu
}
stem :cb(8,s = 2)x2     # two
residual{
  conv 8 3 pad=1
  batchnorm
}   shortcut   {
}
gate {
global_avgpool
conv 2   1
relu
conv 8 1
sigmoid
}
conv 8 3 \\
    pad=1


flatten
dense 10    x 1
"""

CANONICAL = """network messy  # a network
input 3x8x8
# blocks
block cb(c, s=1) {
    conv c 3 stride=s pad=1  # the conv
    relu
}
stem: cb(8, s=2) x2          # two
residual {
    conv 8 3 pad=1
    batchnorm
} shortcut {
}
gate {
    global_avgpool
    conv 2 1
    relu
    conv 8 1
    sigmoid
}
conv 8 3 pad=1

flatten
dense 10 x1
"""


def test_the_layout():
    assert format_source(MESSY) == CANONICAL


def test_parentheses_and_floor_division_keep_their_grouping():
    text = ("network p\ninput 3x9x9\nblock b(k,d=1) {\nconv 8 k pad=( k-1 )//2*d dilation=d\nrelu x(k-2)\n}\n"
            "b(3)\nconv(8,(3 - 1) // 2 + 1,pad=(1))\n")
    assert format_source(text) == ("network p\ninput 3x9x9\nblock b(k, d=1) {\n    conv 8 k pad=(k - 1) // 2 * d "
                                   "dilation=d\n    relu x (k - 2)\n}\nb(3)\nconv(8, (3 - 1) // 2 + 1, pad=(1))\n")


def test_the_command_line(tmp_path, capsys):
    good, bad = tmp_path / "good.cnn", tmp_path / "bad.cnn"
    good.write_text(MESSY)
    bad.write_text("network b\ninput 1x4x4\nconv 4 3 pad=1\nflaten\n")
    assert main(["fmt", "--check", str(good)]) == 1 and good.read_text() == MESSY
    assert "would reformat" in capsys.readouterr().err
    assert main(["fmt", str(good)]) == 0 and good.read_text() == CANONICAL
    assert main(["fmt", "--check", str(good)]) == 0
    assert main(["fmt", str(bad)]) == 1 and "flaten" in capsys.readouterr().err
    assert bad.read_text().endswith("flaten\n")  # left alone


def test_a_text_that_names_a_file_is_text(tmp_path, monkeypatch, capsys):
    # Security review, finding 10: fmt parsed its input with api.parse, which takes a one-line
    # `other.cnn` for a path, so `fmt pointer.cnn` quoted another file's contents in its error.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "target.cnn").write_text("network secret_leak\ninput 1x8x8\nsecretword_abc 1\n")
    (tmp_path / "pointer.cnn").write_text("target.cnn")
    with pytest.raises(CnnError) as info:
        format_source("target.cnn", "pointer.cnn")
    assert info.value.kind == "syntax error" and "secret" not in str(info.value)
    assert str(info.value).startswith("pointer.cnn:1:1: syntax error: unexpected 'target'")
    assert main(["fmt", "pointer.cnn"]) == 1
    err = capsys.readouterr().err
    assert "pointer.cnn:1:1: syntax error" in err and "secret" not in err


def test_a_canonical_file_with_crlf_line_ends_is_canonical(tmp_path, capsys):
    (tmp_path / "crlf.cnn").write_bytes(b"network a\r\ninput 1x8x8\r\nrelu\r\n")
    assert main(["fmt", "--check", str(tmp_path / "crlf.cnn")]) == 0
    assert "0 of 1 file(s) would reformat" in capsys.readouterr().err


def test_fmt_refuses_what_is_not_a_regular_file_unread(tmp_path, capsys):
    os.mkfifo(tmp_path / "pipe.cnn")  # would block a reader for ever; /dev/zero would never end
    for path in (tmp_path / "pipe.cnn", "/dev/zero"):
        assert main(["fmt", str(path)]) == 1
        assert f"{path}: input error: not a regular file (a pipe, socket or device)" in capsys.readouterr().err


def test_fmt_writes_through_a_link_and_never_leaves_half_a_file(tmp_path, capsys):
    """The formatted text replaces the file whole (a new file renamed over it), through a link
    to it; a write that fails (here a file-size limit smaller than the result) leaves it as it was."""
    messy = "network a\ninput 1x8x8\n" + "".join(f"relu    # comment {i} padding padding padding\n" for i in range(60))
    (tmp_path / "real.cnn").write_text(messy)
    (tmp_path / "link.cnn").symlink_to(tmp_path / "real.cnn")
    assert main(["fmt", str(tmp_path / "link.cnn")]) == 0
    assert (tmp_path / "link.cnn").is_symlink() and (tmp_path / "real.cnn").read_text() != messy
    (tmp_path / "real.cnn").write_text(messy)
    script = "import resource, sys; from cnndsl.cli import main; "
    script += "resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048)); sys.exit(main(['fmt', sys.argv[1]]))"
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "real.cnn")], capture_output=True, text=True,
                         check=False)
    assert run.returncode == 1 and "input error: cannot write" in run.stderr and "it is unchanged" in run.stderr, run.stderr
    assert (tmp_path / "real.cnn").read_text() == messy and not list(tmp_path.glob("*.tmp"))


def test_fmt_names_files_without_terminal_escapes(tmp_path, capsys):
    name = tmp_path / "x\x1b]0;PWNED\x07.cnn"
    name.write_text("network a\ninput 1x8x8\nrelu    # spaced\n")
    assert main(["fmt", "--check", str(name)]) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and "x?]0;PWNED?.cnn" in err


def test_a_statement_longer_than_the_line_limit_is_broken_not_joined():
    """Joined, the continued call would be 1,700 characters, past the 1,000 a line may hold:
    fmt breaks it at spaces into lines of at most 100, and formats its own output to itself."""
    terms = " + ".join(["0" * 25] * 30)
    text = (f"network a\ninput 1x8x8\nblock b(n, m) {{\nrelu\n}}\nb({terms}, \\\n{terms}) x (1 + 0)  # a long call\n"
            "relu x 2\n")
    out = format_source(text)
    assert max(len(line.partition("#")[0].rstrip()) for line in out.splitlines()) <= 100 and out.count("\\\n") >= 16
    assert out.splitlines()[-2].endswith(") x (1 + 0)  # a long call") and out.splitlines()[-1] == "relu x2"
    assert format_source(out) == out
    assert network_identity(cnndsl.parse(out)) == network_identity(cnndsl.parse(text))


def test_a_layout_that_would_pass_a_limit_is_refused_as_fmts_own():
    """Spaced, the dense line is 987 characters; aligned after it, the relu line's comment would
    end at 1,020: fmt says its layout would pass the limit, not that the user's line 3 is too long."""
    text = f"network a\ninput 1x8x8\nrelu  # a comment long enough to pass\nflatten\ndense {'+'.join(['11111'] * 123)}  #c\n"
    with pytest.raises(CnnError, match=r"fmt: the canonical layout of <text> would pass a limit of the language "
                                       r"\(line 3 is too long: 1,020 characters, at most 1,000\)"):
        format_source(text)


def test_a_comment_counts_toward_the_line_it_ends():
    """Spaced, the dense line is 979 characters, and its comment 62 more: the line is broken."""
    text = f"network a\ninput 1x8x8\nflatten\ndense {'+'.join(['11111'] * 122)}  # {'c' * 60}\n"
    out = format_source(text)
    assert "\\\n" in out and max(map(len, out.splitlines())) <= 1000 and format_source(out) == out
