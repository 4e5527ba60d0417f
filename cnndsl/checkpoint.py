"""Training checkpoints: one file holding the weights, the optimizer state, the epoch, the
RNG state that makes a resumed run continue bit for bit, the network's identity and source
text, and a checksum over all of it.

Format `cnndsl-checkpoint-2`: a torch zip archive (torch.save) of one dict,

    format     "cnndsl-checkpoint-2"
    network    {"name": the network's name, "identity": network_identity(net), 64 hex digits}
    source     the .cnn text it was trained from (for the reader; the identity decides fit)
    epoch      the epochs done, an int >= 0
    model      the state dict, str -> tensor
    optimizer  torch's optimizer state dict: {"state": {int: {str: tensor}},
               "param_groups": [{"params": [int, ...], ...}, ...]}
    rng        the torch CPU generator's state, a 1-D uint8 tensor
    config     the run's options, str -> str, int, float, bool or None
    history    one dict per epoch done, str -> number
    normalize  (only in a run with --normalize) {"mean": tensor (C,), "std": tensor (C,)}, fp32
    scaler     (only in an fp16 run) torch.amp.GradScaler's state dict, str -> number
    checksum   sha256 (hex) of digest(): every other field in a canonical serialisation

Written atomically (a temporary file in the same folder, flushed and fsynced, renamed over
the old one, then the folder fsynced), so a run killed mid-write leaves the previous
checkpoint whole. Read with `torch.load(weights_only=True)`: tensors, numbers, strings,
lists and dicts only, never an arbitrary pickled object; then the checksum and every
field's type are checked before anything is used."""

import contextlib
import hashlib
import os
import pickle
import struct
import tempfile
import zipfile
from pathlib import Path

import torch

from .errors import CnnTrainError

FORMAT = "cnndsl-checkpoint-2"
OLD_FORMATS = ("cnndsl-checkpoint-1",)  # no checksum, no network identity: cannot be verified
FIELDS = ("format", "network", "source", "epoch", "model", "optimizer", "rng", "config", "history", "checksum")
OPTIONAL = ("normalize", "scaler")  # fields only some runs write (the module's docstring)


def save(path: str | os.PathLike, *, network: dict, source: str, epoch: int, model: dict, optimizer: dict,
         rng: torch.Tensor, config: dict, history: list, normalize: dict | None = None,
         scaler: dict | None = None) -> Path:
    """Write the checkpoint atomically; CnnTrainError naming the path and the reason (a full
    disk, say) if any step fails, with the temporary file removed and the old file untouched."""
    path = Path(path)
    payload = {"format": FORMAT, "network": network, "source": source, "epoch": epoch, "model": model,
               "optimizer": optimizer, "rng": rng, "config": config, "history": history}
    for key, value in (("normalize", normalize), ("scaler", scaler)):
        if value is not None:
            payload[key] = value
    payload["checksum"] = digest(payload, _hashed(payload))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as RuntimeError
        raise CnnTrainError(f"cannot write the checkpoint {path}: {_reason(err)}; "
                            "the previous checkpoint, if any, is unchanged") from None
    _sync_folder(path.parent)
    return path


