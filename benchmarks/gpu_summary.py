"""What a GPU-check call brings home, whole: three files in OUT, rewritten after every step so that a call
cut short still returns everything measured so far.

- `summary.md`: the steps (limit, time taken, outcome), the tests' counts and failures, and one table of
  every figure (images/s, launches per step, GPU busy, peak memory, TFLOP/s) with its ratios: to the
  same step's synthetic rate, end to end to its bound (min of synthetic and the loader's no-model rate,
  named), to the step it is compared with at the same batch, and to the headline's eager batch-64 step.
- `results.json`: the plan, the environment and every step's record merged (each benchmark's own JSON).
- `logs.tar.gz`: every step's log and JSON, and env.json.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.gpu_plan import BUDGET_S, KILL_AFTER_S, Step, worst_case_s

OUTPUT_FILES = ("summary.md", "results.json", "logs.tar.gz")
PROFILE_COLUMNS = (  # (key in a mode's result, title, format)
    ("launches_per_step", "launches/step", "{:g}"),
    ("gpu_busy", "GPU busy", "{:.0%}"),
    ("peak_memory_gib", "peak GiB", "{:.1f}"),
    ("achieved_tflops", "TFLOP/s", "{:.3g}"),
)
COUNT_NAMES = {"errors": "error", "tests collected": "collected", "test collected": "collected"}
DATA_SIDE_MODES = ("synthetic", "naive", "raw-ffcv")  # modes that are not a loader end to end


@dataclass
class StepRecord:
    name: str
    command: str
    limit_s: int
    exit: int | None = None  # None: not run (yet)
    seconds: float | None = None
    tests: dict | None = None  # a test step's counts and failures
    benchmark: dict | None = None  # a throughput step's own JSON (as far as it got)

    @property
    def outcome(self) -> str:
        if self.exit is None:
            return "not run"
        if self.exit in (124, 137):
            return f"timed out at {self.limit_s} s"
        return "ok" if self.exit == 0 else f"exit {self.exit}"


@dataclass
class Report:
    call: str
    dry_run: bool
    started: str
    plan: list[Step] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    steps: dict[str, StepRecord] = field(default_factory=dict)


def count_tests(log: str) -> dict:
    """pytest's last summary line as counts, and the FAILED/ERROR lines of its short summary. A run cut
    before its summary is counted from its per-test lines (`-v`), marked partial."""
    lines, counts = log.splitlines(), {}
    for line in reversed(lines):
        found = re.findall(r"(\d+)(?:/\d+)? (passed|failed|skipped|errors?|deselected|tests? collected)", line)
        if found:
            counts = {COUNT_NAMES.get(kind, kind): int(n) for n, kind in found}
            break
    if not counts:
        for outcome in re.findall(r"::\S+ (PASSED|FAILED|SKIPPED|ERROR)\b", log):
            counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
        counts |= {"partial": 1} if counts else {}
    failures = [line for line in lines if line.startswith(("FAILED ", "ERROR "))]
    failures += [] if failures else [line.split(" ")[0] for line in lines if re.search(r"::\S+ (FAILED|ERROR)\b", line)]
    return {**counts, "failures": failures[:20]}


def figure(report: Report, step: str, batch: int | str, mode: str) -> float | None:
    record = report.steps.get(step)
    results = (record.benchmark or {}).get("results", {}) if record else {}
    return results.get(str(batch), {}).get(mode, {}).get("median")


def ratios(report: Report, step: Step, batch: str, mode: str, rate: float) -> list[str]:
    found, synthetic = [], figure(report, step.name, batch, "synthetic")
    if mode != "synthetic" and synthetic:
        found.append(f"{rate / synthetic:.2f}x synthetic")
    no_model = figure(report, step.name, batch, f"no-model:{mode}")
    if mode not in DATA_SIDE_MODES and not mode.startswith("no-model:") and synthetic and no_model:
        bound, name = min((synthetic, "synthetic"), (no_model, f"no-model:{mode}"))
        found.append(f"{rate / bound:.2f}x its bound ({name})")
    base = figure(report, step.baseline, batch, mode) if step.baseline else None
    if base:
        found.append(f"{rate / base:.2f}x {step.baseline}")
    if step.anchor and mode == step.anchor[1]:
        name, anchor_mode, anchor_batch = step.anchor
        anchor = figure(report, name, anchor_batch, anchor_mode)
        found += [f"{rate / anchor:.2f}x {name} @{anchor_batch}"] if anchor else []
    return found


def figure_rows(report: Report) -> list[str]:
    titles = ["step", "mode", "batch", "images/s", "ratios", *(title for _, title, _ in PROFILE_COLUMNS)]
    rows = ["| " + " | ".join(titles) + " |", "| --- | --- | ---: | ---: | --- |" + " ---: |" * len(PROFILE_COLUMNS)]
    for step in report.plan:
        benchmark = report.steps[step.name].benchmark if step.name in report.steps else None
        for batch, modes in ((benchmark or {}).get("results") or {}).items():
            for mode, result in modes.items():
                rate = result["median"]
                cells = [step.name, mode, batch, f"{rate:,.0f}", "; ".join(ratios(report, step, batch, mode, rate))]
                cells += [
                    fmt.format(result[key]) if result.get(key) is not None else "-" for key, _, fmt in PROFILE_COLUMNS
                ]
                rows.append("| " + " | ".join(cells) + " |")
    return rows


def step_rows(report: Report) -> list[str]:
    rows = ["| step | limit s | took s | outcome | tests |", "| --- | ---: | ---: | --- | --- |"]
    for step in report.plan:
        record = report.steps.get(step.name) or StepRecord(step.name, "", step.limit_s)
        took = f"{record.seconds:.0f}" if record.seconds is not None else "-"
        tests = ", ".join(f"{n} {kind}" for kind, n in (record.tests or {}).items() if kind != "failures")
        rows.append(f"| {step.name} | {step.limit_s} | {took} | {record.outcome} | {tests} |")
    return rows


def summary_markdown(report: Report) -> str:
    env = report.env
    device = env.get("device") or ("no CUDA device" if env else "environment unknown")
    versions = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items() if v)
    absent = ", ".join(k for k, v in (env.get("versions") or {}).items() if not v)
    lines = [
        f"# GPU check: {report.call}{' (dry run: commands parsed, nothing measured)' if report.dry_run else ''}",
        "",
        f"Started {report.started}; {device}; {env.get('cpus', '?')} CPUs; "
        f"loaders {', '.join(env.get('loaders', [])) or '-'}.",
        f"Versions: {versions or '-'}; not importable: {absent or 'none'}.",
        f"Plan: {len(report.plan)} steps, at most {worst_case_s(report.plan)} s of the {BUDGET_S} s budget "
        f"(limits + {KILL_AFTER_S} s kill grace each + the runner's reserve).",
        "",
        *step_rows(report),
    ]
    failures = [f"- {step}: {line}" for step, r in report.steps.items() for line in (r.tests or {}).get("failures", [])]
    if failures:
        lines += ["", "Test failures:", *failures]
    if report.dry_run:
        lines += [
            "",
            "Commands (each under `timeout -k`):",
            "",
            *(f"- {r.name}: `{r.command}`" for r in report.steps.values()),
        ]
    if any(record.benchmark for record in report.steps.values()):
        lines += [
            "",
            "Median-window images/s reaching the loss (no-model: the data side alone):",
            "",
            *figure_rows(report),
        ]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, work: Path, report: Report) -> None:
    """The three files, each replaced whole (a kill mid-write leaves the previous version)."""
    results = {
        "call": report.call,
        "dry_run": report.dry_run,
        "started": report.started,
        "budget_s": BUDGET_S,
        "worst_case_s": worst_case_s(report.plan),
        "plan": [asdict(step) | {"worst_case_s": step.worst_case_s} for step in report.plan],
        "env": report.env,
        "steps": {name: asdict(record) | {"outcome": record.outcome} for name, record in report.steps.items()},
    }
    _replace(out / "results.json", lambda path: path.write_text(json.dumps(results, indent=1, default=str)))
    _replace(out / "summary.md", lambda path: path.write_text(summary_markdown(report)))
    _replace(out / "logs.tar.gz", lambda path: _archive(path, work))


def _archive(path: Path, work: Path) -> None:
    with tarfile.open(path, "w:gz") as archive:
        for item in sorted(work.iterdir()):
            if item.is_file() and not item.name.endswith(".partial"):
                archive.add(item, arcname=f"logs/{item.name}")


def _replace(path: Path, write) -> None:
    partial = path.with_name(path.name + ".partial")
    write(partial)
    os.replace(partial, path)
