"""Download a public data set this trainer reads, its published checksum verified.

    python -m pipeline.fetch cifar10 ~/data            # -> ~/data/cifar-10-batches-py
    python -m pipeline.fetch fashion-mnist ~/data      # -> ~/data/fashion-mnist/*-ubyte.gz
    python -m pipeline.fetch cifar10 ~/data --mirror http://host/path/   # same files from a mirror

A download that stops (network, Ctrl-C) leaves DEST/.fetch/<file>.part and the next call continues it
where it ended (an HTTP range request; a server that ignores ranges sends the whole file again). A file
is used only when its MD5 is the one the data set's authors publish; a mismatch deletes the download and
is an error. The data set appears under its final folder name only once it is complete (extracted
beside it under a temporary name, then renamed), so a folder with that name is never half there.
ImageNet is not offered: its licence needs a login, so it stays a manual step (README).
Every failure is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import stat
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.atomic import RefusedPath, open_for_append, open_new, open_to_read
from pipeline.errors import os_error_line

Progress = Callable[[int, int | None], None]

CHUNK = 1 << 20
TIMEOUT_S = 60  # per network read: a stalled server is an error, not a hang
# The whole download's deadline: this much, plus its size at this rate (a server dripping bytes slower
# than the per-read timeout would otherwise keep it going for ever).
DEADLINE_GRACE_S = 120
MIN_RATE = 20_000  # bytes/s, the slowest average a download may keep


class FetchError(Exception):
    """A download or an archive that cannot be used; the message names the file or address."""


@dataclass(frozen=True)
class Resource:
    filename: str
    md5: str  # as published by the data set's authors
    size: int | None = None  # its bytes: a cap on what a server may send (None: only the deadline limits it)


@dataclass(frozen=True)
class DataSet:
    base_url: str  # the files' folder; --mirror replaces it
    resources: tuple[Resource, ...]
    folder: str  # what DEST/<folder> holds when done: what --data is pointed at
    extract: bool  # a tar archive whose single top folder is `folder`; else the files are kept as they are


DATASETS = {
    # https://www.cs.toronto.edu/~kriz/cifar.html publishes the archive's MD5.
    "cifar10": DataSet(
        "https://www.cs.toronto.edu/~kriz/",
        (Resource("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", 170498071),),
        "cifar-10-batches-py",
        extract=True,
    ),
    # https://github.com/zalandoresearch/fashion-mnist publishes the four files' MD5s.
    "fashion-mnist": DataSet(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        (
            Resource("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", 26421880),
            Resource("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe", 29515),
            Resource("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79", 4422102),
            Resource("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310", 5148),
        ),
        "fashion-mnist",
        extract=False,
    ),
}


def md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open_to_read(path) as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, part: Path, size: int | None = None, progress: Progress | None = None) -> None:
    """Append the rest of `url` to `part` (a range request from its current size); a server that answers
    with the whole file (200) makes `part` start again. `size`, the file's known bytes, caps what is
    accepted: a claim or a stream past it deletes `part` and is an error. `part` is never a link."""
    have = _part_size(part)
    if size is not None and have >= size:
        return  # whole already (the MD5 decides whether it is right)
    deadline = time.monotonic() + DEADLINE_GRACE_S + (size or 0) / MIN_RATE
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:  # the range starts at the end: the part is already whole
            return
        raise FetchError(f"{url}: HTTP {error.code} {error.reason}") from error
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise FetchError(f"{url}: cannot connect ({reason}); offline? --mirror names another source") from error
    with response:
        resumed = response.status == 206
        length = response.headers.get("Content-Length")
        total = (have if resumed else 0) + int(length) if length and length.isdigit() else None
        if size is not None and total is not None and total > size:
            part.unlink(missing_ok=True)
            raise FetchError(f"{url}: the server announces {total} bytes, the file has {size}; nothing kept")
        with open_for_append(part) if resumed else open_new(part) as f:
            _copy(response, f, Limits(url, part, size, deadline), (total if size is None else size, progress))
    if total is not None and part.stat().st_size != total:
        raise FetchError(f"{url}: got {part.stat().st_size} of {total} bytes; run again to continue it")


@dataclass(frozen=True)
class Limits:
    url: str
    part: Path
    size: int | None  # the most bytes `part` may reach
    deadline: float  # time.monotonic() by which the download must end


def _copy(response, f, limits: Limits, shown: tuple[int | None, Progress | None]) -> None:
    """The response's bytes into `f`, within `limits` (past them `part` is deleted: a rerun starts afresh)."""
    try:
        while chunk := response.read1(CHUNK):
            f.write(chunk)
            if limits.size is not None and f.tell() > limits.size:
                raise _over(limits, f"sent more than the {limits.size} bytes the file has")
            if time.monotonic() > limits.deadline:
                raise _over(limits, f"too slow (under {MIN_RATE // 1000} kB/s on average, {f.tell()} bytes so far)")
            if shown[1]:
                shown[1](f.tell(), shown[0])
    except OSError as error:
        raise FetchError(f"{limits.url}: the download broke off ({error}); run again to continue it") from error


def _over(limits: Limits, what: str) -> FetchError:
    limits.part.unlink(missing_ok=True)
    return FetchError(f"{limits.url}: {what}; the partial download was deleted")


