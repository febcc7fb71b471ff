"""pipeline/fetch.py against a server on the loopback address: nothing here reaches the internet."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline.fetch import DATASETS, DataSet, FetchError, Resource, fetch
from tests.conftest import HANG_GUARD_S, ROOT, free_port


def cifar_like_archive() -> bytes:
    """A small tar.gz with CIFAR-10's layout: one top folder holding the batch files."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in ("data_batch_1", "test_batch", "batches.meta"):
            content = (name * 500).encode()
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


class Served:
    """Files the loopback server answers with, and the Range headers it was asked for."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.ranges: list[str | None] = []
        self.honour_ranges = True


@pytest.fixture
def server() -> Iterator[tuple[str, Served]]:
    served = Served()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the http.server interface)
            content = served.files.get(self.path.lstrip("/"))
            served.ranges.append(self.headers.get("Range"))
            if content is None:
                self.send_error(404)
                return
            start = 0
            if served.honour_ranges and self.headers.get("Range"):
                start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
                self.send_response(206)
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(content) - start))
            self.end_headers()
            self.wfile.write(content[start:])

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", served
    httpd.shutdown()
    httpd.server_close()


def spec_for(served: Served, archive: bytes) -> DataSet:
    served.files["small.tar.gz"] = archive
    md5 = hashlib.md5(archive, usedforsecurity=False).hexdigest()
    return DataSet("unused", (Resource("small.tar.gz", md5),), "cifar-10-batches-py", extract=True)


def test_a_verified_archive_is_unpacked_under_its_final_name(server, tmp_path: Path) -> None:
    url, served = server
    target = fetch("cifar10", tmp_path, mirror=url, spec=spec_for(served, cifar_like_archive()))
    assert target == tmp_path / "cifar-10-batches-py"
    assert sorted(p.name for p in target.iterdir()) == ["batches.meta", "data_batch_1", "test_batch"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-batches-py"]  # no staging or temp left


def test_an_interrupted_download_continues_from_where_it_stopped(server, tmp_path: Path) -> None:
    url, served = server
    archive = cifar_like_archive()
    spec = spec_for(served, archive)
    (tmp_path / ".fetch").mkdir()
    (tmp_path / ".fetch" / "small.tar.gz.part").write_bytes(archive[:100])
    fetch("cifar10", tmp_path, mirror=url, spec=spec)
    assert served.ranges == ["bytes=100-"]
    assert (tmp_path / "cifar-10-batches-py" / "test_batch").is_file()


def test_a_server_that_ignores_ranges_starts_the_file_again(server, tmp_path: Path) -> None:
    url, served = server
    served.honour_ranges = False
    archive = cifar_like_archive()
    spec = spec_for(served, archive)
    (tmp_path / ".fetch").mkdir()
    (tmp_path / ".fetch" / "small.tar.gz.part").write_bytes(b"junk that is not the start of the file")
    fetch("cifar10", tmp_path, mirror=url, spec=spec)
    assert (tmp_path / "cifar-10-batches-py" / "data_batch_1").is_file()


def test_a_corrupted_download_is_deleted_and_no_folder_appears(server, tmp_path: Path) -> None:
    url, served = server
    archive = cifar_like_archive()
    spec = spec_for(served, archive)
    served.files["small.tar.gz"] = archive[:-10] + b"0123456789"  # the right size, the wrong bytes
    with pytest.raises(FetchError, match="MD5 .* expected"):
        fetch("cifar10", tmp_path, mirror=url, spec=spec)
    assert not (tmp_path / "cifar-10-batches-py").exists()
    assert not list((tmp_path / ".fetch").iterdir())  # the bad file is gone: the next run starts afresh


def test_an_archive_escaping_its_folder_is_refused(server, tmp_path: Path) -> None:
    url, served = server
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("../escaped")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(FetchError, match="not a readable tar archive"):
        fetch("cifar10", tmp_path / "dest", mirror=url, spec=spec_for(served, buffer.getvalue()))
    assert not (tmp_path / "escaped").exists()
    assert not (tmp_path / "dest" / "cifar-10-batches-py").exists()


def run_fetch(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pipeline.fetch", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S)


def test_the_command_checks_the_published_checksum(server, tmp_path: Path) -> None:
    """Served from a mirror, a file that is not the published one (this test's archive) is refused."""
    url, served = server
    served.files["cifar-10-python.tar.gz"] = cifar_like_archive()
    result = run_fetch("cifar10", str(tmp_path), "--mirror", url)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and DATASETS["cifar10"].resources[0].md5 in lines[0]
    assert not (tmp_path / "cifar-10-batches-py").exists()


def test_offline_is_one_line(tmp_path: Path) -> None:
    result = run_fetch("fashion-mnist", str(tmp_path), "--mirror", f"http://127.0.0.1:{free_port()}/")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot connect" in lines[0] and "train-images-idx3-ubyte.gz" in lines[0]
    assert not (tmp_path / "fashion-mnist").exists()


def test_an_unknown_data_set_is_refused(tmp_path: Path) -> None:
    result = run_fetch("imagenet", str(tmp_path))
    assert result.returncode == 2 and "invalid choice" in result.stderr
