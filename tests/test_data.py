"""Tests for cnndsl.data: the bundled default set and its fixed split, each file format
(written here, small, in tmp_path) and every error message. CIFAR batches and the strict
pickle reader are in test_data_cifar.py, the data limit and hostile files in
test_data_limits.py."""

import gzip
import re
import sys

import numpy as np
import pytest

from cnndsl.data import DEFAULT_NAME, Dataset, check, load
from cnndsl.errors import CnnDataError, CnnError

rng = np.random.default_rng(1)


def data_error(match: str):
    return pytest.raises(CnnDataError, match=match)


# --- the default set ------------------------------------------------------------------

def test_default_set_is_the_bundled_digits_with_a_fixed_split():
    train, test = load()
    assert (len(train), len(test)) == (1438, 359)
    for ds in (train, test):
        assert ds.name == DEFAULT_NAME and ds.classes == tuple("0123456789")
        assert ds.x.shape[1:] == (1, 8, 8) and ds.x.dtype == np.float32 and ds.y.dtype == np.int64
        assert 0 <= ds.x.min() and ds.x.max() == 1 and set(ds.y) == set(range(10))
        check(ds, (1, 8, 8), 10)
    again = load(None)
    assert all(np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y) for a, b in zip((train, test), again))
    assert np.array_equal(train.x[:3] * 16, np.round(train.x[:3] * 16))  # pixel counts 0..16


def test_the_held_out_split_is_disjoint_and_covers_everything(tmp_path):
    ids = np.arange(50, dtype=np.float32)  # pixel value = example id
    np.savez(tmp_path / "d.npz", x=np.broadcast_to(ids[:, None, None], (50, 2, 2)).copy(), y=np.arange(50) % 3)
    train, test = load(tmp_path / "d.npz")
    seen_train, seen_test = set(train.x[:, 0, 0, 0]), set(test.x[:, 0, 0, 0])
    assert (len(train), len(test)) == (40, 10) and not seen_train & seen_test
    assert seen_train | seen_test == set(ids)
    assert np.array_equal(load(tmp_path / "d.npz")[1].x, test.x)  # the same split every time


# --- MNIST IDX ------------------------------------------------------------------------

def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return magic.to_bytes(4, "big") + np.array(array.shape, ">u4").tobytes() + array.astype(np.uint8).tobytes()


def write_idx(root, n_train=5, n_test=2, gz=False, dotted=False, skip=()):
    root.mkdir(exist_ok=True)
    parts = {"train": n_train, "t10k": n_test}
    for part, n in parts.items():
        for kind, magic, array in (("images-idx3", 0x803, rng.integers(0, 256, (n, 4, 3))),
                                   ("labels-idx1", 0x801, np.arange(n) % 10)):
            name = f"{part}-{kind}-ubyte".replace("-idx", ".idx" if dotted else "-idx")
            if name in skip:
                continue
            raw = idx_bytes(array, magic)
            (root / (name + ".gz" if gz else name)).write_bytes(gzip.compress(raw) if gz else raw)
    return root


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dotted", [False, True])
def test_mnist_idx_plain_and_gz(tmp_path, gz, dotted):
    train, test = load(write_idx(tmp_path / "mnist", gz=gz, dotted=dotted))
    assert train.x.shape == (5, 1, 4, 3) and test.x.shape == (2, 1, 4, 3)
    assert train.y.tolist() == [0, 1, 2, 3, 4] and train.classes == tuple("0123456789")
    assert train.x.max() <= 1 and train.name == str(tmp_path / "mnist")


def corrupt_magic(path):
    path.write_bytes(b"\x00\x00\x08\x04" + path.read_bytes()[4:])


def truncate(path):
    path.write_bytes(path.read_bytes()[:-3])


@pytest.mark.parametrize("gz, damage, message", [
    (False, corrupt_magic, r"train-images-idx3-ubyte: data error: bad IDX magic 0x00000804, expected 0x00000803"),
    (False, truncate, r"wrong size: \d+ bytes, but a 5x4x3 IDX file has 76"),
    (False, lambda p: p.write_bytes(b"\x00\x00"), "truncated IDX file: 2 bytes"),
    (True, truncate, r"train-images-idx3-ubyte.gz: data error: truncated gzip file"),
    (True, lambda p: p.write_bytes(b"not gzip at all"), "not a valid gzip file"),
])
def test_corrupt_idx_files_are_named(tmp_path, gz, damage, message):
    root = write_idx(tmp_path / "m", gz=gz)
    damage(root / ("train-images-idx3-ubyte" + (".gz" if gz else "")))
    with data_error(message):
        load(root)


