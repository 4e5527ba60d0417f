"""Readers of the image-set formats users have (MNIST IDX, CIFAR-10 python batches in
cifar.py, .npz, image folders), each path -> (train, test) Datasets, and FORMATS, the table
`data.load` tries in order. Formats, layouts and what is refused are described in data.py.
Every reader takes what it allocates out of one Budget (dataset.py) before allocating it."""

import math
import stat
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from .cifar import CIFAR_TRAIN, load_cifar
from .dataset import (
    Budget,
    Dataset,
    dims,
    fail,
    make,
    open_maybe_gz,
    pixels,
    read_at_most,
    split,
)
from .errors import CnnDataError
from .files import open_regular
from .limits import MAX_SIZE

# --- MNIST IDX ------------------------------------------------------------------------

_IDX_FILES = {  # name -> (magic, number of dimensions)
    "train-images-idx3-ubyte": (0x803, 3), "train-labels-idx1-ubyte": (0x801, 1),
    "t10k-images-idx3-ubyte": (0x803, 3), "t10k-labels-idx1-ubyte": (0x801, 1),
}


def _idx_path(root: Path, name: str) -> Path | None:
    dotted = name.replace("-idx", ".idx")
    return next((p for stem in (name, dotted) for p in (root / stem, root / f"{stem}.gz") if p.is_file()), None)


def _read_idx(path: Path, magic: int, ndim: int, budget: Budget) -> np.ndarray:
    """The header first: its sizes say how many bytes follow, counted before they are read,
    and no more than one byte past them is ever inflated."""
    header = 4 + 4 * ndim
    with open_maybe_gz(path) as f:
        head = read_at_most(f, header)
        if len(head) < header:
            raise fail(path, f"truncated IDX file: {len(head)} bytes, the header alone needs {header}")
        found = int.from_bytes(head[:4], "big")
        if found != magic:
            raise fail(path, f"bad IDX magic 0x{found:08x}, expected 0x{magic:08x}")
        sizes = [int(d) for d in np.frombuffer(head, ">u4", ndim, 4)]
        if max(sizes) > MAX_SIZE:  # (an empty file's other sizes could overflow numpy's: 0 x 2**32-1 x 2**32-1)
            raise fail(path, f"IDX size {max(sizes):,} is more than the largest, {MAX_SIZE:,}")
        want = math.prod(sizes)
        budget.take(path, want, f"a {dims(sizes)} IDX file")
        body = read_at_most(f, want + 1)
    if len(body) != want:
        found_size = f"more than {header + want}" if len(body) > want else str(header + len(body))
        raise fail(path, f"wrong size: {found_size} bytes, but a {dims(sizes)} IDX file has {header + want}")
    return np.frombuffer(body, np.uint8).reshape(sizes)


def _load_idx(root: Path) -> tuple[Dataset, Dataset]:
    budget, arrays = Budget(), {}
    for name, (magic, ndim) in _IDX_FILES.items():
        path = _idx_path(root, name)
        if path is None:
            raise fail(root, f"MNIST IDX directory without {name} (plain or .gz)")
        arrays[name] = _read_idx(path, magic, ndim, budget)

    def part(prefix: str) -> Dataset:
        images, labels = arrays[f"{prefix}-images-idx3-ubyte"], arrays[f"{prefix}-labels-idx1-ubyte"]
        return make(str(root), pixels(budget, root, images[:, None], 255), labels, [str(d) for d in range(10)], root)

    return part("train"), part("t10k")


# --- .npz -----------------------------------------------------------------------------

_NPZ_KEYS = ("x", "y", "x_test", "y_test", "classes")
_NAME_BYTES = 80  # one numbered class name: a short str (about 60 bytes, allocated in 64) and its tuple slot
_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _npz_member(archive, path: Path, key: str, budget: Budget) -> np.ndarray:
    """One member, after its .npy header's dtype and size are checked: numpy allocates what
    the header says before it reads a byte."""
    member = f"{key}.npy" if f"{key}.npy" in archive.zip.namelist() else key
    try:
        with archive.zip.open(member) as f:
            version = np.lib.format.read_magic(f)
            if version not in _NPY_HEADERS:
                raise fail(path, f"{key} is a .npy version {version[0]}.{version[1]} array; 1.0 and 2.0 are read")
            shape, _, dtype = _NPY_HEADERS[version](f)
        if dtype.hasobject:
            raise fail(path, f"{key} holds Python objects (dtype {dtype}); store numbers (or names, for classes)")
        budget.take(path, math.prod(shape) * dtype.itemsize, f"{key} ({dims(shape) or 'scalar'} {dtype})")
        return archive[key]
    except CnnDataError:
        raise
    except Exception as err:  # noqa: BLE001 - zip, zlib and .npy header parsing fail with assorted types
        raise fail(path, f"corrupt .npz member {key} ({err})") from None


