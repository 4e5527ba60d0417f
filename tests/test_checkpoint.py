"""The checkpoint file itself (cnndsl/checkpoint.py): a checksum that catches every bit flip
torch would read, structure checks that turn crafted plain data into CnnTrainError, a bound
on what a load may allocate or hash, and saves that fail cleanly (a full disk) without
touching the previous checkpoint. Checkpoints come from a real model and optimizer step on
the reference backend; no training run is needed."""

import errno
import os
import random
import re
import stat
import zipfile

import pytest
import torch

import cnndsl
from cnndsl import CnnTrainError, CnnWeightsError
from cnndsl import checkpoint as ckpt
from cnndsl.resume import network_record
from cnndsl.weights import read as read_weights

pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")

NET = """network small
input 1x4x4
conv 2 3 pad=1
batchnorm
relu
flatten
dense 3
softmax
"""


def _fields() -> dict:
    """save()'s arguments after one Adam step of a real model."""
    net = cnndsl.parse(NET)
    model = cnndsl.compile(net, backend="torch", device="cpu")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.loss(torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    return {"network": network_record(net), "source": NET, "epoch": 1, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
            "config": {"optimizer": "adam", "lr": 0.01, "dtype": "fp32", "data": None},
            "history": [{"epoch": 1, "loss": 1.25, "accuracy": 0.5}]}


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "last.pt"
    ckpt.save(path, **_fields())
    return path


def _equal(a, b) -> bool:
    """The same content: tensors of one dtype, shape and values; containers of one kind."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    return type(a) is type(b) and a == b


def test_bit_flips_are_refused_or_change_nothing(saved, tmp_path):
    """300 seeded single-bit flips anywhere in the file: each load is either a CnnTrainError or
    exactly the original content (the flip hit bytes torch never reads); never another
    exception, never changed weights."""
    original, data = ckpt.load(saved), saved.read_bytes()
    rng, outcomes, flipped = random.Random(7), {"refused": 0, "same": 0}, tmp_path / "flipped.pt"
    for _ in range(300):
        damaged = bytearray(data)
        damaged[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        flipped.write_bytes(damaged)
        try:
            loaded = ckpt.load(flipped)
        except CnnTrainError:
            outcomes["refused"] += 1
            continue
        assert _equal(loaded, original), "a flipped bit loaded as different content"
        outcomes["same"] += 1
    assert outcomes["refused"] > 100 and outcomes["same"] > 0, outcomes


def test_a_changed_weight_fails_the_checksum(saved, tmp_path):
    payload = torch.load(saved, weights_only=True)
    next(iter(payload["model"].values())).view(-1)[0] += 1.0
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(CnnTrainError, match=r"edited.pt is corrupt: its contents do not match its sha256 checksum "
                                            r"\(stored [0-9a-f]{16}\.\.\., computed [0-9a-f]{16}\.\.\.\)"):
        ckpt.load(tmp_path / "edited.pt")


def _write(path, mutate) -> None:
    """A checkpoint that cnndsl did not write: the real fields changed by `mutate`, with a
    checksum that matches them where digest() can compute one."""
    payload = {"format": ckpt.FORMAT, **_fields()}
    mutate(payload)
    if "checksum" not in payload:
        try:
            payload["checksum"] = ckpt.digest(payload, ckpt.FIELDS[:-1])
        except ckpt.Invalid:  # a value digest() refuses: load must refuse it the same way
            payload["checksum"] = "0" * 64
    torch.save(payload, path)


def _first(d: dict):
    return next(iter(d))


def _nested(depth: int):
    value = 1.0
    for _ in range(depth):
        value = [value]
    return value


CRAFTED = [
    (lambda p: p.update(epoch="1"), "epoch is '1' (str); expected an int >= 0"),
    (lambda p: p.update(epoch=-1), "epoch is -1 (int); expected an int >= 0"),
    (lambda p: p.update(epoch=True), "epoch is True (bool); expected an int >= 0"),
    (lambda p: p.update(epoch=2**70), "it holds an integer of 71 bits (at most 63)"),
    (lambda p: p.update(network="small"), "network is 'small' (str); expected {'name': str, 'identity'"),
    (lambda p: p["network"].update(identity="abc"), "network is a dict of 2 items; expected"),
    (lambda p: p.update(source=None), "source is None (NoneType); expected the .cnn text"),
    (lambda p: p.update(model=list(p["model"].values())), "model is a list of 9 items; expected a state dict"),
    (lambda p: p.update(model={}), "model is a dict of 0 items; expected a state dict"),
    (lambda p: p["model"].update({_first(p["model"]): 1.5}), "'] is 1.5 (float); expected a tensor"),
    (lambda p: p["model"].update({7: torch.zeros(1)}), "a name in model is 7 (int); expected a str"),
    (lambda p: p["model"].update({_first(p["model"]): torch.zeros(2, dtype=torch.complex64)}),
     "it holds a tensor (torch.complex64, torch.strided, on cpu), which a cnndsl checkpoint never does"),
    (lambda p: p["model"].update({_first(p["model"]): torch.empty(2, device="meta")}),
     "it holds a tensor (torch.float32, torch.strided, on meta), which"),
    (lambda p: p["model"].update({_first(p["model"]): torch.nested.nested_tensor([torch.ones(1), torch.ones(2)])}),
     "it holds a tensor (torch.float32, torch.strided, on cpu, nested), which"),
    (lambda p: p["model"].update({_first(p["model"]): torch.eye(2).to_sparse()}),
     "it holds a tensor (torch.float32, torch.sparse_coo, on cpu), which"),
    (lambda p: p.update(optimizer={"state": {}}), "optimizer is a dict of 1 items; expected torch's optimizer"),
    (lambda p: p["optimizer"].update(state={"a": {}}), "a parameter id in optimizer['state'] is 'a' (str)"),
    (lambda p: p["optimizer"].update(state={0: {"step": 1.0}}), ("optimizer['state'][0] is a dict of 1 items; "
                                                                 "expected a dict of str -> tensor")),
    (lambda p: p["optimizer"].update(param_groups=[{"params": "x"}]), ("optimizer['param_groups'][0] is a dict "
                                                                      "of 1 items; expected a dict whose 'params'")),
    (lambda p: p["optimizer"].update(param_groups=[]), "optimizer['param_groups'] is a list of 0 items"),
    (lambda p: p.update(rng=p["rng"].float()), ("rng is a float32 tensor of shape (5056,); expected the torch CPU "
                                               "generator's state, a uint8 tensor of shape (5056,)")),
    (lambda p: p.update(rng=p["rng"][:10]), "rng is a uint8 tensor of shape (10,); expected"),
    (lambda p: p.update(config=[1]), "config is a list of 1 items; expected a dict of the run's options"),
    (lambda p: p["config"].update(lr=[1.0]), "config['lr'] is a list of 1 items; expected a str, number"),
    (lambda p: p.update(history=[]), "history is a list of 0 items; expected a list of 1 epochs"),
    (lambda p: p.update(history=[["x"]]), "history[0] is a list of 1 items; expected a dict of str -> number"),
    (lambda p: p["config"].update(junk=_nested(20)), "it nests containers deeper than 8 levels"),
    (lambda p: p.update(extra=1), "it holds fields a cnndsl checkpoint does not have: extra"),
    (lambda p: p.update(checksum=5), "checksum is 5 (int); expected a sha256, 64 hex digits"),
    # one tensor referred to 2,000 times, and a stride-0 view of 200 MB over 4 bytes: refused
    # from the bytes they would hash, before anything is expanded
    (lambda p: p.update(model={f"w{i}": p["rng"] for i in range(2000)}), "it refers to more data than its"),
    (lambda p: p["model"].update({_first(p["model"]): torch.zeros(1).expand(50_000_000)}),
     "it refers to more data than its"),
]


@pytest.mark.parametrize(("mutate", "message"), CRAFTED, ids=[message[:48] for _, message in CRAFTED])
def test_crafted_plain_data_is_refused(tmp_path, mutate, message):
    _write(tmp_path / "crafted.pt", mutate)
    with pytest.raises(CnnTrainError, match=r"crafted.pt is not a valid cnndsl checkpoint: .*" + re.escape(message)):
        ckpt.load(tmp_path / "crafted.pt")


def test_a_checkpoint_of_the_older_format_is_refused_by_name(tmp_path):
    fields = _fields()
    del fields["network"]
    torch.save({"format": "cnndsl-checkpoint-1", **fields}, tmp_path / "old.pt")
    with pytest.raises(CnnTrainError, match=r"old.pt was written by an older cnndsl \(format 'cnndsl-checkpoint-1'\): "
                                            "it has no checksum and no network identity"):
        ckpt.load(tmp_path / "old.pt")
    # where weights are read (eval --weights, export --weights, --init, load_weights) too: not taken
    # for a state dict under "model"
    with pytest.raises(CnnWeightsError, match=r"old.pt was written by an older cnndsl \(format 'cnndsl-checkpoint-1'"):
        read_weights(tmp_path / "old.pt")


def test_a_compressed_record_is_refused_before_it_is_inflated(saved, tmp_path):
    """torch's reader inflates a deflated record in full before it checks its size (a small
    file could claim gigabytes); torch.save never compresses, so load refuses it first."""
    with zipfile.ZipFile(saved) as src, zipfile.ZipFile(tmp_path / "zipped.pt", "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    with pytest.raises(CnnTrainError, match=r"zipped.pt is not a readable checkpoint: record 'archive/data.pkl' is "
                                            r"compressed"):
        ckpt.load(tmp_path / "zipped.pt")


class _FullDisk:
    """A file whose writes fail with ENOSPC once `room` bytes are written."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _fail(errno_: int):
    def fail(*_args, **_kw):
        raise OSError(errno_, os.strerror(errno_))
    return fail


