"""Readers of the image-set formats users have (MNIST IDX, CIFAR-10 python batches, .npz,
image folders), each path -> (train, test) Datasets, and FORMATS, the table `data.load`
tries in order. Formats and layouts are described in data.py."""

import math
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np

from .dataset import Dataset, dims, fail, make, read_maybe_gz, split
from .errors import CnnDataError

try:  # numpy >= 1.26 has numpy._core; older ones only numpy.core
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric


# --- MNIST IDX ------------------------------------------------------------------------

_IDX_FILES = {  # name -> (magic, number of dimensions)
    "train-images-idx3-ubyte": (0x803, 3), "train-labels-idx1-ubyte": (0x801, 1),
    "t10k-images-idx3-ubyte": (0x803, 3), "t10k-labels-idx1-ubyte": (0x801, 1),
}


def _idx_path(root: Path, name: str) -> Path | None:
    dotted = name.replace("-idx", ".idx")
    return next((p for stem in (name, dotted) for p in (root / stem, root / f"{stem}.gz") if p.is_file()), None)


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    raw = read_maybe_gz(path)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise fail(path, f"truncated IDX file: {len(raw)} bytes, the header alone needs {header}")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise fail(path, f"bad IDX magic 0x{found:08x}, expected 0x{magic:08x}")
    sizes = [int(d) for d in np.frombuffer(raw, ">u4", ndim, 4)]
    want = header + math.prod(sizes)
    if len(raw) != want:
        raise fail(path, f"wrong size: {len(raw)} bytes, but a {dims(sizes)} IDX file has {want}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(sizes)


def _load_idx(root: Path) -> tuple[Dataset, Dataset]:
    arrays = {}
    for name, (magic, ndim) in _IDX_FILES.items():
        path = _idx_path(root, name)
        if path is None:
            raise fail(root, f"MNIST IDX directory without {name} (plain or .gz)")
        arrays[name] = _read_idx(path, magic, ndim)

    def part(prefix: str) -> Dataset:
        images, labels = arrays[f"{prefix}-images-idx3-ubyte"], arrays[f"{prefix}-labels-idx1-ubyte"]
        return make(str(root), images[:, None] / 255.0, labels, [str(d) for d in range(10)], root)

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
        raise fail(self.path, f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")


def _unpickle(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            obj = _ArrayUnpickler(f, path).load()
    except CnnDataError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged pickle stream fails with almost any type
        raise fail(path, f"corrupt pickle ({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict):
        raise fail(path, f"expected a pickled dict, found {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    if "data" not in batch or "labels" not in batch:
        raise fail(path, "CIFAR batch without 'data' and 'labels'")
    data = np.asarray(batch["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise fail(path, f"CIFAR data must be (N, 3072) uint8, found {data.shape} {data.dtype}")
    return data.reshape(-1, 3, 32, 32), np.asarray(batch["labels"])


def _load_cifar(root: Path) -> tuple[Dataset, Dataset]:
    missing = [n for n in [*_CIFAR_TRAIN, "test_batch", "batches.meta"] if not (root / n).is_file()]
    if missing:
        raise fail(root, f"CIFAR-10 directory without {', '.join(missing)}")
    names = _unpickle(root / "batches.meta").get("label_names")
    if not isinstance(names, (list, tuple)):
        raise fail(root / "batches.meta", "CIFAR meta file without a label_names list")
    classes = [n.decode(errors="replace") if isinstance(n, bytes) else str(n) for n in names]
    train = [_cifar_batch(root / n) for n in _CIFAR_TRAIN]
    x_test, y_test = _cifar_batch(root / "test_batch")
    x_train, y_train = np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train])
    return (make(str(root), x_train / 255.0, y_train, classes, root),
            make(str(root), x_test / 255.0, y_test, classes, root / "test_batch"))


# --- .npz -----------------------------------------------------------------------------

def _npz_images(x: np.ndarray, path: Path, key: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[3] <= 4 < x.shape[1]:
        x = x.transpose(0, 3, 1, 2)  # channels last: (N, H, W, C)
    elif x.ndim != 4:
        raise fail(path, f"{key} has shape {x.shape}; expected (N, H, W), (N, C, H, W) or (N, H, W, C)")
    if x.dtype == np.uint8:
        return x / 255.0
    if x.dtype.kind == "f":
        return x
    raise fail(path, f"{key} has dtype {x.dtype}; store uint8 pixels (0..255) or floats")


def _load_npz(path: Path) -> tuple[Dataset, Dataset]:
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - zip, zlib and .npy header parsing fail with assorted types
        raise fail(path, f"not a readable .npz archive ({err})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise fail(path, "a single .npy array, not an .npz archive with x and y")
    with archive:
        missing = [k for k in ("x", "y") if k not in archive.files]
        if missing:
            raise fail(path, f".npz without {' and '.join(missing)} (it has: {', '.join(archive.files) or 'nothing'})")
        try:
            arrays = {k: archive[k] for k in archive.files}
        except Exception as err:  # noqa: BLE001 - as above, for each member read
            raise fail(path, f"corrupt .npz member ({err})") from None
    x = _npz_images(arrays["x"], path, "x")
    if "x_test" in arrays and "y_test" in arrays:
        x_test = _npz_images(arrays["x_test"], path, "x_test")
        train, test = (make(str(path), x, arrays["y"], (), path), make(str(path), x_test, arrays["y_test"], (), path))
    elif "x_test" in arrays or "y_test" in arrays:
        raise fail(path, ".npz has only one of x_test and y_test")
    else:
        train, test = split(str(path), x, arrays["y"], (), path)
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
            raise fail(folder, f"class folder not in the training classes ({', '.join(classes)})")
        found = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        files += found
        labels += [classes.index(folder.name)] * len(found)
    if not files:
        raise fail(root, f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) in its class folders")
    return files, labels


def _with_image(image_module, path: Path, use):
    try:
        with image_module.open(path) as im:
            return use(im)
    except Exception as err:  # noqa: BLE001 - Pillow's decoders fail with assorted types
        raise fail(path, f"unreadable image ({type(err).__name__}: {err})") from None


def _read_images(image_module, files: list[Path]) -> np.ndarray:
    """Pixels (N, C, H, W) /255: one channel when every image is grayscale, else RGB."""
    heads = [_with_image(image_module, p, lambda im: (im.mode, im.size)) for p in files]
    for path, (_, size) in zip(files, heads):
        if size != heads[0][1]:
            raise fail(path, f"image is {dims(size)} but {files[0]} is {dims(heads[0][1])}: "
                              "all images must have one size")
    mode = "L" if all(m in ("1", "L") for m, _ in heads) else "RGB"
    x = np.stack([_with_image(image_module, p, lambda im: np.asarray(im.convert(mode))) for p in files])
    return (x[:, None] if mode == "L" else x.transpose(0, 3, 1, 2)) / 255.0


def _load_images(root: Path) -> tuple[Dataset, Dataset]:
    try:
        from PIL import Image
    except ImportError:
        raise fail(root, "reading an image folder needs Pillow: pip install pillow") from None
    parts = (root / "train").is_dir() and (root / "test").is_dir()
    classes = [p.name for p in _class_dirs(root / "train" if parts else root)]
    if not parts:
        files, labels = _image_files(root, classes)
        return split(str(root), _read_images(Image, files), np.array(labels), classes, root)
    (train_files, train_y), (test_files, test_y) = (_image_files(root / p, classes) for p in ("train", "test"))
    x = _read_images(Image, train_files + test_files)  # together: one size, one channel count
    return (make(str(root), x[:len(train_y)], np.array(train_y), classes, root / "train"),
            make(str(root), x[len(train_y):], np.array(test_y), classes, root / "test"))


FORMATS = {  # description -> (detector, reader); tried in order, the image folder last
    "an MNIST IDX directory (train-images-idx3-ubyte[.gz], ...)":
        (lambda p: p.is_dir() and any(_idx_path(p, n) for n in _IDX_FILES), _load_idx),
    "a CIFAR-10 python directory (data_batch_1..5, test_batch, batches.meta)":
        (lambda p: p.is_dir() and any((p / n).is_file() for n in ["test_batch", *_CIFAR_TRAIN]), _load_cifar),
    "an .npz file with x and y":
        (lambda p: p.is_file() and p.suffix.lower() == ".npz", _load_npz),
    "an image folder (root/<class>/*.png or root/train|test/<class>/...)":
        (lambda p: p.is_dir() and bool(_class_dirs(p)), _load_images),
}
