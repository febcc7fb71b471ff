"""The paper's Table 1 protocol on Fashion-MNIST in one call of a lent GPU machine (at most 600 s a
command): pretrain with `configs/fmnist.yaml` for tens of epochs, then fine-tune pretrained and supervised
ResNet-50s at every label fraction, 5 seeds, the lr chosen per cell on 10 % of that cell's own labelled subset
(no label beyond the budget read), the fine-tuning horizon the config's: 5 passes over the labelled subset, at
least 1,000 steps.

    bash benchmarks/gpu_table1.sh OUT                     # on the GPU machine (the data carried in .data/)
    bash benchmarks/gpu_table1.sh OUT --dry-run           # anywhere: every command parsed and checked
    bash benchmarks/gpu_table1.sh OUT --smoke             # on a CPU: the whole pipeline in a few minutes

The IDX files travel with the working tree: `mkdir -p .data && cp -r /usr/share/datasets/fashion-mnist
.data/` here, then the device tool's `carry: [".data"]` (31 MB; `.data/` is git-ignored).

Phases, each under `timeout`: the pretraining (SIGTERM at its limit: the run saves a checkpoint and the
grid starts from it, so a slower machine gets fewer epochs, never none); then one `train/compare.py` per
label fraction, all at once on the one GPU (the networks are small: one process cannot fill an H200); a
column that fails (not cut) is retried without CUDA graphs in what time is left; last, one compare over the
finished columns reads their cells back into one table and plot. OUT receives summary.md (also printed),
table.md, table.json, accuracy_vs_labels.png and logs.tar.gz (every log, the pretraining's log.jsonl and
config, each column's table): five files, as the device tool returns at most eight.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.atomic import write_atomic
from train.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
TRAIN_IMAGES = 60_000  # Fashion-MNIST's training split
BATCH = 64  # the recipe's batch (configs/fmnist.yaml), for both stages
KILL_AFTER_S = 10  # `timeout -k`: a process that ignores SIGTERM this long after its limit is killed
GRAPHED = ("--speed.precision=bf16", "--speed.channels_last=true", "--speed.cuda_graph=true")
EAGER = ("--speed.precision=bf16", "--speed.channels_last=true")
QUERIES = {"attend": (), "paper": ("--selfie.query=paper", "--selfie.logit_scale=plain")}


@dataclass(frozen=True)
class Plan:
    data: str  # the IDX folder
    query: str  # a key of QUERIES: the recipe's attending query or the paper's
    epochs: float  # pretraining epochs planned (the time limit may cut them)
    fractions: tuple[float, ...]  # label fractions, one compare process each
    seeds: int  # seeds of each cell's test run
    lrs: tuple[float, ...]  # candidates chosen among per cell on 10 % of its labelled subset (one seed each)
    # fine-tuning steps of batch 64 per seed; None: configs/fmnist.yaml's horizon, which scales with the labels
    finetune_steps: int | None
    speed: tuple[str, ...]  # GRAPHED on a GPU; () on a CPU
    budget_s: int  # the whole call
    pretrain_limit_s: int  # the pretraining's share; the grid gets what is left
    pretrain_extra: tuple[str, ...] = ()  # the pretraining's own flags (the smoke run's small monitors)

    @property
    def pretrain_steps(self) -> int:
        return max(1, math.ceil(self.epochs * TRAIN_IMAGES / BATCH))


FULL = Plan(
    data="", query="attend", epochs=20, fractions=(0.01, 0.05, 0.1, 0.2, 1.0), seeds=5, lrs=(0.05, 0.1, 0.2),
    finetune_steps=None, speed=GRAPHED, budget_s=540, pretrain_limit_s=170,
)  # fmt: skip
SMOKE_MONITORS = ("--monitor.knn_train_images=100", "--monitor.knn_test_images=100", "--monitor.clean_images=64")
SMOKE = replace(
    FULL, epochs=8 * BATCH / TRAIN_IMAGES, fractions=(0.01, 0.1), seeds=2, lrs=(0.05, 0.1), finetune_steps=4,
    speed=(), budget_s=900, pretrain_limit_s=300, pretrain_extra=SMOKE_MONITORS,
)  # fmt: skip
MERGE_S, RESERVE_S = 30, 20  # reading the cells back into one table; archiving and the summary
GRID_MIN_S = 60  # what the pretraining always leaves to the grid
PHASE_MIN_S = 30  # no pretraining starts with less


def pretrain_args(plan: Plan, folder: Path, workers: int, speed: tuple[str, ...]) -> list[str]:
    every = max(1, min(1000, plan.pretrain_steps // 4))
    return [
        "train/pretrain.py", "--config", "fmnist", "--data", plan.data, "--steps", str(plan.pretrain_steps),
        "--out", str(folder), f"--log.every={every}", f"--checkpoint.every={every}", f"--data.workers={workers}",
        *QUERIES[plan.query], *speed, *plan.pretrain_extra,
    ]  # fmt: skip


def column_args(plan: Plan, fraction: float, init: Path, folder: Path, speed: tuple[str, ...]) -> list[str]:
    steps = ["--steps", str(plan.finetune_steps)] if plan.finetune_steps else []
    return [
        "train/compare.py", "--config", "fmnist", "--data", plan.data, "--init", str(init),
        "--fractions", f"{fraction:g}", "--seeds", str(plan.seeds), "--lrs", ",".join(f"{lr:g}" for lr in plan.lrs),
        "--selection", "labelled_subset", "--selection-seeds", "1", *steps, "--out", str(folder), "--data.workers=2",
        *speed,
    ]  # fmt: skip


@dataclass
class Phase:
    """One command's record: what ran, how it ended, how long it took."""

    name: str
    argv: list[str]
    limit_s: int
    exit: int | None = None
    seconds: float = 0.0

    @property
    def cut(self) -> bool:
        """Stopped by its limit (124 from `timeout`, 143 from a run that saved on SIGTERM, 137 killed) or by
        a SIGTERM to the runner (a negative code: `timeout` re-raises the signal its run ended with)."""
        return self.exit is not None and (self.exit in (124, 137, 143) or self.exit < 0)

    def line(self) -> str:
        outcome = "cut (time limit or SIGTERM)" if self.cut else ("ok" if self.exit == 0 else f"exit {self.exit}")
        return f"{self.name}: {outcome} after {self.seconds:.0f} s (limit {self.limit_s} s)"


