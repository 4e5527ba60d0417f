"""Labelled image sets for `cnndsl train`: `load(spec)` reads one into a (train, test) pair
of `Dataset`s and `check` says whether a set fits a network. numpy only, so the front end
runs without torch. Every failure raises `CnnDataError` naming the file and the problem.

`spec` is None (the default set) or a path to one of these:

- an MNIST IDX directory: train-images-idx3-ubyte, train-labels-idx1-ubyte,
  t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each plain or .gz, with `-idx` or the
  dotted `.idx` spelling (Fashion-MNIST uses the same names). Pixels /255; classes "0".."9".
- a CIFAR-10 python directory (cifar-10-batches-py): data_batch_1..5, test_batch and
  batches.meta for the class names. These are pickles, read with an unpickler that builds
  numpy arrays and nothing else. Pixels /255, images 3x32x32.
- an `.npz` file with `x` and `y`, optionally `x_test`, `y_test` and `classes` (names).
  x is (N, H, W) (one channel), (N, C, H, W), or (N, H, W, C) when the last dim is 1..4 and
  the second is larger than 4. uint8 pixels are divided by 255; float pixels are kept as
  they are (cast to float32; assumed already scaled); other dtypes are refused.
- an image folder: root/<class>/*.png|jpg|... (classes sorted by folder name), or
  root/train/<class>/... and root/test/<class>/... Needs Pillow. All-grayscale folders give
  one channel, anything else RGB; every image must have the same size.

Sets without their own test part (the default, npz without x_test, a folder without
train/test) hold out a fixed 20%: the examples at the first round(N / 5) positions of
`np.random.default_rng(0).permutation(N)` are the test set, the rest train.

The default set is scikit-learn's bundled copy of the UCI "Optical Recognition of
Handwritten Digits" test set (E. Alpaydin, C. Kaynak, 1998; UCI ML Repository, CC BY 4.0):
1797 8x8 grayscale digits, 10 classes, pixel counts 0..16 scaled by 1/16. It is read from
the installed package's file sklearn/datasets/data/digits.csv.gz (scikit-learn is
BSD-3-Clause), so nothing is downloaded.
"""

import gzip
import importlib.util
import io
import math
import os
import pickle
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .errors import CnnDataError

try:  # numpy >= 1.26 has numpy._core; older ones only numpy.core
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric

TEST_FRACTION = 0.2
SPLIT_SEED = 0
DEFAULT_NAME = "digits (scikit-learn bundled, UCI)"


@dataclass(frozen=True)
class Dataset:
    """Images (N, C, H, W) float32 in [0, 1], labels (N,) int64 and the class names."""

    name: str
    x: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.y)


def _fail(path, message: str) -> CnnDataError:
    return CnnDataError(message, filename=str(path))


def _make(name: str, x, y, classes, where) -> Dataset:
    """A Dataset from raw arrays, refusing what no network could train on."""
    x, y = np.asarray(x), np.asarray(y)
    if y.ndim != 1:
        raise _fail(where, f"labels must be one per example, got shape {y.shape}")
    if len(x) != len(y):
        raise _fail(where, f"{len(x)} images but {len(y)} labels")
    if len(y) == 0:
        raise _fail(where, "no examples")
    if y.dtype.kind == "f":
        fractional = y[np.mod(y, 1) != 0]  # NaN lands here too
        if fractional.size:
            raise _fail(where, f"labels must be integers, found {fractional[0]}")
        y = y.astype(np.int64)  # whole-number float labels are common in .npz exports
    if y.dtype.kind not in "iu":
        raise _fail(where, f"labels must be integers, found dtype {y.dtype}")
    if y.min() < 0:
        raise _fail(where, f"label {y.min()} is negative")
    return Dataset(name, np.ascontiguousarray(x, np.float32), y.astype(np.int64), tuple(classes))


def _split(name: str, x, y, classes, where) -> tuple[Dataset, Dataset]:
    """The fixed held-out split: a seeded permutation, its first 20% are the test set."""
    whole = _make(name, x, y, classes, where)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(whole))
    test, train = np.split(order, [round(len(whole) * TEST_FRACTION)])
    if not (len(test) and len(train)):
        raise _fail(where, f"{len(whole)} examples are too few to hold out {TEST_FRACTION:.0%} for testing")
    return tuple(replace(whole, x=whole.x[i], y=whole.y[i]) for i in (train, test))  # type: ignore[return-value]


