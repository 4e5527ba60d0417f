"""archive.py: a torch.save archive is checked before torch.load reads it. The pickle's
nesting, found from its opcodes alone, matches the nesting of what it builds; a file that
nests deeper than the bound is refused as a weights error, before torch.load could crash the
interpreter hashing a deep tuple."""

import io
import pickle
import random
import struct
import zipfile

import pytest
import torch

from cnndsl.archive import MAX_PICKLE_DEPTH, pickle_depth
from cnndsl.errors import CnnWeightsError
from cnndsl.weights import read


def _depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max((max(_depth(k), _depth(v)) for k, v in value.items()), default=0)
    if isinstance(value, (list, tuple)):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _random_value(rng: random.Random, depth: int, shared: list):
    """Nested dicts, lists and tuples with scalars, some values shared (pickle's memo)."""
    kind = rng.choice(["scalar", "list", "tuple", "dict", "shared"] if depth else ["scalar"])
    if kind == "shared" and shared:
        return rng.choice(shared)
    if kind in ("scalar", "shared"):
        return rng.choice([0, 1.5, "s", None, True, 2**70])  # (not bytes: protocols 0-2 REDUCE them)
    items = [_random_value(rng, depth - 1, shared) for _ in range(rng.randint(0, 3))]
    value = {(i, str(i)): v for i, v in enumerate(items)} if kind == "dict" else tuple(items) if kind == "tuple" else items
    shared.append(value)
    return value


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_the_depth_from_the_opcodes_is_the_depth_built(protocol):
    rng = random.Random(protocol)
    for _ in range(200):
        value = _random_value(rng, rng.randint(0, 7), [])
        assert pickle_depth(pickle.dumps(value, protocol=protocol)) == _depth(value), value


def test_a_container_filled_after_it_was_shared_counts_its_items():
    """pickle writes a list before its items and shares it by memo: a chain of lists built by
    appending to ones written earlier is as deep as it ends up."""
    head = cur = []
    for _ in range(100):
        nxt = []
        cur.append(nxt)
        cur = nxt
    assert pickle_depth(pickle.dumps(head), stop=10**6) == 101


def _archive_with_pickle(tmp_path, data: bytes):
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    path = tmp_path / "hostile.pt"
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, data if info.filename.endswith("/data.pkl") else src.read(info))
    return path


@pytest.mark.parametrize("depth", [MAX_PICKLE_DEPTH + 1, 3_000_000])
def test_a_deeply_nested_tuple_key_is_refused_before_it_is_loaded(tmp_path, depth):
    """{((...((),)...),): 0}: torch.load would hash the key, and CPython's tuple hash recurses
    with no RecursionError: a crash, not an error, at a depth of millions."""
    data = b"\x80\x02}" + b")" + b"\x85" * depth + b"K\x00s."  # PROTO 2, {}, (), TUPLE1 x depth, 0, SETITEM
    path = _archive_with_pickle(tmp_path, data)
    with pytest.raises(CnnWeightsError, match=rf"hostile.pt is not a readable torch file: its pickle nests containers "
                                              rf"{MAX_PICKLE_DEPTH + 1} deep, more than {MAX_PICKLE_DEPTH}"):
        read(path)


def test_what_torch_save_writes_passes(tmp_path):
    state = {"model": {"a.weight": torch.zeros(3, 3)}, "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}},
                                                                     "param_groups": [{"betas": (0.9, 0.999)}]}}
    torch.save(state, tmp_path / "ok.pt")
    assert torch.equal(read(tmp_path / "ok.pt").tensors["a.weight"], torch.zeros(3, 3))


DEEP = b"\x80\x02}" + b")" + b"\x85" * 100_000 + b"K\x00s."  # {((...(),)...): 0}, 100,000 deep


def _rewritten(tmp_path, name: str, pkl: bytes, rename=lambda n: n):
    """A torch.save archive rewritten by zipfile (no zip64), its data.pkl replaced and its names renamed."""
    buf, out = io.BytesIO(), io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(rename(info.filename), pkl if info.filename.endswith("/data.pkl") else src.read(info))
    (tmp_path / name).write_bytes(out.getvalue())
    return tmp_path / name


def _with_gap(path):
    """Bytes slipped in before the central directory, the end record left as it was: zipfile
    forgives the gap (it reads the directory where it finds it), torch's reader follows the record."""
    data = path.read_bytes()
    at = struct.unpack("<I", data[data.rindex(b"PK\x05\x06") + 16:][:4])[0]
    path.write_bytes(data[:at] + b"\0" * 64 + data[at:])
    return path


def _prefixed(path, data: bytes):
    path.write_bytes(data + path.read_bytes())
    return path


@pytest.mark.parametrize("build, message", [
    (lambda t: _rewritten(t, "upper.pt", DEEP, lambda n: n.replace("data.pkl", "data.PKL")),
     "its pickle nests containers 65 deep"),  # (torch's reader finds data.pkl ignoring case)
    (lambda t: _with_gap(_rewritten(t, "gap.pt", pickle.dumps({"w": 1}, protocol=2))),
     "its zip directory is not where its end record says"),
    (lambda t: _prefixed(_rewritten(t, "prefix.pt", pickle.dumps({}, 2)), DEEP),
     "it does not begin as the zip archive torch.save writes"),  # (torch.load reads it by its legacy format)
    (lambda t: _rewritten(t, "alloc.pt", b"\x80\x02]c__builtin__\nbytearray\nJ\x00\x00\x00@\x85Ra."),
     "its pickle calls __builtin__.bytearray, which allocates what its argument says")],
    ids=["renamed-record", "directory-gap", "legacy-prefix", "bytearray"])
def test_archives_that_torch_reads_otherwise_than_zipfile_are_refused(tmp_path, build, message):
    path = build(tmp_path)
    with pytest.raises(CnnWeightsError, match=rf"{path.name} is not a readable torch file: {message}"):
        read(path)
