"""One run per folder: the process that writes a run folder (rank 0) holds an exclusive OS lock on
RUN/run.lock for the run's whole life, so a second run started on the same folder is refused instead of
interleaving its log and checkpoints with the first's.

The lock is a POSIX record lock (fcntl.lockf), not a marker file: the kernel drops it when the process
ends in any way, kill -9 included, so a stale lock never blocks a resume. Unlike flock it is not shared
with the processes a run forks (data-loader workers, which outlive a killed parent by a few seconds), and
Linux's NFS client enforces it across machines. The file also records the holder (its pid, host and start
time) and the stage that wrote the folder, so a refusal names who holds it.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pipeline.atomic import RefusedPath, open_fd, open_to_read
from train.config import ConfigError

LOCK_NAME = "run.lock"
F = TypeVar("F", bound=Callable[..., Any])
# Folder (resolved) -> the open descriptor holding its lock. A POSIX lock is released when the process
# closes *any* descriptor of the file, so while it is held the file is only ever read through this one.
_held: dict[Path, int] = {}


def read_holder(folder: Path) -> dict[str, Any] | None:
    """What run.lock says (stage, pid, host, since); {} when it is empty or not ours (not JSON, a link, not
    a regular file), None when absent."""
    path = folder / LOCK_NAME
    if folder.resolve() in _held:
        return json.loads(os.pread(_held[folder.resolve()], 4096, 0) or b"{}")
    try:
        with open_to_read(path) as f:
            record = json.loads(f.read(4096) or b"{}")
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # RefusedPath included: a link is never read as a record
        return {}
    return record if isinstance(record, dict) else {}


def acquire(folder: Path, stage: str) -> None:
    """Lock `folder` (which exists) for this process, or raise ConfigError naming the holder."""
    key = folder.resolve()
    if key in _held:  # this process runs there already (a runner calling a stage's main again)
        return
    path = folder / LOCK_NAME
    try:
        fd = open_fd(path, os.O_RDWR | os.O_CREAT)
    except RefusedPath as error:
        raise ConfigError(f"--out {folder}: {error}") from error
    except OSError as error:
        raise ConfigError(f"--out {folder}: cannot write there ({error.strerror}: {path})") from error
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = os.pread(fd, 4096, 0).decode(errors="replace")
        os.close(fd)
        raise ConfigError(f"--out {folder}: in use by another run ({describe(holder)}); wait for it to end or "
                          "choose another --out") from error  # fmt: skip
    record = {"stage": stage, "pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%FT%T%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    _held[key] = fd


def is_record(holder: dict[str, Any] | None) -> bool:
    """Whether `holder` is a whole record `acquire` wrote (not merely some JSON)."""
    return bool(holder) and {"stage", "pid", "host", "since"} <= holder.keys()


def describe(text: str) -> str:
    try:
        record = json.loads(text)
        return f"pid {record['pid']} on {record['host']}, since {record['since']}"
    except (ValueError, KeyError, TypeError):
        return "a process starting up"


def release_all() -> None:
    """Release every run folder this process locked (the kernel does it too when the process ends)."""
    for fd in _held.values():
        os.close(fd)
    _held.clear()


def releasing_locks(main: F) -> F:
    """`main`, releasing its run folder's lock when it returns or raises: a runner (train/pretext_table.py)
    calls stages' mains one after another in one process, and tests call them in-process."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        finally:
            release_all()

    return wrapper  # type: ignore[return-value]
