"""The run folder (train/engine/run_folder.py, train/engine/run_lock.py): one run per folder, held by an OS lock; a
folder that is not a run of this trainer, the current folder and an --out that cannot be created are
refused with one line, touching nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import HANG_GUARD_S, ROOT, SMALL_MONITORS, TINY, finetune, pretrain
from train.engine.cli import run_cli
from train.stages import finetuning as finetune_module
from train.stages import pretraining as pretrain_module

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("keep_threads")]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int] | None]:
    """Everything under `folder`: each file's bytes and modification time, each folder's name."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
        for p in folder.rglob("*")
    }


def refused(main, args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, args)
    error = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(error) == 1, error
    return error[0]


def test_a_second_run_on_a_folder_in_use_is_refused_and_the_first_is_untouched(tmp_path: Path, demo_root: Path) -> None:
    run = tmp_path / "run"
    args = [*SMALL_MONITORS, *TINY, "--data", str(demo_root), "--out", str(run), "--steps", "40"]
    first = subprocess.Popen([sys.executable, str(ROOT / "train" / "pretrain.py"), *args], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + HANG_GUARD_S
    while not (run / "log.jsonl").exists() or '"loss"' not in (run / "log.jsonl").read_text():
        assert first.poll() is None and time.time() < deadline, first.communicate()[1][-2000:]
        time.sleep(0.05)
    config = (run / "config.yaml").read_bytes()
    second = subprocess.run([sys.executable, str(ROOT / "train" / "pretrain.py"), *args],
                            cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_S)  # fmt: skip
    _, stderr = first.communicate(timeout=HANG_GUARD_S)
    assert first.returncode == 0, stderr[-2000:]
    error = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(error) == 1, error
    assert f"in use by another run (pid {first.pid} on " in error[0], error
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 41))  # the first run's, each once
    assert (run / "config.yaml").read_bytes() == config
    assert len(json.loads((run / "run.json").read_text())["invocations"]) == 1


def foreign_folder(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.yaml").write_text("my: own config\n")
    (folder / "log.jsonl").write_text('{"my": "log"}\n')
    (folder / "run.json").write_text('{"not": "a run record"}\n')
    (folder / "notes.txt").write_text("notes\n")
    return folder


def test_a_folder_that_is_not_a_run_is_left_byte_identical(
    tmp_path: Path, demo_root: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    folder = foreign_folder(tmp_path / "mine")
    before = snapshot(folder)
    for main in (pretrain_module.main, finetune_module.main):
        line = refused(main, [*TINY, "--data", str(demo_root), "--steps", "2", "--out", str(folder)], capsys)
        assert f"--out {folder}: an existing folder that is not a" in line and "notes.txt" in line, line
        assert snapshot(folder) == before


def test_a_pretraining_run_folder_is_not_a_fine_tuning_one(tmp_path: Path, demo_root: Path) -> None:
    """Fine-tuning into a pretraining run's folder would overwrite its config.yaml and log."""
    run = tmp_path / "run"
    done = pretrain([*TINY, "--steps", "1", "--data", str(demo_root), "--out", str(run)], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    before = snapshot(run)
    result = finetune(
        [*TINY, "--data", str(demo_root), "--init", str(run), "--out", str(run), "--steps", "2"], tmp_path
    )
    assert result.returncode == 2 and "not a finetuning run of this trainer" in result.stderr, result.stderr[-2000:]
    assert snapshot(run) == before


@pytest.mark.parametrize("out", ["", ".", "/proc/x/run", "afile/run"])
def test_the_current_folder_and_an_uncreatable_out_are_one_line(
    out: str, tmp_path: Path, demo_root: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "log.jsonl").write_text('{"a log": "of the user"}\n')
    before = snapshot(tmp_path)
    line = refused(pretrain_module.main, [*TINY, "--data", str(demo_root), "--steps", "2", "--out", out], capsys)
    expected = "the current folder" if out in ("", ".") else "cannot be created"
    assert f"--out {out!r}" in line or f"--out {out}" in line, line
    assert expected in line, line
    assert snapshot(tmp_path) == before


def test_a_run_lock_linked_elsewhere_is_never_written_through(
    tmp_path: Path, demo_root: Path, monkeypatch, capsys
) -> None:
    """`ln -s ~/victim RUN/run.lock`: neither a resume nor a run into a folder holding only the link
    truncates the victim or writes the lock record into it."""
    monkeypatch.chdir(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "run.lock").symlink_to(victim)
    for main in (pretrain_module.main, finetune_module.main):
        line = refused(main, [*TINY, "--data", str(demo_root), "--steps", "2", "--out", str(lonely)], capsys)
        assert "not a" in line and "run of this trainer" in line, line
    run = tmp_path / "run"
    done = pretrain([*TINY, "--steps", "1", "--data", str(demo_root), "--out", str(run)], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    (run / "run.lock").unlink()
    (run / "run.lock").symlink_to(victim)
    line = refused(pretrain_module.main, [*TINY, "--data", str(demo_root), "--steps", "2", "--out", str(run),
                                          "--resume"], capsys)  # fmt: skip
    assert f"{run / 'run.lock'} is a symbolic link; refusing to write through it" in line, line
    assert victim.read_text() == "precious\n"


def test_a_run_lock_that_is_not_a_record_makes_no_folder_a_run_folder(
    tmp_path: Path, demo_root: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "run.lock").write_text("not json\n")
    (folder / "notes.txt").write_text("notes\n")
    before = snapshot(folder)
    args = [*TINY, "--data", str(demo_root), "--steps", "2", "--out", str(folder)]
    line = refused(pretrain_module.main, args, capsys)
    assert "an existing folder that is not a pretraining run" in line, line
    assert snapshot(folder) == before


def test_a_dead_writers_temporary_is_removed_when_the_run_resumes(tmp_path: Path, demo_root: Path) -> None:
    run = tmp_path / "run"
    args = [*TINY, "--data", str(demo_root), "--out", str(run)]
    assert pretrain([*args, "--steps", "1"], tmp_path).returncode == 0
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, timeout=HANG_GUARD_S).stdout)  # fmt: skip
    stale = run / "checkpoints" / f".step_00000002.pt.tmp-{dead}"
    stale.write_bytes(b"half a checkpoint")
    done = pretrain([*args, "--steps", "2", "--resume"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not stale.exists() and f"removed {stale}" in done.stdout
