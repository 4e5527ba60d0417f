"""Checkpoints in `cnndsl train --resume` and `cnndsl eval` (the reference backend, short
runs): the network's identity, the model's weights and the optimizer's state must fit
before anything loads; a resumed run keeps its checkpoint's optimizer and hyper-parameters;
one run at a time holds an output folder and clears what a killed run left in it; every
refusal reaches the command line as a rendered error with exit status 1."""

import fcntl
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import cnndsl
from cnndsl import CnnTrainError, rundir
from cnndsl import checkpoint as ckpt
from cnndsl.cli import main
from cnndsl.resume import network_identity
from cnndsl.train import Options, train

from helpers import run_files

NET = """network tiny
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
QUIET = {"log": lambda *_: None}


@pytest.fixture
def files(tmp_path):
    """(network file, npz file): class k lights up row k of a 4x4 image, plus noise."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    x = rng.normal(0, 0.3, (60, 1, 4, 4)).astype(np.float32)
    x[np.arange(60), 0, y] += 2.5
    np.savez(tmp_path / "rows.npz", x=x, y=y)
    (tmp_path / "tiny.cnn").write_text(NET)
    return tmp_path / "tiny.cnn", tmp_path / "rows.npz"


def _opts(data, out, **kw) -> Options:
    return Options(data=str(data), out=str(out), device="cpu", batch_size=16, backend="torch", **kw)


def _variant(tmp_path, old: str, new: str):
    path = tmp_path / "variant.cnn"
    path.write_text(NET.replace(old, new, 1))
    return path


SAME_NETWORK = [("network tiny\n", "# a comment\nnetwork tiny   # renamed below\n\n"),
                ("network tiny", "network renamed"), ("dense 8\n", "dense   8  # hidden\n")]
OTHER_NETWORK = [("relu\n", "tanh\n"), ("dropout 0.2", "dropout 0.3"), ("batchnorm", "batchnorm eps=0.001")]


@pytest.mark.parametrize(("old", "new"), SAME_NETWORK + OTHER_NETWORK)
def test_the_identity_is_the_ir_not_the_text(old, new):
    assert (network_identity(cnndsl.parse(NET)) == network_identity(cnndsl.parse(NET.replace(old, new, 1)))) \
        == ((old, new) in SAME_NETWORK)


@pytest.mark.parametrize(("old", "new"), OTHER_NETWORK)
def test_weights_of_another_network_with_the_same_shapes_are_refused(files, tmp_path, capsys, old, new):
    net, data = files
    train(net, _opts(data, tmp_path / "run", epochs=1), **QUIET)
    weights, other = tmp_path / "run" / "last.pt", _variant(tmp_path, old, new)
    message = (rf"{re.escape(str(weights))} holds weights for another network: 'tiny' \(identity [0-9a-f]{{12}}\) "
               rf"there, 'tiny' \(identity [0-9a-f]{{12}}\) in {re.escape(str(other))}; the layers or their options "
               "differ")
    assert main(["eval", str(other), "--weights", str(weights), "--data", str(data), "--backend", "torch"]) == 1
    err = capsys.readouterr().err
    assert re.search("weights error: " + message, err) and "Traceback" not in err
    assert main(["export", str(other), "--weights", str(weights), "-o", str(tmp_path / "other.pt")]) == 1
    assert re.search("weights error: " + message, capsys.readouterr().err) and not (tmp_path / "other.pt").exists()
    with pytest.raises(CnnTrainError, match=message):
        train(other, _opts(data, tmp_path / "run", epochs=2, resume=""), **QUIET)
    same = _variant(tmp_path, *SAME_NETWORK[0])
    assert main(["eval", str(same), "--weights", str(weights), "--data", str(data), "--backend", "torch"]) == 0


def _same_run(a: dict, b: dict) -> None:
    assert a["epoch"] == b["epoch"] and {**a["config"], "out": None} == {**b["config"], "out": None}
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert torch.equal(a["rng"], b["rng"])


