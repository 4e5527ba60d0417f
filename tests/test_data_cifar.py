"""CIFAR-10 python batches and the strict pickle reader (cnndsl/pickles.py): the layouts real
files have (Python 2, protocols 2-5, numpy 1 and 2 spellings) and crafted hostile files,
written here opcode by opcode, each refused with a CnnDataError naming the file, the opcode
and its offset, without allocating what the file asks for."""

import os
import pickle
import pickletools
import struct
import tracemalloc

import numpy as np
import pytest

from cnndsl.data import load
from cnndsl.errors import CnnDataError

rng = np.random.default_rng(2)
BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
MiB = 2**20


def data_error(match: str):
    return pytest.raises(CnnDataError, match=match)


def write_cifar(root, protocol=2, n=3, dumps=pickle.dumps):
    root.mkdir()
    for name in BATCHES:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [i % 10 for i in range(n)]}
        (root / name).write_bytes(dumps(batch, protocol=protocol))
    meta = {b"label_names": [b"airplane", b"automobile", *(f"c{i}".encode() for i in range(8))]}
    (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return root


def with_batch(root, content: bytes, name="data_batch_1"):
    (root / name).write_bytes(content)
    return root


# --- opcode spelling ------------------------------------------------------------------

def ops(value) -> bytes:
    """The opcodes that push value (protocol 3, memo-free), for splicing into a crafted pickle."""
    whole = pickletools.optimize(pickle.dumps(value, protocol=3))
    assert whole[:2] == b"\x80\x03" and whole[-1:] == b"." and b"h" not in whole[2:3]
    return whole[2:-1]


def text(s: str) -> bytes:  # BINUNICODE
    return b"X" + struct.pack("<I", len(s.encode())) + s.encode()


def py2str(b: bytes) -> bytes:  # a Python 2 str: SHORT_BINSTRING or BINSTRING
    return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b


def batch(*items: bytes, proto=3) -> bytes:
    """A pickled dict from key and value opcodes."""
    return b"\x80" + bytes([proto]) + b"}(" + b"".join(items) + b"u."


def array(shape: bytes, raw: bytes, dtype="u1", byteorder="|") -> bytes:
    """numpy's protocol-2 array idiom, as Python 2 wrote it: _reconstruct(ndarray, (0,), 'b')
    + BUILD (1, shape, dtype('u1', 0, 1) + BUILD (3, '|', ...), False, raw)."""
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + py2str(b"b") + b"\x87R(K\x01"
            + shape + b"cnumpy\ndtype\n" + py2str(dtype.encode()) + b"K\x00K\x01\x87R(K\x03" + py2str(byteorder.encode())
            + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89" + raw + b"tb")


TWO_ROWS = b"K\x02M\x00\x0c\x86"  # the shape (2, 3072)
VALID = (ops(b"data"), ops(np.zeros((2, 3072), np.uint8)), ops(b"labels"), ops([0, 1]))


def test_the_crafting_helpers_spell_real_pickles():
    raw = np.arange(6144, dtype=np.uint8)
    content = batch(py2str(b"data"), array(TWO_ROWS, py2str(raw.tobytes())), py2str(b"labels"), ops([3, 7]))
    ref = pickle.loads(content, encoding="bytes")
    assert np.array_equal(ref[b"data"], raw.reshape(2, 3072)) and ref[b"labels"] == [3, 7]


# --- the layouts real files have ------------------------------------------------------

@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_cifar_batches(tmp_path, protocol):
    train, test = load(write_cifar(tmp_path / "cifar-10-batches-py", protocol))
    assert train.x.shape == (15, 3, 32, 32) and test.x.shape == (3, 3, 32, 32)
    assert train.classes[:2] == ("airplane", "automobile") and len(train.classes) == 10
    raw = pickle.loads((tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes())
    assert np.array_equal(test.x.reshape(3, -1), np.divide(raw[b"data"], 255, dtype=np.float32))
    assert test.y.tolist() == [0, 1, 2] and test.x.dtype == np.float32


def numpy1_dumps(value, protocol):  # numpy 1.x names its module numpy.core
    return pickle.dumps(value, protocol=protocol).replace(b"numpy._core.", b"numpy.core.")


@pytest.mark.parametrize("protocol", [2, 3])
def test_numpy1_spelling(tmp_path, protocol):
    train, _ = load(write_cifar(tmp_path / "c", protocol, dumps=numpy1_dumps))
    assert b"numpy.core.multiarray" in (tmp_path / "c" / "test_batch").read_bytes() and len(train) == 15


def test_python2_batch(tmp_path):
    """The official files: Python 2 cPickle, protocol 2, str keys and pixel bytes, memo PUTs."""
    raw = rng.integers(0, 256, 2 * 3072, dtype=np.uint8)
    content = (b"\x80\x02}q\x01(" + py2str(b"data") + b"q\x02" + array(TWO_ROWS, py2str(raw.tobytes()))
               + py2str(b"labels") + b"q\x03](K\x03K\x07e" + py2str(b"batch_label") + py2str(b"training batch 1 of 5")
               + b"u.")
    root = write_cifar(tmp_path / "c")
    for name in BATCHES:
        with_batch(root, content, name)
    train, test = load(root)
    assert np.array_equal(np.round(test.x.reshape(-1) * 255), raw) and test.y.tolist() == [3, 7] and len(train) == 10


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("data, labels", [
    (np.asfortranarray(rng.integers(0, 256, (2, 3072), dtype=np.uint8)), np.array([4, 9], ">u2")),
    (rng.integers(0, 256, (2, 3072), dtype=np.uint8), list(np.array([4, 9], "<i8"))),  # numpy scalars
    (rng.integers(0, 256, (2, 3072), dtype=np.uint8).tobytes(), (4, 9)),  # raw bytes, a tuple
])
def test_numpy_forms_of_data_and_labels(tmp_path, protocol, data, labels):
    root = with_batch(write_cifar(tmp_path / "c"), pickle.dumps({"data": data, "labels": labels}, protocol), "test_batch")
    _, test = load(root)
    pixels = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else data.ravel()
    assert np.array_equal(np.round(test.x.reshape(-1) * 255), pixels) and test.y.tolist() == [4, 9]


# --- hostile files --------------------------------------------------------------------

class Exploit:
    def __reduce__(self):
        return os.system, ("echo owned > owned.txt",)


def test_a_malicious_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = with_batch(write_cifar(tmp_path / "c"), pickle.dumps({b"data": Exploit(), b"labels": []}), "data_batch_2")
    with data_error(r"data_batch_2: data error: refusing to unpickle (posix|nt|os)\.system: .* \(opcode (STACK_)?GLOBAL at byte"):
        load(root)
    assert not (tmp_path / "owned.txt").exists()


DTYPE_BUILD = (b"\x80\x02cnumpy\ndtype\n" + text("u1") + b"\x89\x88\x87R(K\x03" + text("|")
               + b"NJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb.")  # issue item 2: SIGSEGV in numpy's setstate
HUGE = b"cnumpy\nndarray\nM\x00 M\x00\x0c\x86\x85R"  # numpy.ndarray((8192, 3072)): 201 MB of float64


@pytest.mark.parametrize("content, message", [
    (DTYPE_BUILD, r"data_batch_1: data error: expected a pickled dict, found numpy dtype"),
    (batch(ops(b"data"), DTYPE_BUILD[2:-1], *VALID[2:]), r"CIFAR data must be \(N, 3072\) uint8 \(an array of dtype u1, found a numpy dtype\)"),
    (batch(ops(b"data"), HUGE, *VALID[2:]), r"refusing REDUCE of numpy.ndarray: .* \(opcode REDUCE at byte 33\)"),
    (batch(*VALID[:3], ops([1, [2, 3]])), "CIFAR labels must be a flat list of integers; label 1 is a list"),
    (batch(*VALID[:3], ops([0, True])), "label 1 is a bool"),
    (batch(*VALID[:3], ops([0, 10])), r"label 10 \(example 1\) is outside 0..9: batches.meta names 10 classes"),
    (batch(*VALID[:3], ops([0, 1, 2])), "data_batch_1: data error: 2 images but 3 labels"),
    (batch(*VALID[:3], ops(np.zeros((2, 1), np.int64))), r"labels must be a flat list .* shape \(2, 1\)"),
    (batch(*VALID, ops(b"\xff\xfe"), b"N"), r"dict key b'\\xff\\xfe' is not UTF-8 text"),
    (batch(*VALID, b"]N"), r"refusing a dict key that is a list \(opcode SETITEMS at byte \d+\)"),
    (batch(ops(b"data"), ops(np.zeros((2, 3072))), *VALID[2:]), "dtype u1, found a f8 array"),
    (batch(ops(b"data"), array(TWO_ROWS, ops(b"x" * 10)), *VALID[2:]),
     "a 2x3072 uint8 array with its 6,144 bytes, found 10 bytes"),
    (batch(ops(b"data"), ops(b"x" * 10), *VALID[2:]), "CIFAR data as raw bytes must be N x 3072 long, found 10 bytes"),
    (batch(*VALID[:2], ops(b"labels"), array(b"\x8a\x08" + (2**62).to_bytes(8, "little") + b"K\x00\x86", ops(b""), "i8")),
     "CIFAR labels must be an array with a shape of at most 8 sizes from 0 to 2,147,483,647"),
    (batch(ops(b"data"), array(TWO_ROWS, b"]"), *VALID[2:]), "array with its 6,144 bytes, found list"),
    (b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93.", r"refusing to unpickle builtins.eval: .*STACK_GLOBAL at byte 18"),
    (b"\x80\x02c_codecs\nencode\n" + text("abc") + text("utf-8") + b"\x86R.", "_codecs.encode other than .* latin1"),
    (b"\x80\x02c_codecs\nencode\n" + text("\u0394") + text("latin1") + b"\x86R.", "a character above 255"),
    (b"\x80\x02N(" + text("x") + b"tb.", r"refusing BUILD of a NoneType with a tuple state \(opcode BUILD"),
    (b"\x80\x02NQ.", r"refusing an unsupported pickle opcode \(opcode BINPERSID at byte 3\)"),
    (b"\x80\x02\x82\x01.", r"\(opcode EXT1 at byte 2\)"),
    (b"\x80\x02cnumpy\nndarray\n)\x81.", r"\(opcode NEWOBJ at byte 18\)"),
    (b"\x80\x05\x97.", r"\(opcode NEXT_BUFFER at byte 2\)"),
    (b"\x80\x02I1\n.", r"\(opcode INT at byte 2\)"),
    (b"\x80\x01}.", "unsupported pickle protocol 1"),
    (b"\x80\x02R.", r"stack underflow \(opcode REDUCE at byte 2\)"),
    (b"\x80\x02(\x85.", r"stack underflow \(opcode TUPLE1 at byte 3\)"),
    (b"\x80\x02(.", r"0 values and 1 marks left at STOP \(opcode STOP at byte 3\)"),
    (b"\x80\x02}e.", r"no MARK to close \(opcode APPENDS at byte 3\)"),
    (b"\x80\x02h\x05.", r"memo entry 5 was never stored \(opcode BINGET at byte 2\)"),
    (b"\x80\x02}.junk", r"4 bytes after STOP"),
    (b"\x80\x02\x8e" + (2**62).to_bytes(8, "little") + b".", r"truncated, 4,611,686,018,427,387,904 bytes needed but 1"),
    (b"\x80\x02X\x02\x00\x00\x00\xff\xfe.", "a string that is not UTF-8"),
    (b"\x80\x02cnumpy\ndtype" + b"x" * 300, "a GLOBAL name without a newline in 256 bytes"),
])
def test_crafted_batches_are_refused(tmp_path, content, message):
    root = with_batch(write_cifar(tmp_path / "c"), content)
    with data_error(message):
        load(root)


M61 = 2**61 - 1  # Python hashes an int modulo this prime: every multiple of it hashes to 0


@pytest.mark.parametrize("key, kind", [(M61, "int"), (2 * M61, "int"), (float(M61), "float"), (None, "NoneType"),
                                       (True, "bool")])
def test_dict_keys_are_only_strings(tmp_path, key, kind):
    """Ints (and floats, which hash as ints) whose hashes collide make a dict of N of them
    take N**2 time to build; a CIFAR batch's keys are all names."""
    root = with_batch(write_cifar(tmp_path / "c"), batch(*VALID, ops(key), b"N"))
    with data_error(rf"refusing a dict key that is a {kind} \(opcode SETITEMS at byte \d+\)"):
        load(root)


def test_a_hash_flood_is_refused_at_once(tmp_path):
    """The review's 519 KB batch: 50,000 int keys (i + 1) * M61, all hashing to 0 (28 s)."""
    keys = b"".join(ops((i + 1) * M61) + b"N" for i in range(50_000))
    root = with_batch(write_cifar(tmp_path / "c"), batch(*VALID, keys))
    with data_error(r"data_batch_1: data error: refusing an integer of 9 bytes: a CIFAR batch's numbers fit in 8 "
                    r"\(opcode LONG1 at byte \d+\)"):
        load(root)


@pytest.mark.parametrize("label, shown", [
    (b"\x8b" + struct.pack("<i", 5000) + b"\x01" * 5000, "5,000 bytes"),  # 12,000 digits: str() refused them
    (ops(2**63), "9 bytes"),
    (ops(-(2**63) - 1), "9 bytes"),
], ids=["5000-byte LONG4", "2**63", "-2**63-1"])
def test_integers_longer_than_8_bytes_are_refused(tmp_path, label, shown):
    root = with_batch(write_cifar(tmp_path / "c"), batch(ops(b"data"), ops(np.zeros((1, 3072), np.uint8)),
                                                         ops(b"labels"), b"](" + label + b"e"))
    with data_error(rf"data_batch_1: data error: refusing an integer of {shown}: a CIFAR batch's numbers fit in 8 "
                    r"\(opcode LONG[14] at byte \d+\)"):
        load(root)


def test_8_byte_integers_are_read(tmp_path):
    root = with_batch(write_cifar(tmp_path / "c"), batch(*VALID, ops(b"extra"), ops([2**63 - 1, -(2**63)])))
    assert len(load(root)[0]) == 14


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


def test_the_ndarray_call_allocates_nothing(tmp_path):
    root = with_batch(write_cifar(tmp_path / "c"), batch(ops(b"data"), HUGE, *VALID[2:]))
    assert peak_bytes(lambda: load(root), refused="refusing REDUCE of numpy.ndarray") < 10 * MiB


def shared_arrays(copies: int) -> bytes:
    """A 1 MiB buffer stored once (memo 1) and BUILT into `copies` big-endian 1024x512
    uint16 arrays: numpy's setstate copies (and byte-swaps) a non-native buffer each time."""
    raw = b"B" + struct.pack("<I", MiB) + bytes(MiB)
    shape = b"M\x00\x04M\x00\x02\x86"
    return b"](" + array(shape, raw + b"q\x01", "u2", ">") + array(shape, b"h\x01", "u2", ">") * (copies - 1) + b"e"


def shared_strings(copies: int) -> bytes:
    """_codecs.encode of one 1 MiB string (memo 2), `copies` times: a fresh bytes each time."""
    one = b"h\x02h\x03" + text("latin1") + b"\x86R"
    return b"](c_codecs\nencode\nq\x02" + text("a" * MiB) + b"q\x03" + text("latin1") + b"\x86R" + one * (copies - 1) + b"e"


def test_shared_references_do_not_multiply_memory(tmp_path):
    """Issue item 2: a 1 MiB pickle whose memo GETs ask numpy for 500 copies of one buffer
    (500 MiB). The strict reader shares the buffer; nothing is copied."""
    root = with_batch(write_cifar(tmp_path / "c"), batch(*VALID, ops(b"junk"), shared_arrays(500)))
    assert (root / "data_batch_1").stat().st_size < 2 * MiB
    assert peak_bytes(lambda: load(root)) < 16 * MiB


def test_shared_string_copies_count_against_the_limit(tmp_path, monkeypatch):
    """The one copying idiom, _codecs.encode of a shared string, is counted per copy: 2 GiB
    asked from a 1 MiB file is refused at the (lowered) limit, before it is allocated."""
    monkeypatch.setenv("CNNDSL_MAX_DATA_BYTES", str(16 * MiB))
    root = with_batch(write_cifar(tmp_path / "c"), batch(*VALID, ops(b"junk"), shared_strings(2048)))
    refused = (r"data_batch_1: data error: the pickle builds more than [\d,]+ bytes, the most the data limit "
               r"leaves for it \(set CNNDSL_MAX_DATA_BYTES to raise the limit\) \(opcode REDUCE at byte \d+\)")
    assert peak_bytes(lambda: load(root), refused) < 40 * MiB


@pytest.mark.parametrize("limit, message", [
    (5_000, r"data_batch_1: data error: file is [\d,]+ bytes, more than the [\d,]+ the data limit leaves for it"),
    (200_000, r"15x3x32x32 float32 images: 184,320 bytes, more than the [\d,]+ left of the 200,000-byte data limit"),
])
def test_cifar_over_the_data_limit(tmp_path, monkeypatch, limit, message):
    root = write_cifar(tmp_path / "c", protocol=3)
    monkeypatch.setenv("CNNDSL_MAX_DATA_BYTES", str(limit))
    with data_error(message):
        load(root)


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:100]), r"test_batch: data error: corrupt pickle: truncated"),
    (lambda p: p.write_bytes(pickle.dumps([1, 2])), "expected a pickled dict, found list"),
    (lambda p: p.write_bytes(pickle.dumps({b"data": np.zeros((2, 5), np.uint8), b"labels": [0, 1]})),
     r"CIFAR data must be \(N, 3072\) uint8, found \(2, 5\) uint8"),
    (lambda p: p.write_bytes(pickle.dumps({b"labels": [0, 1]})), "CIFAR batch without 'data' and 'labels'"),
    (lambda p: p.unlink(), "CIFAR-10 directory without test_batch"),
    (lambda p: (p.parent / "batches.meta").write_bytes(pickle.dumps({b"label_names": [1, 2]})),
     "batches.meta: data error: CIFAR meta file without a label_names list of names"),
])
def test_corrupt_cifar_batches(tmp_path, damage, message):
    root = write_cifar(tmp_path / "c")
    damage(root / "test_batch")
    with data_error(message):
        load(root)
