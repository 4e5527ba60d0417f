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
import os
import pickle
import re
from pathlib import Path
from typing import BinaryIO

import torch

from . import files
from .archive import Refused, check_archive
from .errors import CnnTrainError
from .payload import Invalid, digest, expect, is_hex, validate

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
        files.write_file(path, lambda f: torch.save(payload, f), sync=True)
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as RuntimeError
        raise CnnTrainError(f"cannot write the checkpoint {path}: {reason(err)}; "
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


def reason(err: BaseException) -> str:
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


def open_file(path: Path, error, what: str) -> BinaryIO:
    """The regular file at path, open for reading; `error` ("no {what} at PATH", and why) if
    there is none, or "cannot read PATH" and the reason."""
    try:
        return files.open_regular(path)
    except FileNotFoundError:
        raise error(f"no {what} at {path}") from None
    except IsADirectoryError:
        raise error(f"no {what} at {path} (a directory)") from None
    except files.NotRegularFile:
        raise error(f"no {what} at {path} (not a regular file)") from None
    except OSError as err:
        raise error(f"cannot read {path}: {err.strerror or err}") from None


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # a terminal's control sequence (color, bold)


def read_torch(path: Path, error, missing: str, readable: str) -> tuple[object, int]:
    """(payload, file size) of a torch.save archive, loaded with weights_only=True after
    check_archive; `error` (a CnnError class) if the file is missing ("no {missing} at ..."),
    holds anything but tensors and plain data, or is damaged ("not a readable {readable}")."""
    with open_file(path, error, missing) as f:  # one open file for the check and the load: no swap in between
        try:
            size = check_archive(f)
            f.seek(0)
            return torch.load(f, map_location="cpu", weights_only=True), size
        except Refused as err:
            raise error(f"{path} is not a readable {readable}: {err}") from None
        except pickle.UnpicklingError as err:
            text = ANSI.sub("", str(err)).strip()  # (torch's message sets bold with terminal escapes)
            first = text.splitlines()[0] if text else "unpickling failed"
            raise error(f"{path} holds objects other than tensors and plain data, or is corrupt; refusing to "
                        f"load it ({first[:200]})") from None
        except Exception as err:  # noqa: BLE001 - a damaged archive makes torch raise almost any type
            raise error(f"{path} is not a readable {readable} (corrupt or truncated: "
                        f"{type(err).__name__}: {reason(err)})") from None


def verify(path: Path, payload, size: int, error=CnnTrainError) -> dict:
    """payload, checked to be a whole, uncorrupted checkpoint of this format; else `error`."""
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if isinstance(fmt, str) and fmt in OLD_FORMATS:
        raise error(f"{path} was written by an older cnndsl (format {fmt!r}): it has no checksum and no "
                    f"network identity, so it cannot be verified; train again to write a {FORMAT!r} "
                    "checkpoint")
    if not (isinstance(fmt, str) and fmt == FORMAT):
        raise error(f"{path} is not a cnndsl checkpoint (expected format {FORMAT!r})")
    missing = [k for k in FIELDS if k not in payload]
    if missing:
        raise error(f"{path} is an incomplete checkpoint: it lacks {', '.join(missing)}")
    try:
        extra = [str(k)[:40] for k in payload if k not in FIELDS + OPTIONAL]
        if extra:
            raise Invalid(f"it holds fields a cnndsl checkpoint does not have: {', '.join(extra)}")
        stored = payload["checksum"]
        expect(is_hex(stored), "checksum", stored, "a sha256, 64 hex digits")
        computed = digest(payload, _hashed(payload), file_size=size)
        if computed != stored:
            raise error(f"{path} is corrupt: its contents do not match its sha256 checksum (stored "
                        f"{stored[:16]}..., computed {computed[:16]}...); it was changed after it was "
                        "written")
        validate(payload, torch.get_rng_state().numel())
    except Invalid as err:
        raise error(f"{path} is not a valid cnndsl checkpoint: {err}") from None
    return payload


def _hashed(payload: dict) -> list:
    """The fields the checksum covers: all but itself, the optional ones where present."""
    return [*FIELDS[:-1], *(k for k in OPTIONAL if k in payload)]