def _part_size(part: Path) -> int:
    """The bytes already in `part` (0 when absent); a link or a non-regular file there is refused."""
    try:
        mode = part.lstat().st_mode
    except FileNotFoundError:
        return 0
    if not stat.S_ISREG(mode):
        raise FetchError(f"{part}: not a regular file (a link?); refusing to write through it, remove it")
    return part.stat().st_size


def check_free_space(folder: Path, spec: DataSet) -> None:
    """Refuse before downloading when `folder`'s file system cannot hold the files (and, for an archive,
    as much again for what it unpacks to)."""
    needed = sum(r.size or 0 for r in spec.resources) * (2 if spec.extract else 1)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise FetchError(f"{folder}: {free / 2**20:.0f} MiB free, the download needs {needed / 2**20:.0f} MiB")


def fetch_resource(base_url: str, resource: Resource, staging: Path, progress=None) -> Path:
    """The verified file in `staging` (downloaded or continued as needed)."""
    done, part = staging / resource.filename, staging / f"{resource.filename}.part"
    if done.is_file() and md5_of(done) == resource.md5:
        return done
    download(base_url + resource.filename, part, resource.size, progress)
    got = md5_of(part)
    if got != resource.md5:
        part.unlink()  # a regular file of this download (`download` refuses any other)
        raise FetchError(
            f"{base_url + resource.filename}: MD5 {got}, expected {resource.md5} (a corrupted download or a "
            "changed file); it was deleted, run again to download it afresh"
        )
    os.replace(part, done)
    return done


def checked_members(tar: tarfile.TarFile, archive: Path, temporary: Path) -> list[tarfile.TarInfo]:
    """Every member of `tar`, each checked here whatever the interpreter's tarfile filter does: a regular
    file or a folder (no link, device or FIFO), whose path stays inside `temporary` once resolved."""
    root = temporary.resolve()
    members = tar.getmembers()
    for member in members:
        if not (member.isfile() or member.isdir()):
            raise FetchError(f"{archive}: member {member.name!r} is a link or a device; expected files and folders")
        name = Path(member.name)
        resolved = (root / name).resolve()
        if name.is_absolute() or ".." in name.parts or not resolved.is_relative_to(root) or resolved == root:
            raise FetchError(f"{archive}: member {member.name!r} would land outside its folder; refused")
    return members


def extract_into(archive: Path, temporary: Path, folder: str) -> Path:
    """Unpack `archive` into `temporary` and return its top folder `folder`; members that would land outside
    it (absolute paths, '..') and links or devices are refused before anything is written (and again by
    tarfile's 'data' filter)."""
    try:
        with tarfile.open(archive) as tar:
            members = checked_members(tar, archive, temporary)
            tar.extractall(temporary, members=members, filter="data")
    except (tarfile.TarError, OSError, EOFError) as error:
        raise FetchError(f"{archive}: not a readable tar archive ({error})") from error
    top = temporary / folder
    if not top.is_dir():
        found = sorted(os.listdir(temporary)) if temporary.is_dir() else []
        raise FetchError(f"{archive}: expected the folder {folder}/ inside, found {found or 'nothing'}")
    return top


def fetch(name: str, dest: Path, mirror: str | None = None, spec: DataSet | None = None, progress=None) -> Path:
    """DEST/<folder> holding data set `name` (`spec` replaces the registry's entry; tests serve their own)."""
    spec = spec or DATASETS[name]
    target = dest / spec.folder
    if target.exists():
        return target
    base_url = mirror.rstrip("/") + "/" if mirror else spec.base_url
    staging = dest / ".fetch"
    try:
        staging.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FetchError(f"{dest}: cannot create the download folder ({error.strerror})") from error
    if staging.is_symlink():
        raise FetchError(f"{staging}: a symbolic link; refusing to download through it (remove it)")
    check_free_space(staging, spec)
    try:
        files = [fetch_resource(base_url, resource, staging, progress) for resource in spec.resources]
    except RefusedPath as error:
        raise FetchError(str(error)) from error
    temporary = dest / f".{spec.folder}.tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        if spec.extract:
            complete = extract_into(files[0], temporary, spec.folder)
        else:
            temporary.mkdir()
            for file in files:
                shutil.copyfile(file, temporary / file.name)
            complete = temporary
        os.replace(complete, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    return target


def print_progress(done: int, total: int | None) -> None:
    if total and (done == total or done % (32 * CHUNK) < CHUNK):
        print(f"\r  {done / 2**20:.0f} / {total / 2**20:.0f} MiB", end="\n" if done == total else "", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.fetch", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(DATASETS), help="the data set")
    parser.add_argument("dest", type=Path, help="folder to put it in (created if missing)")
    parser.add_argument("--mirror", help="a folder URL holding the same files (their MD5s are still checked)")
    args = parser.parse_args(argv)
    try:
        target = fetch(args.name, args.dest, args.mirror, progress=print_progress if sys.stdout.isatty() else None)
    except FetchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full or read-only DEST, a name too long: named in words
        print(f"error: {os_error_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nstopped: run the same command again to continue the download in {args.dest / '.fetch'}")
        return 130
    print(f"{args.name}: {target}  (--data {target})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
