"""Weights from outside a training run: a torch state dict (`.pt`/`.pth`, read with
`torch.load(weights_only=True)`: tensors and plain data, never code), a `.safetensors` file (read
here, without the safetensors package: a JSON header and raw little-endian data), or a cnndsl
checkpoint (checkpoint.py, verified); loaded into a compiled model by name where every name
matches, else by declaration order, every shape checked before anything is copied. And the
writing of safetensors files, in declaration order (`cnndsl export`)."""

import json
import os
import struct
from pathlib import Path
from typing import NamedTuple

import torch

from . import checkpoint
from .errors import CnnError, CnnWeightsError

# safetensors' dtype names <-> torch's
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 2**20  # bytes of a safetensors JSON header
ORDER = "declaration"  # the metadata `order` of the safetensors files cnndsl writes


class Weights(NamedTuple):
    tensors: dict  # name -> tensor, in the file's order
    ordered: bool  # whether that order is the declaration order
    checkpoint: dict | None = None  # the verified cnndsl checkpoint it came from, if it is one


def read(path: str | os.PathLike) -> Weights:
    """The tensors of a weights file (a state dict, safetensors or a cnndsl checkpoint)."""
    path = Path(path)
    checkpoint.require_file(path, CnnWeightsError, "weights file")
    if path.suffix == ".safetensors":
        return Weights(*read_safetensors(path))
    payload, size = checkpoint.read_torch(path, CnnWeightsError, "weights file", "torch file")
    if isinstance(payload, dict) and payload.get("format") == checkpoint.FORMAT:
        try:
            ckpt = checkpoint.verify(path, payload, size)
        except CnnError as err:
            raise CnnWeightsError(err.message) from None
        return Weights(dict(ckpt["model"]), True, ckpt)
    return Weights(_state_dict(payload, path), True)


def _state_dict(payload, path) -> dict:
    """A state dict, or one under "state_dict" or "model" (Lightning's and timm's checkpoints)."""
    for key in ("state_dict", "model"):
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
            break
    if not isinstance(payload, dict) or not payload or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload.items()):
        raise CnnWeightsError(f"{path} is not a state dict (a dict of names to tensors), nor a checkpoint holding "
                              "one under 'state_dict' or 'model'")
    return dict(payload)


