"""The runner behind `benchmarks/gpu_check.sh OUT quick|full [--dry-run]` (see benchmarks/gpu_plan.py for
the steps and benchmarks/gpu_summary.py for what comes back).

Each step is one command under `timeout -k` with its own limit, its output in a log in a scratch folder.
The environment step runs first; the rest of the plan follows from what it found (the loaders that
import, the registered methods, the CPU count). After every step the three output files are rewritten.

A dry run (`--dry-run`, or GPU_CHECK_DRY_RUN=1) runs the same plan with each command in its checking
form: the environment probe as it is, the data step and every benchmark with `--check-args` (flags parse,
every batch size's config resolves, the loaders' packages import), the test steps with `--collect-only`
(the marker expression and the collection of tests/). It needs no GPU, and writes what a real call writes.
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

from benchmarks.gpu_plan import CALLS, KILL_AFTER_S, Step, Where, env_step, plan
from benchmarks.gpu_summary import Report, StepRecord, count_tests, summary_markdown, write_outputs

ROOT = Path(__file__).resolve().parent.parent
CHECK_FORMS = {"env": (), "data": ("--check-args",), "throughput": ("--check-args",), "tests": ("--collect-only",)}
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


def progress_line(record: StepRecord) -> str:
    tests = ", ".join(f"{n} {kind}" for kind, n in (record.tests or {}).items() if kind != "failures")
    line = f"=== {record.name}: {record.outcome} after {record.seconds:.0f} s (limit {record.limit_s} s)"
    return line + (f"; {tests}" if tests else "")


def machine(report: Report, where: Where) -> Where:
    """The plan's paths with the worker count the environment step found (all cores but two)."""
    cpus = report.env.get("cpus") or os.cpu_count() or 2
    return Where(where.work, where.cache, int(os.environ.get("WORKERS", max(1, cpus - 2))))


def run_call(report: Report, out: Path, where: Where, python: str) -> None:
    first = env_step(where)
    report.plan = [first]
    report.steps[first.name] = run_step(first, python, where.work, report.dry_run)
    print(progress_line(report.steps[first.name]), flush=True)
    env_file = where.work / "env.json"
    report.env = json.loads(env_file.read_text()) if env_file.is_file() else {}
    where = machine(report, where)
    report.plan = [first, *plan(report.call, where, report.env)]
    write_outputs(out, where.work, report)
    for step in report.plan[1:]:
        report.steps[step.name] = run_step(step, python, where.work, report.dry_run)
        print(progress_line(report.steps[step.name]), flush=True)
        write_outputs(out, where.work, report)


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="where the three files go (summary.md, results.json, logs.tar.gz)")
    parser.add_argument("call", choices=CALLS, help="quick (first: tests and the headline) or full (second)")
    parser.add_argument("--dry-run", action="store_true", help="check every step's command; measure nothing")
    parser.add_argument("--python", default=sys.executable, help="the interpreter the steps run")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "selfie-trainer"), help="the data cache")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = arguments().parse_args(argv)
    dry_run = args.dry_run or os.environ.get("GPU_CHECK_DRY_RUN") == "1"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"gpu_check-{args.call}-"))
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    report = Report(args.call, dry_run, started)
    try:
        run_call(report, out, Where(work, args.cache, 1), args.python)
        write_outputs(out, work, report)
        print(summary_markdown(report), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    failed = [name for name, record in report.steps.items() if record.exit != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
