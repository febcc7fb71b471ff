"""How the project creates files: never through a link, and never seen half-written.

Every file the project writes (a checkpoint, a config, a log, a result, a picture, a .beton and its
sidecar, a download's .part, run.lock) is opened by `open_new` / `open_for_append` here: with O_NOFOLLOW,
so a symbolic link planted where the file goes is refused (`RefusedPath`, one line) instead of writing
through it to its target, and checked to be a regular file (a FIFO or device in its place is refused
too, without blocking on it). `write_atomic` writes beside the file under a temporary name created
exclusively (O_EXCL), then renames it over the file: a rename replaces a link itself, never its target.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # NONBLOCK: a FIFO in the file's place cannot hang
TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)$")  # `atomic_path`'s temporary names: .NAME.tmp-PID


class RefusedPath(OSError):
    """A path the project will not write through: a symbolic link, or not a regular file."""

    def __init__(self, path: str | os.PathLike, what: str) -> None:
        message = f"{path}: {what}; refusing to write through it (remove it, or choose another folder)"
        super().__init__(errno.ELOOP, message, str(path))

    def __str__(self) -> str:
        return self.strerror


def open_fd(path: str | os.PathLike, flags: int) -> int:
    """`os.open(path, flags)` (O_CREAT and friends as given), refusing a link or a non-regular file."""
    try:
        fd = os.open(path, flags | _NOFOLLOW, 0o644)
    except OSError as error:
        if error.errno == errno.ELOOP or (error.errno == errno.EEXIST and os.path.islink(path)):
            raise RefusedPath(path, "a symbolic link") from error
        if error.errno == errno.ENXIO:  # a FIFO nobody reads, opened for writing without blocking
            raise RefusedPath(path, "not a regular file (a FIFO)") from error
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise RefusedPath(path, "not a regular file")
    os.set_blocking(fd, True)
    return fd


def open_new(path: str | os.PathLike, exclusive: bool = False) -> BinaryIO:
    """`path` opened for writing from empty; `exclusive`: it must not exist yet (O_EXCL)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    return os.fdopen(open_fd(path, flags), "wb")


def open_for_append(path: str | os.PathLike) -> BinaryIO:
    """`path` opened to append to (created when missing)."""
    return os.fdopen(open_fd(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND), "ab")


def open_to_read(path: str | os.PathLike) -> BinaryIO:
    """`path` opened to read, refusing a link or a non-regular file (a file the project wrote itself)."""
    return os.fdopen(open_fd(path, os.O_RDONLY), "rb")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write to, already created empty by this process (O_EXCL, so no
    link can stand there); when the block ends without an error the file is flushed to disk and renamed to
    `path` (readers see the old file or the new one, never a torn one), and in any case the temporary file
    is gone."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)  # a leftover of this pid (or a planted link): unlink removes the name only
    try:
        os.close(open_fd(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        yield tmp
        fd = open_fd(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # the error that brought us here (a read-only or vanished folder) is the one to report


def write_atomic(path: str | os.PathLike, content: bytes | Callable[[BinaryIO], None]) -> Path:
    """Write `content` (bytes, or a function that writes into the open file) to `path` atomically."""
    with atomic_path(path) as tmp, os.fdopen(open_fd(tmp, os.O_WRONLY | os.O_TRUNC), "wb") as f:
        if callable(content):
            content(f)
        else:
            f.write(content)
    return Path(path)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete `atomic_path`'s temporaries under `folder` left by processes that no longer run (a kill
    during a write); a live process's are kept. Returns what was deleted."""
    removed = []
    for path in folder.rglob(".*.tmp-*"):
        match = TEMPORARY.match(path.name)
        if match is None or path.is_dir() or _alive(int(match.group(1))):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return pid > 0
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid > 0  # another user's process exists
    return True
