"""The data limit (CNNDSL_MAX_DATA_BYTES) and hostile data files other than pickles: gzip
and npz bombs, object arrays, ragged labels, bad class names, FIFOs and broken links in
image folders, decompression bombs. Each is small here: the bombs only claim their size in
a header, or the limit is lowered, so nothing allocates gigabytes."""

import gzip
import io
import os
import tracemalloc
import warnings
import zipfile

import numpy as np
import pytest

from cnndsl.data import load
from cnndsl.dataset import make, read_maybe_gz
from cnndsl.errors import CnnDataError

rng = np.random.default_rng(3)
GiB, MiB = 2**30, 2**20
LIMIT = "CNNDSL_MAX_DATA_BYTES"
OVER = r"more than the [\d,]+ left of the {}-byte data limit \(set CNNDSL_MAX_DATA_BYTES to raise the limit\)"


def data_error(match: str):
    return pytest.raises(CnnDataError, match=match)


def peak_bytes(run, refused: str | None = None) -> int:
    """The most memory Python and numpy held while run() ran; with `refused`, run() must
    raise a CnnDataError matching it."""
    tracemalloc.start()
    try:
        if refused is None:
            run()
        else:
            with data_error(refused):
                run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# --- the limit itself -----------------------------------------------------------------

@pytest.mark.parametrize("value", ["8G", "0", "-5", "", "1e9"])
def test_a_bad_limit_is_named(monkeypatch, value):
    monkeypatch.setenv(LIMIT, value)
    with data_error(f"{LIMIT}={value!r} is not a positive whole number of bytes "
                    r"\(the default is 2,147,483,648; e.g. 8589934592 for 8 GiB\)"):
        load()


def test_the_limit_applies_to_the_default_set(monkeypatch):
    monkeypatch.setenv(LIMIT, "1000")
    with data_error(r"digits.csv.gz: data error: inflates to more than 1,000 bytes, the most the data limit "
                    r"leaves for it \(set CNNDSL_MAX_DATA_BYTES to raise the limit\)"):
        load()


@pytest.mark.parametrize("gz, message", [
    (True, r"big.gz: data error: inflates to more than 1,048,576 bytes"),
    (False, r"big: data error: file is 67,108,864 bytes, more than the 1,048,576 the data limit leaves for it"),
])
def test_reading_stops_at_the_limit(tmp_path, gz, message):
    """A 64 MiB file (a 64 KiB .gz) read with a 1 MiB limit: held memory stays near the
    limit plus a few 1 MiB read chunks, whatever the file inflates to."""
    path = tmp_path / ("big.gz" if gz else "big")
    if gz:
        path.write_bytes(gzip.compress(bytes(64 * MiB), 1))
    else:
        with path.open("wb") as f:
            f.truncate(64 * MiB)  # sparse: no disk space
    assert peak_bytes(lambda: read_maybe_gz(path, MiB), refused=message) < 8 * MiB


# --- MNIST IDX and gzip ---------------------------------------------------------------

def idx_header(shape, magic=0x803) -> bytes:
    return magic.to_bytes(4, "big") + np.array(shape, ">u4").tobytes()


def write_mnist(root, train_images: bytes):
    root.mkdir()
    for name, raw in (("train-images-idx3-ubyte", train_images), ("t10k-images-idx3-ubyte", idx_header((1, 2, 2)) + bytes(4)),
                      ("train-labels-idx1-ubyte", idx_header((1,), 0x801) + bytes(1)),
                      ("t10k-labels-idx1-ubyte", idx_header((1,), 0x801) + bytes(1))):
        (root / f"{name}.gz").write_bytes(gzip.compress(raw, 1))
    return root


def test_an_idx_header_is_checked_against_the_limit_before_reading(tmp_path, monkeypatch):
    """A real MNIST-sized file (47 MB inflated from 46 KB) with a 1 MiB limit."""
    root = write_mnist(tmp_path / "m", idx_header((60000, 28, 28)) + bytes(60000 * 28 * 28))
    monkeypatch.setenv(LIMIT, str(MiB))
    refused = "train-images-idx3-ubyte.gz: data error: a 60000x28x28 IDX file: 47,040,000 bytes, " + OVER.format("1,048,576")
    assert peak_bytes(lambda: load(root), refused) < MiB


def test_an_idx_header_claiming_gigabytes_is_refused_at_the_default_limit(tmp_path):
    root = write_mnist(tmp_path / "m", idx_header((3, 1024, 1024 * 1024)))
    with data_error(r"a 3x1024x1048576 IDX file: 3,221,225,472 bytes, " + OVER.format("2,147,483,648")):
        load(root)


