"""Seeded fuzzing of the front end. Random corruptions of the shipped examples and of every
code block of the docs, and generated hostile files (empty-block fan-out, deep nesting, huge
repetition, huge numbers, long lines) must each give a Network or a CnnError whose rendered
message is non-empty and located (`<string>:LINE:COL:` with a caret on the right line), never
another exception, and within CASE_LIMIT_S seconds.

CNNDSL_FUZZ sets the number of cases (2,000 by default, about a minute on two cores at most;
CNNDSL_FUZZ=10000 is the long run). Large new numbers (> MAX_NEW_NUMBER) are kept out of the
corruptions only for speed (as repetition counts each expands to up to 100,000 layers); the
generators make them on purpose. tests/test_limits.py checks each bound exactly."""

import os
import random
import re
import signal
import time
from pathlib import Path

import cnndsl
from cnndsl import CnnError, CnnInputError
from cnndsl.layers import LAYERS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.cnn"))
SEED = 20250117
CASES = int(os.environ.get("CNNDSL_FUZZ", "2000"))
GENERATED = 0.1  # the share of CASES made by the generators (~0.1 s each); the rest are corruptions
CASE_LIMIT_S = 2.0
MAX_NEW_NUMBER = 100
SHOWN = 120  # characters of a long line an error shows (cnndsl/errors.py)
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


def corruptions(name, original, count, seed):
    """`count` distinct corrupted versions of a text, deterministic for a seed."""
    rng = random.Random(f"{seed}:{name}")
    seen, out = set(), []
    for _ in range(50 * count):  # a tiny text may not have `count` distinct corruptions
        if len(out) == count:
            break
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
    start = time.perf_counter()
    try:
        try:
            cnndsl.parse(text)
            outcome, problem = "ok", None
        except CnnError as err:  # a one-line text ending in .cnn is a path (cnndsl.parse's rule): not located
            problem = None if isinstance(err, CnnInputError) and "\n" not in text else bad_message(err, text)
            outcome = "bad" if problem else "error"
        elapsed = time.perf_counter() - start
        if elapsed > CASE_LIMIT_S and problem is None:
            return "bad", f"took {elapsed:.2f} s (at most {CASE_LIMIT_S} s)"
        return outcome, problem
    except _Timeout:
        return "bad", f"took more than {CASE_TIMEOUT_S} s"
    except Exception as exc:  # noqa: BLE001 - any other exception is what the fuzz looks for
        return "bad", f"{type(exc).__name__}: {exc}"[:500]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def printable(line):
    """A source line as an error shows it: non-printable characters as `?`."""
    return "".join(c if c.isprintable() else "?" for c in line)


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
    text = text.removeprefix("\ufeff")  # as the parser reads it: positions count from after a BOM
    lines = text.split("\n")
    if not 1 <= err.line <= len(lines) + 1 or err.column < 1:
        return f"position {err.line}:{err.column} outside the text ({len(lines)} lines)"
    if err.line <= len(text.splitlines()):  # the source line and a caret are shown
        rendered = msg.split("\n")
        gutter = f"{err.line:>5} | "
        if len(rendered) < 3 or not rendered[1].startswith(gutter):
            return f"no source line: {msg!r}"
        shown, carets = rendered[1][len(gutter):], rendered[2][len(gutter):]
        full = printable(lines[err.line - 1].rstrip().expandtabs(1))
        stripped = carets.lstrip(" ")
        if not stripped or set(stripped) != {"^"}:
            return f"no caret: {msg!r}"
        at = len(carets) - len(stripped)  # the caret's index in `shown`
        if max(len(full), err.column) <= SHOWN:  # the whole line, the caret at the column
            if shown != full:
                return f"wrong source line shown: {msg!r}"
            if at + 1 != err.column:
                return f"caret not at column {err.column}: {msg!r}"
        elif len(shown) > SHOWN + 6 or (err.column <= len(full) and shown[at:at + 1] != full[err.column - 1]):
            return f"a long line not shown as a window with the caret under column {err.column}: {msg!r}"
        if err.column > len(lines[err.line - 1]) + 1:  # trailing blanks (and a CRLF "\r") count
            return f"caret past the end of the line: {msg!r}"
    return None




# --- the corpus -----------------------------------------------------------------------------------


def doc_blocks():
    """(name, text) of every .cnn code block of the docs and the README (a complete file or a
    fragment: a corruption of a fragment is as good a test as any)."""
    blocks = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for i, (lang, body) in enumerate(re.findall(r"^```(\w*)\n(.*?)^```", path.read_text(), re.MULTILINE | re.DOTALL)):
            if lang == "cnn" or body.startswith("network "):
                blocks.append((f"{path.name}#{i}", body))
    return blocks


def sources():
    return [(p.name, p.read_text()) for p in EXAMPLES] + doc_blocks()


def corpus(total, seed=SEED):
    """`total` corruptions spread evenly over the examples and the docs' code blocks."""
    srcs = sources()
    per, extra = divmod(total, len(srcs))
    return [t for i, (name, text) in enumerate(srcs) for t in corruptions(name, text, per + (i < extra), seed)]


# --- the generators -------------------------------------------------------------------------------

H = "network a\ninput 1x8x8\n"