RUNNING: list[subprocess.Popen] = []  # the phases' `timeout` processes, each in its own process group
STOPPED = threading.Event()  # set by SIGTERM: no phase starts after it


def forward_termination(signum: int, _frame: object) -> None:
    """SIGTERM to the runner reaches every phase (each `timeout` passes it on to its run, which saves a
    checkpoint): without this a run would outlive a runner stopped from outside."""
    STOPPED.set()
    for process in RUNNING:
        if process.poll() is None:
            process.send_signal(signum)


def start(phase: Phase, python: str, log: Path) -> tuple[subprocess.Popen, float]:
    limited = ["timeout", "-k", str(KILL_AFTER_S), str(phase.limit_s), python, *phase.argv]
    with log.open("w") as sink:
        process = subprocess.Popen(limited, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
    RUNNING.append(process)
    print(f"=== {phase.name} started: {shlex.join(phase.argv)}", flush=True)
    return process, time.monotonic()


def finish(phase: Phase, process: subprocess.Popen, started: float) -> Phase:
    phase.exit = process.wait()
    phase.seconds = round(time.monotonic() - started, 1)
    print(f"=== {phase.line()}", flush=True)
    return phase


def run_phases(phases: list[Phase], python: str, logs: Path) -> list[Phase]:
    """Every phase at once, each under its own `timeout`; returns when all have ended."""
    running = [(phase, *start(phase, python, logs / f"{phase.name}.log")) for phase in phases]
    return [finish(phase, process, started) for phase, process, started in running]


@dataclass
class Call:
    """One call of the runner: its plan, folders, interpreter, clock and what has run."""

    plan: Plan
    out: Path  # the files that come back
    work: Path  # run folders and logs (checkpoints stay here, never in OUT)
    python: str
    started: float
    phases: list[Phase]
    init: Path | None = None  # the pretraining run the grid starts from, once there is one

    def left_s(self) -> int:
        return int(self.plan.budget_s - (time.monotonic() - self.started))


def pretrain(call: Call) -> Path | None:
    """The pretraining, cut at its share of the budget (retried eagerly if it failed graphed without a
    checkpoint); the folder of the run that left a checkpoint, if one did."""
    workers, plan = max(1, (os.cpu_count() or 2) - 2), call.plan
    attempts = [("pretraining", plan.speed)] + ([("pretraining-eager", EAGER)] if plan.speed == GRAPHED else [])
    for name, speed in attempts:
        folder, share = call.work / name, plan.pretrain_limit_s - (time.monotonic() - call.started)
        limit = int(min(share, call.left_s() - MERGE_S - RESERVE_S - GRID_MIN_S))
        if limit < PHASE_MIN_S or STOPPED.is_set():
            return None
        phase = Phase(name, pretrain_args(plan, folder, workers, speed), limit)
        call.phases += run_phases([phase], call.python, call.work)
        if any((folder / "checkpoints").glob("step_*.pt")):
            return folder
        if phase.cut:
            return None
    return None


def grid(call: Call, init: Path) -> dict[float, Path]:
    """One compare per fraction, all at once; a failed graphed column is retried eagerly. Returns the
    finished columns' folders."""
    plan, columns = call.plan, call.work / "columns"
    limit = call.left_s() - MERGE_S - RESERVE_S - KILL_AFTER_S
    folders = {fraction: columns / f"{fraction:g}" for fraction in plan.fractions}
    phases = [Phase(f"column-{f:g}", column_args(plan, f, init, folders[f], plan.speed), limit) for f in plan.fractions]
    call.phases += run_phases(phases, call.python, call.work)
    failed = [f for f, phase in zip(plan.fractions, phases, strict=True) if phase.exit != 0 and not phase.cut]
    limit = call.left_s() - MERGE_S - RESERVE_S - KILL_AFTER_S
    if failed and plan.speed == GRAPHED and limit > 60:
        folders |= {f: columns / f"{f:g}-eager" for f in failed}
        retries = [Phase(f"column-{f:g}-eager", column_args(plan, f, init, folders[f], EAGER), limit) for f in failed]
        call.phases += run_phases(retries, call.python, call.work)
    return {f: folder for f, folder in folders.items() if (folder / "table.json").is_file()}


def merged_summary(folders: list[Path]) -> dict:
    """Comparisons' table.json files (the same init, any columns each) as one summary, columns in order."""
    parts = [json.loads((folder / "table.json").read_text()) for folder in folders]
    summary = {key: parts[0].get(key) for key in ("title", "init", "chance", "measured_on", "per_class")}
    columns = sorted(
        (value, label, index)
        for index, part in enumerate(parts)
        for value, label in zip(part["values"], part["columns"], strict=True)
    )
    summary |= {"columns": [label for _, label, _ in columns], "values": [value for value, _, _ in columns]}
    rows = parts[0]["cells"]
    summary["cells"] = {row: {label: parts[i]["cells"][row][label] for _, label, i in columns} for row in rows}
    return summary


def pretraining_lines(folder: Path, planned_steps: int) -> list[str]:
    """How far the pretraining got and its last monitors, from its log.jsonl."""
    log = folder / "log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    trained = [r for r in records if "loss" in r]
    if not trained:
        return ["- pretraining: no step logged"]
    last = trained[-1]
    lines = [f"- pretraining: step {last['step']} of {planned_steps} (epoch {last.get('epoch', 0):.1f})"]
    if "clean_patch_acc" in last:
        lines.append(f"- clean patch accuracy {100 * last['clean_patch_acc']:.1f} % (chance 25 %)")
    knn = [r for r in records if "knn_acc" in r]
    floor = next((r for r in records if "knn_acc_random" in r), {})
    if knn and floor:
        lines.append(
            f"- kNN {100 * knn[-1]['knn_acc']:.1f} % at step {knn[-1]['step']}; random networks "
            f"{100 * floor['knn_acc_random']:.1f} ± {100 * floor.get('knn_acc_random_sd', 0):.1f} %; raw pixels "
            f"{100 * floor.get('knn_acc_pixels', float('nan')):.1f} %"
        )
    return lines


def cells_lines(columns: Path) -> list[str]:
    """Each column's finished fine-tuning runs (a cut column's table is not written; its runs say how far
    it got)."""
    lines = []
    for folder in sorted(columns.glob("*")):
        done = sorted(run.parent.name for run in folder.glob("*/results.json"))
        lines.append(f"- column {folder.name}: {len(done)} runs finished ({', '.join(done) or 'none'})")
    return lines


def finetune_horizon(plan: Plan) -> str:
    if plan.finetune_steps:
        return f"{plan.finetune_steps} steps"
    return "steps of configs/fmnist.yaml (5 passes over the labelled subset, at least 1,000)"


def summary_markdown(call: Call, columns: dict[float, Path]) -> str:
    plan = call.plan
    lines = [
        "# Fashion-MNIST Table 1 (benchmarks/fmnist_table1.py)",
        "",
        f"- plan: {plan.query} query, {plan.epochs:g} pretraining epochs ({plan.pretrain_steps} steps of {BATCH}); "
        f"fractions {', '.join(f'{f:g}' for f in plan.fractions)}; {plan.seeds} seeds; lrs "
        f"{', '.join(f'{lr:g}' for lr in plan.lrs)} chosen on 10 % of each labelled subset (1 seed); fine-tuning "
        f"{finetune_horizon(plan)}; speed flags {' '.join(plan.speed) or 'none'}; budget {plan.budget_s} s",
        f"- wall time {time.monotonic() - call.started:.0f} s",
        *(f"- {phase.line()}" for phase in call.phases),
        *pretraining_lines(call.init or call.work / "pretraining", plan.pretrain_steps),
        f"- columns finished: {', '.join(f'{f:g}' for f in sorted(columns)) or 'none'}",
        *cells_lines(call.work / "columns"),
    ]
    table = call.out / "table.md"
    return "\n".join(lines) + "\n\n" + (table.read_text() if columns and table.is_file() else "no table\n")


def archive(call: Call) -> None:
    """Every log, the pretraining's log and config, each column's table: OUT/logs.tar.gz."""
    buffer = call.work / "logs.tar.gz"
    with tarfile.open(buffer, "w:gz") as tar:
        for path in sorted(call.work.glob("*.log")):
            tar.add(path, arcname=path.name)
        for path in sorted(call.work.glob("pretraining*/log.jsonl")) + sorted(
            call.work.glob("pretraining*/config.yaml")
        ):
            tar.add(path, arcname=str(path.relative_to(call.work)))
        for table in sorted(call.work.glob("columns/*/table.*")):
            tar.add(table, arcname=str(table.relative_to(call.work)))
    write_atomic(call.out / "logs.tar.gz", buffer.read_bytes())


def run_call(call: Call) -> bool:
    """Pretrain, fine-tune every column, merge; True when every column finished."""
    from train.experiments.comparison import write_comparison  # matplotlib only where a table is drawn

    call.init = pretrain(call)
    columns = grid(call, call.init) if call.init is not None and not STOPPED.is_set() else {}
    if columns:
        write_comparison(call.out, merged_summary([columns[f] for f in sorted(columns)]))
    archive(call)
    text = summary_markdown(call, columns)
    write_atomic(call.out / "summary.md", text.encode())
    print(text, flush=True)
    return len(columns) == len(call.plan.fractions)


IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DATA_FOLDERS = (ROOT / ".data" / "fashion-mnist", Path("/usr/share/datasets/fashion-mnist"))


def default_data() -> str:
    return str(next((folder for folder in DATA_FOLDERS if folder.is_dir()), DATA_FOLDERS[0]))


def check_data(folder: str) -> None:
    missing = [name for name in IDX_FILES if not any(Path(folder).glob(f"{name}*"))]
    if missing:
        raise ConfigError(f"--data {folder}: no {', '.join(missing)}[.gz]; expected Fashion-MNIST's IDX files")


def dry_run(plan: Plan) -> list[str]:
    """Every command of the plan parsed and its config checked as the run would, without running it;
    returns one line per command checked (a ConfigError or SystemExit stops at the first bad one)."""
    from train.experiments import comparison
    from train.stages import finetuning, pretraining

    check_data(plan.data)
    scratch = Path(tempfile.mkdtemp(prefix="fmnist_table1-dry-"))
    try:
        checked = []
        for speed in (plan.speed, EAGER) if plan.speed == GRAPHED else (plan.speed,):
            argv = pretrain_args(plan, scratch / "pretraining", 1, speed)
            pretraining.validate(pretraining.parse(argv[1:])[0])
            checked.append(shlex.join(argv))
        for fraction in plan.fractions:
            for speed in (plan.speed, EAGER) if plan.speed == GRAPHED else (plan.speed,):
                argv = column_args(plan, fraction, scratch / "pretraining", scratch / "column", speed)
                parsed = comparison.parse(argv[1:])
                for lr in plan.lrs:
                    selection = ["--lr", f"{lr:g}", *comparison.selection_flags(parsed.args)]
                    column = ["--init", "none", "--label-fraction", f"{fraction:g}"]
                    finetuning.validate(finetuning.parse([*parsed.passthrough, *selection, *column])[0])
                checked.append(shlex.join(argv))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return checked


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="where the five files go (summary.md, table.*, the plot, logs.tar.gz)")
    parser.add_argument("--data", default=default_data(), help="the IDX folder (default: .data/ or Debian's)")
    parser.add_argument("--query", choices=sorted(QUERIES), default="attend", help="the query kind (default attend)")
    parser.add_argument("--epochs", type=float, help=f"pretraining epochs (default {FULL.epochs:g}; the limit may cut)")
    parser.add_argument("--smoke", action="store_true", help="the whole pipeline at toy sizes, on a CPU")
    parser.add_argument("--dry-run", action="store_true", help="parse and check every command; run nothing")
    parser.add_argument("--work", help="keep the run folders here (default: a temporary folder, removed)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter the phases run")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = arguments().parse_args(argv)
    plan = replace(SMOKE if args.smoke else FULL, data=args.data, query=args.query)
    plan = replace(plan, epochs=args.epochs) if args.epochs is not None else plan
    try:
        if plan.epochs <= 0:
            raise ConfigError(f"--epochs {plan.epochs:g}: expected a positive number of epochs")
        check_data(plan.data)
        if args.dry_run:
            print("\n".join(f"checked: {line}" for line in dry_run(plan)))
            return 0
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, forward_termination)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fmnist_table1-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        finished = run_call(Call(plan, out, work, args.python, time.monotonic(), []))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if finished else 1


if __name__ == "__main__":
    sys.exit(main())
