"""Every bound of cnndsl/limits.py (listed in docs/reliability.md) trips early with a located
CnnError, and what stays inside the bounds still works: huge lines and files, deep nesting,
empty-block fan-out, huge repetitions, sizes and values, and files that are not files."""

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_fuzz import ODD_BREAKS, bad_message

import cnndsl
from cnndsl import CnnError
from cnndsl.limits import (
    MAX_DEPTH,
    MAX_EVALUATIONS,
    MAX_EXPANSIONS,
    MAX_LINE_CHARS,
    MAX_NESTING,
    MAX_NODES,
    MAX_OPERATORS,
    MAX_POOL_WINDOW,
    MAX_SIZE,
    MAX_SOURCE_CHARS,
)

H = "network a\ninput 1x8x8\n"


def parse_fast(text, seconds=2.0):
    """Parse; return the Network or the CnnError; fail on any other exception or if slow."""
    start = time.perf_counter()
    try:
        result = cnndsl.parse(text)
    except CnnError as err:
        result = err
        assert err.render().strip()
    elapsed = time.perf_counter() - start
    assert elapsed < seconds, f"took {elapsed:.2f} s"
    return result


def error(text, kind=CnnError, seconds=2.0):
    result = parse_fast(text, seconds)
    assert isinstance(result, kind), f"expected {kind.__name__}, got {type(result).__name__}: {str(result)[:300]}"
    return result


# --- text size and line length -----------------------------------------------------------------

def test_a_line_at_the_limit_works_one_more_character_does_not():
    line = "flatten\ndense 10 #"
    fits = H + line + "c" * (MAX_LINE_CHARS - len("dense 10 #")) + "\n"
    assert parse_fast(fits).output_shape == (10,)
    err = error(H + line + "c" * (MAX_LINE_CHARS + 1 - len("dense 10 #")) + "\n", cnndsl.CnnSyntaxError)
    assert (err.line, err.column) == (4, MAX_LINE_CHARS + 1)
    assert err.message == f"line 4 is too long: {MAX_LINE_CHARS + 1:,} characters, at most {MAX_LINE_CHARS:,}"


@pytest.mark.parametrize("line", ["a" * 100_000, "relu " + "@" * 100_000, "dense(" + "1, " * 10_000 + "1)",
                                  "flatten\ndense 10" + " " * 500_000])
def test_very_long_lines_are_refused_at_once_and_shown_in_part(line):
    err = error(H + line + "\n", cnndsl.CnnSyntaxError)
    assert "is too long" in err.message
    shown = err.render().split("\n")
    assert max(map(len, shown)) < 200 and shown[2].strip(" |") == "^"


