"""`cnndsl train` and `cnndsl eval` on a tiny .npz set the test writes (the triton backend
in the interpreter): the printed report, checkpoints (atomic, safe to load, bit-for-bit
resume after a kill), a NaN loss, data that does not fit; the bundled
digits recipe reaching 0.95 with the reference backend; examples/train.py."""

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cnndsl import CnnTrainError
from cnndsl import checkpoint as ckpt
from cnndsl.cli import main
from cnndsl.train import Options, train

from helpers import run_files

ROOT = Path(__file__).resolve().parents[1]
TINY = """network tiny
input 1x4x4
conv 4 3 pad=1 bias=false
batchnorm
relu
flatten
dense 8
relu
dropout 0.2
dense 3
softmax
"""


@pytest.fixture
def tiny(tmp_path):
    """(network file, npz file): class k lights up row k of a 4x4 image, plus noise."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 150)
    x = rng.normal(0, 0.3, (150, 1, 4, 4)).astype(np.float32)
    x[np.arange(150), 0, y] += 2.5
    np.savez(tmp_path / "rows.npz", x=x, y=y)
    (tmp_path / "tiny.cnn").write_text(TINY)
    return tmp_path / "tiny.cnn", tmp_path / "rows.npz"


def _opts(data, out, batch_size=16, **kw):
    return Options(data=str(data), out=str(out), device="cpu", batch_size=batch_size, **kw)


def test_train_reports_and_learns(tiny, tmp_path, capsys):
    net, data = tiny
    assert main(["train", str(net), "--data", str(data), "--epochs", "3", "--batch-size", "30",
                 "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "Total params:" in out and "plan for tiny: 3 groups (fused)" in out
    assert "120 training images, 12 of them held out for validation and 30 test images, 3 classes" in out
    assert "backend: triton (fused), Triton's interpreter on the CPU" in out
    epochs = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 3 and all("loss" in e and "accuracy" in e and "images/s" in e for e in epochs)
    acc = float(out.rsplit("test accuracy: ", 1)[1])
    assert acc >= 0.9
    assert main(["eval", str(net), "--weights", str(tmp_path / "run" / "last.pt"), "--data", str(data)]) == 0
    assert capsys.readouterr().out.strip() == f"test accuracy: {acc:.3f}"
    assert run_files(tmp_path / "run") == ["best.pt", "config.json", "last.pt",
                                                                     "metrics.csv"], "no temporary files left"


def _state(path):
    return ckpt.load(path)


def _same(a, b):
    assert a["epoch"] == b["epoch"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert torch.equal(a["rng"], b["rng"])


def test_kill_and_resume(tiny, tmp_path):
    """A run killed (SIGKILL) once its first checkpoint exists, resumed, ends where an
    uninterrupted run ends, and leaves no lock or temporary file behind (one is planted as if
    the kill had come mid-save)."""
    net, data = tiny
    cli = ["train", str(net), "--data", str(data), "--epochs", "2", "--batch-size", "40", "--device", "cpu"]
    args = [sys.executable, "-m", "cnndsl", *cli]
    killed = tmp_path / "killed" / "last.pt"
    proc = subprocess.Popen([*args, "--out", str(killed.parent)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not killed.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert killed.exists() and _state(killed)["epoch"] < 2, "the run ended before it could be killed"
    (killed.parent / "last.pt.x7kq2m1z.tmp").write_bytes(killed.read_bytes()[:1000])
    left = len(list(killed.parent.glob("*.tmp")))  # (the kill may also have come as best.pt was written)
    resumed = subprocess.run([*args, "--out", str(killed.parent), "--resume"], check=True, capture_output=True,
                             text=True)
    assert f"removed {left} temporary file(s) an interrupted run left in" in resumed.stdout
    assert run_files(killed.parent) == ["best.pt", "config.json", "last.pt", "metrics.csv"]
    assert main([*cli, "--out", str(tmp_path / "whole")]) == 0  # the uninterrupted run, in this process
    _same(_state(tmp_path / "whole" / "last.pt"), _state(killed))


def test_nan_loss_keeps_the_last_good_checkpoint(tiny, tmp_path):
    net, data = tiny
    train(net, _opts(data, tmp_path, epochs=1, batch_size=40), log=lambda *_: None)
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(CnnTrainError, match=r"the loss became (nan|inf) in epoch 2 .*try a lower --lr; "
                                            r"the last good checkpoint, .*last.pt, is kept") as caught:
        train(net, _opts(data, tmp_path, epochs=2, resume="", lr=1e30, batch_size=40), log=lambda *_: None)
    assert caught.value.render().count("training error") == 1, caught.value.render()
    assert (tmp_path / "last.pt").read_bytes() == before


@pytest.mark.parametrize(("arrays", "message"), [
    ({"x": np.zeros((20, 1, 5, 5), np.float32), "y": np.zeros(20, np.int64)},
     "training set: images are 1x5x5 but the network expects 1x4x4"),
    ({"x": np.zeros((20, 1, 4, 4), np.float32), "y": np.full(20, 7)},
     "label 7 is out of range: the network has 3 classes"),
    ({"x": np.full((20, 1, 4, 4), np.nan, np.float32), "y": np.zeros(20, np.int64)},
     "pixel values are NaN or inf"),
    ({"x": np.zeros((0, 1, 4, 4), np.float32), "y": np.zeros(0, np.int64)}, "no examples"),
])
def test_data_that_does_not_fit_is_refused(tiny, tmp_path, capsys, arrays, message):
    net, _ = tiny
    np.savez(tmp_path / "bad.npz", **arrays)
    assert main(["train", str(net), "--data", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_bad_options_and_checkpoints(tiny, tmp_path, capsys):
    net, data = tiny
    assert main(["train", str(net), "--data", str(data), "--epochs", "0"]) == 1
    assert "--epochs must be at least 1, got 0" in capsys.readouterr().err
    assert main(["train", str(net), "--data", str(data), "--lr", "-1"]) == 1
    assert "--lr must be a positive number of at most 1e+30, got -1.0" in capsys.readouterr().err
    seed_range = "--seed must be a whole number from -1,099,511,627,776 to 1,099,511,627,776 (2^40), got"
    for flags, message in ((["--seed", "9" * 23], f"{seed_range} {'9' * 23}"),
                           (["--seed", str(2**62)], f"{seed_range} {2**62}"),  # (seed * 100,003 overflowed)
                           (["--epochs", "9" * 20], "--epochs must be at most 1,000,000, got 99,999,"),
                           (["--warmup-epochs", "5000000"], "--warmup-epochs must be at most 1,000,000, got 5,000,000"),
                           (["--batch-size", "3000000000"], "--batch-size must be at most 2,147,483,647"),
                           (["--lr", "1e39"], "--lr must be a positive number of at most 1e+30, got 1e+39"),
                           (["--weight-decay", "1e308"], "--weight-decay must be a number from 0 to 1e+30, got 1e+308"),
                           (["--epochs", "2", "--warmup-epochs", "2"], "--warmup-epochs 2 must be less than --epochs 2")):
        assert main(["train", str(net), "--data", str(data), *flags]) == 1  # before a first epoch, not after it
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert main(["eval", str(net), "--weights", str(tmp_path / "none.pt"), "--data", str(data)]) == 1
    assert "no weights file at" in capsys.readouterr().err
    (tmp_path / "torn.pt").write_bytes(b"PK\x03\x04 not a whole zip")
    with pytest.raises(CnnTrainError, match="not a readable checkpoint"):
        ckpt.load(tmp_path / "torn.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CnnTrainError, match="not a cnndsl checkpoint"):
        ckpt.load(tmp_path / "other.pt")
    torch.save({"format": ckpt.FORMAT, "payload": Path("x")}, tmp_path / "evil.pt")
    with pytest.raises(CnnTrainError, match="holds objects other than tensors and plain data"):
        ckpt.load(tmp_path / "evil.pt")



def test_a_batch_that_surely_cannot_fit_is_refused_before_it_allocates(tiny, tmp_path, capsys):
    """A map padded to 40004x40004 (6.4 GB an image in fp32) at batch 64: no machine here holds it."""
    _, data = tiny
    net = tmp_path / "wide.cnn"
    net.write_text("network wide\ninput 1x4x4\nconv 1 1 pad=20000\nglobal_avgpool\nflatten\ndense 3\n")
    assert main(["train", str(net), "--data", str(data), "--backend", "torch", "--device", "cpu", "--out",
                 str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert main(["train", str(tiny[0]), "--data", str(data), "--backend", "torch", "--device", "cpu", "--epochs", "1",
                 "--batch-size", "100000000", "--out", str(tmp_path / "full")]) == 0  # full-batch: the data's size
    err += capsys.readouterr().err
    assert re.search(r"input error: wide: a batch of 64 needs at least [\d,.]+ GiB \(every layer's output, kept for "
                     r"the backward pass, .*\), more than the [\d,.]+ GiB of memory on cpu; use a smaller "
                     r"--batch-size", err) and "Traceback" not in err, err


def test_resume_refuses_another_network(tiny, tmp_path):
    net, data = tiny
    train(net, _opts(data, tmp_path, epochs=1), log=lambda *_: None)
    other = tmp_path / "other.cnn"
    other.write_text(TINY.replace("dense 8", "dense 9"))
    with pytest.raises(CnnTrainError, match=r"holds weights for another network: 'tiny' \(identity \w+\) there"):
        train(other, _opts(data, tmp_path, epochs=2, resume=""), log=lambda *_: None)


def test_resume_and_eval_take_the_same_network_with_other_labels(tiny, tmp_path, capsys):
    """The network's identity leaves names out: relabelled layers take the checkpoint's weights
    in declaration order, on --resume as on eval."""
    net, data = tiny
    train(net, _opts(data, tmp_path, epochs=1, backend="torch"), log=lambda *_: None)
    renamed = tmp_path / "renamed.cnn"
    renamed.write_text(TINY.replace("dense 8", "first_dense: dense 8"))
    assert main(["eval", str(renamed), "--weights", str(tmp_path / "last.pt"), "--data", str(data),
                 "--backend", "torch"]) == 0
    result = train(renamed, _opts(data, tmp_path, epochs=2, resume="", backend="torch"), log=lambda *_: None)
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    capsys.readouterr()


def test_digits_recipe_reaches_95_percent_with_the_reference_backend(tmp_path):
    """The README's first command minus the interpreter's time: the same network, data split,
    optimizer and defaults; the triton backend equals this backend (test_triton_backend)."""
    result = train(ROOT / "examples" / "digits.cnn", Options(backend="torch", device="cpu", out=str(tmp_path)),
                   log=lambda *_: None)
    assert result["test_accuracy"] >= 0.95, result["test_accuracy"]


def test_example_script_trains_with_a_plain_torch_loop():
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "train.py"), "--backend", "torch",
                          "--epochs", "2"], capture_output=True, text=True, check=False, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    assert float(run.stdout.rsplit("test accuracy: ", 1)[1]) >= 0.9


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_a_bar_on_a_terminal_and_silent_elsewhere():
    from cnndsl.progress import Progress
    term = _Terminal()
    p = Progress(10, "epoch 1/1", file=term)
    p.update(4, None)
    p.update(6, 0.5)
    p.bar.refresh()
    shown = term.getvalue()
    p.close()
    assert "epoch 1/1" in shown and "10/10" in shown and "loss 0.5000" in shown and "img/s" in shown, shown
    log = io.StringIO()  # a file, not a terminal: nothing mid-epoch
    p = Progress(10, "epoch 1/1", file=log)
    p.update(10, 0.25)
    p.close()
    assert log.getvalue() == ""