def _read_maybe_gz(path: Path) -> bytes:
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path) as f:
            return f.read()
    except EOFError:
        raise _fail(path, "truncated gzip file (it ends before its end-of-stream marker)") from None
    except (gzip.BadGzipFile, zlib.error) as err:
        raise _fail(path, f"not a valid gzip file ({err})") from None


def _digits() -> tuple[Dataset, Dataset]:
    # find_spec locates the package without importing it (and scipy with it).
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise CnnDataError("the default data set ships with scikit-learn: pip install scikit-learn")
    path = Path(next(iter(spec.submodule_search_locations)), "datasets", "data", "digits.csv.gz")
    try:
        table = np.loadtxt(io.BytesIO(_read_maybe_gz(path)), delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, ValueError) as err:
        raise _fail(path, f"cannot read scikit-learn's digits ({err}); reinstall scikit-learn") from None
    x = table[:, :-1].reshape(-1, 1, 8, 8) / 16.0
    return _split(DEFAULT_NAME, x, table[:, -1], [str(d) for d in range(10)], path)


# --- MNIST IDX ------------------------------------------------------------------------

_IDX_FILES = {  # name -> (magic, number of dimensions)
    "train-images-idx3-ubyte": (0x803, 3), "train-labels-idx1-ubyte": (0x801, 1),
    "t10k-images-idx3-ubyte": (0x803, 3), "t10k-labels-idx1-ubyte": (0x801, 1),
}