def test_idx_missing_file_and_mismatched_counts(tmp_path):
    with data_error("without t10k-labels-idx1-ubyte"):
        load(write_idx(tmp_path / "a", skip={"t10k-labels-idx1-ubyte"}))
    root = write_idx(tmp_path / "b")
    (root / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(4), 0x801))
    with data_error("5 images but 4 labels"):
        load(root)


# --- .npz -----------------------------------------------------------------------------

@pytest.mark.parametrize("shape, expected", [
    ((10, 5, 6), (1, 5, 6)), ((10, 3, 5, 6), (3, 5, 6)), ((10, 5, 6, 3), (3, 5, 6)), ((10, 7, 7, 1), (1, 7, 7)),
])
def test_npz_layouts(tmp_path, shape, expected):
    x = rng.integers(0, 256, shape, dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(10) % 4)
    train, test = load(tmp_path / "d.npz")
    assert train.x.shape[1:] == expected and (len(train), len(test)) == (8, 2)
    assert train.classes == ("0", "1", "2", "3") and 0 <= train.x.min() and train.x.max() <= 1


def test_npz_with_test_arrays_and_names_keeps_floats(tmp_path):
    x, x_test = rng.random((6, 1, 4, 4)) * 2, rng.random((3, 1, 4, 4))
    np.savez(tmp_path / "d.npz", x=x, y=[0, 1, 2, 0, 1, 2], x_test=x_test, y_test=np.array([2.0, 1.0, 0.0]),
             classes=np.array(["cat", "dog", "eel"]))
    train, test = load(str(tmp_path / "d.npz"))
    assert np.allclose(train.x, x) and np.allclose(test.x, x_test) and test.y.tolist() == [2, 1, 0]
    assert train.classes == test.classes == ("cat", "dog", "eel") and test.y.dtype == np.int64


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((4, 2, 2))}, r"d.npz: data error: .npz without y \(it has: x\)"),
    ({"x": np.zeros((4, 2, 2)), "y": np.zeros(3)}, "4 images but 3 labels"),
    ({"x": np.zeros((4, 2, 2)), "y": [0, 1.5, 0, 1]}, "labels must be integers, found 1.5"),
    ({"x": np.zeros((4, 2, 2)), "y": np.array(["a", "b", "c", "d"])}, "labels must be integers, found dtype <U1"),
    ({"x": np.zeros((4, 2, 2)), "y": [0, -1, 0, 1]}, "label -1 is negative"),
    ({"x": np.zeros((0, 2, 2)), "y": np.zeros(0, int)}, "no examples"),
    ({"x": np.zeros((2, 2, 2)), "y": [0, 1]}, "2 examples are too few to hold out 20%"),
    ({"x": np.zeros((4, 2)), "y": [0, 1, 0, 1]}, r"x has shape \(4, 2\); expected"),
    ({"x": np.zeros((4, 2, 2), np.int64), "y": [0, 1, 0, 1]}, "x has dtype int64; store uint8"),
    ({"x": np.zeros((4, 2, 2)), "y": [0, 1, 0, 1], "x_test": np.zeros((1, 2, 2))}, "only one of x_test and y_test"),
])
def test_bad_npz_contents(tmp_path, arrays, message):
    np.savez(tmp_path / "d.npz", **arrays)
    with data_error(message):
        load(tmp_path / "d.npz")


@pytest.mark.parametrize("content, message", [
    (b"garbage, not a zip", "not a readable .npz archive"),
    (None, r"a single .npy array, not an .npz archive"),
])
def test_unreadable_npz(tmp_path, content, message):
    path = tmp_path / "d.npz"
    if content is None:
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    else:
        path.write_bytes(content)
    with data_error(message):
        load(path)


def test_truncated_npz(tmp_path):
    np.savez_compressed(tmp_path / "d.npz", x=rng.random((40, 8, 8)), y=np.arange(40) % 2)
    truncate(tmp_path / "d.npz")
    with data_error("d.npz: data error: (not a readable .npz archive|corrupt .npz member)"):
        load(tmp_path / "d.npz")


# --- image folders --------------------------------------------------------------------

try:
    from PIL import Image
except ImportError:  # the image-folder reader is optional; its tests need Pillow to write PNGs
    Image = None
needs_pillow = pytest.mark.skipif(Image is None, reason="Pillow is not installed")


def write_images(root, classes=("cat", "dog"), per_class=5, size=(6, 4), mode="L"):
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).convert(mode).save(root / name / f"{i}.png")
    return root