def _sync_folder(folder: Path) -> None:
    """Make the rename durable: fsync the folder's entries where the platform and the file
    system allow it (best effort: the new checkpoint is in place either way)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _reason(err: BaseException) -> str:
    """The OSError behind err (torch wraps a failed write in a RuntimeError), else its first line."""
    seen = err
    while seen is not None and not isinstance(seen, OSError):
        seen = seen.__cause__ or seen.__context__
    if seen is not None and seen.strerror:
        return seen.strerror
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def load(path: str | os.PathLike) -> dict:
    """The checkpoint's dict, verified; CnnTrainError if the file is missing, not a cnndsl
    checkpoint, corrupt (checksum), malformed (a field of the wrong type), or holds anything
    but plain data."""
    path = Path(path)
    return verify(path, *read_torch(path, CnnTrainError, "checkpoint", "checkpoint"))


def require_file(path: Path, error, what: str) -> None:
    """`error` ("no {what} at PATH", and why) unless path is a regular file."""
    if not path.is_file():
        kind = " (a directory)" if path.is_dir() else " (not a regular file)" if path.exists() else ""
        raise error(f"no {what} at {path}{kind}")


def read_torch(path: Path, error, missing: str, readable: str) -> tuple[object, int]:
    """(payload, file size) of a torch.save archive, loaded with weights_only=True after
    check_archive; `error` (a CnnError class) if the file is missing ("no {missing} at ..."),
    holds anything but tensors and plain data, or is damaged ("not a readable {readable}")."""
    require_file(path, error, missing)
    try:
        with open(path, "rb") as f:  # one open file for the check and the load: no swap in between
            size = check_archive(f)
            f.seek(0)
            return torch.load(f, map_location="cpu", weights_only=True), size
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "unpickling failed"
        raise error(f"{path} holds objects other than tensors and plain data, or is corrupt; refusing to "
                    f"load it ({first[:200]})") from None
    except Exception as err:  # noqa: BLE001 - a damaged archive makes torch raise almost any type
        raise error(f"{path} is not a readable {readable} (corrupt or truncated: "
                    f"{type(err).__name__}: {_reason(err)})") from None


def check_archive(f) -> int:
    """The file's size, after checking that loading it allocates no more than that: torch.save
    stores every record uncompressed, and a compressed one could inflate without bound."""
    size = os.fstat(f.fileno()).st_size
    declared = 0
    with zipfile.ZipFile(f) as archive:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
                raise ValueError(f"record {info.filename[:100]!r} is compressed ({info.compress_size} bytes for "
                                 f"{info.file_size}), which torch.save never does")
            declared += info.file_size
    if declared > size:
        raise ValueError(f"its records declare {declared} bytes, more than the file's {size}")
    return size


def verify(path: Path, payload, size: int) -> dict:
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if isinstance(fmt, str) and fmt in OLD_FORMATS:
        raise CnnTrainError(f"{path} was written by an older cnndsl (format {fmt!r}): it has no checksum and no "
                            f"network identity, so it cannot be verified; train again to write a {FORMAT!r} "
                            "checkpoint")
    if not (isinstance(fmt, str) and fmt == FORMAT):
        raise CnnTrainError(f"{path} is not a cnndsl checkpoint (expected format {FORMAT!r})")
    missing = [k for k in FIELDS if k not in payload]
    if missing:
        raise CnnTrainError(f"{path} is an incomplete checkpoint: it lacks {', '.join(missing)}")
    try:
        extra = [str(k)[:40] for k in payload if k not in FIELDS + OPTIONAL]
        if extra:
            raise Invalid(f"it holds fields a cnndsl checkpoint does not have: {', '.join(extra)}")
        stored = payload["checksum"]
        _expect(_is_hex(stored), "checksum", stored, "a sha256, 64 hex digits")
        computed = digest(payload, _hashed(payload), file_size=size)
        if computed != stored:
            raise CnnTrainError(f"{path} is corrupt: its contents do not match its sha256 checksum (stored "
                                f"{stored[:16]}..., computed {computed[:16]}...); it was changed after it was "
                                "written")
        validate(payload, torch.get_rng_state().numel())
    except Invalid as err:
        raise CnnTrainError(f"{path} is not a valid cnndsl checkpoint: {err}") from None
    return payload


def _hashed(payload: dict) -> list:
    """The fields the checksum covers: all but itself, the optional ones where present."""
    return [*FIELDS[:-1], *(k for k in OPTIONAL if k in payload)]


class Invalid(ValueError):
    """A checkpoint's content that is not what cnndsl writes; load() names the file."""


