"""A strict reader of the pickles that CIFAR-10's python batches are. It interprets the
opcodes itself and never hands the file to pickle's Unpickler, so nothing in a file can
call code, build a numpy object or make numpy allocate. numpy only.

It builds plain values (dict, list, tuple, bytes, bytearray, str, int, float, bool, None;
dict keys only str and bytes, integers at most 8 bytes long) and, for numpy's pickling
idioms, inert records that the caller validates (pickled_numpy.py):

- `Array` from `numpy[._]core.multiarray._reconstruct(numpy.ndarray, (0,), b"b")` + BUILD
  `([1,] shape, dtype, fortran, raw)` (Python 2 and protocols 2-4), or from
  `numpy[._]core.numeric._frombuffer(raw, dtype, shape, order)` (protocol 5, in band);
- `Dtype` from `numpy.dtype(name, align, copy)` + BUILD `(version, byteorder, ...)`;
- `Scalar` from `numpy[._]core.multiarray.scalar(dtype, raw)`;
- bytes from `_codecs.encode(text, "latin1")`, Python 3's spelling of bytes at protocol <= 2.
  Python 2 `str` (SHORT_BINSTRING, BINSTRING) reads as bytes.

Anything else — another global, REDUCE of anything but those callables, NEWOBJ, PERSID, EXT,
out-of-band buffers, protocol 0 text opcodes, a stack, mark or memo that does not add up,
bytes after STOP — is a CnnDataError naming the file, the opcode and its byte offset.

What a file builds is counted before it is allocated: payload bytes plus OBJECT_BYTES for
each object, reference pushed, memo entry and mark. Past the caller's limit the file is
refused. Memo GETs share objects and never copy; the one copy, `_codecs.encode` of a shared
string, is counted each time.
"""

import pickletools
import struct
from pathlib import Path

from . import pickled_numpy as idioms
from .dataset import DATA_LIMIT_ENV, fail

OBJECT_BYTES = 64  # a generous size of one Python object, list slot, memo entry or mark
_LINE = 256  # the longest module or name a GLOBAL opcode may name
_NAMES = {op.code.encode("latin1")[0]: op.name for op in pickletools.opcodes}
# A CIFAR batch's keys are all names. Only str and bytes keys are kept: their hashes are
# seeded per process, while ints (and floats, which hash as ints) that all hash alike are
# easy to forge, and a dict of them takes quadratic time to build.
_KEY_TYPES = (str, bytes)
_LONG_BYTES = 8  # the longest LONG1/LONG4 integer: every number in a CIFAR batch fits in 64 bits


