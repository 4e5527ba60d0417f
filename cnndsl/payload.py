"""A checkpoint's content checked as plain data, before anything is used (checkpoint.py reads the
file): `digest`, the checksum over a canonical serialisation whose work is bounded by the file's
size, and `validate`, every field's type and shape."""

import hashlib
import struct

import torch


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
    expect(isinstance(net, dict) and set(net) == {"name", "identity"} and isinstance(net["name"], str)
            and is_hex(net["identity"]), "network", net, "{'name': str, 'identity': 64 hex digits}")
    expect(isinstance(payload["source"], str), "source", payload["source"], "the .cnn text, a str")
    epoch = payload["epoch"]
    expect(_is_number(epoch, int) and epoch >= 0, "epoch", epoch, "an int >= 0")
    model = payload["model"]
    expect(isinstance(model, dict) and len(model) > 0, "model", model, "a state dict (names -> tensors)")
    for key, value in model.items():
        expect(isinstance(key, str), "a name in model", key, "a str")
        expect(isinstance(value, torch.Tensor), f"model[{key[:60]!r}]", value, "a tensor")
    _validate_optimizer(payload["optimizer"])
    rng = payload["rng"]
    expect(isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8 and tuple(rng.shape) == (rng_size,),
            "rng", rng, f"the torch CPU generator's state, a uint8 tensor of shape ({rng_size},)")
    config = payload["config"]
    expect(isinstance(config, dict), "config", config, "a dict of the run's options")
    for key, value in config.items():
        expect(isinstance(key, str) and (value is None or isinstance(value, (str, int, float))),
                f"config[{str(key)[:60]!r}]", value, "a str, number, bool or None")
    history = payload["history"]
    expect(isinstance(history, list) and len(history) == epoch, "history", history, f"a list of {epoch} epochs")
    for i, stats in enumerate(history):
        expect(isinstance(stats, dict) and all(isinstance(k, str) and _is_number(v) for k, v in stats.items()),
                f"history[{i}]", stats, "a dict of str -> number")
    norm = payload.get("normalize")
    if norm is not None:
        expect(isinstance(norm, dict) and set(norm) == {"mean", "std"}
                and all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() == 1 for t in norm.values())
                and norm["mean"].shape == norm["std"].shape and bool((norm["std"] > 0).all())
                and bool(norm["mean"].isfinite().all()), "normalize", norm,
                "{'mean': tensor (C,), 'std': tensor (C,) > 0}, fp32")
    scaler = payload.get("scaler")
    if scaler is not None:
        expect(isinstance(scaler, dict) and all(isinstance(k, str) and _is_number(v) for k, v in scaler.items()),
                "scaler", scaler, "a GradScaler's state, a dict of str -> number")


def _validate_optimizer(opt) -> None:
    expect(isinstance(opt, dict) and set(opt) == {"state", "param_groups"}, "optimizer", opt,
            "torch's optimizer state dict: {'state': ..., 'param_groups': ...}")
    state, groups = opt["state"], opt["param_groups"]
    expect(isinstance(state, dict), "optimizer['state']", state, "a dict: parameter id -> its state")
    for pid, entry in state.items():
        expect(_is_number(pid, int), "a parameter id in optimizer['state']", pid, "an int")
        expect(isinstance(entry, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in entry.items()),
                f"optimizer['state'][{pid}]", entry, "a dict of str -> tensor")
    expect(isinstance(groups, list) and len(groups) > 0, "optimizer['param_groups']", groups,
            "a list of parameter groups")
    for i, group in enumerate(groups):
        expect(isinstance(group, dict) and isinstance(group.get("params"), list)
                and all(_is_number(p, int) for p in group["params"]), f"optimizer['param_groups'][{i}]", group,
                "a dict whose 'params' is a list of parameter ids (ints)")


def expect(ok: bool, where: str, value, what: str) -> None:
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


def is_hex(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= set("0123456789abcdef")