MAX_DEPTH = 8  # the deepest a checkpoint nests is 5: optimizer > param_groups > group > betas > float
WORK_PER_BYTE = 4  # digest's bound on a load's work per byte of the file (1 is enough for cnndsl's files)
INT_BITS = 64  # every int a checkpoint holds (epochs, ids, sizes) fits a signed 64-bit integer
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16,
          torch.int32, torch.int64, torch.bool)


def digest(payload: dict, keys, file_size: int | None = None) -> str:
    """sha256 (hex) over a canonical serialisation of payload[k] for k in keys: a tag byte per
    value, counts and lengths as 8-byte little-endian integers, floats as IEEE doubles, a
    tensor as its dtype, shape and raw bytes in row-major order, dicts in their stored order
    (pickle keeps it). Loading a file of `file_size` bytes, the work is bounded by
    WORK_PER_BYTE times it: a tensor costs its bytes, a string its length, any other value 1;
    a crafted file that refers to one entry many times, or holds a stride-0 view of a huge
    shape, is refused before it is expanded or hashed. A checkpoint that cnndsl writes costs
    about its size or less: each tensor is stored once, each other value in a few pickle bytes."""
    walk = _Digest(file_size)
    for key in keys:
        walk.feed(key, 1)
        walk.feed(payload[key], 1)
    return walk.sha.hexdigest()


class _Digest:
    def __init__(self, file_size: int | None):
        self.sha, self.size = hashlib.sha256(), file_size
        self.budget = None if file_size is None else WORK_PER_BYTE * file_size

    def spend(self, n: int) -> None:
        if self.budget is not None:
            self.budget -= n
            if self.budget < 0:
                raise Invalid(f"it refers to more data than its {self.size:,} bytes can hold (an entry repeated "
                              "many times, or a tensor expanded from a few bytes)")

    def count(self, tag: bytes, n: int) -> None:
        self.sha.update(tag + struct.pack("<Q", n))

    def feed(self, value, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise Invalid(f"it nests containers deeper than {MAX_DEPTH} levels")
        if isinstance(value, torch.Tensor):
            return self.tensor(value)
        self.spend(len(value) if isinstance(value, str) else 1)
        if value is None or isinstance(value, bool):
            self.sha.update({None: b"N", False: b"F", True: b"T"}[value])
        elif isinstance(value, int):
            if value.bit_length() >= INT_BITS:
                raise Invalid(f"it holds an integer of {value.bit_length()} bits (at most {INT_BITS - 1})")
            self.sha.update(b"I" + value.to_bytes(8, "little", signed=True))
        elif isinstance(value, float):
            self.sha.update(b"R" + struct.pack("<d", value))
        elif isinstance(value, str):
            data = value.encode("utf-8", "surrogatepass")
            self.count(b"S", len(data))
            self.sha.update(data)
        elif isinstance(value, dict):
            self.count(b"D", len(value))
            for k, v in value.items():
                self.feed(k, depth + 1)
                self.feed(v, depth + 1)
        elif isinstance(value, (list, tuple)):
            self.count(b"L" if isinstance(value, list) else b"U", len(value))
            for v in value:
                self.feed(v, depth + 1)
        else:
            raise Invalid(f"it holds a {type(value).__name__}, which a cnndsl checkpoint never does")

    def tensor(self, t: torch.Tensor) -> None:
        if t.layout != torch.strided or t.dtype not in DTYPES or t.is_nested or t.is_meta:
            raise Invalid(f"it holds a tensor ({t.dtype}, {t.layout}, on {t.device}{', nested' if t.is_nested else ''})"
                          ", which a cnndsl checkpoint never does")
        self.spend(t.numel() * t.element_size())
        self.count(b"A" + str(t.dtype).encode(), t.dim())
        self.sha.update(b"".join(struct.pack("<Q", n) for n in t.shape))
        self.sha.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def validate(payload: dict, rng_size: int) -> None:
    """Every field has the type and layout cnndsl writes (module docstring); Invalid if not.
    digest() has already bounded the depth, the ints and the tensors' dtypes and layouts."""
    net = payload["network"]
    _expect(isinstance(net, dict) and set(net) == {"name", "identity"} and isinstance(net["name"], str)
            and _is_hex(net["identity"]), "network", net, "{'name': str, 'identity': 64 hex digits}")
    _expect(isinstance(payload["source"], str), "source", payload["source"], "the .cnn text, a str")
    epoch = payload["epoch"]
    _expect(_is_number(epoch, int) and epoch >= 0, "epoch", epoch, "an int >= 0")
    model = payload["model"]
    _expect(isinstance(model, dict) and len(model) > 0, "model", model, "a state dict (names -> tensors)")
    for key, value in model.items():
        _expect(isinstance(key, str), "a name in model", key, "a str")
        _expect(isinstance(value, torch.Tensor), f"model[{key[:60]!r}]", value, "a tensor")
    _validate_optimizer(payload["optimizer"])
    rng = payload["rng"]
    _expect(isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8 and tuple(rng.shape) == (rng_size,),
            "rng", rng, f"the torch CPU generator's state, a uint8 tensor of shape ({rng_size},)")
    config = payload["config"]
    _expect(isinstance(config, dict), "config", config, "a dict of the run's options")
    for key, value in config.items():
        _expect(isinstance(key, str) and (value is None or isinstance(value, (str, int, float))),
                f"config[{str(key)[:60]!r}]", value, "a str, number, bool or None")
    history = payload["history"]
    _expect(isinstance(history, list) and len(history) == epoch, "history", history, f"a list of {epoch} epochs")
    for i, stats in enumerate(history):
        _expect(isinstance(stats, dict) and all(isinstance(k, str) and _is_number(v) for k, v in stats.items()),
                f"history[{i}]", stats, "a dict of str -> number")
    norm = payload.get("normalize")
    if norm is not None:
        _expect(isinstance(norm, dict) and set(norm) == {"mean", "std"}
                and all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() == 1 for t in norm.values())
                and norm["mean"].shape == norm["std"].shape and bool((norm["std"] > 0).all())
                and bool(norm["mean"].isfinite().all()), "normalize", norm,
                "{'mean': tensor (C,), 'std': tensor (C,) > 0}, fp32")
    scaler = payload.get("scaler")
    if scaler is not None:
        _expect(isinstance(scaler, dict) and all(isinstance(k, str) and _is_number(v) for k, v in scaler.items()),
                "scaler", scaler, "a GradScaler's state, a dict of str -> number")


