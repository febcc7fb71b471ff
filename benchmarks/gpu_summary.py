"""What a GPU-check call brings home, whole: three files in OUT, rewritten after every step so that a call
cut short still returns everything measured so far, and a line on stdout as each step ends.

- stdout: per step, the moment it ends, one line (`step_line`: outcome, the step's figure at its best
  batch, its ratios, TFLOP/s, whether the loss was finite), and the last lines of its log if it failed;
  at the end the summary, at most `SUMMARY_CHARS` characters (the lent machine returns the last 12,000).
- `summary.md`: the same summary: what is left for the next call and the command that runs it, the steps
  (limit, time taken, outcome), the tests' counts and failures, and one table of every figure (images/s,
  loss finite, launches per step, GPU busy, peak memory, TFLOP/s) with its ratios: to the same step's
  synthetic rate, end to end to its bound (min of synthetic and the loader's no-model rate, named), to
  the step it is compared with at the same batch, and to the headline's eager batch-64 step. What does not
  fit in `SUMMARY_CHARS` is cut, said in a last line (results.json holds everything).
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

from benchmarks.gpu_plan import KILL_AFTER_S, Step, worst_case_s

OUTPUT_FILES = ("summary.md", "results.json", "logs.tar.gz")
SUMMARY_CHARS = 4000  # the printed summary's most: a third of what the lent machine's output returns
LOG_TAIL_LINES = 12  # a failed step's log lines printed when it ends
PROFILE_COLUMNS = (  # (key in a mode's result, title, format)
    ("launches_per_step", "launches/step", "{:g}"),
    ("gpu_busy", "GPU busy", "{:.0%}"),
    ("peak_memory_gib", "peak GiB", "{:.1f}"),
    ("achieved_tflops", "TFLOP/s", "{:.3g}"),
)
LOSS_FINITE = {True: "yes", False: "NO"}
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
    dry_run: bool
    started: str
    budget_s: int
    plan: list[Step] = field(default_factory=list)  # this call's steps, the prelude first
    env: dict = field(default_factory=dict)
    steps: dict[str, StepRecord] = field(default_factory=dict)
    left: list[str] = field(default_factory=list)  # the steps for later calls, in order

    def next_command(self) -> str | None:
        """What runs the steps left (on the next lease, into its own output folder)."""
        if not self.left:
            return None
        return f'bash benchmarks/gpu_check.sh "$OUT" --from {self.left[0]}' + (" --dry-run" if self.dry_run else "")


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
    titles = ["step", "mode", "batch", "images/s", "ratios", "loss finite", *(t for _, t, _ in PROFILE_COLUMNS)]
    rows = [
        "| " + " | ".join(titles) + " |",
        "| --- | --- | ---: | ---: | --- | --- |" + " ---: |" * len(PROFILE_COLUMNS),
    ]
    for step in report.plan:
        benchmark = report.steps[step.name].benchmark if step.name in report.steps else None
        for batch, modes in ((benchmark or {}).get("results") or {}).items():
            for mode, result in modes.items():
                rate = result["median"]
                cells = [step.name, mode, batch, f"{rate:,.0f}", "; ".join(ratios(report, step, batch, mode, rate))]
                cells.append(LOSS_FINITE.get(result.get("loss_finite"), "-"))
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


def summary_sections(report: Report) -> list[list[str]]:
    """The summary's sections in the order they are kept when it must be cut."""
    env = report.env
    device = env.get("device") or ("no CUDA device" if "cuda" in env else "device unknown (no probe)")
    versions = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items() if v)
    absent = ", ".join(k for k, v in (env.get("versions") or {}).items() if not v)
    command = report.next_command()
    head = [
        f"# GPU check{' (dry run: commands checked, nothing measured)' if report.dry_run else ''}",
        "",
        f"Started {report.started}; {device}; {env.get('cpus', '?')} CPUs; "
        f"loaders {', '.join(env.get('loaders', [])) or '-'}.",
        f"Versions: {versions or '-'}; not importable: {absent or 'none'}.",
        f"Plan: {len(report.plan)} steps, at most {worst_case_s(report.plan)} s of the {report.budget_s} s budget "
        f"(limits + {KILL_AFTER_S} s kill grace each + the runner's reserve).",
        f"Left for the next call: {len(report.left)} steps ({', '.join(report.left)}); run `{command}`."
        if command
        else "Left for the next call: nothing (this call ends the plan).",
    ]
    sections = [head, ["", *step_rows(report)]]
    failures = [f"- {step}: {line}" for step, r in report.steps.items() for line in (r.tests or {}).get("failures", [])]
    sections += [["", "Test failures:", *failures]] if failures else []
    if any(record.benchmark for record in report.steps.values()):
        title = "Median-window images/s reaching the loss (no-model: the data side alone):"
        sections.append(["", title, "", *figure_rows(report)])
    if report.dry_run:
        commands = [f"- {r.name}: `{r.command}`" for r in report.steps.values()]
        sections.append(["", "Commands (each under `timeout -k`):", "", *commands])
    return sections