@needs_pillow
def test_image_folder_grayscale_with_split(tmp_path):
    train, test = load(write_images(tmp_path / "pets"))
    assert train.x.shape == (8, 1, 4, 6) and test.x.shape == (2, 1, 4, 6)
    assert train.classes == ("cat", "dog") and set(np.concatenate([train.y, test.y])) == {0, 1}
    with Image.open(tmp_path / "pets" / "cat" / "0.png") as im:
        first = np.asarray(im) / 255
    assert any(np.allclose(x[0], first) for x in np.concatenate([train.x, test.x]))


@needs_pillow
def test_image_folder_train_test_mixed_modes_become_rgb(tmp_path):
    write_images(tmp_path / "r" / "train", mode="RGB", per_class=2)
    write_images(tmp_path / "r" / "test", classes=("dog",), per_class=1, mode="L")
    train, test = load(tmp_path / "r")
    assert train.x.shape == (4, 3, 4, 6) and test.x.shape == (1, 3, 4, 6) and test.y.tolist() == [1]


@needs_pillow
def test_image_folder_errors(tmp_path):
    root = write_images(tmp_path / "a", per_class=2)
    Image.new("L", (5, 5)).save(root / "dog" / "9.png")
    with data_error(r"9.png: data error: image is 5x5 but \S+0.png is 6x4"):
        load(root)
    (root / "dog" / "9.png").write_bytes(b"not a png")
    with data_error("9.png: data error: unreadable image"):
        load(root)
    write_images(tmp_path / "b" / "train", classes=("cat",), per_class=1)
    write_images(tmp_path / "b" / "test", classes=("cow",), per_class=1)
    with data_error("class folder not in the training classes"):
        load(tmp_path / "b")
    (tmp_path / "c" / "empty").mkdir(parents=True)
    with data_error("no images"):
        load(tmp_path / "c")


@needs_pillow
@pytest.mark.parametrize(("mode", "pixels"), [("I;16", np.full((4, 6), 40000, np.uint16)),
                                              ("I", np.full((4, 6), -5, np.int32)),
                                              ("F", np.full((4, 6), 0.5, np.float32))])
def test_an_image_of_more_than_8_bits_is_refused_not_clipped(tmp_path, mode, pixels):
    """Pillow converts a 16-bit, 32-bit or float image to 8 bits by clipping (every pixel 255 or 0):
    such an image is named instead."""
    root = write_images(tmp_path / "a", per_class=2)
    image = Image.fromarray(pixels)
    assert image.mode == mode
    image.save(root / "dog" / "9.tif")
    with data_error(rf"9.tif: data error: a {re.escape(mode)} image \(16 or 32 bits, or floating point a pixel\): "
                    "only 8-bit images are read"):
        load(root)


@needs_pillow
def test_image_folder_without_pillow(tmp_path, monkeypatch):
    root = write_images(tmp_path / "a", per_class=2)
    monkeypatch.setitem(sys.modules, "PIL", None)
    with data_error("needs Pillow: pip install pillow"):
        load(root)


# --- load's own errors and check ------------------------------------------------------

def test_missing_path_and_unknown_format(tmp_path):
    with data_error("nowhere: data error: no such file or directory"):
        load(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CnnDataError) as info:
        load(tmp_path / "notes.txt")
    assert "unknown data format; supported: an MNIST IDX directory" in str(info.value)
    assert ".npz" in str(info.value) and "image folder" in str(info.value) and "CIFAR-10" in str(info.value)
    assert isinstance(info.value, (CnnError, ValueError)) and info.value.render().count("\n") == 0


def small(x=None, y=None) -> Dataset:
    x = np.zeros((4, 1, 28, 28), np.float32) if x is None else x
    return Dataset("small.npz", x, np.array([0, 1, 2, 3]) if y is None else y, tuple("0123"))


@pytest.mark.parametrize("ds, message", [
    (small(), r"small.npz: data error: train: images are 1x28x28 but the network expects 1x8x8"),
    (small(x=np.zeros((4, 1, 8, 8), np.float32), y=np.array([0, 1, 12, 3])),
     "label 12 is out of range: the network has 4 classes"),
    (small(x=np.zeros((4, 1, 8, 8), np.float32), y=np.array([0, -2, 1, 1])), "label -2 is out of range"),
    (Dataset("e", np.zeros((0, 1, 8, 8), np.float32), np.zeros(0, np.int64), ()), "train: is empty"),
    (small(x=np.where(np.arange(256).reshape(4, 1, 8, 8) == 70, np.nan, 0).astype(np.float32)),
     r"1 pixel values are NaN or inf \(first in example 1\)"),
])
def test_check_names_what_does_not_fit(ds, message):
    with data_error(message):
        check(ds, (1, 8, 8), 4, where="train")


def test_check_accepts_a_fitting_set():
    check(small(x=np.ones((4, 1, 8, 8), np.float32)), (1, 8, 8), 4)
