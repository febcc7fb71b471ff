"""The one-call Table 1 runner (benchmarks/fmnist_table1.py): its plan fits a call, every command it
would run parses and checks, and its orchestration (the pretraining cut at its limit, columns in
parallel, a failed graphed column retried eagerly, the merge, the five files) works, driven through a
stand-in interpreter that writes what the real programs write, instantly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks import fmnist_table1 as runner
from tests.conftest import HANG_GUARD_S, ROOT
from tests.test_idx import make_idx

# Stands in for `python train/pretrain.py ...` and `python train/compare.py ...`: the files they write.
FAKE_PYTHON = textwrap.dedent(
    """\
    import json, os, sys, time
    from pathlib import Path
    args = sys.argv[2:]
    out = Path(args[args.index("--out") + 1])
    out.mkdir(parents=True, exist_ok=True)
    graphed = "--speed.cuda_graph=true" in args
    if sys.argv[1] == "train/pretrain.py":
        if os.environ.get("FAKE_FAIL_GRAPHED") == "pretraining" and graphed:
            sys.exit(1)
        (out / "checkpoints").mkdir(exist_ok=True)
        (out / "checkpoints" / "step_2.pt").write_bytes(b"")
        records = [{"step": 0, "knn_acc_random": 0.4, "knn_acc_random_sd": 0.03, "knn_acc_pixels": 0.7},
                   {"step": 2, "loss": 1.2, "epoch": 0.5, "clean_patch_acc": 0.61, "knn_acc": 0.55}]
        (out / "log.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in records))
        time.sleep(float(os.environ.get("FAKE_PRETRAIN_S", "0")))  # a pretraining that runs past its limit
        sys.exit(0)
    fraction = float(args[args.index("--fractions") + 1])
    (out / "supervised-cell").mkdir(exist_ok=True)
    (out / "supervised-cell" / "results.json").write_text("{}")
    if os.environ.get("FAKE_FAIL_GRAPHED") == f"{fraction:g}" and graphed:
        sys.exit(1)
    time.sleep(float(os.environ.get("FAKE_COLUMN_S", "0")))
    label = f"{fraction * 100:g}%"
    cells = {row: {label: {"mean": mean + fraction, "std": 0.5, "seeds": 5, "lr": 0.1, "validation": {}}}
             for row, mean in (("supervised", 70.0), ("pretrained", 73.0))}
    summary = {"title": "t", "columns": [label], "values": [fraction], "cells": cells, "init": "i",
               "chance": 10.0, "measured_on": "test", "per_class": False}
    (out / "table.json").write_text(json.dumps(summary))
    """
)


@pytest.fixture
def fake_python(tmp_path: Path) -> str:
    script = tmp_path / "fake_programs.py"
    script.write_text(FAKE_PYTHON)
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {script} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def call_of(tmp_path: Path, python: str, **changes) -> runner.Call:
    plan = replace(runner.FULL, data=str(tmp_path / "data"), fractions=(0.01, 0.1), **changes)
    return runner.Call(plan, tmp_path / "out", tmp_path / "work", python, time.monotonic(), [])


def test_the_full_plan_fits_one_call() -> None:
    plan = runner.FULL
    assert plan.budget_s + runner.KILL_AFTER_S <= 580  # the device tool's 600 s a command, with margin
    # the grid keeps at least 4 minutes after the pretraining, the merge and the reserve
    assert plan.budget_s - plan.pretrain_limit_s - runner.MERGE_S - runner.RESERVE_S >= 240
    assert plan.pretrain_steps == 18_750 and plan.seeds == 5 and 1.0 in plan.fractions and 0.05 in plan.fractions


@pytest.mark.parametrize("name", ["FULL", "SMOKE"])
def test_the_dry_run_checks_every_command(tmp_path: Path, name: str) -> None:
    plan = replace(getattr(runner, name), data=str(make_idx(tmp_path / "fmnist")))
    checked = runner.dry_run(plan)
    # the pretraining, then each column (graphed and eager on a GPU)
    assert len(checked) == (2 if plan.speed == runner.GRAPHED else 1) * (1 + len(plan.fractions))
    assert "train/pretrain.py" in checked[0] and f"--steps {plan.pretrain_steps}" in checked[0]
    lrs = ",".join(f"{lr:g}" for lr in plan.lrs)
    columns = [line for line in checked if "train/compare.py" in line]
    assert all(f"--seeds {plan.seeds}" in line and f"--lrs {lrs}" in line for line in columns)


@pytest.mark.parametrize("bad", ["--epochs=0", "--data=MISSING"])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture, bad: str) -> None:
    data = make_idx(tmp_path / "fmnist")
    argv = [str(tmp_path / "out"), "--data", str(data), bad.replace("MISSING", str(tmp_path)), "--dry-run"]
    assert runner.main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and bad.split("=")[0] in error
    assert not (tmp_path / "out").exists()


def test_a_call_writes_the_merged_table_and_its_five_files(tmp_path: Path, fake_python: str) -> None:
    call = call_of(tmp_path, fake_python)
    call.out.mkdir()
    call.work.mkdir()
    assert runner.run_call(call)
    assert sorted(p.name for p in call.out.iterdir()) == sorted(
        ["summary.md", "table.md", "table.json", "accuracy_vs_labels.png", "logs.tar.gz"]
    )
    table = json.loads((call.out / "table.json").read_text())
    assert table["columns"] == ["1%", "10%"] and table["cells"]["pretrained"]["10%"]["mean"] == pytest.approx(73.1)
    summary = (call.out / "summary.md").read_text()
    assert "step 2 of 18750" in summary and "clean patch accuracy 61.0 %" in summary
    assert "| Δ | +3.0 | +3.0 |" in summary
    with tarfile.open(call.out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert {"pretraining.log", "column-0.01.log", "pretraining/log.jsonl", "columns/0.1/table.json"} <= set(names)


@pytest.mark.parametrize("failing", ["0.1", "pretraining"])
def test_a_failed_graphed_phase_is_retried_eagerly(
    tmp_path: Path, fake_python: str, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    monkeypatch.setenv("FAKE_FAIL_GRAPHED", failing)
    call = call_of(tmp_path, fake_python)
    call.out.mkdir()
    call.work.mkdir()
    assert runner.run_call(call)
    outcomes = {phase.name: phase.exit for phase in call.phases}
    name = "column-0.1" if failing == "0.1" else "pretraining"
    assert outcomes[name] == 1 and outcomes[f"{name}-eager"] == 0
    assert set(outcomes.values()) == {0, 1} and len(outcomes) == 4
    folder = call.work / ("columns/0.1-eager" if failing == "0.1" else "pretraining-eager")
    assert (folder / ("table.json" if failing == "0.1" else "log.jsonl")).is_file()


def test_a_column_cut_at_its_limit_says_how_far_it_got(
    tmp_path: Path, fake_python: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_COLUMN_S", "30")
    monkeypatch.setattr(runner, "GRID_MIN_S", 5)
    monkeypatch.setattr(runner, "PHASE_MIN_S", 1)
    call = call_of(tmp_path, fake_python)
    call.plan = replace(call.plan, budget_s=runner.MERGE_S + runner.RESERVE_S + runner.KILL_AFTER_S + 6)
    call.out.mkdir()
    call.work.mkdir()
    assert not runner.run_call(call)
    summary = (call.out / "summary.md").read_text()
    assert "column-0.01: cut (time limit or SIGTERM)" in summary and "columns finished: none" in summary
    assert "- column 0.01: 1 runs finished (supervised-cell)" in summary and "no table" in summary


def test_a_pretraining_cut_at_its_limit_still_feeds_the_grid(
    tmp_path: Path, fake_python: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_PRETRAIN_S", "30")
    monkeypatch.setattr(runner, "PHASE_MIN_S", 1)
    call = call_of(tmp_path, fake_python, pretrain_limit_s=2)
    call.out.mkdir()
    call.work.mkdir()
    assert runner.run_call(call)
    pretraining = call.phases[0]
    # The limit is what is tested: cut at 2 s, not after the stand-in's 30 s (slack for a busy machine).
    assert pretraining.cut and pretraining.seconds < 25
    assert "pretraining: cut (time limit or SIGTERM)" in (call.out / "summary.md").read_text()


def test_a_runner_stopped_from_outside_stops_its_runs(tmp_path: Path, fake_python: str) -> None:
    marker = tmp_path / "data"
    make_idx(marker)
    env = {**os.environ, "FAKE_PRETRAIN_S": "60", "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "benchmarks.fmnist_table1", str(tmp_path / "out"), "--data", str(marker)]
    runner_process = subprocess.Popen([*argv, "--python", fake_python, "--work", str(tmp_path / "work")], env=env)
    deadline = time.monotonic() + HANG_GUARD_S
    while not (tmp_path / "work" / "pretraining" / "log.jsonl").is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    runner_process.send_signal(signal.SIGTERM)
    runner_process.wait(timeout=HANG_GUARD_S)
    time.sleep(0.5)
    alive = subprocess.run(["pgrep", "-f", str(tmp_path / "work")], capture_output=True, text=True).stdout
    assert alive == ""  # the stand-in pretraining (sleeping 60 s) ended with the runner
    assert not (tmp_path / "work" / "columns").exists()  # and no column started after it
    assert "pretraining: cut (time limit or SIGTERM)" in (tmp_path / "out" / "summary.md").read_text()
