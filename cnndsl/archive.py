"""A torch.save archive checked before torch.load reads it (checkpoint.read_torch): what
loading it allocates, and how deep its pickle nests. torch.load(weights_only=True) runs no
code, but it trusts the archive's sizes, and builds whatever nesting the pickle describes:
a dict key that is a tuple nested a million deep crashes the interpreter when it is hashed
(CPython's tuple hash recurses with no RecursionError)."""

import os
import pickletools
import struct
import zipfile

MAX_PICKLE_BYTES = 16 * 2**20  # a checkpoint's pickle (tensors are records of their own) is KBs
MAX_PICKLE_DEPTH = 64  # torch nests a tensor 4 deep, a checkpoint's payload 6 more
_MARK = None  # a MARK on the simulated stack
_MUTATORS = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}  # change their first input
_CONTAINERS = (pickletools.pytuple, pickletools.pylist, pickletools.pydict, pickletools.pyset,
               pickletools.pyfrozenset)
_ALLOCATORS = {"bytearray"}  # globals weights_only allows that allocate a size given as a number
_GETS = {"GET", "BINGET", "LONG_BINGET"}
_PUTS = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}


class Refused(ValueError):
    """An archive torch.load would read unsafely; the message says what is wrong."""


def check_archive(f) -> int:
    """The file's size, after checking that loading it allocates no more than that (torch.save
    stores every record uncompressed, and a compressed one could inflate without bound) and
    that its pickle nests no deeper than MAX_PICKLE_DEPTH; else Refused."""
    size = os.fstat(f.fileno()).st_size
    # torch.load reads a file that does not start as a zip by its legacy format, unpickling it
    # from byte 0; and where bytes precede the zip, Python's zipfile and torch's reader can see
    # two different central directories
    f.seek(0)
    if f.read(4) != b"PK\x03\x04":
        raise Refused("it does not begin as the zip archive torch.save writes")
    end = zipfile._EndRecData(f)  # (zipfile's own reading of the end record, zip64 included)
    if end is None or _prepended(end):
        raise Refused("its zip directory is not where its end record says (data was put before or inside it)")
    declared, pickles, names = 0, [], set()
    with zipfile.ZipFile(f) as archive:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
                raise Refused(f"record {info.filename[:100]!r} is compressed ({info.compress_size} bytes for "
                              f"{info.file_size}), which torch.save never does")
            if info.filename.lower() in names:  # (torch's reader matches names ignoring case)
                raise Refused(f"it holds two records named {info.filename[:100]!r}, ignoring case")
            names.add(info.filename.lower())
            declared += info.file_size
            if info.filename.lower().endswith(".pkl"):
                pickles.append(info)
        if declared > size:
            raise Refused(f"its records declare {declared} bytes, more than the file's {size}")
        for info in pickles:
            if info.file_size > MAX_PICKLE_BYTES:
                raise Refused(f"its pickle {info.filename[:100]!r} is {info.file_size:,} bytes, more than the "
                              f"{MAX_PICKLE_BYTES:,} a file of weights needs")
            depth = pickle_depth(_stored(f, info))
            if depth > MAX_PICKLE_DEPTH:
                raise Refused(f"its pickle nests containers {depth} deep, more than {MAX_PICKLE_DEPTH}")
    return size


def _prepended(end: list) -> int:
    """Bytes between where the end record says the central directory is and where it is, as
    zipfile computes them (and then forgives): torch's reader follows the record."""
    gap = end[zipfile._ECD_LOCATION] - end[zipfile._ECD_OFFSET] - end[zipfile._ECD_SIZE]
    if end[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:  # the zip64 end record and locator lie between
        gap -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator
    return gap


def _stored(f, info: zipfile.ZipInfo) -> bytes:
    """A stored record's bytes, read as torch.load reads them: without zipfile's CRC check, so
    that damage is reported as the checksum's (a checkpoint's) or the unpickler's."""
    f.seek(info.header_offset)
    head = f.read(30)  # the local file header; its name and extra field follow it
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        raise Refused(f"record {info.filename[:100]!r} has no local header where the archive's index says")
    name, extra = struct.unpack("<HH", head[26:30])
    f.seek(info.header_offset + 30 + name + extra)
    return f.read(info.compress_size)


def pickle_depth(data: bytes, stop: int = MAX_PICKLE_DEPTH) -> int:
    """How deep the values a pickle builds nest (a scalar 0, an empty list or a tuple of
    scalars 1, ...), found from each opcode's declared stack effect without building anything;
    the scan ends at the first value deeper than `stop`. Each object on the simulated stack and
    in the memo is tracked by identity, so a container filled after it was memoized (as pickle
    writes every list and dict) is as deep as its deepest item plus one. Exact for tuples, whose
    items are complete when they are built, and so for what hashing walks; a crafted pickle can
    fill a list after placing it in another and nest lists deeper than counted, which costs a
    RecursionError at worst. A pickle whose stack does not add up is left for the unpickler."""
    stack, memo, depths = [], {}, []

    def new(depth: int) -> int:
        depths.append(depth)
        return len(depths) - 1

    strings = []  # the last two strings pushed: STACK_GLOBAL's module and name
    for op, arg, _ in pickletools.genops(data):
        if isinstance(arg, str) and op.name != "GLOBAL":
            strings = [*strings[-1:], arg]
        if op.name in ("GLOBAL", "STACK_GLOBAL"):
            module, name = arg.split(" ", 1) if op.name == "GLOBAL" else (["", ""] + strings)[-2:]
            if name in _ALLOCATORS:  # (weights_only allows it: bytearray(2**30) is 1 GiB from 20 bytes)
                raise Refused(f"its pickle calls {module}.{name}, which allocates what its argument says")
        if op.name in _PUTS:
            memo[len(memo) if op.name == "MEMOIZE" else arg] = stack[-1] if stack and stack[-1] is not _MARK else new(0)
            continue
        if op.name in _GETS:
            stack.append(memo[arg] if arg in memo else new(0))
            continue
        if op.name == "DUP":
            stack.append(stack[-1] if stack else new(0))
            continue
        popped = _pop(stack, op.stack_before)
        if not op.stack_after:  # (POP, STOP: nothing is built)
            continue
        if op.name in _MUTATORS and popped:
            obj = popped[0]
            depths[obj] = max([depths[obj], *(depths[i] + 1 for i in popped[1:])])
        else:
            items = [depths[i] for i in popped]
            obj = new(1 + max(items) if items else int(op.stack_after[0] in _CONTAINERS))  # (EMPTY_LIST: 1)
        stack.append(_MARK if op.stack_after[0] is pickletools.markobject else obj)
        if depths[obj] > stop:
            break
    return max(depths, default=0)


def _pop(stack: list, before: list) -> list[int]:
    """The objects an opcode consumes, in stack order: back to the MARK where it takes a
    stack slice, and the fixed items below it."""
    popped = []
    fixed = before
    if pickletools.stackslice in before:
        while stack and stack[-1] is not _MARK:
            popped.append(stack.pop())
        if stack:
            stack.pop()
        popped.reverse()
        fixed = before[:before.index(pickletools.markobject)]
    below = [stack.pop() for _ in fixed if stack]
    below.reverse()
    return [o for o in below + popped if o is not _MARK]
