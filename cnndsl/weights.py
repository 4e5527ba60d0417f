"""Weights from outside a training run: a torch state dict (`.pt`/`.pth`, read with
`torch.load(weights_only=True)`: tensors and plain data, never code), a `.safetensors` file (read
here, without the safetensors package: a JSON header and raw little-endian data), or a cnndsl
checkpoint (checkpoint.py, verified); loaded into a compiled model by name where every name
matches, else by declaration order, every shape, layout and dtype checked before anything is
copied. And the writing of safetensors files, in declaration order (`cnndsl export`)."""

import json
import os
import reprlib
import struct
from pathlib import Path
from typing import NamedTuple

import torch

from . import checkpoint, payload
from .errors import CnnWeightsError
from .limits import MAX_INT

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
    where: str = "the weights"  # the file read, for load_weights' errors to name


def read(path: str | os.PathLike) -> Weights:
    """The tensors of a weights file (a state dict, safetensors or a cnndsl checkpoint)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return Weights(*read_safetensors(path), where=str(path))
    payload, size = checkpoint.read_torch(path, CnnWeightsError, "weights file", "torch file")
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if isinstance(fmt, str) and fmt.startswith("cnndsl-checkpoint"):  # (an older one is refused by
        # verify, as --resume refuses it, not read as a state dict under "model")
        ckpt = checkpoint.verify(path, payload, size, CnnWeightsError)
        return Weights(dict(ckpt["model"]), True, ckpt, str(path))
    return Weights(_state_dict(payload, path), True, where=str(path))


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
    declaration order (files cnndsl writes say so in their metadata; the safetensors package sorts).
    The header is checked whole before any tensor is made: every entry well formed, and their data
    ranges together tiling the data section (the format's rule), so the tensors are views of the
    one buffer read and take no more memory than the file."""
    with checkpoint.open_file(path, CnnWeightsError, "weights file") as f:
        size = os.fstat(f.fileno()).st_size
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
        except RecursionError:  # json's decoder refuses deep nesting this way, before the stack overflows
            raise CnnWeightsError(f"{path}: its safetensors header nests too deeply (a header holds a flat "
                                  "object of tensor entries)") from None
        if not isinstance(header, dict):
            raise CnnWeightsError(f"{path}: its safetensors header is not a JSON object")
        meta = header.pop("__metadata__", {})
        data = bytearray(size - 8 - n)  # read in place: one buffer of the file's size, which the tensors view
        del data[f.readinto(data):]  # a file that shrank since stat() keeps what it holds
    entries = {name: _entry(path, name, info, len(data)) for name, info in header.items()}
    _check_tiling(path, entries, len(data))
    out = {name: _tensor(data, *entry) for name, entry in entries.items()}
    return out, isinstance(meta, dict) and meta.get("order") == ORDER


_SHOW = reprlib.Repr()  # a header entry in a message: bounded in depth and length, however it nests
_SHOW.maxlevel, _SHOW.maxstring, _SHOW.maxlong, _SHOW.maxother = 3, 60, 40, 60


def _entry(path, name, info, data_size: int) -> tuple:
    """(dtype, shape, begin, stop) of a header entry, checked: its shape fits a tensor and its
    byte range fits both the shape and the data section."""
    ok = isinstance(info, dict) and isinstance(info.get("dtype"), str) and info["dtype"] in DTYPES and isinstance(info.get("shape"), list) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"]) and isinstance(
        info.get("data_offsets"), list) and len(info["data_offsets"]) == 2 and all(
        isinstance(o, int) and not isinstance(o, bool) for o in info["data_offsets"])
    if not ok:
        raise CnnWeightsError(f"{path}: tensor {name[:100]!r} has a malformed entry in the header: "
                              f"{_SHOW.repr(info)[:200]}")
    dtype, shape, (begin, stop) = DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
    count = extent = 1
    for d in shape:
        count *= d
        extent *= max(d, 1)
    # torch holds sizes and strides as int64: a shape with a zero holds no data, but its other
    # dimensions must still fit (with a dimension of 10**30 reshape fails with a C++ dump)
    if extent >= MAX_INT:
        raise CnnWeightsError(f"{path}: tensor {name[:100]!r} has shape {_SHOW.repr(shape)}, whose dimensions "
                              "multiply (zeros left out) to 2**63 or more: no tensor has that shape")
    if not 0 <= begin <= stop <= data_size or stop - begin != count * dtype.itemsize:
        raise CnnWeightsError(f"{path}: tensor {name[:100]!r} ({info['dtype']} {_fmt(shape)}) has data offsets "
                              f"{begin}..{stop}, which do not fit it or the file's {data_size:,} bytes of data")
    return dtype, shape, begin, stop


