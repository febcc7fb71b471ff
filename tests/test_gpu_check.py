"""The GPU check (benchmarks/gpu_check.sh) without a GPU: its plans fit the budget of a call, a dry run
checks every step's command and writes what the lent machine can bring back, a step past its limit is
cut and recorded, and the summary computes each figure's ratios."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from benchmarks.gpu_check import run_step
from benchmarks.gpu_plan import BUDGET_S, CALLS, Step, Where, env_step, plan, worst_case_s
from benchmarks.gpu_summary import Report, StepRecord, count_tests, summary_markdown
from tests.conftest import ROOT

RETURNED_FILES, RETURNED_DEPTH = 8, 2  # what the lent machine brings back from its output folder
RICHEST = {"loaders": ["torch", "ffcv", "dali"], "cpus": 16}  # every loader imports: the longest plans


@pytest.mark.parametrize("call", CALLS)
def test_every_plan_fits_a_calls_budget(call: str, tmp_path: Path) -> None:
    from train.methods import METHODS

    where = Where(tmp_path, str(tmp_path / "cache"), 14)
    # Every built-in method has its table rows (a test's toy method, registered in this worker, has none).
    methods = {name: "resnet50" for name, cls in METHODS.items() if cls.__module__.startswith("train.methods.")}
    steps = [env_step(where), *plan(call, where, RICHEST | {"methods": methods})]
    assert worst_case_s(steps) <= BUDGET_S, [(s.name, s.limit_s) for s in steps]
    assert len({step.name for step in steps}) == len(steps)
    assert all(step.limit_s > 0 for step in steps)


def test_a_step_past_its_limit_is_cut_and_recorded(tmp_path: Path) -> None:
    sleeper = Step("sleeper", 1, "tests", ("-c", "import time; print('started', flush=True); time.sleep(30)"))
    record = run_step(sleeper, sys.executable, tmp_path, dry_run=False)
    # The limit is what is tested: cut at 1 s, not after the 30 s sleep. 20 s of slack for a busy machine.
    assert record.exit == 124 and record.outcome == "timed out at 1 s" and record.seconds < 21
    assert "started" in (tmp_path / "sleeper.log").read_text()


@pytest.mark.slow  # a dry run starts every step's interpreter: a minute or two on a CPU
@pytest.mark.parametrize("call", CALLS)
def test_a_dry_run_checks_every_step_and_writes_what_comes_back(call: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PY": sys.executable, "GPU_CHECK_DRY_RUN": "1"}
    script = ROOT / "benchmarks" / "gpu_check.sh"
    # A hang guard, not a measurement: a dry run times nothing, and a busy CPU may take minutes.
    result = subprocess.run(
        ["bash", str(script), str(out), call], env=env, capture_output=True, text=True, timeout=3600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    written = [path for path in out.rglob("*") if path.is_file()]
    assert len(written) <= RETURNED_FILES and all(len(p.relative_to(out).parts) <= RETURNED_DEPTH + 1 for p in written)
    assert sorted(p.name for p in written) == ["logs.tar.gz", "results.json", "summary.md"]
    results = json.loads((out / "results.json").read_text())
    assert results["dry_run"] and results["worst_case_s"] <= BUDGET_S
    assert sum(step["worst_case_s"] for step in results["plan"]) <= BUDGET_S
    assert [s["name"] for s in results["plan"]] == list(results["steps"])  # every step was run (checked)
    assert all(s["exit"] == 0 for s in results["steps"].values()), {n: s["exit"] for n, s in results["steps"].items()}
    with tarfile.open(out / "logs.tar.gz") as archive:
        assert {f"logs/{name}.log" for name in results["steps"]} <= set(archive.getnames())
    assert "# GPU check: " + call in result.stdout  # the summary is printed too


def test_the_summary_gives_each_figure_its_ratios() -> None:
    """Made-up rates (no measurement): the ratios are to synthetic, to the bound, to the compared step
    at the same batch, and to the headline's eager batch-64 step."""
    eager = Step("eager", 10, "throughput", (), anchor=("eager", "synthetic", 64))
    graph = Step("graph", 10, "throughput", (), "eager", ("eager", "synthetic", 64))
    loaders = Step("loaders", 10, "throughput", ())
    report = Report("quick", False, "now", [eager, graph, loaders])

    def measured(name: str, results: dict) -> StepRecord:
        return StepRecord(name, "", 10, 0, 1.0, benchmark={"results": results})

    report.steps["eager"] = measured(
        "eager", {"64": {"synthetic": {"median": 1000.0}}, "256": {"synthetic": {"median": 2000.0}}}
    )
    report.steps["graph"] = measured("graph", {"256": {"synthetic": {"median": 3000.0, "launches_per_step": 1.0}}})
    rates = {"synthetic": {"median": 4000.0}, "torch": {"median": 1500.0}, "no-model:torch": {"median": 2000.0}}
    report.steps["loaders"] = measured("loaders", {"256": rates})
    text = summary_markdown(report)
    assert "| graph | synthetic | 256 | 3,000 | 1.50x eager; 3.00x eager @64 | 1 |" in text
    assert "| eager | synthetic | 256 | 2,000 | 2.00x eager @64 |" in text
    assert "| loaders | torch | 256 | 1,500 | 0.38x synthetic; 0.75x its bound (no-model:torch) |" in text
    assert "| loaders | no-model:torch | 256 | 2,000 | 0.50x synthetic |" in text


def test_test_counts_read_pytests_summary_and_failures() -> None:
    log = "FAILED tests/test_step.py::test_x - AssertionError\n3 failed, 50 passed, 4 skipped in 61.20s\n"
    assert count_tests(log) == {
        "failed": 3,
        "passed": 50,
        "skipped": 4,
        "failures": ["FAILED tests/test_step.py::test_x - AssertionError"],
    }
    cut = "\n".join(["tests/test_step.py::test_a PASSED [ 10%]", "tests/test_step.py::test_b FAILED [ 20%]", "t::c "])
    assert count_tests(cut) == {"passed": 1, "failed": 1, "partial": 1, "failures": ["tests/test_step.py::test_b"]}
    assert count_tests("57/510 tests collected (453 deselected) in 7.1s") == {
        "collected": 57,
        "deselected": 453,
        "failures": [],
    }