def test_a_text_over_the_size_limit_is_refused_before_parsing(tmp_path):
    fits = H + "relu\n" * ((MAX_SOURCE_CHARS - len(H)) // 5)  # 20,000 layers: about 1 s on one core
    assert len(parse_fast(fits, seconds=6.0).nodes) == 1 + (MAX_SOURCE_CHARS - len(H)) // 5
    text = fits + "relu\n"
    err = error(text, cnndsl.CnnSyntaxError)
    assert err.message.startswith(f"the text is too long: {len(text):,} characters")
    path = tmp_path / "big.cnn"
    path.write_text(text + " " * 3 * MAX_SOURCE_CHARS)
    err = error(path, cnndsl.CnnInputError)
    assert "too large for a .cnn file" in err.message and str(path) in err.render()


def test_non_regular_files_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.cnn"
    os.mkfifo(fifo)
    for path in (str(fifo), Path("/dev/zero")):
        err = error(path, cnndsl.CnnInputError)
        assert err.message == "not a regular file (a pipe, socket or device)"


# --- nesting and expansion ----------------------------------------------------------------------

def test_residuals_nest_up_to_the_limit():
    def nested(n):
        return H + "residual {\n" * n + "relu\n" + "}\n" * n
    assert parse_fast(nested(MAX_NESTING)).nodes[-1].name == "residual1.add"
    err = error(nested(MAX_NESTING + 1), cnndsl.CnnSyntaxError)
    assert (err.line, err.message) == (3 + MAX_NESTING, f"residual and concat branches are nested more than {MAX_NESTING} deep")
    err = error(nested(5000), cnndsl.CnnSyntaxError)  # once past Python's recursion limit
    assert err.line == 3 + MAX_NESTING


def test_residual_nesting_counts_through_block_calls():
    src = H + "block b {\n  residual {\n    b2\n  }\n}\nblock b2 {\n  residual {\n    relu\n  }\n}\nb\n"
    assert parse_fast(src).nodes[-1].name == "b1.residual1.add"
    deep = H + "".join(f"block b{i} {{\n  residual {{\n    residual {{\n      b{i + 1}\n    }}\n  }}\n}}\n"
                       for i in range(40))
    err = error(deep + "block b40 {\n  relu\n}\nb0\n", cnndsl.CnnSyntaxError)
    assert "branches are nested more than" in err.message


def test_block_call_chain_is_bounded():
    n = 200
    src = H + "".join(f"block b{i} {{\n  b{i + 1}\n}}\n" for i in range(n)) + f"block b{n} {{\n  relu\n}}\nb0\n"
    err = error(src, cnndsl.CnnNameError)
    assert err.message == f"block calls are nested more than {MAX_DEPTH} deep" and err.line is not None


def test_empty_block_fan_out_trips_the_expansion_bound():
    """The issue's 74-byte file: 10^10 empty block calls, refused in well under a second."""
    src = "network a\ninput 1x8x8\nblock e {\n}\nblock f {\n  e x 100000\n}\nblock g {\n  f x 100000\n}\ng\nrelu\n"
    err = error(src, cnndsl.CnnArgumentError, seconds=1.5)
    assert err.message.startswith(f"the network expands to more than {MAX_EXPANSIONS:,} statements")
    # (foreseen after the first of g's calls of f: each makes 100,001 statements)
    assert err.line == 9 and "in block 'g' called at line 11" in err.render()


def test_a_repetition_foresees_the_bounds_after_its_first():
    """Every repetition makes what the first made: 3 x 100,000 relus four calls deep are refused
    after the first 3, at the repetition that passes the bound, not after 100,000 layers."""
    src = ("network a\ninput 1x8x8\nblock b0 {\nrelu\n}\nblock b1 {\n  b0 x 3\n}\nblock b2 {\n  b1 x 100000\n}\n"
           "block b3 {\n  b2 x 3\n}\nb3 x 10\nrelu\n")
    err = error(src, cnndsl.CnnArgumentError, seconds=0.3)
    assert (err.line, err.message) == (10, f"the network expands to more than {MAX_NODES:,} layers")
    assert "in block 'b2' called at line 13" in err.render()


def test_the_node_limit_is_exact():
    assert len(parse_fast(H + f"relu x {MAX_NODES}\n").nodes) == MAX_NODES + 1
    err = error(H + f"relu x {MAX_NODES // 2}\nrelu x {MAX_NODES // 2}\nrelu\n", cnndsl.CnnArgumentError)
    assert (err.line, err.message) == (5, f"the network expands to more than {MAX_NODES:,} layers")
    err = error(H + f"relu x {MAX_NODES + 1}\n", cnndsl.CnnArgumentError)
    assert err.message == f"repetition count {MAX_NODES + 1:,} is more than the {MAX_NODES:,} layers a network may have"


def test_many_lines_blocks_and_scopes():
    blocks = "".join(f"block b{i}(c=1) {{\n  conv c 1\n}}\n" for i in range(1000))
    calls = "".join(f"b{i}\n" for i in range(0, 1000, 7))
    net = parse_fast(H + blocks + calls + "\n" * 10_000 + "# end\n")
    assert len(net.nodes) == 1 + len(range(0, 1000, 7))
    net = parse_fast("network big\ninput 1x2x2\nblock b {\n  relu x 20\n}\nblock c {\n  b x 20\n}\nc x 10\n")
    assert len(net.nodes) == 1 + 4000 and net.nodes[-1].name == "c10.b20.relu20"


def test_a_misspelt_call_among_thousands_of_blocks_is_quick():
    blocks = "".join(f"block block_number_{i} {{\n  relu\n}}\n" for i in range(2_500))
    err = error(H + blocks + "block_numbr_77\n", cnndsl.CnnNameError)
    assert err.message == "unknown layer 'block_numbr_77'"


# --- numbers and sizes --------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["+", "*", "-"])
def test_long_expressions_are_refused(op):
    expr = op.join(["1"] * 300) if op != "-" else "20000" + "-1" * 300
    err = error(H + "flatten\ndense " + expr + "\n", cnndsl.CnnSyntaxError)
    assert "expression too long" in err.message


def test_sizes_up_to_the_limit():
    assert parse_fast(f"network a\ninput 1x{MAX_SIZE}x1\nrelu\n").output_shape == (1, MAX_SIZE, 1)
    err = error(f"network a\ninput 1x{MAX_SIZE + 1}x1\nrelu\n", cnndsl.CnnArgumentError)
    assert err.message == f"input size {MAX_SIZE + 1:,} is more than the largest size, {MAX_SIZE:,}"
    for layer in (f"conv {MAX_SIZE + 1} 1", f"conv 8 {MAX_SIZE + 1}x3", f"maxpool 2 stride={MAX_SIZE + 1}",
                  f"flatten\ndense {MAX_SIZE}*2"):
        err = error(H + layer + "\n", cnndsl.CnnArgumentError)
        assert f"more than the largest size, {MAX_SIZE:,}" in err.message, err.message
    net = parse_fast(H + f"flatten\ndense {MAX_SIZE}\n")
    assert net.to_json()["total_params"] == 65 * MAX_SIZE


@pytest.mark.parametrize("src", [H + "flatten\ndense " + "9" * 500 + "\n", H + "dropout " + "*".join(["99999"] * 150)
                                 + "\n", "network a\ninput 1x" + "9" * 500 + "x8\nrelu\n", H + "flatten\ndense 1e400\n"])
def test_huge_numbers(src):
    assert isinstance(parse_fast(src), CnnError)


def test_a_network_too_big_for_memory_is_refused_before_allocating():
    net = cnndsl.parse(H + f"flatten\ndense {MAX_SIZE}\nrelu\ndense {MAX_SIZE}\n")
    for backend in ("torch", "triton"):
        with pytest.raises(cnndsl.CnnInputError, match="parameters and buffers need .* GiB in torch.float32, more "
                                                        "than the .* GiB of memory on cpu"):
            cnndsl.compile(net, backend=backend, device="cpu")


def test_huge_repetition_count_does_not_hang(tmp_path):
    path = tmp_path / "huge.cnn"
    path.write_text(H + "flatten\ndense 10 x 100000000\n")
    result = subprocess.run([sys.executable, "-m", "cnndsl", "check", str(path)], check=False,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "repetition count 100,000,000 is more than" in result.stderr



def test_an_expression_counts_every_operator_not_its_depth():
    """95 sums of 95-term products nest under 200 deep but hold 9,000 operators."""
    expr = " + \\\n".join(" * ".join(["1"] * 95) for _ in range(95))  # a product a line
    err = error(H + "block b(p) {\nrelu\n}\nb(" + expr + ") x 100000\n", cnndsl.CnnSyntaxError)
    assert err.message == f"expression too long: more than {MAX_OPERATORS} operators"


def test_a_repeated_block_call_binds_its_arguments_once():
    net = parse_fast(H + "block b(p) {\nrelu\n}\nb(" + " + ".join(["1"] * 200) + ") x 100000\n", seconds=4)
    assert len(net.nodes) == 100_001


def test_a_cached_call_or_layer_tells_8_from_8_0():
    """8, 8.0 and true are equal dict keys: the caches of bound calls and checked layers key on the
    values' types too, so a non-integer filter count reusing an earlier call's is still an error."""
    src = H + "block inner(c) {\nconv c 3 pad=1\n}\nblock outer(c) {\ninner(c)\n}\nouter(8)\nouter(8.0)\n"
    err = error(src, cnndsl.CnnArgumentError)
    assert err.message == "option 'filters' cannot be 8.0" and err.notes[-1] == "in block 'outer' called at line 10"


def test_arithmetic_that_block_calls_multiply_is_bounded():
    """A tree of calls, each with other arguments (so nothing is bound twice), evaluates each
    call's 190 operators at each of its 2^15 calls: the evaluation bound trips, quickly."""
    pad = " + 0" * 190
    lines = [H, "block l0(a) {\nrelu\n}\n"]
    for k in range(1, 15):
        lines.append(f"block l{k}(a) {{\nl{k - 1}(a * 2{pad})\nl{k - 1}(a * 2 + 1{pad})\n}}\n")
    lines.append("l14(1)\n")
    err = error("".join(lines), cnndsl.CnnArgumentError, seconds=6)
    assert err.message == f"expanding the network evaluates more than {MAX_EVALUATIONS:,} arithmetic operators"


def _many_parameters(n: int) -> str:
    """A block header with n defaulted parameters, 100 to a line."""
    rows = [", ".join(f"p{i}=1" for i in range(j, min(j + 100, n))) for j in range(0, n, 100)]
    return "block big(" + ", \\\n".join(rows) + ")"


def test_a_block_of_many_parameters_repeated_costs_its_layers_not_its_parameters():
    """Each repetition of a layer looks its bindings up by a small key, not by the bindings
    themselves: 3,000 parameters and 33,000 repetitions cost what the repetitions cost."""
    net = parse_fast(H + _many_parameters(3000) + " {\nrelu x 33000\n}\nbig\n", seconds=4.0)
    assert len(net.nodes) == 33_001


def test_binding_many_parameters_counts_against_the_evaluation_bound():
    """A tree of calls binds a 2,000-parameter block with 2^10 different arguments: each
    parameter bound counts as one evaluation, so the bound trips."""
    lines = [H, _many_parameters(2000), " {\nrelu\n}\n", "block l0(a) {\nbig(a)\n}\n"]
    for k in range(1, 11):
        lines.append(f"block l{k}(a) {{\nl{k - 1}(a * 2)\nl{k - 1}(a * 2 + 1)\n}}\n")
    lines.append("l10(1)\n")
    err = error("".join(lines), cnndsl.CnnArgumentError, seconds=6)
    assert err.message == f"expanding the network evaluates more than {MAX_EVALUATIONS:,} arithmetic operators"


@pytest.mark.parametrize("src, message", [
    ("network a\ninput 1x1x1\nconcat {\n" + "branch { }\n" * 16 + "} x 10\n",
     ("concat makes a 4294967296x1x1 tensor per image, 4,294,967,296 values, more than the 2,147,483,647 a layer "
     "may hold")),
    (H + "conv 1 1 pad=100000\n", ("conv makes a 1x200008x200008 tensor per image, 40,003,200,064 values, more "
     "than the 2,147,483,647 a layer may hold")),
    ("network a\ninput 3x30000x30000\nrelu\n", ("input makes a 3x30000x30000 tensor per image, 2,700,000,000 "
     "values, more than the 2,147,483,647 a layer may hold"))])
def test_a_layers_output_is_bounded_however_it_grows(src, message):
    assert error(src, cnndsl.CnnShapeError).message == message


def test_a_pooling_window_is_bounded():
    err = error("network a\ninput 1x4x4\nmaxpool 2147483647 pad=1073741823\n", cnndsl.CnnArgumentError)
    assert err.message == f"maxpool window 2147483647x2147483647 has more than {MAX_POOL_WINDOW:,} taps"
    assert parse_fast("network a\ninput 1x256x256\navgpool 256\n").output_shape == (1, 1, 1)

# --- odd bytes ----------------------------------------------------------------------------------

def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.cnn"
    path.write_bytes(b"")
    for src in ("", path):
        err = error(src, cnndsl.CnnSyntaxError)
        assert (err.line, err.column) == (1, 1)
    assert parse_fast(path).render().startswith(f"{path}:1:1: syntax error: unexpected end of input")


@pytest.mark.parametrize("seed", range(20))
def test_binary_garbage_text(seed):
    rng = random.Random(seed)
    data = bytes(rng.randrange(256) for _ in range(rng.choice([1, 10, 100, 900])))
    for text in (data.decode("latin-1"), H + data.decode("latin-1"), data.decode("utf-8", "replace")):
        text = text.translate({ord(c): " " for c in ODD_BREAKS})
        err = parse_fast(text)
        if isinstance(err, CnnError):
            assert bad_message(err, text) is None, bad_message(err, text)


def test_control_characters_never_reach_the_terminal(tmp_path):
    """An escape sequence in a file (or its name) is shown as `?` in the error, one for one."""
    text = H + "relu \x1b[2J\x1b]0;pwned\x07\n"
    rendered = error(text).render()
    assert "\x1b" not in rendered and "\x07" not in rendered and "relu ?[2J?]0;pwned?" in rendered
    path = tmp_path / "a\x1b[31m.cnn"
    path.write_text(text)
    assert "\x1b" not in error(path).render()


def test_binary_file(tmp_path):
    path = tmp_path / "garbage.cnn"
    rng = random.Random(7)
    path.write_bytes(bytes(rng.randrange(256) for _ in range(4096)))
    err = error(path, cnndsl.CnnInputError)
    assert str(path) in err.render()


@pytest.mark.parametrize("src", ["\ud800.cnn", "a\x00.cnn", "\udcff/x.cnn"])
def test_path_strings_that_no_file_system_accepts(src):
    err = error(src, cnndsl.CnnInputError)
    assert err.render().strip()


def test_repetition_is_fast():
    start = time.perf_counter()
    assert len(cnndsl.parse(H + "relu x 300\n").nodes) == 301
    assert time.perf_counter() - start < 0.5


def test_the_reliability_page_states_every_limit():
    from cnndsl import limits
    from cnndsl.dataset import MAX_DATA_BYTES
    page = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text()
    shown = {"MAX_INT": "2^63", "MAX_SIZE": "2,147,483,647", "MAX_DEPTH": "64 deep", "MAX_NESTING": "64 deep"}
    for name in [n for n in dir(limits) if n.startswith("MAX_")]:
        value = getattr(limits, name)
        assert shown.get(name, f"{value:,}") in page, f"docs/reliability.md does not state {name} = {value:,}"
    assert f"{MAX_DATA_BYTES:,}" in page


def test_concat_branches_count_as_expansions():
    """8,000 empty branches repeated 10,000 times made no layers to count, and took a minute."""
    src = "network a\ninput 1x1x1\nblock c {\nconcat {\n" + "branch { }\n" * 8000 + "}\nconv 1 1x1\n}\nc x 10000\n"
    err = error(src, cnndsl.CnnArgumentError, seconds=4)
    assert err.message.startswith("the network expands to more than 250,000 statements (layers, block calls, "
                                  "residuals and concat branches")


def test_the_layers_names_are_bounded_however_their_block_calls_nest():
    """64 calls deep, each under a 900-character label, around `relu x 99990`: every name was
    57,000 characters, 5.6 GB of names from a 58 KB file."""
    blocks = ["block b0 {\nrelu x 99990\n}\n"] + [f"block b{k} {{\n{'l' * 900}: b{k - 1}\n}}\n" for k in range(1, 64)]
    err = error(H + "".join(blocks) + "b63\n", cnndsl.CnnNameError, seconds=4)
    assert err.message.startswith("the layers' names add up to more than 20,000,000 characters")


def test_a_cached_call_tells_0_0_from_minus_0_0():
    """-0.0 == 0.0 in Python: the binding cache keys a float by its bits, so each call keeps its slope."""
    src = "network t\ninput 1x4x4\nblock b(s) {\nleaky_relu s\n}\nb(0.0)\nb(0.0 * (0 - 1))\n"
    slopes = [str(n.attrs) for n in cnndsl.parse(src).nodes[1:]]
    assert "-0.0" not in slopes[0] and "-0.0" in slopes[1], slopes