def _check_tiling(path, entries: dict, data_size: int) -> None:
    """The entries' byte ranges, sorted, follow each other with no gap or overlap from 0 to the end
    of the data, as the safetensors format requires: an overlap would let a small file name its
    data many times over, and a gap hides bytes no tensor accounts for."""
    end, last = 0, None
    for begin, stop, name in sorted((e[2], e[3], name) for name, e in entries.items()):
        if begin != end:
            what = f"overlaps {last[:100]!r}" if begin < end else f"leaves bytes {end}..{begin} unused"
            raise CnnWeightsError(f"{path}: tensor {name[:100]!r} (data offsets {begin}..{stop}) {what}; the "
                                  "tensors' data must follow each other with no gap or overlap")
        end, last = stop, name
    if end != data_size:
        raise CnnWeightsError(f"{path}: its tensors cover {end:,} bytes of data, the file holds {data_size:,}")


def _tensor(data: bytearray, dtype, shape, begin, stop) -> torch.Tensor:
    """A view of data[begin:stop] (the ranges do not overlap, so no two tensors share bytes), or a
    copy where the range is not aligned to the dtype, as torch's kernels assume."""
    if begin == stop:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(data, dtype=torch.uint8, count=stop - begin, offset=begin)
    if begin % dtype.itemsize:
        flat = flat.clone()
    return flat.view(dtype).reshape(shape)


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
    with open(path, "wb") as f:  # (export writes to a new temporary file, renamed over the target)
        f.write(struct.pack("<Q", len(text)) + text)
        for raw in blobs:
            f.write(raw)


# the top-level modules of torchvision's auxiliary classifiers (GoogLeNet's two, Inception v3's one):
# a network with a second output, which the language cannot write (docs/language.md, section 11)
AUX_HEADS = {"aux1", "aux2", "AuxLogits"}
COUNT = "num_batches_tracked"  # a batch norm's count of training batches (its momentum=None average's)


