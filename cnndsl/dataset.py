"""The Dataset of a labelled image set and what every reader shares: the checks that make
one from raw arrays, the fixed held-out split, the data limit and bounded (gzip) reading.
numpy only.

The data limit: a reader holds at most `max_data_bytes()` bytes of data at once — the raw
arrays it reads (inflated .gz, .npz members, pickled batches, decoded images) plus the
float32 images it makes of them — and checks each amount against what is left *before*
allocating it. The default, MAX_DATA_BYTES (2 GiB), holds CIFAR-10 (1.0-1.3 GB counted: its
pickles, 184 MB of pixels, 737 MB of float32 images) and MNIST (0.26 GB) with room to spare,
and refuses a .gz or .npz that inflates to gigabytes; the environment variable
CNNDSL_MAX_DATA_BYTES (a whole number of bytes) raises or lowers it."""

import gzip
import math
import os
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .errors import CnnDataError
from .files import open_regular
from .limits import MAX_SIZE

TEST_FRACTION = 0.2
SPLIT_SEED = 0
MAX_DATA_BYTES = 2 * 2**30
DATA_LIMIT_ENV = "CNNDSL_MAX_DATA_BYTES"
READ_CHUNK = 2**20  # bytes per read of a stream whose length is not known in advance
MAX_CLASSES = MAX_SIZE  # a dense head has at most MAX_SIZE units, so no larger label fits any network


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


def max_data_bytes() -> int:
    """The data limit: CNNDSL_MAX_DATA_BYTES if set, else MAX_DATA_BYTES."""
    text = os.environ.get(DATA_LIMIT_ENV)
    if text is None:
        return MAX_DATA_BYTES
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise CnnDataError(f"{DATA_LIMIT_ENV}={text!r} is not a positive whole number of bytes "
                           f"(the default is {MAX_DATA_BYTES:,}; e.g. {8 * 2**30} for 8 GiB)")
    return value


class Budget:
    """What one reader may still allocate out of the data limit."""

    def __init__(self):
        self.cap = self.left = max_data_bytes()

    def take(self, where, nbytes: int, what: str) -> None:
        """Count nbytes against the limit, or refuse them before they are allocated."""
        if nbytes > self.left:
            raise fail(where, f"{what}: {nbytes:,} bytes, more than the {self.left:,} left of the "
                              f"{self.cap:,}-byte data limit (set {DATA_LIMIT_ENV} to raise the limit)")
        self.left -= nbytes


def pixels(budget: Budget, where, x: np.ndarray, scale: float) -> np.ndarray:
    """float32 images x / scale, C-contiguous, computed in float32 (no float64 copy)."""
    budget.take(where, math.prod(x.shape) * 4, f"{dims(x.shape)} float32 images")
    if scale == 1:
        return x.astype(np.float32, order="C")
    return np.divide(x, scale, dtype=np.float32, order="C")


def make(name: str, x, y, classes, where) -> Dataset:
    """A Dataset from raw arrays, refusing what no network could train on."""
    try:
        x, y = np.asarray(x), np.asarray(y)
    except (ValueError, TypeError):  # ragged nesting such as [1, [2, 3]]
        raise fail(where, "labels must be a flat list of integers, one per example") from None
    if y.ndim != 1:
        raise fail(where, f"labels must be one per example, got shape {y.shape}")
    if len(x) != len(y):
        raise fail(where, f"{len(x)} images but {len(y)} labels")
    if len(y) == 0:
        raise fail(where, "no examples")
    if y.dtype.kind == "f":  # whole-number float labels are common in .npz exports
        finite = np.isfinite(y)  # first: np.mod of inf or NaN warns
        fractional = y[~finite] if not finite.all() else y[np.mod(y, 1) != 0]
        if fractional.size:
            raise fail(where, f"labels must be integers, found {fractional[0]}")
    elif y.dtype.kind not in "iu":
        raise fail(where, f"labels must be integers, found dtype {y.dtype}")
    # The range is checked before the cast to int64, which would wrap 1e300 or 2**64 - 1
    # around to a negative label and so misname the problem.
    if y.min() < 0:
        raise fail(where, f"label {_label(y.min())} is negative")
    if y.max() >= MAX_CLASSES:
        raise fail(where, f"label {_label(y.max())} is more than a network can have: at most "
                          f"{MAX_CLASSES:,} classes (labels 0..{MAX_CLASSES - 1:,})")
    return Dataset(name, np.ascontiguousarray(x, np.float32), y.astype(np.int64), tuple(classes))


def _label(value) -> str:
    """A label for a message: a whole float as an integer unless that would be a wall of digits."""
    if isinstance(value, np.floating):
        return str(int(value)) if abs(value) < 1e15 else f"{value:.6g}"
    return str(value)


def split(name: str, x, y, classes, where) -> tuple[Dataset, Dataset]:
    """The fixed held-out split: a seeded permutation, its first 20% are the test set."""
    whole = make(name, x, y, classes, where)
    train, test = hold_out(len(whole), TEST_FRACTION, SPLIT_SEED)
    if not (len(test) and len(train)):
        raise fail(where, f"{len(whole)} examples are too few to hold out {TEST_FRACTION:.0%} for testing")
    return tuple(replace(whole, x=whole.x[i], y=whole.y[i]) for i in (train, test))  # type: ignore[return-value]


def hold_out(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) indices of n examples: the first round(n * fraction) positions of a
    permutation seeded by `seed` are held out."""
    held, kept = np.split(np.random.default_rng(seed).permutation(n), [round(n * fraction)])
    return kept, held


@contextmanager
def open_maybe_gz(path: Path):
    """The file as a binary stream, inflated when its name ends in .gz; gzip damage met
    while reading it (inside the `with`) becomes a CnnDataError."""
    try:
        with open_regular(path) as raw, (gzip.GzipFile(fileobj=raw) if path.suffix == ".gz" else raw) as f:
            yield f
    except EOFError:
        raise fail(path, "truncated gzip file (it ends before its end-of-stream marker)") from None
    except (gzip.BadGzipFile, zlib.error) as err:
        raise fail(path, f"not a valid gzip file ({err})") from None


def read_at_most(f, limit: int) -> bytearray:
    """Up to limit bytes of a stream, read in chunks: a stream shorter than limit costs only
    its own length, whatever limit is."""
    out = bytearray()
    while len(out) < limit and (chunk := f.read(min(READ_CHUNK, limit - len(out)))):
        out += chunk
    return out


def read_maybe_gz(path: Path, limit: int | None = None) -> bytearray:
    """The file's bytes (inflated if .gz), refusing more than limit (default: the data
    limit) before holding more than limit + one chunk."""
    cap = max_data_bytes() if limit is None else limit
    gz = path.suffix == ".gz"
    size = None if gz else path.stat().st_size
    if size is not None and size > cap:
        raise fail(path, f"file is {size:,} bytes, more than the {cap:,} the data limit leaves for it "
                         f"(set {DATA_LIMIT_ENV} to raise the limit)")
    with open_maybe_gz(path) as f:
        raw = read_at_most(f, cap + 1)
    if len(raw) > cap:
        raise fail(path, f"{'inflates' if gz else 'grew'} to more than {cap:,} bytes, the most the data limit "
                         f"leaves for it (set {DATA_LIMIT_ENV} to raise the limit)")
    return raw


def dims(shape) -> str:
    return "x".join(str(d) for d in shape)
