"""The runner behind `benchmarks/gpu_check.sh OUT [--from STEP] [--dry-run]` (see benchmarks/gpu_plan.py
for the steps and which of them one call runs, benchmarks/gpu_summary.py for what comes back).

Each step is one command under `timeout -k` with its own limit, its output in a log in a scratch folder.
The environment step runs first; the rest of the plan follows from what it found (the loaders that
import, the CPU count; the registered methods, which the runner lists itself when the probe was cut).
After every step a line with its figures is printed and the three output files are rewritten.

A dry run (`--dry-run`, or GPU_CHECK_DRY_RUN=1) runs the same steps in their checking forms: the
environment probe and the data step as they are (the data built for real, with whatever packages are
there), every benchmark with `--check-inputs` (flags parse, every batch size's config resolves, then the
data, the model and a small batch of every mode's inputs are built; nothing is trained or timed), the
test steps with `--collect-only`. It needs no GPU, writes what a real call writes, and no wall-clock limit
decides its outcome: each step gets a hang guard instead of its limit.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.gpu_plan import (
    KILL_AFTER_S,
    Step,
    Where,
    budget_s,
    call_steps,
    methods_224,
    plan,
    prelude,
    worst_case_s,
)
from benchmarks.gpu_summary import Report, StepRecord, count_tests, log_tail, step_line, summary_markdown, write_outputs

ROOT = Path(__file__).resolve().parent.parent
CHECK_FORMS = {"env": (), "data": (), "throughput": ("--check-inputs",), "tests": ("--collect-only",)}
# A dry run checks commands, not timings: the plan's limits are a GPU machine's, and a busy CPU running the
# checking forms can take several times as long. Each dry step gets this hang guard instead.
DRY_RUN_GUARD_S = 900


def command(step: Step, python: str, work: Path, dry_run: bool) -> list[str]:
    extra = CHECK_FORMS[step.kind] if dry_run else ()
    output = ("--json", str(work / f"{step.name}.json")) if step.kind == "throughput" and not dry_run else ()
    return [python, *step.args, *output, *extra]


def run_step(step: Step, python: str, work: Path, dry_run: bool) -> StepRecord:
    """The step under `timeout -k` (which signals the step's whole process group: loader workers and test
    subprocesses go with it); its output to WORK/NAME.log."""
    argv = command(step, python, work, dry_run)
    limit_s = DRY_RUN_GUARD_S if dry_run else step.limit_s
    record = StepRecord(step.name, shlex.join(argv), limit_s)
    log = work / f"{step.name}.log"
    started = time.monotonic()
    with log.open("w") as sink:
        limited = ["timeout", "-k", str(KILL_AFTER_S), str(limit_s), *argv]
        try:
            done = subprocess.run(
                limited, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, timeout=limit_s + KILL_AFTER_S + 5
            )
            record.exit = done.returncode
        except subprocess.TimeoutExpired:  # `timeout` itself did not return: count it as killed
            record.exit = 137
    record.seconds = round(time.monotonic() - started, 1)
    text = log.read_text(errors="replace")
    if step.kind == "tests":
        record.tests = count_tests(text)
    benchmark = work / f"{step.name}.json"
    if step.kind == "throughput" and benchmark.is_file():
        record.benchmark = json.loads(benchmark.read_text())
    return record


def machine(report: Report, where: Where) -> Where:
    """The plan's paths with the worker count the environment step found (all cores but two)."""
    cpus = report.env.get("cpus") or os.cpu_count() or 2
    return Where(where.work, where.cache, int(os.environ.get("WORKERS", max(1, cpus - 2))))


def fallback_env() -> dict:
    """What the plan needs of the environment when the probe was cut or failed: the registered methods
    (this checkout's, as the probe would list them) and the torch loader, which is always there."""
    try:
        methods = methods_224()
    except Exception as error:  # noqa: BLE001 (an interpreter that cannot import the trainer: no table rows)
        print(f"note: no per-method steps ({error})", file=sys.stderr)
        methods = {}
    return {"methods": methods, "loaders": ["torch"]}


def read_env(work: Path) -> dict:
    env_file = work / "env.json"
    env = json.loads(env_file.read_text()) if env_file.is_file() else {}
    if "methods" not in env:
        env = {**fallback_env(), **env, "probe": "cut or failed: the registered methods and the torch loader"}
    return env


def run_and_say(report: Report, step: Step, python: str, work: Path) -> None:
    """Run the step and print its line at once (and its log's last lines if it failed)."""
    report.steps[step.name] = run_step(step, python, work, report.dry_run)
    print(step_line(report, step), flush=True)
    if report.steps[step.name].exit != 0:
        print(log_tail(work / f"{step.name}.log"), flush=True)


def run_call(report: Report, out: Path, where: Where, python: str, start: str | None) -> None:
    env_step, _ = prelude(where)
    report.plan = [env_step]
    run_and_say(report, env_step, python, where.work)
    report.env = read_env(where.work)
    where = machine(report, where)
    first = prelude(where)
    steps, left = call_steps(first, plan(where, report.env), start, report.budget_s)
    report.plan, report.left = [*first, *steps], [step.name for step in left]
    write_outputs(out, where.work, report)
    for step in report.plan[1:]:
        run_and_say(report, step, python, where.work)
        write_outputs(out, where.work, report)


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="where the three files go (summary.md, results.json, logs.tar.gz)")
    parser.add_argument(
        "--from", dest="start", metavar="STEP", help="after the prelude, start at this step (a summary names it)"
    )
    parser.add_argument("--dry-run", action="store_true", help="check every step's command; measure nothing")
    parser.add_argument("--python", default=sys.executable, help="the interpreter the steps run")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "selfie-trainer"), help="the data cache")
    return parser


def refusal(start: str | None, cache: str, budget: int) -> str | None:
    """What is wrong with --from or the budget, checked before anything runs (nothing is left behind)."""
    where = Where(Path(tempfile.gettempdir()), cache, 1)
    steps = plan(where, fallback_env())
    names = [step.name for step in steps]
    if start is not None and start not in names:
        return f"--from {start}: expected one of the plan's steps: {', '.join(names)}"
    first = steps[names.index(start) if start else 0]
    need = worst_case_s([*prelude(where), first])
    return None if need <= budget else f"GPU_CHECK_BUDGET_S={budget}: the prelude and {first.name} need {need} s"


def main(argv: list[str] | None = None) -> int:
    args = arguments().parse_args(argv)
    try:
        budget = budget_s()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if wrong := refusal(args.start, args.cache, budget):
        print(f"error: {wrong}", file=sys.stderr)
        return 2
    dry_run = args.dry_run or os.environ.get("GPU_CHECK_DRY_RUN") == "1"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    report = Report(dry_run, datetime.now(timezone.utc).isoformat(timespec="seconds"), budget)
    try:
        run_call(report, out, Where(work, args.cache, 1), args.python, args.start)
        write_outputs(out, work, report)
        print(summary_markdown(report), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    failed = [name for name, record in report.steps.items() if record.exit != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