def pairs(model_state: dict, source: dict, ordered: bool, where: str, skip: tuple = ()) -> list:
    """[(our name, their name, tensor)] for every entry of model_state not in `skip`: by name when
    the source has every one of them, else by declaration order (the source's entries in order,
    less as many trailing entries as are skipped: a replaced head); every tensor checked (dense, with
    data, the model's shape, a dtype of the same kind: _kind) so that copying them cannot fail."""
    ours = [k for k in model_state if k not in skip]
    if not any(k.rsplit(".", 1)[-1] == COUNT for k in source):  # saved by a torch before 0.4.1 (older files
        # of torchvision's weights): no batch norm counts; the model's stay, as torch's loader leaves them
        ours = [k for k in ours if k.rsplit(".", 1)[-1] != COUNT]
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
            aux = sorted({name.split(".")[0] for name, _ in theirs} & AUX_HEADS)
            hint = (f"; its {', '.join(f'{a}.*' for a in aux)} entries are the auxiliary classifiers of torchvision's "
                    "GoogLeNet or Inception v3, which a .cnn network has not: leave them out" if aux else
                    " (is it the same architecture?)")
            raise CnnWeightsError(f"{where} holds {len(theirs)} tensors{' besides the head' if skip else ''}, the "
                                  f"model {len(ours)}: the names differ, so they are matched in order, and the "
                                  f"counts must agree{hint}")
        matched = [(k, name, t) for k, (name, t) in zip(ours, theirs)]
    for ours_name, theirs_name, t in matched:
        target = model_state[ours_name]
        # load_weights' copy_ would fail part-way (a sparse or meta tensor), or convert a value into
        # nonsense (complex into a count): every tensor is checked here, before anything is copied
        what = _not_dense(t)
        if what:
            raise CnnWeightsError(f"{where}: {theirs_name} is {what}; nothing was loaded")
        want = tuple(target.shape)
        if tuple(t.shape) != want:
            raise CnnWeightsError(f"{where}: {theirs_name} has shape {_fmt(t.shape)}, but the model's {ours_name} "
                                  f"is {_fmt(want)}; nothing was loaded")
        if t.dtype not in payload.DTYPES or _kind(t.dtype) != _kind(target.dtype):
            raise CnnWeightsError(f"{where}: {theirs_name} is {t.dtype}, the model's {ours_name} {target.dtype}, "
                                  f"which loads only from {_KINDS.get(_kind(target.dtype), 'its own dtype')}; "
                                  "nothing was loaded")
    return matched


def _not_dense(t) -> str | None:
    """What `t` is, where it is not a dense tensor holding data (copy_ takes nothing else)."""
    if not isinstance(t, torch.Tensor):
        return f"a {type(t).__name__}, not a tensor"
    if t.is_nested or t.layout != torch.strided:
        return f"a {'nested' if t.is_nested else t.layout} tensor; only dense (strided) tensors load"
    return "a meta tensor, which holds no data" if t.is_meta else None


_KINDS = {"floating": "a floating tensor (float16, bfloat16, float32 or float64)",
          "integer": "an integer tensor (int8, int16, int32, int64 or uint8)", "bool": "a bool tensor"}


def _kind(dtype: torch.dtype) -> str:
    """What a value of `dtype` means, for whether one converts into another: a weight or statistic
    (floating), a count (integer: num_batches_tracked) or a flag. Complex, quantized and other
    dtypes are none of these, and a float into a count (or the reverse) is refused rather than
    rounded: torchvision, timm and cnndsl all store counts as int64."""
    if dtype.is_floating_point:
        return "floating"
    return "bool" if dtype == torch.bool else "integer" if dtype in payload.DTYPES else "other"


def _fmt(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def load_weights(model: torch.nn.Module, source, skip: tuple = ()) -> dict:
    """Load a weights file (a path), what read() gave, or a state dict into a compiled cnndsl model, by name where
    every name matches, else in declaration order (as torchvision's and timm's models of the same
    architecture are laid out), after checking every tensor (pairs); a mismatch raises CnnWeightsError
    naming both sides and loads nothing. `skip` names model entries left as they are (a new
    head). -> {our name: their name} of what was loaded."""
    if not isinstance(model, torch.nn.Module):
        raise CnnWeightsError(f"load_weights: expected a compiled model (a torch.nn.Module), got {type(model).__name__}")
    if not isinstance(source, (Weights, dict, str, os.PathLike)):
        raise CnnWeightsError(f"load_weights: expected a path (a .pt, .pth, .safetensors or checkpoint file) or a "
                              f"state dict, got {type(source).__name__}")
    if isinstance(source, Weights):
        tensors, ordered, where = source.tensors, source.ordered, source.where
    elif isinstance(source, dict):
        tensors, ordered, where = _state_dict(source, "the state dict"), True, "the state dict"
    else:
        weights = read(source)
        tensors, ordered, where = weights.tensors, weights.ordered, weights.where
    state = model.state_dict()
    matched = pairs(state, tensors, ordered, where, skip)
    with torch.no_grad():
        for ours, _, t in matched:
            state[ours].copy_(t)
    return {ours: theirs for ours, theirs, _ in matched}
