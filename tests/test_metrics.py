"""Validation during training (cnndsl/metrics.py): a split carved from the training data, the
loss and accuracy on it after every epoch, OUT/metrics.csv whole across a resume, OUT/best.pt the
best epoch's checkpoint, early stopping; --val-split 0 for none."""

import csv
from pathlib import Path

import pytest
import torch

from cnndsl import data, metrics
from cnndsl.errors import CnnInputError
from cnndsl.train import Options, train
from cnndsl.weights import read

DIGITS = Path(__file__).resolve().parent.parent / "examples" / "digits.cnn"


def _rows(out: Path) -> list[dict]:
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_the_carve_holds_out_a_fixed_fraction():
    train_set, _ = data.load(None)
    fit, val = metrics.carve(train_set, 0.1)
    assert (len(fit), len(val)) == (1294, 144)
    _, val2 = metrics.carve(train_set, 0.1)
    assert torch.equal(torch.from_numpy(val.y), torch.from_numpy(val2.y))  # seeded
    assert metrics.carve(train_set, 0) == (train_set, None)


def test_metrics_best_checkpoint_and_resume(tmp_path):
    out = tmp_path / "run"
    opts = Options(backend="torch", epochs=2, out=str(out), seed=1)
    train(DIGITS, opts, log=lambda s: None)
    train(DIGITS, Options(backend="torch", epochs=4, out=str(out), seed=1, resume=""), log=lambda s: None)
    rows = _rows(out)
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"] and all(r["val_accuracy"] and r["lr"] for r in rows)
    best = max(range(4), key=lambda i: (float(rows[i]["val_accuracy"]), -i)) + 1
    assert read(out / "best.pt").checkpoint["epoch"] == best


def test_early_stop_and_no_validation(tmp_path):
    lines = []
    result = train(DIGITS, Options(backend="torch", epochs=30, lr=0.05, out=str(tmp_path / "a"), early_stop=1),
                   log=lines.append)
    assert any(s.startswith("early stop: no better validation accuracy in 1 epochs") for s in lines)
    assert len(result["history"]) < 30
    train(DIGITS, Options(backend="torch", epochs=1, out=str(tmp_path / "b"), val_split=0), log=lambda s: None)
    assert not (tmp_path / "b" / "best.pt").exists() and _rows(tmp_path / "b")[0]["val_accuracy"] == ""
    for bad in (Options(val_split=1.0), Options(early_stop=0), Options(early_stop=2, val_split=0)):
        with pytest.raises(CnnInputError):
            bad.validate()
