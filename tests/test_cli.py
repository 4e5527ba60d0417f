"""The `cnndsl` command line, in-process (`cnndsl.cli.main`) and as a subprocess
(`python -m cnndsl`): `check` prints the summary table or one JSON object and exits 0;
every model or file error is printed as its rendered message with exit status 1 and never
a Python traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cnndsl.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TOTALS = {"lenet5": 61706, "cifar_small": 122570, "vgg16": 138357544, "resnet18": 11689512,
          "resnet50": 25557032}
OUTPUTS = {"lenet5": [10], "cifar_small": [10], "vgg16": [1000], "resnet18": [1000], "resnet50": [1000]}
INPUTS = {"lenet5": [1, 32, 32], "cifar_small": [3, 32, 32], "vgg16": [3, 224, 224], "resnet18": [3, 224, 224],
          "resnet50": [3, 224, 224]}
TYPO = "network a\ninput 1x8x8\nconv 4 3\nmaxpol 2\n"


def run_cli(*args, cwd=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "cnndsl", *map(str, args)], check=False, capture_output=True,
                          text=True, cwd=cwd, timeout=timeout)


@pytest.fixture
def typo_file(tmp_path):
    path = tmp_path / "typo.cnn"
    path.write_text(TYPO)
    return path


# --- in-process ---------------------------------------------------------------------------------


def test_check_prints_the_table(capsys):
    assert main(["check", str(EXAMPLES / "lenet5.cnn")]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[0] == "network lenet5: input 1x32x32 -> output 10"
    assert lines[2].split() == ["Layer", "Op", "Output", "shape", "Params", "Mult-adds"]
    rows = {line.split()[0]: line.split() for line in lines[4:-5]}
    assert rows["input"][1:3] == ["input", "1x32x32"]
    assert rows["c1"][1:4] == ["conv", "6x28x28", "156"]
    assert rows["s2"][1:3] == ["avgpool", "6x14x14"]
    assert rows["output"][1:4] == ["dense", "10", "850"]
    assert rows["softmax1"][1:3] == ["softmax", "10"]
    assert "Total params: 61,706" in lines
    assert out.endswith("\n")


@pytest.mark.parametrize("name", sorted(TOTALS))
def test_check_json_totals(name, capsys):
    assert main(["check", str(EXAMPLES / f"{name}.cnn"), "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    data = json.loads(out)  # the whole output is one JSON object
    assert isinstance(data, dict)
    assert data["name"] == name
    assert data["input"] == INPUTS[name]
    assert data["output"] == OUTPUTS[name]
    assert data["total_params"] == TOTALS[name]
    layers = data["layers"]
    assert layers and all({"name", "op", "output_shape", "params"} <= set(layer) for layer in layers)
    assert sum(layer["params"] for layer in layers) == TOTALS[name]
    assert len({layer["name"] for layer in layers}) == len(layers)
    assert layers[-1]["output_shape"] == OUTPUTS[name]
    assert layers[-1]["op"] == "softmax"
    assert "input" not in [layer["name"] for layer in layers]
    for layer in layers:
        assert isinstance(layer["params"], int) and layer["params"] >= 0
        assert all(isinstance(d, int) and d > 0 for d in layer["output_shape"])


def test_check_json_layer_details(capsys):
    assert main(["check", str(EXAMPLES / "resnet18.cnn"), "--json"]) == 0
    layers = {layer["name"]: layer for layer in json.loads(capsys.readouterr().out)["layers"]}
    conv1 = layers["conv1"]
    assert (conv1["op"], conv1["output_shape"], conv1["params"]) == ("conv", [64, 112, 112], 64 * 3 * 7 * 7)
    add = layers["layer2.residual1.add"]
    assert (add["op"], add["output_shape"], add["params"]) == ("add", [128, 28, 28], 0)
    assert layers["layer1.0.residual1.batchnorm1"]["params"] == 128
    assert layers["fc"]["params"] == 512 * 1000 + 1000


def test_check_error_exits_1_with_the_rendered_message(typo_file, capsys):
    assert main(["check", str(typo_file)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert lines[0] == f"{typo_file}:4:1: name error: unknown layer 'maxpol'"
    assert lines[1] == "    4 | maxpol 2"
    assert lines[2] == "      | ^^^^^^"
    assert "  hint: did you mean 'maxpool'?" in lines
    assert "Traceback" not in err


def test_check_json_error_prints_no_json(typo_file, capsys):
    assert main(["check", str(typo_file), "--json"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "did you mean 'maxpool'?" in err


def test_check_missing_file(tmp_path, capsys):
    missing = tmp_path / "missing.cnn"
    assert main(["check", str(missing)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip() == f"{missing}: input error: no such file"


def test_check_a_path_without_the_cnn_suffix(tmp_path, capsys):
    path = tmp_path / "model.txt"
    path.write_text("network m\ninput 1x4x4\nrelu\n")
    assert main(["check", str(path)]) == 0
    assert capsys.readouterr().out.startswith("network m: input 1x4x4 -> output 1x4x4")


def test_check_a_directory_and_a_binary_file(tmp_path, capsys):
    assert main(["check", str(tmp_path)]) == 1
    assert f"{tmp_path}: input error: " in capsys.readouterr().err
    binary = tmp_path / "binary.cnn"
    binary.write_bytes(b"network a\xff\n")
    assert main(["check", str(binary)]) == 1
    err = capsys.readouterr().err
    assert f"{binary}: input error: " in err and "UTF-8" in err


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["check", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: cnndsl")
    assert "check" in out


def test_usage_errors_exit_2(capsys):
    for argv in ([], ["check"], ["frobnicate"], ["check", "a.cnn", "--bogus"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        assert "usage: cnndsl" in capsys.readouterr().err


# --- as a subprocess ----------------------------------------------------------------------------


def test_subprocess_check_example():
    result = run_cli("check", "examples/cifar_small.cnn", cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith("network cifar_small: input 3x32x32 -> output 10\n")
    assert "Total params: 122,570" in result.stdout
    assert "conv1" in result.stdout and "maxpool2" in result.stdout


def test_subprocess_check_json():
    result = run_cli("check", EXAMPLES / "resnet50.cnn", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["total_params"] == TOTALS["resnet50"]


def test_subprocess_misspelled_layer(typo_file):
    result = run_cli("check", typo_file, cwd=typo_file.parent)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"{typo_file}:4:1: name error: unknown layer 'maxpol'\n")
    assert "did you mean 'maxpool'?" in result.stderr
    assert "Traceback" not in result.stderr


def test_subprocess_relative_path_in_the_message(typo_file):
    result = run_cli("check", typo_file.name, cwd=typo_file.parent)
    assert result.returncode == 1
    assert result.stderr.startswith("typo.cnn:4:1: ")
    assert "Traceback" not in result.stderr


def test_subprocess_syntax_and_shape_errors(tmp_path):
    cases = {
        "syntax.cnn": ("network a\ninput 1x8x8\nconv 8 3 stride: 2\n", ":3:16: syntax error", "name=value"),
        "shape.cnn": ("network a\ninput 1x8x8\nconv 4 3\ndense 10\n", ":4:1: shape error", "insert `flatten`"),
        "arg.cnn": ("network a\ninput 1x8x8\ndropout 1.0\n", ":3:9: argument error", "expected: a number in"),
    }
    for name, (text, where, detail) in cases.items():
        (tmp_path / name).write_text(text)
        result = run_cli("check", name, cwd=tmp_path)
        assert result.returncode == 1, name
        assert result.stderr.startswith(name + where), result.stderr
        assert detail in result.stderr
        assert "Traceback" not in result.stderr


def test_subprocess_missing_file(tmp_path):
    result = run_cli("check", "nope.cnn", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip() == "nope.cnn: input error: no such file"


def test_subprocess_help():
    result = run_cli("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: cnndsl")
    assert "check" in result.stdout
    result = run_cli("check", "--help")
    assert result.returncode == 0 and "--json" in result.stdout


def test_subprocess_broken_pipe_is_quiet(tmp_path):
    """`cnndsl check big.cnn --json | head -1`: the reader leaves early, no traceback."""
    path = tmp_path / "big.cnn"
    path.write_text("network big\ninput 1x2x2\nblock b {\n  relu x 20\n}\nblock c {\n  b x 20\n}\nc x 10\n")
    proc = subprocess.Popen([sys.executable, "-m", "cnndsl", "check", str(path), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"{\n"
    proc.stdout.close()  # close before the ~900 KB of JSON is written
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) in (0, 1)
    assert "Traceback" not in err and "BrokenPipeError" not in err


# --- known bugs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("line", ["dense " + "9" * 5000, "dropout " + "*".join(["99999999999999999999"] * 250),
                                  "dense " + "*".join(["99999999999999999999"] * 250)],
                         ids=["literal", "product-in-a-message", "product-in-the-summary"])
def test_subprocess_huge_integer_is_an_error_not_a_traceback(tmp_path, line):
    path = tmp_path / "huge.cnn"
    path.write_text(f"network a\ninput 1x8x8\nflatten\n{line}\n")
    result = run_cli("check", path)
    assert "Traceback" not in result.stderr, result.stderr[-600:]
    assert result.returncode in (0, 1)


LONG = "o" * 300  # a file name past the 255 bytes a file system takes


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "{net}", "--backend", "torch", "--out", LONG], "training error: cannot use the output folder ooo"),
    (["train", "{net}", "--backend", "torch", "--data", LONG], "data error: --data ooo"),
    (["train", "{net}", "--backend", "torch", "--config", "{nul_out}"],
     r"training error: cannot use the output folder 'a\x00b': a path cannot hold a NUL character"),
    (["train", "{net}", "--backend", "torch", "--config", "{nul_init}", "--out", "{tmp}/run"],
     "weights error: cannot read a?b.pt: a path cannot hold a NUL character"),
    (["export", "{net}", "--weights", "w.pt", "-o", LONG + ".onnx"], "input error: export: cannot write ooo")])
def test_a_path_no_file_can_have_is_a_clear_error(tmp_path, capsys, argv, message):
    """A name longer than the file system takes, or a NUL character (a config.json can hold one),
    is refused with one line: pathlib's exists() and os.open raise on them."""
    (tmp_path / "nul_out.json").write_text(json.dumps({"out": "a\u0000b"}))
    (tmp_path / "nul_init.json").write_text(json.dumps({"init": "a\u0000b.pt", "epochs": 1}))
    names = {"net": EXAMPLES / "digits.cnn", "nul_out": tmp_path / "nul_out.json",
             "nul_init": tmp_path / "nul_init.json", "tmp": tmp_path}
    assert main([a.format(**names) for a in argv]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