def test_a_resumed_run_keeps_its_checkpoints_optimizer(files, tmp_path, capsys):
    """An SGD run resumed without --optimizer goes on with SGD and its lr and momentum, bit for
    bit; a different --optimizer is refused; an --lr given again wins and is recorded."""
    net, data = files
    sgd = {"optimizer": "sgd", "lr": 0.02, "momentum": 0.5}
    train(net, _opts(data, tmp_path / "whole", epochs=2, **sgd), **QUIET)
    train(net, _opts(data, tmp_path / "parts", epochs=1, **sgd), **QUIET)
    parts = tmp_path / "parts" / "last.pt"
    assert main(["train", str(net), "--data", str(data), "--out", str(parts.parent), "--epochs", "2", "--resume",
                 "--backend", "torch", "--batch-size", "16", "--device", "cpu"]) == 0
    assert "after epoch 1 (sgd, lr 0.02)" in capsys.readouterr().out
    _same_run(ckpt.load(tmp_path / "whole" / "last.pt"), ckpt.load(parts))
    assert main(["train", str(net), "--data", str(data), "--out", str(parts.parent), "--epochs", "3", "--resume",
                 "--backend", "torch", "--optimizer", "adam"]) == 1
    err = capsys.readouterr().err
    assert f"training error: {parts} was trained with --optimizer sgd, not adam: its optimizer state does not " \
           "carry over; leave out --optimizer to continue with sgd" in err and "Traceback" not in err
    train(net, _opts(data, parts.parent, epochs=3, resume="", lr=0.01), **QUIET)
    saved = ckpt.load(parts)
    assert {k: saved["config"][k] for k in sgd} == {"optimizer": "sgd", "lr": 0.01, "momentum": 0.5}
    assert saved["optimizer"]["param_groups"][0]["lr"] == 0.01
    assert saved["optimizer"]["param_groups"][0]["momentum"] == 0.5



def test_an_error_about_an_option_the_checkpoint_set_says_where_it_came_from(files, tmp_path, capsys):
    """--batch-size 16, recorded in the checkpoint, does not divide among 3 processes: the user did
    not type it, so the error says it came from the checkpoint; typed, the note is not there."""
    net, data = files
    train(net, _opts(data, tmp_path / "run", epochs=1), **QUIET)
    last = tmp_path / "run" / "last.pt"
    base = ["train", str(net), "--data", str(data), "--out", str(last.parent), "--epochs", "2", "--resume",
            "--nproc", "3"]
    assert main(base) == 1
    err = capsys.readouterr().err
    assert "--batch-size 16 is the global batch of 3 processes" in err
    assert f"note: --batch-size 16 came from the checkpoint {last}; give --batch-size to change it" in err
    assert main([*base, "--batch-size", "20"]) == 1
    err = capsys.readouterr().err
    assert "--batch-size 20 is the global batch" in err and "came from" not in err

