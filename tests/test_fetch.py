"""pipeline/fetch.py against a server on the loopback address: nothing here reaches the internet."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import threading
import time
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
    """Files the loopback server answers with, and the Range headers it was asked for; `hostile`, when
    set, answers every request itself (a test's misbehaving mirror)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.ranges: list[str | None] = []
        self.honour_ranges = True
        self.hostile = None


@pytest.fixture
def server() -> Iterator[tuple[str, Served]]:
    served = Served()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the http.server interface)
            if served.hostile is not None:
                served.hostile(self)
                return
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
    with pytest.raises(FetchError, match="'../escaped' would land outside its folder"):
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


def test_a_planted_part_link_is_not_written_through(server, tmp_path: Path) -> None:
    url, served = server
    spec = spec_for(served, cifar_like_archive())
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    dest = tmp_path / "dest"
    (dest / ".fetch").mkdir(parents=True)
    (dest / ".fetch" / "small.tar.gz.part").symlink_to(victim)
    with pytest.raises(FetchError, match=r"small.tar.gz.part: not a regular file \(a link\?\); refusing") as error:
        fetch("cifar10", dest, mirror=url, spec=spec)
    assert "deleted" not in str(error.value)
    assert victim.read_bytes() == b"precious"
    assert served.ranges == []  # refused before asking the mirror


def test_a_linked_staging_folder_is_refused(server, tmp_path: Path) -> None:
    url, served = server
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / ".fetch").symlink_to(elsewhere)
    with pytest.raises(FetchError, match="a symbolic link; refusing to download through it"):
        fetch("cifar10", tmp_path / "dest", mirror=url, spec=spec_for(served, cifar_like_archive()))
    assert not list(elsewhere.iterdir())


def link_chain_archive() -> bytes:
    """The shape of CVE-2025-4517's archives: nested links that resolve outside the folder, then a file
    written through them; every link member must be refused whatever tarfile's filter decides."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        top = tarfile.TarInfo("cifar-10-batches-py")
        top.type = tarfile.DIRTYPE
        tar.addfile(top)
        for name, target in (("cifar-10-batches-py/a", "."), ("cifar-10-batches-py/up", "a/a/a/../../..")):
            link = tarfile.TarInfo(name)
            link.type, link.linkname = tarfile.SYMTYPE, target
            tar.addfile(link)
        info = tarfile.TarInfo("cifar-10-batches-py/up/escaped")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["links", "device"])
def test_links_and_devices_in_an_archive_are_refused_before_extraction(kind: str, server, tmp_path: Path) -> None:
    url, served = server
    if kind == "links":
        archive = link_chain_archive()
    else:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            device = tarfile.TarInfo("cifar-10-batches-py/null")
            device.type, device.devmajor, device.devminor = tarfile.CHRTYPE, 1, 3
            tar.addfile(device)
        archive = buffer.getvalue()
    dest = tmp_path / "dest"
    with pytest.raises(FetchError, match="is a link or a device; expected files and folders"):
        fetch("cifar10", dest, mirror=url, spec=spec_for(served, archive))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]
    assert sorted(p.name for p in dest.iterdir()) == [".fetch"]


def endless(claimed: str | None, pause_s: float = 0.0, block: bytes = b"x" * 65536):
    """A mirror that claims `claimed` as Content-Length and sends bytes until the client hangs up (or 30 s)."""

    def answer(handler) -> None:
        handler.send_response(200)
        if claimed is not None:
            handler.send_header("Content-Length", claimed)
        handler.end_headers()
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline:
                handler.wfile.write(block)
                handler.wfile.flush()
                time.sleep(pause_s)
        except OSError:
            pass  # the client hung up: what the test wants

    return answer


@pytest.mark.parametrize("claimed", [str(10**12), None])
def test_a_mirror_sending_more_than_the_file_has_is_cut_off_and_nothing_kept(claimed, server, tmp_path: Path) -> None:
    url, served = server
    served.hostile = endless(claimed)
    spec = DataSet("unused", (Resource("small.tar.gz", "0" * 32, 200_000),), "cifar-10-batches-py", extract=True)
    with pytest.raises(FetchError, match="200000") as error:  # uncapped, the mirror's 30 s end a MD5 error
        fetch("cifar10", tmp_path, mirror=url, spec=spec)
    assert "deleted" in str(error.value) or "nothing kept" in str(error.value)
    assert not list((tmp_path / ".fetch").iterdir())  # no .part for a rerun to append to


def test_a_mirror_dripping_bytes_meets_the_overall_deadline(server, tmp_path: Path, monkeypatch) -> None:
    url, served = server
    served.hostile = endless(None, pause_s=0.2, block=b"x")
    monkeypatch.setattr("pipeline.fetch.DEADLINE_GRACE_S", 1)
    spec = DataSet("unused", (Resource("small.tar.gz", "0" * 32, 1000),), "cifar-10-batches-py", extract=True)
    with pytest.raises(FetchError, match="too slow .* the partial download was deleted"):  # not an MD5 error
        fetch("cifar10", tmp_path, mirror=url, spec=spec)


def test_a_download_larger_than_the_free_space_is_refused_first(server, tmp_path: Path) -> None:
    url, served = server
    spec = DataSet("unused", (Resource("small.tar.gz", "0" * 32, 2**60),), "cifar-10-batches-py", extract=True)
    with pytest.raises(FetchError, match="MiB free, the download needs"):
        fetch("cifar10", tmp_path, mirror=url, spec=spec)
    assert served.ranges == []


def test_the_registry_knows_every_files_size() -> None:
    assert all(r.size for spec in DATASETS.values() for r in spec.resources)


def test_an_empty_archive_is_one_line(server, tmp_path: Path) -> None:
    url, served = server
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz"):
        pass
    with pytest.raises(FetchError, match="expected the folder cifar-10-batches-py/ inside, found nothing"):
        fetch("cifar10", tmp_path, mirror=url, spec=spec_for(served, buffer.getvalue()))
    assert not (tmp_path / "cifar-10-batches-py").exists()