class _Reader:
    def __init__(self, path: Path, data: bytes | bytearray, limit: int):
        self.path, self.data, self.limit = path, memoryview(data), limit
        self.pos = self.at = self.built = 0  # read position, current opcode's offset, bytes counted
        self.stack: list = []
        self.marks: list[int] = []
        self.memo: dict[int, object] = {}

    def error(self, message: str):
        name = _NAMES.get(self.data[self.at], f"0x{self.data[self.at]:02x}") if self.at < len(self.data) else "end"
        return fail(self.path, f"{message} (opcode {name} at byte {self.at})")

    def take(self, n: int) -> memoryview:
        if n > len(self.data) - self.pos:
            raise self.error(f"corrupt pickle: truncated, {n:,} bytes needed but {len(self.data) - self.pos:,} left")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def count(self, nbytes: int = 0) -> None:
        self.built += nbytes + OBJECT_BYTES
        if self.built > self.limit:
            raise self.error(f"the pickle builds more than {self.limit:,} bytes, the most the data limit leaves "
                             f"for it (set {DATA_LIMIT_ENV} to raise the limit)")

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "little")

    def sint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "little", signed=True)

    def payload(self, length_bytes: int, signed: bool = False) -> memoryview:
        """The bytes after a length field, counted before the caller copies them."""
        n = self.sint(length_bytes) if signed else self.uint(length_bytes)
        if n < 0:
            raise self.error(f"corrupt pickle: negative length {n}")
        view = self.take(n)
        self.count(n)
        return view

    def text(self, length_bytes: int) -> str:
        try:
            return str(self.payload(length_bytes), "utf-8", "surrogatepass")
        except UnicodeDecodeError as err:
            raise self.error(f"corrupt pickle: a string that is not UTF-8 ({err.reason} at {err.start})") from None

    def line(self) -> str:
        window = bytes(self.data[self.pos:self.pos + _LINE])
        end = window.find(b"\n")
        if end < 0 and len(window) < _LINE:
            raise self.error("corrupt pickle: truncated in a GLOBAL name")
        if end < 0:
            raise self.error(f"corrupt pickle: a GLOBAL name without a newline in {_LINE} bytes")
        return str(self.take(end + 1)[:-1], "utf-8", "replace")

    def push(self, value, nbytes: int = 0) -> None:
        self.count(nbytes)
        self.stack.append(value)

    def pop(self):
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise self.error("corrupt pickle: stack underflow")
        return self.stack.pop()

    def top(self, kind):
        """The value on top of the stack, left there, which must be a kind."""
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise self.error("corrupt pickle: stack underflow")
        if not isinstance(self.stack[-1], kind):
            raise self.error(f"corrupt pickle: expected a {kind.__name__}, found a {idioms.describe(self.stack[-1])}")
        return self.stack[-1]

    def pop_mark(self) -> list:
        if not self.marks:
            raise self.error("corrupt pickle: no MARK to close")
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def key(self, key):
        if not isinstance(key, _KEY_TYPES):
            raise self.error(f"refusing a dict key that is a {idioms.describe(key)}")
        return key

    def setitems(self, target: dict, items: list) -> None:
        if len(items) % 2:
            raise self.error(f"corrupt pickle: {len(items)} items for a dict, not key-value pairs")
        for k, v in zip(items[::2], items[1::2]):
            target[self.key(k)] = v

    def memo_put(self, index: int) -> None:
        if not self.stack:
            raise self.error("corrupt pickle: memo store from an empty stack")
        self.count()
        self.memo[index] = self.stack[-1]

    def memo_get(self, index: int) -> None:
        if index not in self.memo:
            raise self.error(f"corrupt pickle: memo entry {index} was never stored")
        self.push(self.memo[index])

    def resolve(self, module: str, name: str) -> idioms.Global:
        if (module, name) not in idioms.GLOBALS:
            raise self.error(f"refusing to unpickle {module[:_LINE]}.{name[:_LINE]}: a CIFAR batch holds only "
                             "numpy arrays, lists, dicts, strings and numbers")
        return idioms.Global(idioms.GLOBALS[module, name])

    def run(self):
        while True:
            self.at = self.pos
            code = self.take(1)[0]
            if code == ord("."):  # STOP
                break
            if code not in _OPS:
                raise self.error("refusing an unsupported pickle opcode")
            _OPS[code](self)
        if self.marks or len(self.stack) != 1:
            raise self.error(f"corrupt pickle: {len(self.stack)} values and {len(self.marks)} marks left at STOP")
        if self.pos != len(self.data):
            raise self.error(f"corrupt pickle: {len(self.data) - self.pos:,} bytes after STOP")
        return self.stack[0]


def _proto(r: _Reader) -> None:
    version = r.uint(1)
    if not 2 <= version <= 5:
        raise r.error(f"unsupported pickle protocol {version}; CIFAR batches use 2 to 5")


def _mark(r: _Reader) -> None:
    r.count()
    r.marks.append(len(r.stack))


def _tuple_of(n: int):
    def pop_n(r: _Reader) -> None:
        items = [r.pop() for _ in range(n)]
        r.push(tuple(reversed(items)))
    return pop_n


def _dict(r: _Reader) -> None:
    d: dict = {}
    r.setitems(d, r.pop_mark())
    r.push(d)


def _append(r: _Reader) -> None:
    value = r.pop()
    r.top(list).append(value)


def _appends(r: _Reader) -> None:
    items = r.pop_mark()
    r.top(list).extend(items)