def _huge(rng):
    return rng.choice(["100000", "100001", "2147483647", "2147483648", "999999999999", "9" * rng.randrange(5, 40),
                       "99999 * 99999", "2147483647 + 1", "1e300", "1e400", "0", str(rng.randrange(1, 10**6))])


def fan_out(rng):
    """Blocks calling blocks `x N`, some empty: products up to 10^20 expansions."""
    depth = rng.randrange(2, 6)
    body = [rng.choice(["", "relu\n", "", "conv 1 1\n"])]
    for i in range(1, depth):
        body.append(f"  b{i - 1} x {rng.choice([10, 1000, 100000, 99999, 3])}\n")
    blocks = "".join(f"block b{i} {{\n{b}}}\n" for i, b in enumerate(body))
    return H + blocks + f"b{depth - 1}" + rng.choice(["", " x 100000", " x 2"]) + "\nrelu\n"


def nesting(rng):
    """Residuals and block calls nested up to thousands deep."""
    n = rng.choice([1, 10, 63, 64, 65, 100, 1000, 5000])
    if rng.random() < 0.5:
        return H + "residual {\n" * n + "relu\n" + "} shortcut {\n  relu\n}\n" * n
    return H + "".join(f"block b{i} {{\n  b{i + 1}\n}}\n" for i in range(n)) + f"block b{n} {{\n  relu\n}}\nb0\n"


def repetition(rng):
    """Huge repetition counts, literal or computed, on layers, residuals and block calls."""
    count = _huge(rng)
    stmt = rng.choice(["relu", "dense 3", "residual {\n  relu\n}", "b(2)", "c: relu"])
    return H + "block b(k) {\n  relu x k\n}\n" + ("flatten\n" if "dense" in stmt else "") + f"{stmt} x {count}\n"


def numbers(rng):
    """Huge sizes, strides, probabilities and input shapes."""
    big = _huge(rng)
    layer = rng.choice([f"conv {big} 3", f"conv 4 {big}", f"conv 4 3 stride={big}", f"conv 4 3 pad={big}",
                        f"conv 4 3 dilation={big}", f"conv 4 3 groups={big}", f"maxpool {big}", f"dropout {big}",
                        f"flatten\ndense {big}", f"batchnorm eps={big}", f"leaky_relu {big}"])
    shape = rng.choice(["1x8x8", f"1x{big}x8", f"{big}x1x1", "3x224x224"])
    return f"network a\ninput {shape}\n{layer}\n"


def long_lines(rng):
    """Lines of hundreds to hundreds of thousands of characters: words, operators, comments."""
    n = rng.choice([200, 999, 1000, 1001, 5000, 200_000])
    line = rng.choice([lambda: "a" * n, lambda: "dense " + "+".join(["1"] * (n // 2)),
                       lambda: "relu # " + "c" * n, lambda: "conv(" + "1, " * (n // 3) + "1)",
                       lambda: " ".join(rng.choice(WORDS + NUMBERS) for _ in range(n // 4))])()
    return H + "flatten\n" + line + "\n"


GENERATORS = [fan_out, nesting, repetition, numbers, long_lines]


def generated(total, seed=SEED):
    rng = random.Random(f"{seed}:generated")
    return [rng.choice(GENERATORS)(rng) for _ in range(total)]


# --- the fuzz -------------------------------------------------------------------------------------


def _run(cases):
    failures, outcomes = [], {"ok": 0, "error": 0, "bad": 0}
    for text in cases:
        outcome, problem = outcome_of(text)
        outcomes[outcome] += 1
        if problem is not None:
            failures.append(f"--- {problem}\n--- text ({len(text):,} characters):\n{text[:2000]}")
    return failures, outcomes


def test_corpus_covers_the_examples_and_the_docs_and_is_deterministic():
    names = [name for name, _ in sources()]
    assert len(EXAMPLES) >= 6 and sum(n.startswith("language.md") for n in names) > 40
    assert corpus(100) == corpus(100) and generated(20) == generated(20)


def test_corrupted_examples_and_doc_blocks_parse_or_raise_a_located_cnn_error():
    cases = corpus(round(CASES * (1 - GENERATED)))
    failures, outcomes = _run(cases)
    print(f"\nfuzz: {len(cases):,} corruptions: {outcomes}")
    assert not failures, f"{len(failures)} bad cases; the first ones:\n" + "\n\n".join(failures[:3])
    assert outcomes["error"] > len(cases) // 2 and outcomes["ok"] > 0, outcomes  # both outcomes exercised


def test_generated_hostile_files_end_quickly_in_a_network_or_a_located_error():
    cases = generated(round(CASES * GENERATED))
    failures, outcomes = _run(cases)
    print(f"\nfuzz: {len(cases):,} generated: {outcomes}")
    assert not failures, f"{len(failures)} bad cases; the first ones:\n" + "\n\n".join(failures[:3])
    assert outcomes["error"] and outcomes["ok"], outcomes


def test_the_oracle_catches_a_crash_and_a_slow_case(monkeypatch):
    def boom(text):
        raise KeyError("x")
    monkeypatch.setattr(cnndsl, "parse", boom)
    outcome, problem = outcome_of("anything")
    assert outcome == "bad" and problem.startswith("KeyError")
    monkeypatch.setattr(cnndsl, "parse", lambda text: time.sleep(CASE_LIMIT_S + 0.1))
    outcome, problem = outcome_of("anything")
    assert outcome == "bad" and problem.startswith("took ")