def _idx_path(root: Path, name: str) -> Path | None:
    dotted = name.replace("-idx", ".idx")
    return next((p for stem in (name, dotted) for p in (root / stem, root / f"{stem}.gz") if p.is_file()), None)


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    raw = _read_maybe_gz(path)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _fail(path, f"truncated IDX file: {len(raw)} bytes, the header alone needs {header}")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise _fail(path, f"bad IDX magic 0x{found:08x}, expected 0x{magic:08x}")
    dims = [int(d) for d in np.frombuffer(raw, ">u4", ndim, 4)]
    want = header + math.prod(dims)
    if len(raw) != want:
        shape = "x".join(map(str, dims))
        raise _fail(path, f"wrong size: {len(raw)} bytes, but a {shape} IDX file has {want}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _load_idx(root: Path) -> tuple[Dataset, Dataset]:
    arrays = {}
    for name, (magic, ndim) in _IDX_FILES.items():
        path = _idx_path(root, name)
        if path is None:
            raise _fail(root, f"MNIST IDX directory without {name} (plain or .gz)")
        arrays[name] = _read_idx(path, magic, ndim)

    def part(prefix: str) -> Dataset:
        images, labels = arrays[f"{prefix}-images-idx3-ubyte"], arrays[f"{prefix}-labels-idx1-ubyte"]
        return _make(str(root), images[:, None] / 255.0, labels, [str(d) for d in range(10)], root)

    return part("train"), part("t10k")


# --- CIFAR-10 python batches ----------------------------------------------------------

_CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """How Python 3 pickles bytes at protocol <= 2 (`_codecs.encode(text, "latin1")`)."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


# What pickled numpy arrays and scalars need, in numpy 1 and 2 spellings; nothing else.
_PICKLE_SAFE = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                ("_codecs", "encode"): _latin1_bytes}
for _core in ("core", "_core"):
    _PICKLE_SAFE[(f"numpy.{_core}.multiarray", "_reconstruct")] = _multiarray._reconstruct
    _PICKLE_SAFE[(f"numpy.{_core}.multiarray", "scalar")] = _multiarray.scalar
    _PICKLE_SAFE[(f"numpy.{_core}.numeric", "_frombuffer")] = _numeric._frombuffer


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; any other global is refused, so a
    crafted batch file cannot run code."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _PICKLE_SAFE:
            return _PICKLE_SAFE[(module, name)]
        raise _fail(self.path, f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")


def _unpickle(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            obj = _ArrayUnpickler(f, path).load()
    except CnnDataError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged pickle stream fails with almost any type
        raise _fail(path, f"corrupt pickle ({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict):
        raise _fail(path, f"expected a pickled dict, found {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    if "data" not in batch or "labels" not in batch:
        raise _fail(path, "CIFAR batch without 'data' and 'labels'")
    data = np.asarray(batch["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise _fail(path, f"CIFAR data must be (N, 3072) uint8, found {data.shape} {data.dtype}")
    return data.reshape(-1, 3, 32, 32), np.asarray(batch["labels"])


def _load_cifar(root: Path) -> tuple[Dataset, Dataset]:
    missing = [n for n in [*_CIFAR_TRAIN, "test_batch", "batches.meta"] if not (root / n).is_file()]
    if missing:
        raise _fail(root, f"CIFAR-10 directory without {', '.join(missing)}")
    names = _unpickle(root / "batches.meta").get("label_names")
    if not isinstance(names, (list, tuple)):
        raise _fail(root / "batches.meta", "CIFAR meta file without a label_names list")
    classes = [n.decode(errors="replace") if isinstance(n, bytes) else str(n) for n in names]
    train = [_cifar_batch(root / n) for n in _CIFAR_TRAIN]
    x_test, y_test = _cifar_batch(root / "test_batch")
    x_train, y_train = np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train])
    return (_make(str(root), x_train / 255.0, y_train, classes, root),
            _make(str(root), x_test / 255.0, y_test, classes, root / "test_batch"))


# --- .npz -----------------------------------------------------------------------------

def _npz_images(x: np.ndarray, path: Path, key: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[3] <= 4 < x.shape[1]:
        x = x.transpose(0, 3, 1, 2)  # channels last: (N, H, W, C)
    elif x.ndim != 4:
        raise _fail(path, f"{key} has shape {x.shape}; expected (N, H, W), (N, C, H, W) or (N, H, W, C)")
    if x.dtype == np.uint8:
        return x / 255.0
    if x.dtype.kind == "f":
        return x
    raise _fail(path, f"{key} has dtype {x.dtype}; store uint8 pixels (0..255) or floats")


def _load_npz(path: Path) -> tuple[Dataset, Dataset]:
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - zip, zlib and .npy header parsing fail with assorted types
        raise _fail(path, f"not a readable .npz archive ({err})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise _fail(path, "a single .npy array, not an .npz archive with x and y")
    with archive:
        missing = [k for k in ("x", "y") if k not in archive.files]
        if missing:
            raise _fail(path, f".npz without {' and '.join(missing)} (it has: {', '.join(archive.files) or 'nothing'})")
        try:
            arrays = {k: archive[k] for k in archive.files}
        except Exception as err:  # noqa: BLE001 - as above, for each member read
            raise _fail(path, f"corrupt .npz member ({err})") from None
    x = _npz_images(arrays["x"], path, "x")
    if "x_test" in arrays and "y_test" in arrays:
        x_test = _npz_images(arrays["x_test"], path, "x_test")
        train, test = (_make(str(path), x, arrays["y"], (), path), _make(str(path), x_test, arrays["y_test"], (), path))
    elif "x_test" in arrays or "y_test" in arrays:
        raise _fail(path, ".npz has only one of x_test and y_test")
    else:
        train, test = _split(str(path), x, arrays["y"], (), path)
    top = int(max(train.y.max(), test.y.max()))
    classes = arrays["classes"].tolist() if "classes" in arrays else range(top + 1)
    return tuple(replace(d, classes=tuple(map(str, classes))) for d in (train, test))  # type: ignore[return-value]


# --- image folders --------------------------------------------------------------------

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(root: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    files, labels = [], []
    for folder in _class_dirs(root):
        if folder.name not in classes:
            raise _fail(folder, f"class folder not in the training classes ({', '.join(classes)})")
        found = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        files += found
        labels += [classes.index(folder.name)] * len(found)
    if not files:
        raise _fail(root, f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) in its class folders")
    return files, labels


def _with_image(image_module, path: Path, use):
    try:
        with image_module.open(path) as im:
            return use(im)
    except Exception as err:  # noqa: BLE001 - Pillow's decoders fail with assorted types
        raise _fail(path, f"unreadable image ({type(err).__name__}: {err})") from None


def _read_images(image_module, files: list[Path]) -> np.ndarray:
    """Pixels (N, C, H, W) /255: one channel when every image is grayscale, else RGB."""
    heads = [_with_image(image_module, p, lambda im: (im.mode, im.size)) for p in files]
    for path, (_, size) in zip(files, heads):
        if size != heads[0][1]:
            raise _fail(path, f"image is {_dims(size)} but {files[0]} is {_dims(heads[0][1])}: "
                              "all images must have one size")
    mode = "L" if all(m in ("1", "L") for m, _ in heads) else "RGB"
    x = np.stack([_with_image(image_module, p, lambda im: np.asarray(im.convert(mode))) for p in files])
    return (x[:, None] if mode == "L" else x.transpose(0, 3, 1, 2)) / 255.0


def _load_images(root: Path) -> tuple[Dataset, Dataset]:
    try:
        from PIL import Image
    except ImportError:
        raise _fail(root, "reading an image folder needs Pillow: pip install pillow") from None
    split = (root / "train").is_dir() and (root / "test").is_dir()
    classes = [p.name for p in _class_dirs(root / "train" if split else root)]
    if not split:
        files, labels = _image_files(root, classes)
        return _split(str(root), _read_images(Image, files), np.array(labels), classes, root)
    (train_files, train_y), (test_files, test_y) = (_image_files(root / p, classes) for p in ("train", "test"))
    x = _read_images(Image, train_files + test_files)  # together: one size, one channel count
    return (_make(str(root), x[:len(train_y)], np.array(train_y), classes, root / "train"),
            _make(str(root), x[len(train_y):], np.array(test_y), classes, root / "test"))


# --- the format table and the public API ----------------------------------------------

_FORMATS = {  # description -> (detector, reader); tried in order, the image folder last
    "an MNIST IDX directory (train-images-idx3-ubyte[.gz], ...)":
        (lambda p: p.is_dir() and any(_idx_path(p, n) for n in _IDX_FILES), _load_idx),
    "a CIFAR-10 python directory (data_batch_1..5, test_batch, batches.meta)":
        (lambda p: p.is_dir() and any((p / n).is_file() for n in ["test_batch", *_CIFAR_TRAIN]), _load_cifar),
    "an .npz file with x and y":
        (lambda p: p.is_file() and p.suffix.lower() == ".npz", _load_npz),
    "an image folder (root/<class>/*.png or root/train|test/<class>/...)":
        (lambda p: p.is_dir() and bool(_class_dirs(p)), _load_images),
}


def load(spec: str | os.PathLike | None = None) -> tuple[Dataset, Dataset]:
    """(train, test). None -> the bundled default set with its fixed held-out split."""
    if spec is None:
        return _digits()
    path = Path(spec)
    if not path.exists():
        raise _fail(path, "no such file or directory")
    for detect, read in _FORMATS.values():
        if detect(path):
            try:
                return read(path)
            except OSError as err:  # permissions, vanished files, I/O errors
                raise _fail(getattr(err, "filename", None) or path, f"cannot read: {err.strerror or err}") from None
    raise _fail(path, f"unknown data format; supported: {'; '.join(_FORMATS)}")


def _dims(shape) -> str:
    return "x".join(str(d) for d in shape)


def check(ds: Dataset, input_shape: tuple[int, int, int], num_classes: int, where: str = "data") -> None:
    """Raise CnnDataError unless ds fits a network taking input_shape (C, H, W) images and
    num_classes classes: not empty, shapes equal, labels in range, pixels finite."""
    def fail(message: str) -> CnnDataError:
        return _fail(ds.name, f"{where}: {message}")

    if len(ds) == 0 or ds.x.size == 0:
        raise fail("is empty (no examples)")
    if ds.x.ndim != 4 or len(ds.x) != len(ds.y):
        raise fail(f"expected images (N, C, H, W) and N labels, got {ds.x.shape} and {ds.y.shape}")
    if tuple(ds.x.shape[1:]) != tuple(input_shape):
        raise fail(f"images are {_dims(ds.x.shape[1:])} but the network expects {_dims(input_shape)}")
    bad = ds.y[(ds.y < 0) | (ds.y >= num_classes)]
    if bad.size:
        raise fail(f"label {bad[0]} is out of range: the network has {num_classes} classes "
                   f"(labels 0..{num_classes - 1}); {bad.size} labels are outside")
    finite = np.isfinite(ds.x)
    if not finite.all():
        first = int(np.argwhere(~finite)[0][0])
        raise fail(f"{finite.size - int(finite.sum())} pixel values are NaN or inf (first in example {first})")
