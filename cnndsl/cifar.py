"""CIFAR-10 python batches (cifar-10-batches-py): data_batch_1..5, test_batch and
batches.meta, each a pickled dict read by the strict pickle reader (pickles.py), so nothing
is ever unpickled. A batch holds 'data', a uint8 array (N, 3072) or its N*3072 raw bytes,
and 'labels', a flat list (or 1-D integer array) of N integers, each below the number of
names in batches.meta's 'label_names'. Every file, and what it builds, counts against the
data limit (dataset.py) before it is allocated. numpy only."""

from pathlib import Path

import numpy as np

from .dataset import Budget, Dataset, fail, make, pixels, read_maybe_gz
from .pickled_numpy import Array, Scalar, describe, to_numpy
from .pickles import read_pickle

CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_FILES = [*CIFAR_TRAIN, "test_batch", "batches.meta"]
_PIXELS = 3 * 32 * 32


def _read_dict(path: Path, budget: Budget) -> dict:
    """The pickled dict in path, its bytes keys decoded as UTF-8."""
    value, built = read_pickle(path, read_maybe_gz(path, budget.left), budget.left)
    budget.take(path, built, "the pickle's contents")  # within budget.left: read_pickle checked it
    if not isinstance(value, dict):
        raise fail(path, f"expected a pickled dict, found {describe(value)}")
    out = {}
    for key, item in value.items():
        if isinstance(key, bytes):
            try:
                key = key.decode()
            except UnicodeDecodeError:
                raise fail(path, f"dict key {key[:40]!r} is not UTF-8 text (CIFAR keys are names such as "
                                 "'data' and 'labels')") from None
        out[key] = item
    return out


def _data(path: Path, value) -> np.ndarray:
    """(N, 3072) uint8 pixels, viewing the pickle's bytes."""
    if isinstance(value, (bytes, bytearray)):
        if len(value) % _PIXELS:
            raise fail(path, f"CIFAR data as raw bytes must be N x {_PIXELS} long, found {len(value):,} bytes")
        return np.frombuffer(value, np.uint8).reshape(-1, _PIXELS)
    data = to_numpy(value, {"u1"})
    if isinstance(data, str):
        raise fail(path, f"CIFAR data must be (N, {_PIXELS}) uint8 ({data})")
    if data.ndim != 2 or data.shape[1] != _PIXELS:
        raise fail(path, f"CIFAR data must be (N, {_PIXELS}) uint8, found {data.shape} {data.dtype}")
    return data


def _label(value) -> int | None:
    if isinstance(value, Scalar):
        value = to_numpy(value)
        return None if isinstance(value, str) else int(value)
    return value if type(value) is int else None  # not bool, not a nested list


def _labels(path: Path, value, classes: int) -> np.ndarray:
    """int64 labels from a flat list of ints (or numpy integer scalars) or a 1-D integer array."""
    if isinstance(value, Array):
        array = to_numpy(value)
        if isinstance(array, str):
            raise fail(path, f"CIFAR labels must be {array}")
        if array.ndim != 1:
            raise fail(path, f"CIFAR labels must be a flat list of integers, found an array of shape {array.shape}")
        labels = array.tolist()
    elif isinstance(value, (list, tuple)):
        labels = [_label(v) for v in value]
        if None in labels:
            i = labels.index(None)
            raise fail(path, f"CIFAR labels must be a flat list of integers; label {i} is a {describe(value[i])}")
    else:
        raise fail(path, f"CIFAR labels must be a list of integers, found a {describe(value)}")
    bad = next((i for i, y in enumerate(labels) if not 0 <= y < classes), None)
    if bad is not None:
        raise fail(path, f"label {labels[bad]} (example {bad}) is outside 0..{classes - 1}: "
                         f"batches.meta names {classes} classes")
    return np.array(labels, np.int64)


def _batch(path: Path, budget: Budget, classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _read_dict(path, budget)
    if "data" not in batch or "labels" not in batch:
        raise fail(path, "CIFAR batch without 'data' and 'labels'")
    data, labels = _data(path, batch["data"]), _labels(path, batch["labels"], classes)
    if len(data) != len(labels):
        raise fail(path, f"{len(data)} images but {len(labels)} labels")
    return data, labels


def _class_names(path: Path, budget: Budget) -> list[str]:
    names = _read_dict(path, budget).get("label_names")
    if not (isinstance(names, (list, tuple)) and names and all(isinstance(n, (bytes, str)) for n in names)):
        raise fail(path, "CIFAR meta file without a label_names list of names")
    return [n.decode(errors="replace") if isinstance(n, bytes) else n for n in names]


def load_cifar(root: Path) -> tuple[Dataset, Dataset]:
    missing = [n for n in CIFAR_FILES if not (root / n).is_file()]
    if missing:
        raise fail(root, f"CIFAR-10 directory without {', '.join(missing)}")
    budget = Budget()
    classes = _class_names(root / "batches.meta", budget)
    train = [_batch(root / n, budget, len(classes)) for n in CIFAR_TRAIN]
    x_test, y_test = _batch(root / "test_batch", budget, len(classes))
    budget.take(root, sum(len(x) for x, _ in train) * _PIXELS, "the training batches together")
    x_train, y_train = np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])
    shape = (-1, 3, 32, 32)
    return (make(str(root), pixels(budget, root, x_train.reshape(shape), 255), y_train, classes, root),
            make(str(root), pixels(budget, root / "test_batch", x_test.reshape(shape), 255), y_test, classes,
                 root / "test_batch"))
