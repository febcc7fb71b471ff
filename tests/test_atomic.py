"""pipeline/atomic.py: every file the project creates is opened without following a link, and a
temporary left by a process killed mid-write is removed when a run starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.atomic import (
    RefusedPath,
    open_for_append,
    open_new,
    remove_stale_temporaries,
    write_atomic,
)
from tests.conftest import HANG_GUARD_S


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim"
    path.write_bytes(b"precious")
    return path


@pytest.mark.parametrize("opener", [open_new, open_for_append, lambda p: open_new(p, exclusive=True)])
def test_a_link_in_the_files_place_is_refused_and_its_target_untouched(opener, tmp_path: Path, victim: Path) -> None:
    link = tmp_path / "out.bin"
    link.symlink_to(victim)
    with pytest.raises(RefusedPath, match=r"out.bin: a symbolic link; refusing to write through it"):
        opener(link)
    assert victim.read_bytes() == b"precious"


def test_a_fifo_in_the_files_place_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "log.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(RefusedPath, match="not a regular file"):
        open_for_append(fifo)


def test_write_atomic_replaces_a_link_itself_not_its_target(tmp_path: Path, victim: Path) -> None:
    link = tmp_path / "config.yaml"
    link.symlink_to(victim)
    write_atomic(link, b"new")
    assert victim.read_bytes() == b"precious"
    assert not link.is_symlink() and link.read_bytes() == b"new"


def test_a_link_planted_at_the_temporary_name_is_not_written_through(tmp_path: Path, victim: Path) -> None:
    (tmp_path / f".step.pt.tmp-{os.getpid()}").symlink_to(victim)
    write_atomic(tmp_path / "step.pt", b"state")
    assert victim.read_bytes() == b"precious"
    assert (tmp_path / "step.pt").read_bytes() == b"state"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step.pt", "victim"]


def test_only_a_dead_processs_temporaries_are_removed(tmp_path: Path) -> None:
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    dead = int(child.stdout)
    (tmp_path / "checkpoints").mkdir()
    stale = tmp_path / "checkpoints" / f".step_00000002.pt.tmp-{dead}"
    mine = tmp_path / f".log.jsonl.tmp-{os.getpid()}"
    kept = tmp_path / ".notes.tmp-x"  # not a temporary of ours: no pid
    for path in (stale, mine, kept):
        path.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists() and mine.exists() and kept.exists()
