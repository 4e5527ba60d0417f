"""docs/language.md is executable: every `cnn` example is checked with the CLI and its
documented output compared exactly, and the layer option tables are compared with
cnndsl.layers.LAYERS.

Conventions of the page (stated in its introduction):

- A ```cnn block starts with `# file: NAME.cnn` (a complete file) or `# fragment` (a
  sketch that is not a complete file, not checked).
- A complete file is followed by a ```text block whose first line is
  `$ cnndsl check NAME.cnn [--json]` and whose other lines are the exact output; a file
  without such a block must be accepted by `cnndsl check`.
- Any other ```text block starting with `$ ` is a command example: `$ SETUP; cnndsl check
  ARGS`, SETUP run by the shell first. Commands run in a directory holding the example
  file and a copy of `examples/`.
- An output is an error (standard error, exit status 1) when its first line is
  `...: KIND error: ...`; otherwise it is a summary (standard output, exit status 0).
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import cnndsl
from cnndsl.cli import main
from cnndsl.layers import KERNEL, LAYERS, REQUIRED

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "language.md"
FILE_MARK = re.compile(r"^# file: ([A-Za-z0-9_]+\.cnn)$")
FRAGMENT_MARK = "# fragment"
COMMAND = re.compile(r"^\$ (?:(?P<setup>.+); )?cnndsl (?P<args>check .+)$")
ERROR = re.compile(r"^[^ ]*: (syntax|name|argument|shape|input) error: ")


@dataclass
class Fence:
    lang: str
    body: str  # the lines between the fences, each ending in "\n"
    line: int  # of the opening fence, 1-based


@dataclass
class Example:
    """One command of the page and its documented output."""

    name: str  # test id: the file, or the command line
    line: int
    files: dict  # name -> text, written before the command runs
    setup: str | None
    argv: list
    output: str


def fences(text: str) -> list[Fence]:
    out, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        m = re.match(r"^```(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and lines[j] != "```":
            j += 1
        assert j < len(lines), f"docs/language.md:{i + 1}: unclosed code fence"
        out.append(Fence(m.group(1), "".join(f"{s}\n" for s in lines[i + 1:j]), i + 1))
        i = j + 1
    return out


def command(fence: Fence):
    """(setup, argv, output) of a ```text block that starts with `$ `, else None."""
    if fence.lang != "text" or not fence.body.startswith("$ "):
        return None
    first, _, output = fence.body.partition("\n")
    m = COMMAND.match(first)
    assert m, f"docs/language.md:{fence.line + 1}: a command must be `$ [SETUP; ]cnndsl check ARGS`: {first}"
    return m.group("setup"), shlex.split(m.group("args")), output


def collect(text: str):
    """(examples, files without output, fragments) of the page."""
    blocks = fences(text)
    examples, silent, fragments, used = [], [], [], set()
    for k, fence in enumerate(blocks):
        if fence.lang == "cnn":
            first = fence.body.split("\n", 1)[0]
            if first == FRAGMENT_MARK:
                fragments.append(fence)
                continue
            m = FILE_MARK.match(first)
            assert m, (f"docs/language.md:{fence.line + 1}: a cnn block must start with "
                       f"`# file: NAME.cnn` or `{FRAGMENT_MARK}`, not {first!r}")
            name = m.group(1)
            after = command(blocks[k + 1]) if k + 1 < len(blocks) else None
            if after and name in after[1]:
                setup, argv, output = after
                examples.append(Example(name, fence.line, {name: fence.body}, setup, argv, output))
                used.add(k + 1)
            else:
                silent.append(Example(name, fence.line, {name: fence.body}, None, ["check", name], ""))
        elif k not in used and (cmd := command(fence)):
            setup, argv, output = cmd
            examples.append(Example(" ".join(argv), fence.line, {}, setup, argv, output))
    return examples, silent, fragments


TEXT = DOC.read_text(encoding="utf-8")
EXAMPLES, SILENT, FRAGMENTS = collect(TEXT)


