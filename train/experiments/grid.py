"""Running a grid of pretraining and fine-tuning runs in one process: the part train/compare.py and
train/pretext_table.py share. A cell's run folder is reused (a finished run is read back, an interrupted
one resumed), flags the runner sets itself are refused, and the table is written atomically."""

from __future__ import annotations

import json
from pathlib import Path

from accelerate import PartialState

from pipeline.atomic import write_atomic
from train.config import ConfigError
from train.engine.checkpoint import has_checkpoint
from train.stages import finetuning, pretraining

# Flags a runner sets for every run itself; given by the user they would clash.
RUN_OWNED = frozenset({"--out", "--resume", "--train.out", "--train.resume"})


def refuse_owned_flags(tokens: list[str], owned: frozenset[str], runner: str, instead: str) -> None:
    clashes = sorted({token.split("=")[0] for token in tokens} & owned)
    if clashes:
        raise ConfigError(f"{', '.join(clashes)}: set by {runner} for each run; use {instead}")


def run_pretraining(folder: Path, args: list[str]) -> Path:
    """train/pretrain.py into `folder`, resumed when it holds a checkpoint (a finished run trains nothing)."""
    resume = ["--resume"] if has_checkpoint(folder, "checkpoints/*") else []
    pretraining.main([*args, "--out", str(folder), *resume])
    return folder


def run_finetuning(folder: Path, args: list[str]) -> dict:
    """train/finetune.py into `folder`, resumed when it holds a checkpoint: its finished seeds are read
    back, the rest continued (finetune.py refuses the folder when its config differs)."""
    resume = ["--resume"] if has_checkpoint(folder, "seed_*/checkpoints/*") else []
    return finetuning.main([*args, "--out", str(folder), *resume])


def cell(results: dict) -> dict:
    """A fine-tuning run's table cell: mean and sample std of its seeds' test accuracies (percent)."""
    accuracy = results["accuracy"]
    return {"mean": accuracy["mean"], "std": accuracy["std"], "seeds": len(accuracy["per_seed"])}


def format_cell(cell: dict) -> str:
    """ "80.3 ± 0.3"; a cell of one seed has no spread: "80.3"."""
    return f"{cell['mean']:.1f}" if cell["seeds"] == 1 else f"{cell['mean']:.1f} ± {cell['std']:.1f}"


def seeds_note(counts: set[int], measured_on: str = "test") -> str:
    """What the cells are: `measured_on` ("test", or "validation" when a split was held out) accuracy."""
    name = measured_on.capitalize()
    if counts == {1}:
        return f"{name} accuracy (%) of one seed each (no spread to show)."
    return f"{name} accuracy (%), mean ± sample standard deviation over {'/'.join(map(str, sorted(counts)))} seeds."


def write_table(out: Path, markdown: str, summary: dict) -> bool:
    """OUT/table.md and OUT/table.json (rank 0); True on the process that wrote them."""
    if not PartialState().is_main_process:
        return False
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "table.md", markdown.encode())
    write_atomic(out / "table.json", json.dumps(summary, indent=1).encode())
    print(markdown)
    return True
