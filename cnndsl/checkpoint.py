"""Training checkpoints: one file holding the weights, the optimizer state, the epoch, the
RNG state that makes a resumed run continue bit for bit, and the network's source text.

Written atomically (a temporary file in the same folder, flushed, then renamed over the
old one), so a run killed mid-write leaves the previous checkpoint whole. Read with
`torch.load(weights_only=True)`: tensors, numbers, strings, lists and dicts only, never an
arbitrary pickled object."""

import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

from .errors import CnnTrainError

FORMAT = "cnndsl-checkpoint-1"
KEYS = ("format", "source", "epoch", "model", "optimizer", "rng", "config", "history")


def save(path: str | os.PathLike, *, source: str, epoch: int, model: dict, optimizer: dict,
         rng: torch.Tensor, config: dict, history: list) -> Path:
    path = Path(path)
    payload = {"format": FORMAT, "source": source, "epoch": epoch, "model": model, "optimizer": optimizer,
               "rng": rng, "config": config, "history": history}
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
    except OSError as err:
        raise CnnTrainError(f"cannot write the checkpoint {path}: {err.strerror or err}") from None
    return path


def load(path: str | os.PathLike) -> dict:
    """The checkpoint's dict; CnnTrainError if the file is missing, not a cnndsl checkpoint,
    corrupt, or holds anything but plain data."""
    path = Path(path)
    if not path.is_file():
        raise CnnTrainError(f"no checkpoint at {path}" + (" (a directory)" if path.is_dir() else ""))
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "unpickling failed"
        raise CnnTrainError(f"{path} holds objects other than tensors and plain data; refusing to load it "
                            f"({first[:200]})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise CnnTrainError(f"{path} is not a readable checkpoint (corrupt or truncated: "
                            f"{str(err).splitlines()[0][:200] if str(err) else type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CnnTrainError(f"{path} is not a cnndsl checkpoint (expected format {FORMAT!r})")
    missing = [k for k in KEYS if k not in payload]
    if missing:
        raise CnnTrainError(f"{path} is an incomplete checkpoint: it lacks {', '.join(missing)}")
    return payload
