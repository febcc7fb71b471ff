"""The GPU check (benchmarks/gpu_check.sh) without a GPU: one call fits one lease with the headline first,
later calls continue where it stopped and cover the plan, every step's memory estimate fits an 80 GB
device, a dry run checks every step (the data built for real, every benchmark's inputs built) with FFCV and
DALI hidden and writes what the lent machine can bring back, a step past its limit is cut and recorded,
each step prints its line as it ends, and the summary computes each figure's ratios within 4,000 characters."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from benchmarks.gpu_check import read_env, run_and_say, run_step
from benchmarks.gpu_plan import (
    ACTIVATION_GIB,
    BUDGET_S,
    DEVICE_MEMORY_GIB,
    FIXED_GIB,
    SWEEP,
    Step,
    Where,
    budget_s,
    call_steps,
    plan,
    prelude,
    worst_case_s,
)
from benchmarks.gpu_summary import SUMMARY_CHARS, Report, StepRecord, count_tests, step_line, summary_markdown
from tests.conftest import HANG_GUARD_S, HIDDEN, ROOT, without_packages

RETURNED_FILES, RETURNED_DEPTH = 8, 2  # what the lent machine brings back from its output folder
RICHEST = {"loaders": ["torch", "ffcv", "dali"], "cpus": 16}  # every loader imports: the longest plans
HEADLINE = ["selfie224_eager", "selfie224_graph", "selfie224_compile_graph", "selfie224_loaders"]


def richest_plan(tmp_path: Path) -> tuple[list[Step], list[Step]]:
    from train.methods import METHODS

    where = Where(tmp_path, str(tmp_path / "cache"), 14)
    # Every built-in method has its table rows (a test's toy method, registered in this worker, has none).
    methods = {name: "resnet50" for name, cls in METHODS.items() if cls.__module__.startswith("train.methods.")}
    return prelude(where), plan(where, RICHEST | {"methods": methods})


def calls_of(first: list[Step], steps: list[Step], budget: int) -> list[list[Step]]:
    """The steps of each call in turn, each continuing where the last one stopped (its `--from`)."""
    calls, start = [], None
    while True:
        taken, left = call_steps(first, steps, start, budget)
        assert taken, f"no step fits after {start}"
        calls.append(taken)
        if not left:
            return calls
        start = left[0].name


def test_the_first_call_is_the_headline_and_later_calls_cover_the_rest_within_the_budget(tmp_path: Path) -> None:
    first, steps = richest_plan(tmp_path)
    calls = calls_of(first, steps, BUDGET_S)
    assert [step.name for step in calls[0]] == HEADLINE  # the headline whole, first, in its order
    assert [step.name for call in calls for step in call] == [step.name for step in steps]  # once each, in order
    assert all(worst_case_s([*first, *call]) <= BUDGET_S <= 420 for call in calls)
    assert len({step.name for step in [*first, *steps]}) == len(first) + len(steps)
    assert all(step.limit_s > 0 for step in [*first, *steps])


def test_a_smaller_budget_drops_the_tail_and_says_where_to_go_on(tmp_path: Path, monkeypatch) -> None:
    first, steps = richest_plan(tmp_path)
    budget = worst_case_s([*first, *steps[:2]])  # room for the prelude and two steps exactly
    monkeypatch.setenv("GPU_CHECK_BUDGET_S", str(budget))
    taken, left = call_steps(first, steps, None, budget_s())
    assert [s.name for s in taken] == HEADLINE[:2] and left[0].name == HEADLINE[2]
    report = Report(False, "now", budget, [*first, *taken], left=[s.name for s in left])
    assert f'`bash benchmarks/gpu_check.sh "$OUT" --from {HEADLINE[2]}`' in summary_markdown(report)
    taken, left = call_steps(first, steps, HEADLINE[2], budget)  # the next call starts there
    assert taken[0].name == HEADLINE[2]
    for wrong in ("0", "-5", "7.5", "soon"):
        monkeypatch.setenv("GPU_CHECK_BUDGET_S", wrong)
        with pytest.raises(ValueError, match=f"GPU_CHECK_BUDGET_S={wrong}: expected a positive whole number"):
            budget_s()


def test_every_steps_memory_estimate_fits_an_80_gb_device(tmp_path: Path) -> None:
    """One copy of a step's activations fits; two (the old FLOP count at the full batch beside a graph's
    pool) would not fit the headline's largest batch: the reason the count runs at a small batch."""
    first, steps = richest_plan(tmp_path)
    too_big = {step.name: step.memory_gib for step in [*first, *steps] if step.memory_gib > DEVICE_MEMORY_GIB}
    assert not too_big, too_big
    largest = {step.name: step.memory_gib for step in steps}["selfie224_graph"]
    assert largest == pytest.approx(FIXED_GIB + ACTIVATION_GIB["selfie"] * max(SWEEP), abs=0.1)
    assert FIXED_GIB + 2 * (largest - FIXED_GIB) > DEVICE_MEMORY_GIB


