"""`cnndsl train` writes OUT/config.json (the network file and every option, settled) and
`--config FILE` replays it, the options given on the command line winning; bad files are refused
with the option named."""

import json
import os
from pathlib import Path

import torch

from cnndsl.cli import main
from cnndsl.weights import read

DIGITS = str(Path(__file__).resolve().parent.parent / "examples" / "digits.cnn")


def test_a_replayed_run_repeats_the_recorded_one(tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["train", DIGITS, "--backend", "torch", "--epochs", "1", "--optimizer", "sgd", "--lr", "0.02",
                 "--seed", "3", "--out", str(first)]) == 0
    config = json.loads((first / "config.json").read_text())
    assert config["file"] == DIGITS and config["optimizer"] == "sgd" and config["lr"] == 0.02
    assert config["momentum"] == 0.9 and config["fuse"] is True  # settled defaults are recorded too
    assert main(["train", "--config", str(first / "config.json"), "--out", str(second)]) == 0
    a, b = read(first / "last.pt").tensors, read(second / "last.pt").tensors
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((second / "config.json").read_text()) == {**config, "out": str(second)}
    capsys.readouterr()


def test_bad_config_files_are_refused(tmp_path, capsys):
    cases = {"[1, 2]": "expected a JSON object of options",
             '{"epochs": "x"}': "epochs is 'x', not a value --epochs takes",
             '{"epochs": 2.5}': "epochs is 2.5, not a value --epochs takes",
             '{"optimizer": "lbfgs"}': "optimizer is 'lbfgs', not a value --optimizer takes (sgd, adam, adamw)",
             '{"freeze_bn": "yes"}': "freeze_bn is 'yes'",
             '{"epoch": 3}': "unknown option 'epoch'",
             '{"seed": null}': "seed is None, not a value --seed takes",  # (null only where the default is unset)
             '{"fuse": "cross"}': "fuse is 'cross', not a fusion level (true, \"block\" or false)",
             '{"no_fuse": true, "block_fusion": true}': "no_fuse and block_fusion are both set; give one fusion level",
             "{": "not a JSON file"}
    for i, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"c{i}.json"
        path.write_text(text)
        assert main(["train", DIGITS, "--config", str(path)]) == 1
        assert message in capsys.readouterr().err, text
    (tmp_path / "zero.json").write_text('{"epochs": 0}')  # a valid type, a bad value: the note says whose
    assert main(["train", DIGITS, "--config", str(tmp_path / "zero.json")]) == 1
    assert f"--epochs must be at least 1, got 0\n  note: --epochs 0 came from --config {tmp_path / 'zero.json'}; " \
           "give --epochs to change it" in capsys.readouterr().err
    (tmp_path / "deep.json").write_text("[" * 100_000)
    assert main(["train", DIGITS, "--config", str(tmp_path / "deep.json")]) == 1
    assert "not a JSON file" in capsys.readouterr().err
    (tmp_path / "big.json").write_text(" " * 2**20 + "{}")
    assert main(["train", DIGITS, "--config", str(tmp_path / "big.json")]) == 1
    assert "1,048,578 bytes, more than the 1,048,576 a config.json of options holds" in capsys.readouterr().err
    os.mkfifo(tmp_path / "fifo.json")  # would block a reader for ever
    assert main(["train", DIGITS, "--config", str(tmp_path / "fifo.json")]) == 1
    assert "fifo.json: not a regular file" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.json")]) == 1
    assert "cannot read it" in capsys.readouterr().err
    (tmp_path / "nofile.json").write_text('{"epochs": 1}')
    assert main(["train", "--config", str(tmp_path / "nofile.json")]) == 1
    assert "train needs the .cnn file" in capsys.readouterr().err


