"""Seeded fuzzing of the front end: thousands of random corruptions of the shipped
examples must each parse or raise a CnnError whose rendered message is non-empty and
located (`<string>:LINE:COL:` with a caret on the right line), never another exception.
Then hand-written hostile inputs: huge lines, deep expressions, empty and binary files,
huge numbers and repetition counts.

Large new numbers (> MAX_NEW_NUMBER) are kept out of the random corpus only for speed: as
repetition counts they expand to up to 100,000 layers each; the hostile tests cover them."""

import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cnndsl
from cnndsl import CnnError
from cnndsl.layers import LAYERS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.cnn"))
SEED = 20250117
CASES_PER_EXAMPLE = 640  # 5 examples: 3,200 corrupted files
MAX_NEW_NUMBER = 100
CASE_TIMEOUT_S = 10  # a safety net: one case that takes longer fails the test instead of hanging it
KINDS = {"syntax error", "name error", "argument error", "shape error", "input error"}
ODD_BREAKS = "\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"

WORDS = [*LAYERS, "block", "residual", "shortcut", "network", "input", "x", "same", "valid", "true", "false",
         "stride=", "pad=", "groups=", "bias=", "dilation=", "eps=", "momentum=", "slope=", "p=", "units=",
         "c", "n", "k", "stride", "basic", "conv_bn", "stage", "layer1:", "fc:"]
NUMBERS = ["0", "1", "2", "3", "4", "7", "16", "64", "100", "0.5", "1.5", ".5", "5.", "1e-5", "1e400", "2.5e+2",
           "3x3", "1x7", "0x0", "2x1x1", "3x", "x3", "x 2", "x n - 1"]
PUNCT = ["(", ")", "{", "}", ",", "=", ":", "+", "-", "*", "/", "\\", "\\\n", "#", ".", ";", "@", "\n", "\r\n",
         "\t", " ", "  ", "} shortcut {", "{\n", "\n}\n", "()", "(,)", "==", "**", "//", "'", '"', "$", "%", "!",
         "?", "[", "]", "<", ">", "|", "&", "^", "~", "`"]
UNICODE = ["é", "ß", "²", "٣", "ｘ", "×", "−", "—", "🙂", "\u00a0", "\u200b", "\ufeff", "\x00", "\x7f", "\x1b",
           "Ω", "ℓ", "ﬁ", "\U0010ffff"]
CHARS = "abcxyz_ABCXYZ0123456789 \t\n(){}=,:+-*/#.\\;@" + "".join(u for u in UNICODE if len(u) == 1)
TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+(?:x\d+)*(?:\.\d*)?(?:[eE][-+]?\d+)?|[ \t]+|\n|.", re.DOTALL)


# --- corruptions ----------------------------------------------------------------------------------


def _tokens(text):
    return TOKEN.findall(text)


def _pick_token(rng, toks):
    solid = [i for i, t in enumerate(toks) if t.strip()]
    return rng.choice(solid) if solid else None


def _lines(text):
    return text.split("\n")


def _any_insert(rng):
    pool = rng.choice([WORDS, NUMBERS, PUNCT, UNICODE])
    word = rng.choice(pool)
    return rng.choice(["", " "]) + word + rng.choice(["", " "])


def delete_char(rng, text):
    if not text:
        return text
    i = rng.randrange(len(text))
    return text[:i] + text[i + 1:]


def insert_char(rng, text):
    i = rng.randrange(len(text) + 1)
    return text[:i] + rng.choice(CHARS) + text[i:]


def replace_char(rng, text):
    if not text:
        return text
    i = rng.randrange(len(text))
    return text[:i] + rng.choice(CHARS) + text[i + 1:]


def delete_token(rng, text):
    toks = _tokens(text)
    i = _pick_token(rng, toks)
    if i is None:
        return text
    del toks[i]
    return "".join(toks)


def insert_token(rng, text):
    toks = _tokens(text)
    toks.insert(rng.randrange(len(toks) + 1), _any_insert(rng))
    return "".join(toks)


def replace_token(rng, text):
    toks = _tokens(text)
    i = _pick_token(rng, toks)
    if i is None:
        return text
    toks[i] = _any_insert(rng).strip() or "x"
    return "".join(toks)


def swap_tokens(rng, text):
    toks = _tokens(text)
    solid = [i for i, t in enumerate(toks) if t.strip()]
    if len(solid) < 2:
        return text
    i = rng.randrange(len(solid) - 1)
    a, b = solid[i], solid[i + 1]
    toks[a], toks[b] = toks[b], toks[a]
    return "".join(toks)