def test_a_step_past_its_limit_is_cut_and_recorded(tmp_path: Path) -> None:
    sleeper = Step("sleeper", 1, "tests", ("-c", "import time; print('started', flush=True); time.sleep(30)"))
    record = run_step(sleeper, sys.executable, tmp_path, dry_run=False)
    # The limit is what is tested: cut at 1 s, not after the 30 s sleep. 20 s of slack for a busy machine.
    assert record.exit == 124 and record.outcome == "timed out at 1 s" and record.seconds < 21
    assert "started" in (tmp_path / "sleeper.log").read_text()


def test_the_data_step_builds_the_data_without_ffcv_and_dali(tmp_path: Path) -> None:
    """Run for real, as on the GPU machine (neither package): the JPEG set and the demo data are built,
    no .beton, and the step passes (it failed on FFCV's DataError before)."""
    env = without_packages(tmp_path / "hide")
    command = [sys.executable, "-m", "benchmarks.gpu_prepare", "data", "--cache", str(tmp_path / "cache")]
    result = subprocess.run(
        [*command, "--images", "16"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert len(list((tmp_path / "cache" / "bench-jpeg-v1-16" / "train").rglob("*.jpg"))) == 16
    assert not list((tmp_path / "cache").glob("*.beton")) and "FFCV is not installed here" in result.stdout


@pytest.mark.slow  # every step's interpreter, data and inputs, over every call: several minutes on a CPU
def test_a_dry_run_checks_every_step_of_every_call_without_ffcv_and_dali(tmp_path: Path) -> None:
    """Call after call, each from where the last stopped, with FFCV and DALI hidden as on the GPU machine:
    every step passes in its checking form (the data built for real, every benchmark's inputs built),
    prints its line, and the three files hold what the lent machine brings back."""
    env = {**without_packages(tmp_path / "hide"), "PY": sys.executable, "GPU_CHECK_DRY_RUN": "1"}
    script, cache, start, checked = ROOT / "benchmarks" / "gpu_check.sh", str(tmp_path / "cache"), [], []
    while True:
        out = tmp_path / f"out{len(checked)}"
        # A hang guard, not a measurement: a dry run times nothing, and a busy CPU may take minutes.
        command = ["bash", str(script), str(out), "--cache", cache, *start]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=4 * HANG_GUARD_S)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        results = checked_outputs(out)
        assert all(f"=== {name}: ok after" in result.stdout for name in results["steps"])  # a line as each ended
        summary = (out / "summary.md").read_text()
        assert summary in result.stdout and len(summary) <= SUMMARY_CHARS  # printed at the end too
        checked += [name for name in results["steps"] if name not in ("env", "data")]
        if not results["left"]:
            break
        assert results["next_command"].endswith(f"--from {results['left'][0]} --dry-run")
        start = ["--from", results["left"][0]]
    # The plan from the environment the calls probed (this process's registry may hold a test's toy method).
    env = results["env"]
    names = [step.name for step in plan(Where(tmp_path, cache, 1), env)]
    assert checked == names  # every step once, in order
    assert {name for name in names if name.startswith("method224_")} == {f"method224_{m}" for m in env["methods"]}


def checked_outputs(out: Path) -> dict:
    written = [path for path in out.rglob("*") if path.is_file()]
    assert len(written) <= RETURNED_FILES and all(len(p.relative_to(out).parts) <= RETURNED_DEPTH + 1 for p in written)
    assert sorted(p.name for p in written) == ["logs.tar.gz", "results.json", "summary.md"]
    results = json.loads((out / "results.json").read_text())
    assert results["dry_run"] and results["worst_case_s"] <= BUDGET_S
    assert sum(step["worst_case_s"] for step in results["plan"]) <= BUDGET_S
    assert [s["name"] for s in results["plan"]] == list(results["steps"])  # every step was run (checked)
    assert all(s["exit"] == 0 for s in results["steps"].values()), {n: s["exit"] for n, s in results["steps"].items()}
    assert results["env"]["loaders"] == ["torch"] and not any(results["env"]["versions"][name] for name in HIDDEN)
    with tarfile.open(out / "logs.tar.gz") as archive:
        assert {f"logs/{name}.log" for name in results["steps"]} <= set(archive.getnames())
        logs = {name: archive.extractfile(f"logs/{name}.log").read().decode() for name in results["steps"]}
    inputs = [
        name for name, step in zip(results["steps"], results["plan"], strict=True) if step["kind"] == "throughput"
    ]
    assert all("inputs ok: " in logs[name] for name in inputs)  # built its inputs, not only parsed its flags
    return results


def test_a_cut_environment_probe_falls_back_to_the_registered_methods(tmp_path: Path) -> None:
    from benchmarks.gpu_plan import methods_224

    env = read_env(tmp_path)  # no env.json: the probe was cut at its limit
    assert env["methods"] == methods_224() and env["loaders"] == ["torch"] and "cut" in env["probe"]
    assert [s for s in plan(Where(tmp_path, "c", 1), env) if s.name.startswith("method224_")]


def test_each_step_prints_its_line_as_it_ends_and_a_failed_one_its_log(tmp_path: Path, capsys) -> None:
    failing = Step("broken", 30, "tests", ("-c", "print('first'); print('the error'); raise SystemExit(3)"))
    report = Report(False, "now", BUDGET_S, [failing])
    run_and_say(report, failing, sys.executable, tmp_path)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("=== broken: exit 3 after ") and printed[-2:] == ["    first", "    the error"]


def measured(name: str, results: dict, exit_code: int = 0) -> StepRecord:
    return StepRecord(name, "", 10, exit_code, 1.0, benchmark={"results": results})


def test_the_summary_gives_each_figure_its_ratios() -> None:
    """Made-up rates (no measurement): the ratios are to synthetic, to the bound, to the compared step
    at the same batch, and to the headline's eager batch-64 step; a figure's loss finite or not."""
    eager = Step("eager", 10, "throughput", (), anchor=("eager", "synthetic", 64))
    graph = Step("graph", 10, "throughput", (), "eager", ("eager", "synthetic", 64))
    loaders = Step("loaders", 10, "throughput", ())
    report = Report(False, "now", BUDGET_S, [eager, graph, loaders])
    report.steps["eager"] = measured(
        "eager", {"64": {"synthetic": {"median": 1000.0}}, "256": {"synthetic": {"median": 2000.0}}}
    )
    graphed = {"median": 3000.0, "launches_per_step": 1.0, "loss_finite": True, "loss": 6.9}
    report.steps["graph"] = measured("graph", {"256": {"synthetic": graphed}})
    rates = {"synthetic": {"median": 4000.0}, "torch": {"median": 1500.0}, "no-model:torch": {"median": 2000.0}}
    report.steps["loaders"] = measured("loaders", {"256": rates})
    text = summary_markdown(report)
    assert "| graph | synthetic | 256 | 3,000 | 1.50x eager; 3.00x eager @64 | yes | 1 |" in text
    assert "| eager | synthetic | 256 | 2,000 | 2.00x eager @64 | - |" in text
    assert "| loaders | torch | 256 | 1,500 | 0.38x synthetic; 0.75x its bound (no-model:torch) | - |" in text
    assert "| loaders | no-model:torch | 256 | 2,000 | 0.50x synthetic | - |" in text


def test_a_steps_line_gives_its_best_batch_ratios_tflops_and_loss() -> None:
    eager = Step("eager", 10, "throughput", (), anchor=("eager", "synthetic", 64))
    graph = Step("graph", 10, "throughput", (), "eager", ("eager", "synthetic", 64))
    loaders = Step("loaders", 10, "throughput", ())
    report = Report(False, "now", BUDGET_S, [eager, graph, loaders])
    report.steps["eager"] = measured("eager", {"64": {"synthetic": {"median": 1000.0, "loss_finite": True}}})
    fast = {"median": 5000.0, "achieved_tflops": 123.4, "loss_finite": False, "loss": "nan"}
    small = {"median": 2000.0, "loss_finite": True}
    report.steps["graph"] = measured("graph", {"64": {"synthetic": small}, "1024": {"synthetic": fast}})
    torch_loader = {"median": 1500.0, "loss_finite": True}
    rates = {"synthetic": {"median": 4000.0, "loss_finite": True}, "torch": torch_loader}
    rates["no-model:torch"] = {"median": 2000.0}
    report.steps["loaders"] = measured("loaders", {"256": rates})
    assert step_line(report, graph) == (
        "=== graph: ok after 1 s (limit 10 s) | batch 1024 synthetic 5,000 images/s | 5.00x eager @64 "
        "| 123 TFLOP/s | loss finite NO"
    )
    assert step_line(report, loaders).endswith(
        "| batch 256 torch 1,500 images/s | 0.38x synthetic; 0.75x its bound (no-model:torch) | - TFLOP/s "
        "| loss finite yes"
    )


def test_the_printed_summary_stays_within_4000_characters_and_keeps_what_is_left() -> None:
    """Every step of the longest plan measured at four batch sizes, with test failures and the commands:
    cut to 4,000 characters with a line saying so, the command for the next call kept."""
    steps = [Step(f"step{i:02d}_with_a_long_name", 10, "throughput", ("-m", "x" * 200)) for i in range(30)]
    report = Report(True, "now", BUDGET_S, steps[:20], left=[step.name for step in steps[20:]])
    for step in steps[:20]:
        result = {"median": 1234.5, "loss_finite": True, "achieved_tflops": 12.5, "peak_memory_gib": 60.1}
        report.steps[step.name] = measured(step.name, {str(b): {"synthetic": result, "torch": result} for b in SWEEP})
        report.steps[step.name].tests = {"failed": 1, "failures": [f"FAILED tests/test_x.py::test_{step.name} - boom"]}
        report.steps[step.name].command = "python " + "y" * 300
    text = summary_markdown(report)
    assert len(text) <= SUMMARY_CHARS and "more lines cut here" in text.splitlines()[-1]
    assert f"--from {steps[20].name} --dry-run`" in text
    assert len(summary_markdown(report, limit=10**6)) > 4 * SUMMARY_CHARS  # so the cut was needed


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
