"""Reading and writing the files cnndsl does not own, safely: a read takes a regular file of
bounded size, checked on the open file (a FIFO would block for ever, /dev/zero never end, and a
check before the open could be raced); a write makes a new file beside the target and renames it
over it, so that a link planted at the path is replaced, not written through, and a reader never
sees half a file."""

import errno
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


class NotRegularFile(OSError):
    """A pipe, socket or device where a file was expected."""

    def __init__(self, path):
        super().__init__(0, "not a regular file", str(path))


class FileTooLarge(OSError):
    """A file larger than its reader's bound; `size` its bytes."""

    def __init__(self, path, size: int):
        super().__init__(0, f"{size:,} bytes", str(path))
        self.size = size


def usable(path, what: str, error) -> Path:
    """Path(path), refused with `error` ("WHAT P: ...") where no file can be: a path holding a NUL
    character (os calls raise ValueError) or a name longer than the system takes (pathlib's exists()
    and is_dir() raise that OSError instead of answering)."""
    text = os.fspath(path)
    if "\0" in text:
        raise error(f"{what} {text!r:.200}: a path cannot hold a NUL character")
    try:
        os.lstat(text)
    except OSError as err:
        if err.errno == errno.ENAMETOOLONG:
            raise error(f"{what} {text[:80]}...: {err.strerror} ({len(os.fsencode(text)):,} bytes)") from None
    return Path(text)


def open_regular(path: Path) -> BinaryIO:
    """The regular file at `path` (or at the end of its links), open for binary reading:
    FileNotFoundError, IsADirectoryError, NotRegularFile, or any OSError of the open. The type
    is checked on the open file, so the file cannot be swapped between a check and the open."""
    if "\0" in os.fspath(path):  # (os.open would raise ValueError)
        raise OSError(errno.EINVAL, "a path cannot hold a NUL character", str(path))
    # O_NONBLOCK: opening a FIFO must not wait for a writer; it has no effect on a regular file.
    f = os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb")
    try:
        mode = os.fstat(f.fileno()).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(21, "is a directory", str(path))
        if not stat.S_ISREG(mode):
            raise NotRegularFile(path)
    except BaseException:
        f.close()
        raise
    return f


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of the regular file at `path`, at most `limit` of them: what open_regular
    raises, FileTooLarge, or any OSError of the read."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise FileTooLarge(path, size)
        data = f.read(limit + 1)  # (a file that grew since fstat is still bounded)
    if len(data) > limit:
        raise FileTooLarge(path, len(data))
    return data


def write_file(path: Path, data: bytes | str | Callable, sync: bool = False) -> None:
    """Write `data` (bytes, text, or a function that writes to the open binary file) to `path`
    as a new file renamed over the old one; sync: flushed to the disk before the rename (a
    checkpoint). OSError (or what the writing function raised) with nothing left behind."""
    fd, tmp = new_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def new_file_beside(path: Path) -> tuple[int, str]:
    """(fd, name) of a new, empty temporary file `NAME.<hex>.tmp` in path's folder, to be renamed
    over `path`: with the mode of the regular file it will replace, else the one a new file gets
    (0666 less the umask; mkstemp's 0600 would make every replaced file private)."""
    try:
        old = os.stat(path, follow_symlinks=False)
        mode = stat.S_IMODE(old.st_mode) if stat.S_ISREG(old.st_mode) else 0o666
    except FileNotFoundError:
        mode = 0o666
    for _ in range(100):
        tmp = str(path.parent / f"{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
        except FileExistsError:
            continue
        if mode != 0o666:  # (os.open applied the umask; a replaced file keeps its own mode exactly)
            os.fchmod(fd, mode)
        return fd, tmp
    raise FileExistsError(17, f"no free temporary name beside {path}")