def _setitem(r: _Reader) -> None:
    value, key = r.pop(), r.pop()
    r.top(dict)[r.key(key)] = value


def _setitems(r: _Reader) -> None:
    items = r.pop_mark()
    r.setitems(r.top(dict), items)


def _long(length_bytes: int, signed: bool):
    """LONG1 or LONG4, at most _LONG_BYTES long: a longer integer is no CIFAR label or size,
    and one of thousands of digits cannot even be written into an error message."""
    def push(r: _Reader) -> None:
        raw = r.payload(length_bytes, signed)
        if len(raw) > _LONG_BYTES:
            raise r.error(f"refusing an integer of {len(raw):,} bytes: a CIFAR batch's numbers fit in {_LONG_BYTES}")
        r.push(int.from_bytes(raw, "little", signed=True))
    return push


def _stack_global(r: _Reader) -> None:
    name, module = r.pop(), r.pop()
    if not (isinstance(module, str) and isinstance(name, str)):
        raise r.error("corrupt pickle: STACK_GLOBAL needs a module and a name string")
    r.push(r.resolve(module, name))


def _reduce(r: _Reader) -> None:
    args, func = r.pop(), r.pop()
    r.push(idioms.reduce(r, func, args))


def _build(r: _Reader) -> None:
    state = r.pop()
    idioms.build(r, r.top(object), state)


_OPS = {  # opcode byte -> handler; the names are pickletools'
    0x80: _proto, 0x95: lambda r: r.take(8),  # PROTO; FRAME (protocol 4 framing: a read-ahead hint)
    ord("("): _mark, ord("N"): lambda r: r.push(None), 0x88: lambda r: r.push(True), 0x89: lambda r: r.push(False),
    ord("J"): lambda r: r.push(r.sint(4)), ord("K"): lambda r: r.push(r.uint(1)), ord("M"): lambda r: r.push(r.uint(2)),
    0x8a: _long(1, signed=False), 0x8b: _long(4, signed=True),  # LONG1, LONG4
    ord("G"): lambda r: r.push(struct.unpack(">d", r.take(8))[0]),  # BINFLOAT
    ord("U"): lambda r: r.push(bytes(r.payload(1))), ord("T"): lambda r: r.push(bytes(r.payload(4, signed=True))),
    ord("C"): lambda r: r.push(bytes(r.payload(1))), ord("B"): lambda r: r.push(bytes(r.payload(4))),
    0x8e: lambda r: r.push(bytes(r.payload(8))), 0x96: lambda r: r.push(bytearray(r.payload(8))),
    ord("X"): lambda r: r.push(r.text(4)), 0x8c: lambda r: r.push(r.text(1)), 0x8d: lambda r: r.push(r.text(8)),
    ord("}"): lambda r: r.push({}), ord("]"): lambda r: r.push([]), ord(")"): lambda r: r.push(()),
    ord("d"): _dict, ord("l"): lambda r: r.push(r.pop_mark()), ord("t"): lambda r: r.push(tuple(r.pop_mark())),
    0x85: _tuple_of(1), 0x86: _tuple_of(2), 0x87: _tuple_of(3),
    ord("a"): _append, ord("e"): _appends, ord("s"): _setitem, ord("u"): _setitems,
    ord("q"): lambda r: r.memo_put(r.uint(1)), ord("r"): lambda r: r.memo_put(r.uint(4)),
    0x94: lambda r: r.memo_put(len(r.memo)),  # MEMOIZE
    ord("h"): lambda r: r.memo_get(r.uint(1)), ord("j"): lambda r: r.memo_get(r.uint(4)),
    ord("c"): lambda r: r.push(r.resolve(r.line(), r.line())), 0x93: _stack_global,
    ord("R"): _reduce, ord("b"): _build,
}


def read_pickle(path: Path, data: bytes | bytearray, limit: int) -> tuple[object, int]:
    """(the value the pickle in data holds, the bytes counted building it); refuses a file
    that would build more than limit bytes."""
    reader = _Reader(path, data, limit)
    return reader.run(), reader.built