def read_safetensors(path: Path) -> tuple[dict, bool]:
    """The tensors of a safetensors file, in its header's order, and whether that order is the
    declaration order (files cnndsl writes say so in their metadata; the safetensors package sorts)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CnnWeightsError(f"{path} is not a safetensors file: {size} bytes, less than its 8-byte header size")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER, size - 8):
            raise CnnWeightsError(f"{path} is not a safetensors file (or is truncated): its header claims {n:,} "
                                  f"bytes of the {size - 8:,} that follow")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as err:
            raise CnnWeightsError(f"{path}: its safetensors header is not JSON ({err})") from None
        if not isinstance(header, dict):
            raise CnnWeightsError(f"{path}: its safetensors header is not a JSON object")
        meta = header.pop("__metadata__", {})
        data = f.read()
    out, end = {}, 0
    for name, info in header.items():
        out[name] = _tensor(path, name, info, data)
        end = max(end, info["data_offsets"][1])
    if end != len(data):
        raise CnnWeightsError(f"{path}: its tensors cover {end:,} bytes of data, the file holds {len(data):,}")
    return out, isinstance(meta, dict) and meta.get("order") == ORDER


def _tensor(path, name, info, data: bytes) -> torch.Tensor:
    ok = isinstance(info, dict) and info.get("dtype") in DTYPES and isinstance(info.get("shape"), list) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"]) and isinstance(
        info.get("data_offsets"), list) and len(info["data_offsets"]) == 2 and all(
        isinstance(o, int) and not isinstance(o, bool) for o in info["data_offsets"])
    if not ok:
        raise CnnWeightsError(f"{path}: tensor {name[:100]!r} has a malformed entry in the header: {str(info)[:200]}")
    dtype, (begin, stop) = DTYPES[info["dtype"]], info["data_offsets"]
    count = 1
    for d in info["shape"]:
        count *= d
    if not 0 <= begin <= stop <= len(data) or stop - begin != count * dtype.itemsize:
        raise CnnWeightsError(f"{path}: tensor {name[:100]!r} ({info['dtype']} {info['shape']}) has data offsets "
                              f"{begin}..{stop}, which do not fit it or the file's {len(data):,} bytes of data")
    raw = bytearray(data[begin:stop])
    flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
    return flat.reshape(info["shape"])


def write_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """A safetensors file of `tensors` in their order (its metadata says the order is the
    declaration order, and holds `metadata`, str -> str), little-endian, readable by the
    safetensors package."""
    header, blobs, offset = {"__metadata__": {**(metadata or {}), "format": "pt", "order": ORDER}}, [], 0
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for raw in blobs:
            f.write(raw)


def pairs(model_state: dict, source: dict, ordered: bool, where: str, skip: tuple = ()) -> list:
    """[(our name, their name, tensor)] for every entry of model_state not in `skip`: by name when
    the source has every one of them, else by declaration order (the source's entries in order,
    less as many trailing entries as are skipped: a replaced head); shapes checked."""
    ours = [k for k in model_state if k not in skip]
    if all(k in source for k in ours):
        matched = [(k, k, source[k]) for k in ours]
    else:
        if not ordered:
            missing = next(k for k in ours if k not in source)
            raise CnnWeightsError(f"{where}: its names differ from the model's ({missing!r} is not among them) and "
                                  "its order is not the declaration order (a safetensors file sorts its names); "
                                  "save it as a torch state dict, or with the model's names")
        theirs = list(source.items())
        if skip:
            theirs = theirs[:len(theirs) - len(skip)]
        if len(theirs) != len(ours):
            raise CnnWeightsError(f"{where} holds {len(theirs)} tensors{' besides the head' if skip else ''}, the "
                                  f"model {len(ours)}: the names differ, so they are matched in order, and the "
                                  f"counts must agree (is it the same architecture?)")
        matched = [(k, name, t) for k, (name, t) in zip(ours, theirs)]
    for ours_name, theirs_name, t in matched:
        want = tuple(model_state[ours_name].shape)
        if tuple(t.shape) != want:
            raise CnnWeightsError(f"{where}: {theirs_name} has shape {_fmt(t.shape)}, but the model's {ours_name} "
                                  f"is {_fmt(want)}; nothing was loaded")
        if t.is_floating_point() != model_state[ours_name].is_floating_point():
            raise CnnWeightsError(f"{where}: {theirs_name} is {t.dtype}, the model's {ours_name} "
                                  f"{model_state[ours_name].dtype}; nothing was loaded")
    return matched


def _fmt(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def load_weights(model: torch.nn.Module, source, skip: tuple = ()) -> dict:
    """Load a weights file (a path), what read() gave, or a state dict into a compiled cnndsl model, by name where
    every name matches, else in declaration order (as torchvision's and timm's models of the same
    architecture are laid out), after checking every shape; a mismatch raises CnnWeightsError
    naming both sides and loads nothing. `skip` names model entries left as they are (a new
    head). -> {our name: their name} of what was loaded."""
    if isinstance(source, Weights):
        tensors, ordered, where = source.tensors, source.ordered, "the weights"
    elif isinstance(source, dict):
        tensors, ordered, where = _state_dict(source, "the state dict"), True, "the state dict"
    else:
        (tensors, ordered, _), where = read(source), str(source)
    state = model.state_dict()
    matched = pairs(state, tensors, ordered, where, skip)
    with torch.no_grad():
        for ours, _, t in matched:
            state[ours].copy_(t)
    return {ours: theirs for ours, theirs, _ in matched}