def test_an_empty_idx_file_with_huge_sizes_is_refused(tmp_path):
    """No images, so no bytes to read; but 0 x 2^32-1 x 2^32-1 is past what numpy can shape."""
    root = write_mnist(tmp_path / "m", idx_header((0, 2**32 - 1, 2**32 - 1)))
    with data_error("IDX size 4,294,967,295 is more than the largest, 2,147,483,647"):
        load(root)


def test_a_gz_that_inflates_past_its_header_is_not_read_on(tmp_path):
    root = write_mnist(tmp_path / "m", idx_header((5, 4, 3)) + bytes(8 * MiB))
    assert peak_bytes(lambda: load(root), refused=r"wrong size: more than 76 bytes, but a 5x4x3 IDX file has 76") < MiB


# --- .npz -----------------------------------------------------------------------------

def npy_header_only(shape, dtype="<f8") -> bytes:
    """A .npy member that claims shape but holds 16 bytes: a bomb's header without its bulk."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": dtype, "fortran_order": False, "shape": shape})
    return out.getvalue() + bytes(16)


def write_npz(path, **members):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for key, value in members.items():
            if isinstance(value, bytes):
                z.writestr(f"{key}.npy", value)
            else:
                with z.open(f"{key}.npy", "w") as f:
                    np.lib.format.write_array(f, np.asarray(value), allow_pickle=True)
    return path


def test_an_npz_bomb_is_refused_from_its_header(tmp_path):
    path = write_npz(tmp_path / "d.npz", x=npy_header_only((1024 * 1024, 1024)), y=np.zeros(4, np.int64))
    refused = r"d.npz: data error: x \(1048576x1024 float64\): 8,589,934,592 bytes, " + OVER.format("2,147,483,648")
    assert peak_bytes(lambda: load(path), refused) < MiB


@pytest.mark.parametrize("members, message", [
    ({"y": np.array([1, [2, 3], 0, 1], dtype=object)}, r"y holds Python objects \(dtype object\); store numbers"),
    ({"y": [0, 1, 2, 0], "classes": np.array(5)}, r"classes must be a 1-D array of class names, found shape \(\) dtype"),
    ({"y": [0, 1, 2, 0], "classes": np.array([["a", "b", "c"]])}, r"classes must be a 1-D array of class names, found shape \(1, 3\) dtype <U1"),
    ({"y": [0, 1, 2, 0], "classes": np.array([0.5, 1.5, 2.5])}, "classes must be a 1-D array of class names, found shape .3,. dtype float64"),
    ({"y": [0, 1, 2, 0], "classes": np.array(["a", "b"])}, "classes has 2 names but the labels go up to 2"),
    ({"y": [0, 1, 2, 0], "x_test": np.zeros((1, 5, 5)), "y_test": np.array([0], dtype=object)}, "y_test holds Python"),
])
def test_hostile_npz_members(tmp_path, members, message):
    path = write_npz(tmp_path / "d.npz", **{"x": np.zeros((4, 5, 5), np.uint8), **members})
    with data_error(f"d.npz: data error: {message}"):
        load(path)


def test_npz_class_names_as_bytes(tmp_path):
    path = write_npz(tmp_path / "d.npz", x=np.zeros((5, 2, 2)), y=[0, 1, 1, 0, 1], classes=np.array([b"cat", b"dog"]))
    assert load(path)[0].classes == ("cat", "dog")


def test_npz_over_a_lowered_limit(tmp_path, monkeypatch):
    path = write_npz(tmp_path / "d.npz", x=np.zeros((10, 4, 4), np.uint8), y=np.arange(10))
    monkeypatch.setenv(LIMIT, "500")  # the members (160 + 80 bytes) fit; their float32 images do not
    with data_error(r"d.npz: data error: 10x1x4x4 float32 images: 640 bytes, " + OVER.format("500")):
        load(path)


TOO_MANY = r"is more than a network can have: at most 2,147,483,647 classes \(labels 0..2,147,483,646\)"


@pytest.mark.parametrize("y, message", [
    ([2**62, 0, 1, 0, 1], f"label 4611686018427387904 {TOO_MANY}"),  # once built 2**62 class names
    ([2**31 - 1, 0, 1, 0, 1], f"label 2147483647 {TOO_MANY}"),
    (np.array([2**64 - 1, 0, 1, 0, 1], np.uint64), f"label 18446744073709551615 {TOO_MANY}"),  # int64: -1
    ([1e300, 0, 1, 0, 1], rf"label 1e\+300 {TOO_MANY}"),  # was a cast warning, then "label -9223... is negative"
    ([-1e300, 0, 1, 0, 1], r"label -1e\+300 is negative"),
    ([3e9, 0, 1, 0, 1], f"label 3000000000 {TOO_MANY}"),
    ([np.inf, 0, 1, 0, 1], "labels must be integers, found inf"),
    ([0, np.nan, 1, 0, 1], "labels must be integers, found nan"),
    # the largest label a network can have still asks for 2**31 names: the data limit refuses them
    ([2**31 - 2, 0, 1, 0, 1], r"2,147,483,647 class names \(the labels go up to 2,147,483,646\): "
                              r"171,798,691,760 bytes, " + OVER.format("2,147,483,648")),
])
def test_huge_labels_are_refused_before_anything_is_built(tmp_path, y, message):
    path = write_npz(tmp_path / "d.npz", x=np.zeros((5, 2, 2), np.uint8), y=y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's cast warning must not come first
        assert peak_bytes(lambda: load(path), f"d.npz: data error: {message}") < MiB


def test_numbered_class_names_count_against_the_limit(tmp_path, monkeypatch):
    path = write_npz(tmp_path / "d.npz", x=np.zeros((5, 2, 2), np.uint8), y=[10**6, 0, 1, 0, 1])
    assert len(load(path)[0].classes) == 10**6 + 1  # within the default limit: "0".."1000000"
    monkeypatch.setenv(LIMIT, str(10 * MiB))
    with data_error(r"d.npz: data error: 1,000,001 class names \(the labels go up to 1,000,000\): 80,000,080 bytes, "
                    + OVER.format("10,485,760")):
        load(path)


def test_uint8_pixels_become_float32_without_a_float64_copy(tmp_path):
    x = rng.integers(0, 256, (2000, 32, 32), dtype=np.uint8)
    path = write_npz(tmp_path / "d.npz", x=x, y=np.arange(2000) % 10)
    train, test = load(path)
    held_out = np.random.default_rng(0).permutation(2000)[:400]  # the fixed split's test positions
    assert train.x.dtype == test.x.dtype == np.float32
    assert np.array_equal(test.x[:, 0], np.divide(x[held_out], 255, dtype=np.float32))
    # raw uint8 (1x), its float32 images (4x) and the split's float32 copies (4x): about 9x; a
    # float64 intermediate (x / 255.0) adds 8x more
    assert peak_bytes(lambda: load(path)) < 12 * x.nbytes


def test_ragged_labels_are_a_data_error():
    with data_error("labels must be a flat list of integers, one per example"):
        make("set", np.zeros((2, 1, 2, 2)), [1, [2, 3]], (), "set.npz")


# --- image folders --------------------------------------------------------------------

try:
    from PIL import Image
except ImportError:  # the image-folder reader is optional; its tests need Pillow to write PNGs
    Image = None
needs_pillow = pytest.mark.skipif(Image is None, reason="Pillow is not installed")


def write_images(root, per_class=5, size=(6, 4)):
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@needs_pillow
@pytest.mark.parametrize("make_special, message", [
    pytest.param(lambda p: os.mkfifo(p), "x.png: data error: a FIFO, not an image file: refusing to read it",
                 marks=pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")),
    (lambda p: p.symlink_to(p.parent / "gone.png"), "x.png: data error: broken symbolic link: its target does not exist"),
    (lambda p: p.mkdir(), "x.png: data error: a directory, not an image file"),
])
def test_special_files_in_an_image_folder_are_refused_unopened(tmp_path, make_special, message):
    root = write_images(tmp_path / "pets")
    make_special(root / "cat" / "x.png")
    with data_error(message):
        load(root)


@needs_pillow
def test_image_sizes_are_checked_from_the_headers(tmp_path, monkeypatch):
    root = write_images(tmp_path / "pets")
    monkeypatch.setenv(LIMIT, "200")
    with data_error(r"pets: data error: 10 6x4 L images: 240 bytes, " + OVER.format("200")):
        load(root)


@needs_pillow
@pytest.mark.parametrize("max_pixels", [10, 20])  # 6x4 = 24 pixels: over 2x the limit (an error), over 1x (a warning)
def test_pillow_decompression_bombs_are_refused(tmp_path, monkeypatch, max_pixels):
    root = write_images(tmp_path / "pets")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", max_pixels)
    with data_error(r"0.png: data error: image too large for Pillow \(Image.MAX_IMAGE_PIXELS\): Image size \(24 pixels\)"):
        load(root)
