"""A training run's record per epoch: the validation split carved from the training data (the
test split stays untouched until the end), the loss and accuracy on it, OUT/metrics.csv (one row
per epoch, rewritten from the checkpoint's history so that a resumed run's file is whole), and the
best epoch by validation accuracy (OUT/best.pt)."""

import csv
import io
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from .dataset import Dataset, hold_out
from .errors import CnnDataError, CnnTrainError
from .files import write_file

VAL_SEED = 1  # the carve's permutation (the test split's is dataset.SPLIT_SEED)
COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "images_per_second", "seconds")


def carve(ds: Dataset, fraction: float) -> tuple[Dataset, Dataset | None]:
    """(train, validation): the examples at the first round(N * fraction) positions of a seeded
    permutation validate, the rest train; fraction 0: no validation."""
    if fraction == 0:
        return ds, None
    train, val = hold_out(len(ds), fraction, VAL_SEED)
    if not (len(val) and len(train)):
        raise CnnDataError(f"{ds.name}: {len(ds)} training examples are too few to hold out {fraction:.0%} for "
                           "validation; change --val-split (0 for none)")
    return tuple(replace(ds, x=ds.x[i], y=ds.y[i]) for i in (train, val))  # type: ignore[return-value]


def validate(model, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> dict:
    """The mean loss and the accuracy on (x, y) in eval mode without gradients (the test split's
    accuracy too)."""
    was_training = model.training
    model.eval()
    loss = torch.zeros((), dtype=torch.float64, device=y.device)
    correct = torch.zeros((), dtype=torch.int64, device=y.device)
    with torch.no_grad():
        for i in range(0, len(y), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            batch_loss, logits = model.loss_and_logits(xb, yb)
            loss += batch_loss.double() * len(yb)
            correct += (logits.argmax(1) == yb).sum()
    model.train(was_training)
    return {"val_loss": float(loss) / len(y), "val_accuracy": int(correct) / len(y)}


def best_epoch(history: list) -> int | None:
    """The epoch of the highest validation accuracy (the first of equals), None without validation."""
    scored = [(h["val_accuracy"], -h["epoch"]) for h in history if "val_accuracy" in h]
    return -max(scored)[1] if scored else None


def write_csv(path: Path, history: list) -> None:
    """OUT/metrics.csv, one row per epoch of the history (empty cells where a value is absent)."""
    text = io.StringIO(newline="")
    out = csv.writer(text)
    out.writerow(COLUMNS)
    for h in history:
        out.writerow(["" if h.get(c) is None else h[c] for c in COLUMNS])
    try:
        write_file(path, text.getvalue())
    except OSError as err:
        raise CnnTrainError(f"cannot write {path}: {err.strerror or err}") from None


def keep_best(last: Path, best: Path) -> None:
    """Copy the checkpoint just written to OUT/best.pt, atomically (a temporary file renamed over it)."""
    def copy(f):
        with open(last, "rb") as src:
            shutil.copyfileobj(src, f)
    try:
        write_file(best, copy)
    except OSError as err:
        raise CnnTrainError(f"cannot write {best}: {err.strerror or err}") from None