def test_a_resumed_run_takes_its_checkpoints_options(tmp_path, capsys):
    """`--resume` goes on with the options its checkpoint's run was trained with (but --out and
    --device), bit for bit as the uninterrupted run; options given again win; a run that has
    trained its epochs says how to train on."""
    options = ["--backend", "torch", "--augment", "--val-split", "0.2", "--seed", "3", "--batch-size", "32"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(["train", DIGITS, *options, "--epochs", "2", "--out", str(whole)]) == 0
    assert main(["train", DIGITS, *options, "--epochs", "1", "--out", str(parts)]) == 0
    capsys.readouterr()
    assert main(["train", DIGITS, "--resume", "--epochs", "2", "--out", str(parts)]) == 0
    recorded = json.loads((parts / "config.json").read_text())
    assert {k: recorded[k] for k in ("augment", "val_split", "seed", "batch_size", "backend")} == \
        {"augment": "crop,flip", "val_split": 0.2, "seed": 3, "batch_size": 32, "backend": "torch"}
    a, b = read(whole / "last.pt").tensors, read(parts / "last.pt").tensors
    assert all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    before = (parts / "config.json").read_text()
    assert main(["train", DIGITS, "--resume", "--out", str(parts), "--lr", "0.5"]) == 0  # --epochs 2 from the checkpoint
    assert "note: it has trained its 2 epochs of --epochs 2, so none is left; give --epochs 3 or more to train " \
           "on" in capsys.readouterr().out
    assert (parts / "config.json").read_text() == before  # (nothing trained: the record still says what last.pt is)
    assert main(["train", DIGITS, "--resume", "--out", str(parts), "--epochs", "3", "--val-split", "0.1",
                 "--sched", "cosine"]) == 0
    recorded = json.loads((parts / "config.json").read_text())
    assert (recorded["epochs"], recorded["val_split"], recorded["augment"], recorded["sched"]) == \
        (3, 0.1, "crop,flip", "cosine")
    assert main(["train", DIGITS, "--resume", str(tmp_path / "none.pt")]) == 1
    assert f"training error: no checkpoint at {tmp_path / 'none.pt'}" in capsys.readouterr().err


def test_a_resumed_run_finds_its_data_and_turns_options_off(tmp_path, monkeypatch, capsys):
    """--data is recorded as an absolute path (the run may be resumed from another folder); the
    fusion level is not resumed; --early-stop 0 and --no-freeze-bn turn a recorded option off."""
    import numpy as np
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "mine.npz", x=rng.random((60, 1, 8, 8), dtype=np.float32), y=rng.integers(0, 10, 60))
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    assert main(["train", DIGITS, "--backend", "torch", "--epochs", "1", "--data", "mine.npz", "--early-stop", "3",
                 "--no-fuse", "--freeze", "conv1", "--freeze-bn", "--out", "run"]) == 0
    recorded = json.loads((run / "config.json").read_text())
    assert (recorded["data"], recorded["early_stop"], recorded["fuse"]) == (str(tmp_path / "mine.npz"), 3, False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["train", DIGITS, "--resume", str(run / "last.pt"), "--epochs", "2", "--early-stop", "0",
                 "--no-freeze-bn", "--out", str(run)]) == 0
    assert "training error" not in capsys.readouterr().err
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["data"] == str(tmp_path / "mine.npz") and recorded["early_stop"] is None
    assert recorded["fuse"] is True and recorded["freeze_bn"] is False and recorded["freeze"] == "conv1"


def test_a_number_of_thousands_of_digits_is_shown_short(tmp_path, capsys):
    """A config.json may hold an int of 4,000 digits: the error and its note show its first digits
    and its length, not all of it."""
    (tmp_path / "big.json").write_text(json.dumps({"epochs": 10**4000}))
    net = Path(__file__).resolve().parent.parent / "examples" / "digits.cnn"
    assert main(["train", str(net), "--config", str(tmp_path / "big.json"), "--backend", "torch"]) == 1
    err = capsys.readouterr().err
    assert "input error: --epochs must be at most 1,000,000, got 10000000000000000000... (4,001 digits)" in err
    assert "note: --epochs 10000000000000000000... (4,001 characters) came from --config" in err
    assert len(err) < 500