def _validate_optimizer(opt) -> None:
    _expect(isinstance(opt, dict) and set(opt) == {"state", "param_groups"}, "optimizer", opt,
            "torch's optimizer state dict: {'state': ..., 'param_groups': ...}")
    state, groups = opt["state"], opt["param_groups"]
    _expect(isinstance(state, dict), "optimizer['state']", state, "a dict: parameter id -> its state")
    for pid, entry in state.items():
        _expect(_is_number(pid, int), "a parameter id in optimizer['state']", pid, "an int")
        _expect(isinstance(entry, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in entry.items()),
                f"optimizer['state'][{pid}]", entry, "a dict of str -> tensor")
    _expect(isinstance(groups, list) and len(groups) > 0, "optimizer['param_groups']", groups,
            "a list of parameter groups")
    for i, group in enumerate(groups):
        _expect(isinstance(group, dict) and isinstance(group.get("params"), list)
                and all(_is_number(p, int) for p in group["params"]), f"optimizer['param_groups'][{i}]", group,
                "a dict whose 'params' is a list of parameter ids (ints)")


def _expect(ok: bool, where: str, value, what: str) -> None:
    if not ok:
        raise Invalid(f"{where} is {_describe(value)}; expected {what}")


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    if isinstance(value, (dict, list, tuple)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"{repr(value)[:60]} ({type(value).__name__})"


def _is_number(value, kinds=(int, float)) -> bool:
    return isinstance(value, kinds) and not isinstance(value, bool)


def _is_hex(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= set("0123456789abcdef")