def summary_markdown(report: Report, limit: int = SUMMARY_CHARS) -> str:
    """The sections whole while they fit in `limit` characters; then as many lines as fit, and a last line
    saying how many were cut (results.json and logs.tar.gz hold everything)."""
    lines, size, cut = [], 0, 0
    room = limit - 80  # the last line's
    for line in (line for section in summary_sections(report) for line in section):
        if cut or size + len(line) + 1 > room:
            cut += 1
            continue
        lines.append(line)
        size += len(line) + 1
    if cut:
        lines.append(f"({cut} more lines cut here: results.json and logs.tar.gz hold them)")
    return "\n".join(lines) + "\n"


def step_figure(report: Report, step: Step) -> str | None:
    """A throughput step's figure: its end-to-end loader mode if it has one, else its first training mode,
    at the batch where that mode was fastest, with its ratios, TFLOP/s and whether its loss was finite."""
    record = report.steps.get(step.name)
    results = ((record.benchmark if record else None) or {}).get("results") or {}
    trained = [(batch, mode, r) for batch, modes in results.items() for mode, r in modes.items() if "loss_finite" in r]
    if not trained:
        return None
    loader = [item for item in trained if item[1] not in DATA_SIDE_MODES]
    wanted = (loader or trained)[0][1]
    batch, mode, result = max((item for item in trained if item[1] == wanted), key=lambda item: item[2]["median"])
    rate = result["median"]
    found = "; ".join(ratios(report, step, batch, mode, rate)) or "no ratio"
    tflops = f"{result['achieved_tflops']:.3g} TFLOP/s" if result.get("achieved_tflops") is not None else "- TFLOP/s"
    finite = LOSS_FINITE[result["loss_finite"]]
    return f"batch {batch} {mode} {rate:,.0f} images/s | {found} | {tflops} | loss finite {finite}"


def step_line(report: Report, step: Step) -> str:
    """One line as the step ends: its outcome and time, its tests' counts, and its figure."""
    record = report.steps[step.name]
    tests = ", ".join(f"{n} {kind}" for kind, n in (record.tests or {}).items() if kind != "failures")
    line = f"=== {record.name}: {record.outcome} after {record.seconds:.0f} s (limit {record.limit_s} s)"
    figure = step_figure(report, step)
    return line + (f"; {tests}" if tests else "") + (f" | {figure}" if figure else "")


def log_tail(log: Path, count: int = LOG_TAIL_LINES) -> str:
    """A failed step's last log lines, each cut to 200 characters: the error, where output comes back."""
    lines = log.read_text(errors="replace").splitlines()[-count:] if log.is_file() else ["(no log)"]
    return "\n".join(f"    {line[:200]}" for line in lines)


def write_outputs(out: Path, work: Path, report: Report) -> None:
    """The three files, each replaced whole (a kill mid-write leaves the previous version)."""
    results = {
        "dry_run": report.dry_run,
        "started": report.started,
        "budget_s": report.budget_s,
        "worst_case_s": worst_case_s(report.plan),
        "left": report.left,
        "next_command": report.next_command(),
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
