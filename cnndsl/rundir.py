"""The output folder of `cnndsl train`: one run at a time. A run holds an exclusive,
non-blocking `fcntl.flock` on OUT/.lock for its whole length, so a second run with the same
--out stops at once instead of overwriting the first one's checkpoints; the kernel drops the
lock when the holder exits, even on kill -9, so a lock is never stale. While holding it,
the run deletes the temporary files a killed run left mid-save (`last.pt.*.tmp`).

The lock file is removed when the run ends. A run that opened the file just before it was
removed would lock a file no longer in the folder; so after locking, a run checks that the
path still names the file it locked, and tries again if not (the usual lock-file protocol).
POSIX only (fcntl), as is Triton."""

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path

from .errors import CnnTrainError
from .files import usable

LOCK_NAME = ".lock"
LOCK_TRIES = 50  # a try fails only when another run removed the lock file between our open and our lock


@contextlib.contextmanager
def claim(out: Path, stale: tuple[str, ...]):
    """Hold the lock on the folder `out` (created if missing) for the with-block; yields the
    names of the stale files (glob patterns) it deleted. CnnTrainError if another run holds
    it. A folder this call created is removed again if the run leaves it empty."""
    out = usable(out, "cannot use the output folder", CnnTrainError)
    created = not out.exists()
    fd = _lock(out)
    try:
        yield _remove_stale(out, stale)
    finally:
        with contextlib.suppress(OSError):  # still locked: a newcomer sees the file gone and tries again
            (out / LOCK_NAME).unlink()
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):  # not empty (a checkpoint, another run's lock file): kept
                out.rmdir()


def _lock(out: Path) -> int:
    path = out / LOCK_NAME
    for _ in range(LOCK_TRIES):
        try:
            out.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise CnnTrainError(f"cannot use {out} as the output folder: it is a file; give --out a folder (one "
                                "that does not exist is created)") from None
        except OSError as err:
            raise CnnTrainError(f"cannot create the output folder {out}: {err.strerror or err}") from None
        try:
            # never through a link: a planted OUT/.lock -> ~/.ssh/authorized_keys would be truncated
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except FileNotFoundError:  # the folder was removed by a run that just left it empty
            continue
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise CnnTrainError(f"{path} is a symbolic link; a run's lock file must be a file of its own: "
                                    "remove the link, or give this run another --out") from None
            raise CnnTrainError(f"cannot use {out} as the output folder: {err.strerror or err}") from None
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 0:  # removed since we opened it: the protocol's retry
            os.close(fd)
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:  # a FIFO, a device, another file's hard link
            os.close(fd)
            raise CnnTrainError(f"{path} is not a plain file of its own (a device, a pipe or a second name of "
                                "another file); remove it, or give this run another --out")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise CnnTrainError(f"{out} is in use by another cnndsl train ({holder}); wait for it to end, or "
                                "give this run another --out") from None
        except OSError as err:
            os.close(fd)
            raise CnnTrainError(f"cannot lock the output folder {out}: {err.strerror or err}") from None
        if _still_there(fd, path):
            _write_pid(fd)
            return fd
        os.close(fd)
    raise CnnTrainError(f"cannot lock the output folder {out}: its lock file changed under each of "
                        f"{LOCK_TRIES} tries")


def _still_there(fd: int, path: Path) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)


def _write_pid(fd: int) -> None:
    with contextlib.suppress(OSError):  # a full disk, say: the pid only serves another run's message
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())


def _holder(fd: int) -> str:
    """The lock holder's pid as it wrote it (it may not have yet)."""
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return f"pid {text}" if text.isdigit() else "pid unknown"


def _remove_stale(out: Path, patterns: tuple[str, ...]) -> list[str]:
    removed = []
    for path in sorted({p for pattern in patterns for p in out.glob(pattern)}):
        if path.is_symlink() or path.is_file():
            try:
                path.unlink()
            except OSError as err:
                raise CnnTrainError(f"cannot remove {path}, a temporary file an interrupted run left: "
                                    f"{err.strerror or err}") from None
            removed.append(path.name)
    return removed

