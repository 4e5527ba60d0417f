"""numpy's pickling idioms as inert records, for the strict pickle reader (pickles.py): the
globals a CIFAR batch may name, what REDUCE and BUILD make of them, and `to_numpy`, which
turns a validated record into an array that views its bytes. Nothing here builds a numpy
object from the file's say-so: a dtype comes only from the fixed names in `to_numpy`'s
allow-list, and an array only after its shape times its itemsize equals its byte count.

The reader (`r`) is passed in; these functions use its `error(message)` and `count(nbytes)`.
"""

import math
from dataclasses import dataclass

import numpy as np

from .limits import MAX_SIZE


@dataclass(frozen=True)
class Global:
    """One of the few callables (or numpy.ndarray, an argument) a batch may name."""

    name: str


@dataclass
class Dtype:
    name: str
    byteorder: str | None = None  # set by BUILD


@dataclass
class Array:
    shape: object = None  # set by BUILD after _reconstruct; checked by to_numpy
    dtype: object = None
    fortran: object = False
    raw: object = None


@dataclass(frozen=True)
class Scalar:
    dtype: object
    raw: object


GLOBALS = {("numpy", "ndarray"): "ndarray", ("numpy", "dtype"): "dtype", ("_codecs", "encode"): "encode"}
for _core in ("numpy.core", "numpy._core"):  # numpy 1 and numpy 2 spellings
    GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = "_reconstruct"
    GLOBALS[(f"{_core}.multiarray", "scalar")] = "scalar"
    GLOBALS[(f"{_core}.numeric", "_frombuffer")] = "_frombuffer"

INT_DTYPES = frozenset(f"{kind}{size}" for kind in "iu" for size in (1, 2, 4, 8))
MAX_DIMS = 8


def describe(value) -> str:
    return {Array: "numpy array", Dtype: "numpy dtype", Scalar: "numpy scalar", Global: "global"}.get(
        type(value), type(value).__name__)


def to_numpy(rec, dtype_names=INT_DTYPES) -> np.ndarray | str:
    """The array an Array (or Scalar) record stands for, viewing its bytes without a copy,
    or a description of what it should have been."""
    if isinstance(rec, Scalar):
        rec = Array((), rec.dtype, False, rec.raw)
    if not (isinstance(rec, Array) and isinstance(rec.dtype, Dtype) and rec.dtype.name in dtype_names):
        found = f"{rec.dtype.name} array" if isinstance(rec, Array) and isinstance(rec.dtype, Dtype) else describe(rec)
        return f"an array of dtype {', '.join(sorted(dtype_names))}, found {'an' if found[0] in 'aeiou' else 'a'} {found}"
    shape = rec.shape
    # (each size bounded, or an empty array's other sizes could overflow numpy's: (2**62, 0) int64)
    if not (isinstance(shape, tuple) and len(shape) <= MAX_DIMS and all(type(d) is int and 0 <= d <= MAX_SIZE
                                                                        for d in shape)):
        return f"an array with a shape of at most {MAX_DIMS} sizes from 0 to {MAX_SIZE:,}"
    dtype = np.dtype((rec.dtype.byteorder if rec.dtype.byteorder in ("<", ">") else "=") + rec.dtype.name)
    want = math.prod(shape) * dtype.itemsize
    if not isinstance(rec.raw, (bytes, bytearray)) or len(rec.raw) != want:
        have = f"{len(rec.raw):,} bytes" if isinstance(rec.raw, (bytes, bytearray)) else describe(rec.raw)
        return f"a {'x'.join(map(str, shape)) or 'scalar'} {dtype} array with its {want:,} bytes, found {have}"
    return np.frombuffer(rec.raw, dtype).reshape(shape, order="F" if rec.fortran is True else "C")


def _name(value) -> str | None:
    """A dtype, byte-order or array-order name: str, or a Python 2 str (bytes)."""
    if isinstance(value, bytes):
        return value.decode("latin1")
    return value if isinstance(value, str) else None


def _encode(r, args: tuple) -> bytes:
    if len(args) != 2 or not isinstance(args[0], str) or args[1] not in ("latin1", "latin-1"):
        raise r.error("refusing _codecs.encode other than of one string as latin1")
    r.count(len(args[0]))  # a fresh copy each time, even of a shared string
    try:
        return args[0].encode("latin1")
    except UnicodeEncodeError as err:
        raise r.error(f"corrupt pickle: bytes as text with a character above 255 at {err.start}") from None


def _dtype(r, args: tuple) -> Dtype:
    if len(args) != 3 or _name(args[0]) is None:
        raise r.error("refusing numpy.dtype with arguments other than (name, align, copy)")
    return Dtype(_name(args[0]))


def _reconstruct(r, args: tuple) -> Array:
    if len(args) != 3 or args[0] != Global("ndarray"):
        raise r.error("refusing _reconstruct of anything but numpy.ndarray")
    return Array()


def _frombuffer(r, args: tuple) -> Array:
    if len(args) != 4 or _name(args[3]) not in ("C", "F"):
        raise r.error("refusing _frombuffer with arguments other than (buffer, dtype, shape, 'C' or 'F')")
    return Array(args[2], args[1], _name(args[3]) == "F", args[0])


def _scalar(r, args: tuple) -> Scalar:
    if len(args) != 2:
        raise r.error("refusing a numpy scalar with arguments other than (dtype, bytes)")
    return Scalar(*args)


_CALLS = {"encode": _encode, "dtype": _dtype, "_reconstruct": _reconstruct, "_frombuffer": _frombuffer,
          "scalar": _scalar}


def reduce(r, func, args):
    """REDUCE: only the callables above, each checking its arguments."""
    if not isinstance(func, Global) or func.name not in _CALLS or not isinstance(args, tuple):
        culprit = f"numpy.{func.name}" if isinstance(func, Global) else f"a {describe(func)}"
        raise r.error(f"refusing REDUCE of {culprit}: only numpy arrays, dtypes, scalars and latin1 bytes are rebuilt")
    return _CALLS[func.name](r, args)


def build(r, obj, state) -> None:
    """BUILD: an Array's ([version,] shape, dtype, fortran, raw) or a Dtype's byte order, once."""
    if isinstance(obj, Array) and obj.shape is None and isinstance(state, tuple) and len(state) in (4, 5):
        obj.shape, obj.dtype, obj.fortran, obj.raw = state[-4:]
    elif isinstance(obj, Dtype) and obj.byteorder is None and isinstance(state, tuple) and len(state) >= 2 \
            and _name(state[1]) in ("<", ">", "|", "="):
        obj.byteorder = _name(state[1])  # (version, byteorder, ...): the rest only matters to other dtypes
    else:
        raise r.error(f"refusing BUILD of a {describe(obj)} with a {describe(state)} state")
