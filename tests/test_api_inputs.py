"""The Python API at its edges: what `cnndsl.parse` takes for a path and what for text, and
targets of `model.loss` that are out of range or laid out unusually, on both backends."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cnndsl

SRC = "network a\ninput 1x4x4\nconv 2 3x3\nrelu\nflatten\ndense 3\nsoftmax\n"
BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("text", ["# file: tiny.cnn", "network tiny.cnn", "  # a.cnn", "\ufeff# b.cnn",
                                  "examples/digits.cnn  "])
def test_one_line_text_that_begins_as_source_is_text_not_a_path(text):
    with pytest.raises(cnndsl.CnnSyntaxError) as err:
        cnndsl.parse(text)
    assert err.value.line == 1 and err.value.render().startswith("<string>:1:")


@pytest.mark.parametrize("text", ["tiny.cnn", "some dir/net.cnn", "\ud800.cnn", "a\x00.cnn"])
def test_one_line_text_ending_in_cnn_is_a_path(text):
    with pytest.raises(cnndsl.CnnInputError):
        cnndsl.parse(text)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [3, -1, 2**40], ids=["classes", "negative", "huge"])
def test_out_of_range_targets_are_an_input_error(backend, bad):
    model = cnndsl.compile(SRC, backend=backend)
    target = torch.tensor([0, bad, 1])
    with pytest.raises(cnndsl.CnnInputError, match=rf"target class index {bad} is outside \[0, 3\) \(1 of 3"):
        model.loss(torch.randn(3, 1, 4, 4), target)


@pytest.mark.parametrize("backend", BACKENDS)
def test_targets_of_another_dtype_or_shape_are_an_input_error(backend):
    model = cnndsl.compile(SRC, backend=backend)
    x = torch.randn(2, 1, 4, 4)
    for target in (torch.tensor([0, 1], dtype=torch.int32), torch.tensor([[0, 1]]), [0, 1], torch.tensor([0.0, 1.0])):
        with pytest.raises(cnndsl.CnnInputError, match="expected target class indices of dtype torch.int64"):
            model.loss(x, target)


def test_a_non_contiguous_target_gives_the_same_loss_on_both_backends():
    torch.manual_seed(0)
    tri = cnndsl.compile(SRC, backend="triton")
    ref = cnndsl.compile(SRC, backend="torch")
    ref.load_state_dict(tri.state_dict())
    x = torch.randn(3, 1, 4, 4)
    target = torch.tensor([[0, 9], [2, 9], [1, 9]])[:, 0]  # a strided view
    assert not target.is_contiguous()
    torch.testing.assert_close(tri.loss(x, target), ref.loss(x, target))


@pytest.mark.parametrize("backend, device, message", [
    ("triton", "meta", "device 'meta' is not supported; expected 'cpu' or 'cuda' (or 'cuda:N')"),
    ("torch", "mps", "device 'mps' is not supported; expected 'cpu' or 'cuda' (or 'cuda:N')"),
    ("torch", "floppy", "bad device 'floppy'; expected 'cpu' or 'cuda' (or 'cuda:N')")])
def test_a_device_the_kernels_do_not_run_on_is_an_input_error(backend, device, message):
    """The reference backend also builds on 'meta' (shapes without data, as test_macs counts)."""
    with pytest.raises(cnndsl.CnnInputError) as err:
        cnndsl.compile(SRC, backend=backend, device=device)
    assert err.value.message == message


@pytest.mark.parametrize("command", ["train", "eval"])
def test_train_and_eval_run_on_a_cpu_or_a_cuda_gpu(command, tmp_path, capsys):
    from cnndsl.cli import main
    extra = ["--weights", str(tmp_path / "w.pt")] if command == "eval" else ["--out", str(tmp_path / "run")]
    digits = Path(__file__).resolve().parent.parent / "examples" / "digits.cnn"
    assert main([command, str(digits), "--backend", "torch", "--device", "meta", *extra]) == 1
    err = capsys.readouterr().err
    assert "input error: --device must be cpu, cuda or cuda:N, got 'meta'" in err and "Traceback" not in err, err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_a_cuda_device_past_the_machines_is_an_input_error():
    n = torch.cuda.device_count()
    with pytest.raises(cnndsl.CnnInputError, match=rf"device 'cuda:{n}' was asked for, but this machine has {n} CUDA"):
        cnndsl.compile(SRC, device=f"cuda:{n}")


def test_a_write_through_data_is_folded_after_a_mode_switch_and_an_in_place_update_at_once():
    """Eval folds the batch norm into the conv weights once per weight change, which it sees by
    torch's version counters: an update in place (an optimizer's, no_grad's) is seen at once;
    a write through `.data` moves no counter, and model.eval() folds afresh."""
    src = "network t\ninput 2x4x4\nconv 2 3 pad=1\nbatchnorm\nrelu\nflatten\ndense 3\n"
    tri = cnndsl.compile(src, device="cpu").eval()
    ref = cnndsl.compile(src, backend="torch", device="cpu").eval()
    ref.load_state_dict(tri.state_dict())
    x = torch.randn(2, 2, 4, 4)
    with torch.no_grad():
        tri(x)
        for m in (tri, ref):
            m.conv1.weight.mul_(2)
        torch.testing.assert_close(tri(x), ref(x))
        for m in (tri, ref):
            m.conv1.weight.data.mul_(3)
        tri.eval()
        torch.testing.assert_close(tri(x), ref(x))


def test_a_model_moved_to_channels_last_or_float64_or_given_a_sparse_input():
    tri = cnndsl.compile(SRC.replace("1x4x4", "2x4x4"), device="cpu")
    ref = cnndsl.compile(SRC.replace("1x4x4", "2x4x4"), backend="torch", device="cpu")
    ref.load_state_dict(tri.state_dict())
    x = torch.randn(2, 2, 4, 4)
    torch.testing.assert_close(tri.to(memory_format=torch.channels_last)(x), ref(x))
    with pytest.raises(cnndsl.CnnInputError, match="expected a dense tensor, got a torch.sparse_coo tensor"):
        tri(x.to_sparse())
    with pytest.raises(cnndsl.CnnInputError, match=r"the model is torch.float64 on cpu \(model.to\(...\) moved it\)"):
        tri.double()(x.double())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's warning: no CUDA device")
def test_the_interpreter_warning_is_silenced_by_its_category_after_import_cnndsl():
    """cnndsl.InterpreterWarning comes once, at the first triton-backend compile (not at `import
    cnndsl`), so the filter the README gives silences it; without the filter it is shown, at the
    line that compiled."""
    code = ("import warnings, cnndsl\n{}m = cnndsl.compile('network n\\ninput 1x4x4\\nflatten\\ndense 2\\n', "
            "device='cpu')\nassert cnndsl.kernels.InterpreterWarning is cnndsl.InterpreterWarning\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for line, shown in (("warnings.filterwarnings('ignore', category=cnndsl.InterpreterWarning)\n", False),
                        ("", True)):
        run = subprocess.run([sys.executable, "-W", "always", "-c", code.format(line)], env=env, capture_output=True,
                             text=True, check=False)
        assert run.returncode == 0, run.stderr
        assert run.stderr.count("InterpreterWarning: cnndsl: no CUDA device found") == int(shown), run.stderr
    assert "<string>:2: InterpreterWarning" in run.stderr  # the user's line that compiled, not importlib's