def run_cli(example: Example, tmp_path, monkeypatch, capsys):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    for name, body in example.files.items():
        (tmp_path / name).write_text(body, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    if example.setup:
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        subprocess.run(example.setup, shell=True, check=True, cwd=tmp_path, env=env)
    capsys.readouterr()
    try:
        code = main(example.argv)
    except SystemExit as exit_:  # argparse usage errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_documented_output(example, tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(example, tmp_path, monkeypatch, capsys)
    where = f"docs/language.md:{example.line} ({example.name})"
    if ERROR.match(example.output):
        assert (err, out, code) == (example.output, "", 1), where
    else:
        assert (out, err, code) == (example.output, "", 0), where


@pytest.mark.parametrize("example", SILENT, ids=[e.name for e in SILENT])
def test_example_without_output_is_accepted(example, tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(example, tmp_path, monkeypatch, capsys)
    assert (code, err) == (0, ""), f"docs/language.md:{example.line} ({example.name}):\n{err}"
    assert out.startswith(f"network {cnndsl.parse(example.files[example.name]).name}: input ")


def test_page_structure():
    names = [n for e in EXAMPLES + SILENT for n in e.files]
    assert len(names) == len(set(names)), "two examples write the same file"
    assert len(EXAMPLES) > 50 and len(SILENT) >= 3 and len(FRAGMENTS) >= 1
    for fence in fences(TEXT):  # a complete file must be tagged `cnn`, so that it is checked
        if fence.lang != "cnn":
            assert not re.search(r"^network \w+\s*(#.*)?$", fence.body, re.MULTILINE), \
                f"docs/language.md:{fence.line}: a .cnn file in a block not tagged cnn"


# --- the layer tables of section 3 ------------------------------------------------------------

KIND_TEXT = {
    "count": "integer",
    "pair": "integer or `HxW`",
    "nonneg_pair": "integer or `HxW`",
    "padding": "integer, `HxW`, `same` or `valid`",
    "positive": "number",
    "fraction": "number",
    "probability": "number",
    "number": "number",
    "bool": "`true` or `false`",
}


def cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def sections(text: str) -> dict:
    """`### 3.x` heading -> its text, for the layer sections."""
    parts = re.split(r"^### (3\.\d+ .*)$", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def default_value(cell: str):
    """A default as the tables write it -> the value LAYERS holds."""
    words = {"required": REQUIRED, "the kernel": KERNEL, "`true`": True, "`false`": False}
    if cell in words:
        return words[cell]
    number = cell.strip("`")
    return int(number) if number.isdigit() else float(number)


def documented_options(text: str) -> dict:
    """keyword -> [(option, pos., kind, default)] from the option tables and the
    activation table; keywords whose section says "No options." map to []."""
    found = {}
    for heading, body in sections(text).items():
        keywords = re.findall(r"`(\w+)`", heading)
        rows = [cells(r) for r in body.split("\n") if r.startswith("| `")]
        if "| option | pos. | kind | default | range |" in body:
            for kw in keywords:
                found[kw] = [(r[0].strip("`"), r[1], r[2], r[3]) for r in rows]
        elif "| keyword | options | PyTorch |" in body:
            for r in rows:
                kw, opts = r[0].strip("`"), r[1]
                if opts == "none":
                    found[kw] = []
                else:
                    m = re.fullmatch(r"`(\w+)` \(pos\. (\d+), ([^,]+), default (`[^`]+`|required), .*\)", opts)
                    assert m, f"cannot read the options of {kw}: {opts}"
                    found[kw] = [m.groups()]
        elif body.lstrip().startswith("No options."):
            for kw in keywords:
                found[kw] = []
    return found


def test_layer_tables_match_layers():
    found = documented_options(TEXT)
    assert set(found) == set(LAYERS), "layer keywords documented in section 3 vs cnndsl.layers.LAYERS"
    for kw, spec in LAYERS.items():
        expected = [(o.name, str(i + 1) if i < spec.positional else "–", KIND_TEXT[o.kind], o.default)
                    for i, o in enumerate(spec.options)]
        shown = [(*row[:3], default_value(row[3])) for row in found[kw]]
        assert shown == expected, kw
        assert [type(row[3]) for row in shown] == [type(row[3]) for row in expected], kw  # True is not 1


def test_every_layer_and_option_named():
    for kw, spec in LAYERS.items():
        assert f"`{kw}`" in TEXT, kw
        for option in spec.options:
            assert f"`{option.name}`" in TEXT, (kw, option.name)


# --- the table of shipped examples (section 11) -----------------------------------------------

def _human(n: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f} {suffix}"
    return str(n)


def test_shipped_examples_table():
    rows = [cells(r) for r in TEXT.split("\n") if r.startswith("| `examples/")]
    assert sorted(r[0].strip("`") for r in rows) == sorted(f"examples/{p.name}" for p in (ROOT / "examples").glob("*.cnn"))
    for path, _, shape_in, shape_out, n_params, n_buffers, n_macs in rows:
        s = cnndsl.parse(ROOT / path.strip("`")).to_json()
        shown = ("x".join(map(str, s["input"])), "x".join(map(str, s["output"])), f"{s['total_params']:,}",
                 f"{s['bn_buffers']:,}", _human(s["macs"]))
        assert (shape_in, shape_out, n_params, n_buffers, n_macs) == shown, path


# --- the state-dict listing of section 4 -----------------------------------------------------

def test_state_dict_listing():
    """The keys listed for names_demo: the first ones, `...`, then the last ones."""
    blocks = fences(TEXT)
    listing = next(b for b in blocks if b.lang == "" and b.body.startswith("stem.conv1.weight\n"))
    head, _, tail = listing.body.partition("...\n")
    source = next(e.files["names_demo.cnn"] for e in EXAMPLES if e.name == "names_demo.cnn")
    keys = list(cnndsl.compile(source, backend="torch", device="cpu").state_dict())
    head, tail = head.split(), tail.split()
    assert keys[:len(head)] == head and keys[-len(tail):] == tail
