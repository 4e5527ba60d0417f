"""Labelled image sets for `cnndsl train`: `load(spec)` reads one into a (train, test) pair
of `Dataset`s (dataset.py; the readers are in formats.py and cifar.py) and `check` says
whether a set fits a network. numpy only, so the front end runs without torch. Every failure
raises `CnnDataError` naming the file and the problem.

`spec` is None (the default set) or a path to one of these:

- an MNIST IDX directory: train-images-idx3-ubyte, train-labels-idx1-ubyte,
  t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each plain or .gz, with `-idx` or the
  dotted `.idx` spelling (Fashion-MNIST uses the same names). Pixels /255; classes "0".."9".
  The header's sizes are checked against the data limit before the data is read, and a file
  with more or fewer bytes than its header says is refused.
- a CIFAR-10 python directory (cifar-10-batches-py): data_batch_1..5, test_batch and
  batches.meta for the class names. These are pickles (protocols 2-5, Python 2 or 3, numpy
  1 or 2), read by cnndsl's own strict opcode reader (pickles.py), never by pickle's
  Unpickler: it builds plain values and inert records of numpy arrays, refuses every other
  global, callable or opcode, and counts what it builds against the data limit. 'data' must
  be a uint8 (N, 3072) array (or N*3072 raw bytes); 'labels' a flat list (or 1-D array) of N
  integers below the number of label_names; dict keys UTF-8 strings (str or bytes), integers
  at most 8 bytes long. Pixels /255, images 3x32x32.
- an `.npz` file with `x` and `y`, optionally `x_test`, `y_test` and `classes` (a 1-D array
  of names, at least one per label value; without it the classes are "0".."top label", their
  names counted against the data limit). x is (N, H, W) (one channel), (N, C, H, W), or
  (N, H, W, C) when the last dim is 1..4 and the second is larger than 4. uint8 pixels are
  divided by 255; float pixels are kept as they are (cast to float32; assumed already
  scaled); other dtypes are refused. Each member's .npy header is read first: object arrays
  are refused and its size is checked against the data limit before numpy allocates it.
- an image folder: root/<class>/*.png|jpg|... (classes sorted by folder name), or
  root/train/<class>/... and root/test/<class>/... Needs Pillow. All-grayscale folders give
  one channel, anything else RGB; every image must have the same size. A FIFO, socket,
  device, directory or broken symlink with an image name is refused without being opened;
  the images' sizes are read from their headers and checked against the data limit before
  any is decoded, and images beyond Pillow's Image.MAX_IMAGE_PIXELS are refused.

The data limit (dataset.py): a reader holds at most CNNDSL_MAX_DATA_BYTES bytes (default
MAX_DATA_BYTES, 2 GiB) of raw arrays and float32 images; a .gz, .npz member, pickle or image
set that would need more is refused, naming the limit, before it is allocated. Pixels are
converted to float32 directly, never through float64.

Labels are whole numbers (integers, or whole floats) from 0 to 2,147,483,646: no network has
more than MAX_SIZE (2,147,483,647) classes. A label outside that range, NaN or infinite is
refused before it is cast to int64.

Sets without their own test part (the default, npz without x_test, a folder without
train/test) hold out a fixed 20%: the examples at the first round(N / 5) positions of
`np.random.default_rng(0).permutation(N)` are the test set, the rest train.

The default set is the test set of the UCI "Optical Recognition of Handwritten Digits" data
(E. Alpaydin, C. Kaynak, 1998; UCI ML Repository, CC BY 4.0): 1797 8x8 grayscale digits, 10
classes, pixel counts 0..16 scaled by 1/16, shipped in the package as
cnndsl/datasets/digits.csv.gz (57 KB, the copy scikit-learn distributes; its attribution is in
cnndsl/datasets/DIGITS.md), so nothing is downloaded and nothing else is needed.
"""

import io
import os
from importlib import resources
from pathlib import Path

import numpy as np

from .dataset import Dataset, dims, fail, read_maybe_gz, split
from .errors import CnnDataError
from .files import usable
from .formats import FORMATS

DEFAULT_NAME = "digits (UCI, bundled)"
__all__ = ["DEFAULT_NAME", "Dataset", "check", "load"]


def _digits() -> tuple[Dataset, Dataset]:
    path = Path(str(resources.files("cnndsl").joinpath("datasets", "digits.csv.gz")))
    try:
        table = np.loadtxt(io.BytesIO(read_maybe_gz(path)), delimiter=",", dtype=np.int64, ndmin=2)
    except CnnDataError:
        raise  # the data limit's, naming the file
    except (OSError, ValueError) as err:
        raise fail(path, f"cannot read the bundled digits ({err}); reinstall cnndsl") from None
    x = np.divide(table[:, :-1].reshape(-1, 1, 8, 8), 16, dtype=np.float32)
    return split(DEFAULT_NAME, x, table[:, -1], [str(d) for d in range(10)], path)


def load(spec: str | os.PathLike | None = None) -> tuple[Dataset, Dataset]:
    """(train, test). None -> the bundled default set with its fixed held-out split."""
    if spec is None:
        return _digits()
    path = usable(spec, "--data", CnnDataError)
    if not path.exists():
        raise fail(path, "no such file or directory")
    for detect, read in FORMATS.values():
        if detect(path):
            try:
                return read(path)
            except OSError as err:  # permissions, vanished files, I/O errors
                raise fail(getattr(err, "filename", None) or path, f"cannot read: {err.strerror or err}") from None
    raise fail(path, f"unknown data format; supported: {'; '.join(FORMATS)}")


def check(ds: Dataset, input_shape: tuple[int, int, int], num_classes: int, where: str = "data") -> None:
    """Raise CnnDataError unless ds fits a network taking input_shape (C, H, W) images and
    num_classes classes: not empty, shapes equal, labels in range, pixels finite."""
    def misfit(message: str) -> CnnDataError:
        return fail(ds.name, f"{where}: {message}")

    if len(ds) == 0 or ds.x.size == 0:
        raise misfit("is empty (no examples)")
    if ds.x.ndim != 4 or len(ds.x) != len(ds.y):
        raise misfit(f"expected images (N, C, H, W) and N labels, got {ds.x.shape} and {ds.y.shape}")
    if tuple(ds.x.shape[1:]) != tuple(input_shape):
        raise misfit(f"images are {dims(ds.x.shape[1:])} but the network expects {dims(input_shape)}")
    bad = ds.y[(ds.y < 0) | (ds.y >= num_classes)]
    if bad.size:
        raise misfit(f"label {bad[0]} is out of range: the network has {num_classes} classes "
                   f"(labels 0..{num_classes - 1}); {bad.size} labels are outside")
    finite = np.isfinite(ds.x)
    if not finite.all():
        first = int(np.argwhere(~finite)[0][0])
        raise misfit(f"{finite.size - int(finite.sum())} pixel values are NaN or inf (first in example {first})")