@pytest.mark.parametrize(("where", "reason"), [
    ("write:0", "No space left on device"),  # the first write
    ("write:1000", "No space left on device"),  # torch.save's RuntimeError wraps it
    ("write:6000", "No space left on device"),  # among the tensors' records
    ("fsync", "Input/output error"),
    ("replace", "Read-only file system"),
])
def test_a_failed_save_keeps_the_previous_checkpoint(saved, monkeypatch, where, reason):
    before = saved.read_bytes()
    if where.startswith("write:"):
        real = os.fdopen
        monkeypatch.setattr(os, "fdopen", lambda fd, mode: _FullDisk(real(fd, mode), int(where[6:])))
    else:
        monkeypatch.setattr(os, where, _fail({"fsync": errno.EIO, "replace": errno.EROFS}[where]))
    fields = _fields()
    fields["epoch"], fields["history"] = 2, fields["history"] * 2
    with pytest.raises(CnnTrainError, match=f"cannot write the checkpoint {re.escape(str(saved))}: {reason}; "
                                            "the previous checkpoint, if any, is unchanged"):
        ckpt.save(saved, **fields)
    monkeypatch.undo()
    assert saved.read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == ["last.pt"], "the temporary file is removed"


def test_save_makes_the_rename_durable(tmp_path, monkeypatch):
    """fsync of the file before the rename and of its folder after it."""
    synced, real = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)), real(fd)))
    ckpt.save(tmp_path / "last.pt", **_fields())
    assert synced == [False, True]