def _npz_images(x: np.ndarray, path: Path, key: str, budget: Budget) -> np.ndarray:
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[3] <= 4 < x.shape[1]:
        x = x.transpose(0, 3, 1, 2)  # channels last: (N, H, W, C)
    elif x.ndim != 4:
        raise fail(path, f"{key} has shape {x.shape}; expected (N, H, W), (N, C, H, W) or (N, H, W, C)")
    if x.dtype == np.uint8:
        return pixels(budget, path, x, 255)
    if x.dtype.kind == "f":
        return pixels(budget, path, x, 1)
    raise fail(path, f"{key} has dtype {x.dtype}; store uint8 pixels (0..255) or floats")


def _npz_classes(names: np.ndarray | None, path: Path, top: int, budget: Budget) -> tuple[str, ...]:
    """The class names, "0".."top" where the archive has none. make() has bounded top by
    the most classes a network can have, but a 1 KB file can still claim a label in the
    billions, so the names are counted against the data limit before they are built."""
    if names is None:
        budget.take(path, (top + 1) * _NAME_BYTES, f"{top + 1:,} class names (the labels go up to {top:,})")
        return tuple(str(c) for c in range(top + 1))
    if names.ndim != 1 or names.dtype.kind not in "USiu":
        raise fail(path, f"classes must be a 1-D array of class names, found shape {names.shape} dtype {names.dtype}")
    if len(names) <= top:
        raise fail(path, f"classes has {len(names)} names but the labels go up to {top}")
    return tuple(n.decode(errors="replace") if isinstance(n, bytes) else str(n) for n in names.tolist())


def _load_npz(path: Path) -> tuple[Dataset, Dataset]:
    with open_regular(path) as f:
        return _read_npz(f, path)