def test_init_with_resume_is_refused_unless_it_is_the_runs_own(files, tmp_path, capsys):
    """--resume goes on from the checkpoint's weights: another --init is refused, saying so; the
    --init the run started from (recorded in its checkpoint, given again or not) resumes."""
    net, data = files
    train(net, _opts(data, tmp_path / "first", epochs=1), **QUIET)
    start = tmp_path / "first" / "last.pt"
    train(net, _opts(data, tmp_path / "run", epochs=1, init=str(start)), **QUIET)
    base = ["train", str(net), "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "2", "--resume"]
    other = tmp_path / "other.pt"
    other.write_bytes(start.read_bytes())
    assert main([*base, "--init", str(other)]) == 1
    err = capsys.readouterr().err
    assert f"--init {other} with --resume: a resumed run goes on from the weights of its checkpoint" in err
    assert "Traceback" not in err
    assert main([*base, "--init", str(start)]) == 0
    assert "resumed from" in capsys.readouterr().out


def _edit(path, change) -> None:
    """Rewrite a real checkpoint with `change` applied, through save (a valid checksum)."""
    fields = {k: v for k, v in ckpt.load(path).items() if k not in ("format", "checksum")}
    change(fields)
    ckpt.save(path, **fields)


def _groups(f) -> list:
    return f["optimizer"]["param_groups"]


def _state(f) -> dict:
    return f["optimizer"]["state"]


UNFIT = [
    (lambda f: _groups(f).append(dict(_groups(f)[0])),
     "holds Adam state for 2 parameter groups, but this model's optimizer has 1"),
    (lambda f: _groups(f)[0]["params"].pop(), ("parameter group 0 of its Adam state lists 6 parameters, this "
                                              "model's has 7")),
    (lambda f: _groups(f)[0]["params"].__setitem__(1, 0), "its Adam state lists parameter 0 twice"),
    (lambda f: _state(f).update({99: _state(f)[0]}), ("its Adam state has an entry for parameter 99, which no "
                                                     "parameter group lists")),
    (lambda f: _state(f)[0].pop("exp_avg"), ("the Adam state of parameter 0 holds exp_avg_sq, step; expected "
                                            "exp_avg, exp_avg_sq, step")),
    (lambda f: _state(f)[0].update(exp_avg=torch.zeros(1)), ("the Adam state 'exp_avg' of parameter 0 is a "
                                                            "torch.float32 tensor of shape (1,); expected a "
                                                            "floating-point one of shape (4, 1, 3, 3)")),
    (lambda f: _state(f)[0].update(step=torch.zeros(2)), ("the Adam state 'step' of parameter 0 is a "
                                                         "torch.float32 tensor of shape (2,)")),
    (lambda f: f["config"].update(optimizer="rmsprop"), ("its config names the optimizer 'rmsprop'; expected one "
                                                        "of sgd, adam, adamw")),
    (lambda f: f["config"].update(lr=-1.0), "its config's lr is -1.0; expected a number > 0"),
    (lambda f: f["model"].update({"conv1.weight": f["model"]["conv1.weight"].double()}),
     "holds conv1.weight as torch.float64 but this model keeps it as torch.float32; pass --dtype fp32"),
]


@pytest.mark.parametrize(("change", "message"), UNFIT, ids=[message[:40] for _, message in UNFIT])
def test_state_that_does_not_fit_the_run_is_refused(files, tmp_path, change, message):
    net, data = files
    train(net, _opts(data, tmp_path / "run", epochs=1), **QUIET)
    _edit(tmp_path / "run" / "last.pt", change)
    with pytest.raises(CnnTrainError, match=re.escape(message)):
        train(net, _opts(data, tmp_path / "run", epochs=2, resume=""), **QUIET)


@pytest.mark.parametrize(("damage", "message"), [
    (lambda p: p.write_bytes(p.read_bytes().replace(b"network tiny", b"network tinz")),
     "is corrupt: its contents do not match its sha256 checksum"),
    (lambda p: _edit(p, lambda f: f.update(epoch=-1)), "is not a valid cnndsl checkpoint: epoch is -1 (int)"),
])
def test_the_command_line_renders_a_bad_checkpoint(files, tmp_path, capsys, damage, message):
    net, data = files
    train(net, _opts(data, tmp_path / "run", epochs=1), **QUIET)
    weights = tmp_path / "run" / "last.pt"
    damage(weights)
    assert main(["eval", str(net), "--weights", str(weights), "--data", str(data)]) == 1
    assert main(["train", str(net), "--data", str(data), "--out", str(weights.parent), "--resume"]) == 1
    err = capsys.readouterr().err
    assert f"weights error: {weights} {message}" in err and f"training error: {weights} {message}" in err
    assert "error: training error" not in err and "Traceback" not in err, err


def test_a_second_run_on_the_same_folder_is_refused_at_once(files, tmp_path, capsys):
    net, data = files
    out = tmp_path / "busy"
    with rundir.claim(out, ("last.pt.*.tmp",)):
        assert main(["train", str(net), "--data", str(data), "--out", str(out), "--backend", "torch"]) == 1
        assert [p.name for p in out.iterdir()] == [".lock"], "the refused run wrote nothing"
    captured = capsys.readouterr()
    assert f"training error: {out} is in use by another cnndsl train (pid {os.getpid()}); wait for it to end, " \
           "or give this run another --out" in captured.err
    assert captured.out == "" and "Traceback" not in captured.err
    assert not out.exists(), "the lock's folder, empty, is removed with the lock"


HOLD = """import sys
from pathlib import Path
from cnndsl import rundir
with rundir.claim(Path(sys.argv[1]), ("last.pt.*.tmp",)):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_the_lock_holds_against_another_process_and_ends_with_it(files, tmp_path, capsys):
    net, data = files
    out = tmp_path / "shared"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(CnnTrainError, match=f"is in use by another cnndsl train \\(pid {holder.pid}\\)"):
            train(net, _opts(data, out, epochs=1), **QUIET)
    finally:
        holder.communicate("", timeout=60)
    train(net, _opts(data, out, epochs=1), **QUIET)
    assert run_files(out) == ["best.pt", "config.json", "last.pt", "metrics.csv"]


def test_temporary_files_of_a_killed_run_are_removed(files, tmp_path):
    net, data = files
    out = tmp_path / "run"
    out.mkdir()
    for name in ("last.pt.k1lled9x.tmp", "last.pt.abc.tmp", "best.pt.q1.tmp", "notes.txt", "other.pt.abc.tmp"):
        (out / name).write_bytes(b"half a checkpoint")
    lines = []
    train(net, _opts(data, out, epochs=1), log=lines.append)
    assert f"removed 3 temporary file(s) an interrupted run left in {out}: best.pt.q1.tmp, last.pt.abc.tmp, " \
           "last.pt.k1lled9x.tmp" in lines
    assert run_files(out) == ["best.pt", "config.json", "last.pt", "metrics.csv", "notes.txt",
                              "other.pt.abc.tmp"]


def test_a_lock_file_removed_while_locking_is_locked_afresh(tmp_path, monkeypatch):
    """The lock-file protocol: a run that locked a file which the run before it removed in the
    meantime (on its way out) has locked nothing; it tries again with a new file."""
    real, calls = fcntl.flock, []

    def flock(fd, op):
        if not calls:
            (tmp_path / ".lock").unlink()
        calls.append(op)
        real(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    with rundir.claim(tmp_path, ("last.pt.*.tmp",)):
        assert len(calls) == 2 and (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    assert not (tmp_path / ".lock").exists()