def swap_case(rng, text):
    toks = _tokens(text)
    words = [i for i, t in enumerate(toks) if t[:1].isalpha()]
    if not words:
        return text
    i = rng.choice(words)
    toks[i] = rng.choice([str.upper, str.capitalize, str.swapcase])(toks[i])
    return "".join(toks)


def swap_lines(rng, text):
    lines = _lines(text)
    if len(lines) < 2:
        return text
    i, j = rng.sample(range(len(lines)), 2)
    lines[i], lines[j] = lines[j], lines[i]
    return "\n".join(lines)


def duplicate_line(rng, text):
    lines = _lines(text)
    i = rng.randrange(len(lines))
    lines.insert(rng.randrange(len(lines) + 1), lines[i])
    return "\n".join(lines)


def delete_line(rng, text):
    lines = _lines(text)
    del lines[rng.randrange(len(lines))]
    return "\n".join(lines)


def join_lines(rng, text):
    breaks = [i for i, ch in enumerate(text) if ch == "\n"]
    if not breaks:
        return text
    i = rng.choice(breaks)
    return text[:i] + rng.choice([" ", "", " \\ ", "; "]) + text[i + 1:]


def indent_line(rng, text):
    lines = _lines(text)
    i = rng.randrange(len(lines))
    lines[i] = rng.choice(["    ", "\t", " # ", "#"]) + lines[i]
    return "\n".join(lines)


def truncate(rng, text):
    return text[:rng.randrange(len(text) + 1)]


def crlf(rng, text):
    return text.replace("\n", "\r\n")


def insert_line(rng, text):
    lines = _lines(text)
    line = " ".join(_any_insert(rng).strip() or "x" for _ in range(rng.randrange(1, 5)))
    lines.insert(rng.randrange(len(lines) + 1), line)
    return "\n".join(lines)


MUTATIONS = [delete_char, insert_char, replace_char, delete_token, insert_token, replace_token, swap_tokens,
             swap_case, swap_lines, duplicate_line, delete_line, join_lines, indent_line, truncate, crlf, insert_line]


def _new_big_numbers(original, text):
    before = set(re.findall(r"\d+", original))
    return [n for n in re.findall(r"\d+", text) if n not in before and int(n) > MAX_NEW_NUMBER]


def corruptions(path, count, seed):
    """`count` distinct corrupted versions of the file, deterministic for a seed."""
    rng = random.Random(f"{seed}:{path.name}")
    original = path.read_text()
    seen, out = set(), []
    while len(out) < count:
        text = original
        for _ in range(rng.choice([1, 1, 1, 2, 2, 3])):
            text = rng.choice(MUTATIONS)(rng, text)
        if text in seen or _new_big_numbers(original, text):
            continue
        seen.add(text)
        out.append(text)
    return out


# --- the oracle -----------------------------------------------------------------------------------


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout


def outcome_of(text):
    """("ok" | "error" | "bad", None or a description of what is wrong)."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_TIMEOUT_S)
    try:
        cnndsl.parse(text)
        return "ok", None
    except CnnError as err:
        problem = bad_message(err, text)
        return ("bad" if problem else "error"), problem
    except _Timeout:
        return "bad", f"took more than {CASE_TIMEOUT_S} s"
    except Exception as exc:  # noqa: BLE001 - any other exception is what the fuzz looks for
        return "bad", f"{type(exc).__name__}: {exc}"[:500]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def bad_message(err, text):
    msg = err.render()
    if not msg.strip() or str(err) != msg:
        return f"empty or inconsistent message: {msg!r}"
    if err.line is None or err.column is None:
        return f"no line/column: {msg!r}"
    head = msg.split("\n")[0]
    if not head.startswith(f"<string>:{err.line}:{err.column}: "):
        return f"no <string>:line:col prefix: {head!r}"
    if head.split(": ")[1] not in KINDS or not head.split(": ", 2)[2].strip():
        return f"bad kind or empty message: {head!r}"
    lines = text.split("\n")
    if not 1 <= err.line <= len(lines) + 1 or err.column < 1:
        return f"position {err.line}:{err.column} outside the text ({len(lines)} lines)"
    if err.line <= len(text.splitlines()):  # the source line and a caret are shown
        rendered = msg.split("\n")
        gutter = f"{err.line:>5} | "
        if len(rendered) < 3 or not rendered[1].startswith(gutter):
            return f"no source line: {msg!r}"
        shown, carets = rendered[1][len(gutter):], rendered[2][len(gutter):]
        if shown != lines[err.line - 1].rstrip().expandtabs(1):
            return f"wrong source line shown: {msg!r}"
        stripped = carets.lstrip(" ")
        if not stripped or set(stripped) != {"^"} or len(carets) - len(stripped) + 1 != err.column:
            return f"caret not at column {err.column}: {msg!r}"
        if err.column > len(lines[err.line - 1]) + 1:  # trailing blanks (and a CRLF "\r") count
            return f"caret past the end of the line: {msg!r}"
    return None


# --- the fuzz -------------------------------------------------------------------------------------


def test_corpus_is_big_and_deterministic():
    total = sum(len(corruptions(p, CASES_PER_EXAMPLE, SEED)) for p in EXAMPLES)
    assert len(EXAMPLES) == 6 and total >= 3000
    assert corruptions(EXAMPLES[0], 20, SEED) == corruptions(EXAMPLES[0], 20, SEED)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_corrupted_examples_parse_or_raise_a_located_cnn_error(path):
    failures, outcomes = [], {"ok": 0, "error": 0, "bad": 0}
    for text in corruptions(path, CASES_PER_EXAMPLE, SEED):
        outcome, problem = outcome_of(text)
        outcomes[outcome] += 1
        if problem is not None:
            failures.append(f"--- {problem}\n--- corrupted text:\n{text}")
    assert not failures, f"{len(failures)} bad cases; the first ones:\n" + "\n\n".join(failures[:3])
    # the corpus exercises both outcomes
    assert outcomes["error"] > CASES_PER_EXAMPLE // 2 and outcomes["ok"] > 0, outcomes


def test_the_oracle_catches_a_crash(monkeypatch):
    def boom(text):
        raise KeyError("x")
    monkeypatch.setattr(cnndsl, "parse", boom)
    outcome, problem = outcome_of("anything")
    assert outcome == "bad" and problem.startswith("KeyError")


# --- hostile inputs -------------------------------------------------------------------------------

H = "network a\ninput 1x8x8\n"


def parse_fast(text, seconds=10.0):
    """Parse; return the Network or the CnnError; fail on any other exception or if slow."""
    start = time.perf_counter()
    try:
        result = cnndsl.parse(text)
    except CnnError as err:
        result = err
        assert err.render().strip()
    assert time.perf_counter() - start < seconds
    return result


def test_very_long_lines():
    assert parse_fast(H + "flatten\ndense 10" + " " * 1_000_000 + "# " + "c" * 1_000_000 + "\n").output_shape == (10,)
    err = parse_fast(H + "a" * 100_000 + "\n")
    assert isinstance(err, cnndsl.CnnNameError) and (err.line, err.column) == (3, 1)
    err = parse_fast(H + "flatten\ndense(" + "1, " * 10_000 + "1)\n")
    assert isinstance(err, cnndsl.CnnArgumentError) and "got 10001" in err.message
    err = parse_fast(H + "relu " + "@" * 100_000 + "\n")
    assert isinstance(err, cnndsl.CnnSyntaxError) and (err.line, err.column) == (3, 6)


def test_many_lines_and_blocks():
    blocks = "".join(f"block b{i}(c=1) {{\n  conv c 1\n}}\n" for i in range(1000))
    calls = "".join(f"b{i}\n" for i in range(0, 1000, 7))
    net = parse_fast(H + blocks + calls + "\n" * 10_000 + "# end\n")
    assert len(net.nodes) == 1 + len(range(0, 1000, 7))


def test_many_short_scopes():
    net = parse_fast("network big\ninput 1x2x2\nblock b {\n  relu x 20\n}\nblock c {\n  b x 20\n}\nc x 10\n")
    assert len(net.nodes) == 1 + 4000
    assert net.nodes[-1].name == "c10.b20.relu20"


@pytest.mark.parametrize("op", ["+", "*", "-"])
def test_ten_thousand_nested_terms(op):
    expr = op.join(["1"] * 10_000) if op != "-" else "20000" + "-1" * 10_000
    err = parse_fast(H + "flatten\ndense " + expr + "\n")
    assert isinstance(err, cnndsl.CnnSyntaxError)
    assert "expression too long" in err.render()


def test_deeply_nested_residuals():
    err = parse_fast(H + "residual {\n" * 1000 + "relu\n" + "}\n" * 1000)
    assert isinstance(err, cnndsl.CnnSyntaxError)


def test_moderately_nested_terms_and_residuals_work():
    assert parse_fast(H + "flatten\ndense " + "+".join(["1"] * 150) + "\n").output_shape == (150,)
    net = parse_fast(H + "residual {\n" * 100 + "relu\n" + "}\n" * 100)
    assert net.nodes[-1].name == "residual1.add"


def test_deep_block_call_chain_is_bounded():
    n = 200
    src = H + "".join(f"block b{i} {{\n  b{i + 1}\n}}\n" for i in range(n)) + f"block b{n} {{\n  relu\n}}\nb0\n"
    err = parse_fast(src)
    assert isinstance(err, cnndsl.CnnNameError)
    assert "nested more than" in err.message and err.line is not None


def test_ten_thousand_nested_terms_error_is_located():
    err = parse_fast(H + "flatten\ndense " + "+".join(["1"] * 10_000) + "\n")
    assert (err.line, err.column) == (4, 7)
    assert err.render().startswith("<string>:4:7: ")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.cnn"
    path.write_bytes(b"")
    for src in ("", path):
        err = parse_fast(src)
        assert isinstance(err, cnndsl.CnnSyntaxError)
        assert (err.line, err.column) == (1, 1)
    assert parse_fast(path).render().startswith(f"{path}:1:1: syntax error: unexpected end of input")


@pytest.mark.parametrize("seed", range(20))
def test_binary_garbage_text(seed):
    rng = random.Random(seed)
    data = bytes(rng.randrange(256) for _ in range(rng.choice([1, 10, 100, 5000])))
    for text in (data.decode("latin-1"), H + data.decode("latin-1"), data.decode("utf-8", "replace")):
        text = text.translate({ord(c): " " for c in ODD_BREAKS})
        err = parse_fast(text)
        if isinstance(err, CnnError):
            assert bad_message(err, text) is None, bad_message(err, text)


def test_binary_file(tmp_path):
    path = tmp_path / "garbage.cnn"
    rng = random.Random(7)
    path.write_bytes(bytes(rng.randrange(256) for _ in range(4096)))
    err = parse_fast(path)
    assert isinstance(err, cnndsl.CnnInputError)
    assert str(path) in err.render()


def test_huge_values_that_fit():
    big = "99999999999999999999"
    net = parse_fast(f"network a\ninput 1x{big}x8\nrelu\n")
    assert net.output_shape == (1, int(big), 8)
    err = parse_fast(H + f"conv 8 {big}x3\n")
    assert isinstance(err, cnndsl.CnnShapeError)
    err = parse_fast(H + "flatten\ndense 1e400\n")
    assert isinstance(err, cnndsl.CnnArgumentError) and "cannot be inf" in err.message
    net = parse_fast(H + f"flatten\ndense {big}\n")
    assert net.to_json()["total_params"] == 64 * int(big) + int(big)


@pytest.mark.parametrize("src", [H + "flatten\ndense " + "9" * 5000 + "\n", "network a\ninput 1x" + "9" * 5000 + "x8\n"
                                 "relu\n"], ids=["number", "dims"])
def test_huge_integer_literal(src):
    parse_fast(src)


@pytest.mark.parametrize("layer", ["dropout", "flatten\ndense"])
def test_huge_integer_from_arithmetic(layer):
    result = parse_fast(H + layer + " " + "*".join(["99999999999999999999"] * 250) + "\n")
    if isinstance(result, cnndsl.Network):
        result.summary()
        result.to_json()


def test_repetition_is_fast():
    start = time.perf_counter()
    net = cnndsl.parse(H + "relu x 300\n")
    assert len(net.nodes) == 301
    assert time.perf_counter() - start < 0.5


def test_huge_repetition_count_does_not_hang(tmp_path):
    path = tmp_path / "huge.cnn"
    path.write_text(H + "flatten\ndense 10 x 100000000\n")
    try:
        result = subprocess.run([sys.executable, "-m", "cnndsl", "check", str(path)], check=False,
                                capture_output=True, text=True, timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail("`cnndsl check` on `dense 10 x 100000000` ran for more than 5 s")
    assert result.returncode in (0, 1) and "Traceback" not in result.stderr
