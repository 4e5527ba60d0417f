"""The Dataset of a labelled image set and what every reader shares: the checks that make
one from raw arrays, the fixed held-out split, gzip reading. numpy only."""

import gzip
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .errors import CnnDataError

TEST_FRACTION = 0.2
SPLIT_SEED = 0


@dataclass(frozen=True)
class Dataset:
    """Images (N, C, H, W) float32 in [0, 1], labels (N,) int64 and the class names."""

    name: str
    x: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.y)


def fail(path, message: str) -> CnnDataError:
    return CnnDataError(message, filename=str(path))


def make(name: str, x, y, classes, where) -> Dataset:
    """A Dataset from raw arrays, refusing what no network could train on."""
    x, y = np.asarray(x), np.asarray(y)
    if y.ndim != 1:
        raise fail(where, f"labels must be one per example, got shape {y.shape}")
    if len(x) != len(y):
        raise fail(where, f"{len(x)} images but {len(y)} labels")
    if len(y) == 0:
        raise fail(where, "no examples")
    if y.dtype.kind == "f":
        fractional = y[np.mod(y, 1) != 0]  # NaN lands here too
        if fractional.size:
            raise fail(where, f"labels must be integers, found {fractional[0]}")
        y = y.astype(np.int64)  # whole-number float labels are common in .npz exports
    if y.dtype.kind not in "iu":
        raise fail(where, f"labels must be integers, found dtype {y.dtype}")
    if y.min() < 0:
        raise fail(where, f"label {y.min()} is negative")
    return Dataset(name, np.ascontiguousarray(x, np.float32), y.astype(np.int64), tuple(classes))


def split(name: str, x, y, classes, where) -> tuple[Dataset, Dataset]:
    """The fixed held-out split: a seeded permutation, its first 20% are the test set."""
    whole = make(name, x, y, classes, where)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(whole))
    test, train = np.split(order, [round(len(whole) * TEST_FRACTION)])
    if not (len(test) and len(train)):
        raise fail(where, f"{len(whole)} examples are too few to hold out {TEST_FRACTION:.0%} for testing")
    return tuple(replace(whole, x=whole.x[i], y=whole.y[i]) for i in (train, test))  # type: ignore[return-value]


def read_maybe_gz(path: Path) -> bytes:
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path) as f:
            return f.read()
    except EOFError:
        raise fail(path, "truncated gzip file (it ends before its end-of-stream marker)") from None
    except (gzip.BadGzipFile, zlib.error) as err:
        raise fail(path, f"not a valid gzip file ({err})") from None


def dims(shape) -> str:
    return "x".join(str(d) for d in shape)