def _read_npz(f, path: Path) -> tuple[Dataset, Dataset]:
    try:
        archive = np.load(f, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - zip, zlib and .npy header parsing fail with assorted types
        raise fail(path, f"not a readable .npz archive ({err})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise fail(path, "a single .npy array, not an .npz archive with x and y")
    budget = Budget()
    with archive:
        missing = [k for k in ("x", "y") if k not in archive.files]
        if missing:
            raise fail(path, f".npz without {' and '.join(missing)} (it has: {', '.join(archive.files) or 'nothing'})")
        arrays = {k: _npz_member(archive, path, k, budget) for k in _NPZ_KEYS if k in archive.files}
    x = _npz_images(arrays["x"], path, "x", budget)
    if "x_test" in arrays and "y_test" in arrays:
        x_test = _npz_images(arrays["x_test"], path, "x_test", budget)
        train, test = (make(str(path), x, arrays["y"], (), path), make(str(path), x_test, arrays["y_test"], (), path))
    elif "x_test" in arrays or "y_test" in arrays:
        raise fail(path, ".npz has only one of x_test and y_test")
    else:
        train, test = split(str(path), x, arrays["y"], (), path)
    classes = _npz_classes(arrays.get("classes"), path, int(max(train.y.max(), test.y.max())), budget)
    return tuple(replace(d, classes=classes) for d in (train, test))  # type: ignore[return-value]


# --- image folders --------------------------------------------------------------------

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
_SPECIAL_FILES = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"))


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _regular_file(path: Path) -> Path:
    """path if it is a regular file or a link to one. Anything else is refused from its
    stat, never opened: opening a FIFO blocks until a writer comes."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if not path.is_symlink():
            raise
        raise fail(path, "broken symbolic link: its target does not exist") from None
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _SPECIAL_FILES if test(mode)), "not a regular file")
        raise fail(path, f"{kind}, not an image file: refusing to read it")
    return path


def _image_files(root: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    files, labels = [], []
    for folder in _class_dirs(root):
        if folder.name not in classes:
            raise fail(folder, f"class folder not in the training classes ({', '.join(classes)})")
        found = sorted(_regular_file(p) for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        files += found
        labels += [classes.index(folder.name)] * len(found)
    if not files:
        raise fail(root, f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) in its class folders")
    return files, labels


def _with_image(image_module, path: Path, use):
    bombs = (image_module.DecompressionBombError, image_module.DecompressionBombWarning)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", image_module.DecompressionBombWarning)
            with open_regular(path) as f, image_module.open(f) as im:
                return use(im)
    except bombs as err:
        raise fail(path, f"image too large for Pillow (Image.MAX_IMAGE_PIXELS): {err}") from None
    except Exception as err:  # noqa: BLE001 - Pillow's decoders fail with assorted types
        raise fail(path, f"unreadable image ({type(err).__name__}: {err})") from None


def _read_images(image_module, files: list[Path], budget: Budget, root: Path) -> np.ndarray:
    """Pixels (N, C, H, W) /255: one channel when every image is grayscale, else RGB. The
    sizes come from the headers and are counted before any image is decoded."""
    heads = [_with_image(image_module, p, lambda im: (im.mode, im.size)) for p in files]
    for path, (mode, size) in zip(files, heads):
        if mode.startswith(("I", "F")):  # Pillow's convert to "L" or "RGB" would clip them to 0 or 255
            raise fail(path, f"a {mode} image (16 or 32 bits, or floating point a pixel): only 8-bit images are "
                             "read; convert it to 8 bits a channel")
        if size != heads[0][1]:
            raise fail(path, f"image is {dims(size)} but {files[0]} is {dims(heads[0][1])}: "
                              "all images must have one size")
    mode = "L" if all(m in ("1", "L") for m, _ in heads) else "RGB"
    (width, height), channels = heads[0][1], 1 if mode == "L" else 3
    budget.take(root, len(files) * height * width * channels, f"{len(files)} {width}x{height} {mode} images")
    x = np.empty((len(files), height, width, channels), np.uint8)
    for i, path in enumerate(files):
        x[i] = _with_image(image_module, path, lambda im: np.asarray(im.convert(mode))).reshape(height, width, -1)
    return pixels(budget, root, x.transpose(0, 3, 1, 2), 255)


def _load_images(root: Path) -> tuple[Dataset, Dataset]:
    try:
        from PIL import Image
    except ImportError:
        raise fail(root, "reading an image folder needs Pillow: pip install pillow") from None
    parts = (root / "train").is_dir() and (root / "test").is_dir()
    classes = [p.name for p in _class_dirs(root / "train" if parts else root)]
    if not parts:
        files, labels = _image_files(root, classes)
        return split(str(root), _read_images(Image, files, Budget(), root), np.array(labels), classes, root)
    (train_files, train_y), (test_files, test_y) = (_image_files(root / p, classes) for p in ("train", "test"))
    x = _read_images(Image, train_files + test_files, Budget(), root)  # together: one size, one channel count
    return (make(str(root), x[:len(train_y)], np.array(train_y), classes, root / "train"),
            make(str(root), x[len(train_y):], np.array(test_y), classes, root / "test"))


FORMATS = {  # description -> (detector, reader); tried in order, the image folder last
    "an MNIST IDX directory (train-images-idx3-ubyte[.gz], ...)":
        (lambda p: p.is_dir() and any(_idx_path(p, n) for n in _IDX_FILES), _load_idx),
    "a CIFAR-10 python directory (data_batch_1..5, test_batch, batches.meta)":
        (lambda p: p.is_dir() and any((p / n).is_file() for n in ["test_batch", *CIFAR_TRAIN]), load_cifar),
    "an .npz file with x and y":
        (lambda p: p.is_file() and p.suffix.lower() == ".npz", _load_npz),
    "an image folder (root/<class>/*.png or root/train|test/<class>/...)":
        (lambda p: p.is_dir() and bool(_class_dirs(p)), _load_images),
}
