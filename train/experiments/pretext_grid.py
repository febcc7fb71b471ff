"""The pretext-method table (Patch RotNet's Table 1 layout) as a library: every method pretrained, then
evaluated frozen and fine-tuned, beside the supervised and random-weight rows. train/pretext_table.py is
its command line."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

from model.classifier import POOLED_ARCHS, pretrained_backbones
from train.config import ConfigError, FinetuneConfig, PretrainConfig, to_dict
from train.config.command_line import parse_args
from train.engine.run_folder import read_records
from train.engine.session import resolve_precision
from train.evaluation.pretrained import BACKBONE_KEYS
from train.experiments.grid import (
    RUN_OWNED,
    cell,
    format_cell,
    refuse_owned_flags,
    run_finetuning,
    run_pretraining,
    seeds_note,
    write_table,
)
from train.methods import METHODS, method_parts, stage_class
from train.methods.registry import pool_shape
from train.stages import finetuning, pretraining

COLUMNS = ("linear", "tuned")
STAGE_FLAGS = ("--pretrain", "--finetune", "--linear", "--tuned")  # each takes one quoted string of flags
TABLE_OWNED = RUN_OWNED | {"--method", "--init", "--linear-probe", "--finetune.init", "--finetune.linear_probe"}


def last_record(folder: Path, key: str) -> float | None:
    """The last value of `key` in the run's log.jsonl (the pretext task's training accuracy)."""
    log = folder / "log.jsonl"
    if not log.is_file():
        return None
    values = [record.get(key) for _, record in read_records(log)]
    values = [v for v in values if v is not None]
    return values[-1] if values else None


def run_evaluation(out: Path, name: str, column: str, init: str, args: list[str]) -> dict:
    """`args`: the column's full fine-tuning flags (see `parse`)."""
    return run_finetuning(out / f"{name}-{column}", [*args, "--init", init])


def format_table(rows: dict[str, dict], title: str) -> str:
    """Markdown: one row per method or baseline; cells mean ± sample std (%) over seeds."""
    lines = [f"**{title}**", "", "| method | linear | tuned | pretext accuracy |", "| --- | ---: | ---: | ---: |"]
    for name, row in rows.items():
        cells = [format_cell(row[c]) if c in row else "" for c in COLUMNS]
        pretext = row.get("pretext_acc")
        pretext_text = f"{100 * pretext:.1f} (chance {100 * row['chance_acc']:.1f})" if pretext is not None else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {pretext_text} |")
    seeds = {row[c]["seeds"] for row in rows.values() for c in COLUMNS if c in row}
    lines += [
        "",
        seeds_note(seeds) + " Linear: frozen backbone, the head trained; tuned: the whole network trained. "
        "Pretext accuracy: the last logged training accuracy of the pretext task (%).",
    ]
    return "\n".join(lines) + "\n"


def attach_stage_flags(argv: list[str]) -> list[str]:
    """`--pretrain "--model.width=0.5"` as `--pretrain=--model.width=0.5`: argparse takes a lone value that
    starts with "--" for a flag of its own."""
    out, tokens = [], iter(argv)
    for token in tokens:
        value = next(tokens, None) if token in STAGE_FLAGS else None
        out.append(token if value is None else f"{token}={value}")
    return out


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list of pretext methods")
    parser.add_argument("--config", default="pretext_demo", help="config for both stages (default pretext_demo)")
    parser.add_argument("--data", help="data set for both stages (default: the built-in demo data)")
    parser.add_argument("--loader", help="loader backend for both stages")
    parser.add_argument("--seeds", type=int, help="fine-tuning seeds per cell (default: the config's)")
    parser.add_argument("--supervised-steps", type=int, help="steps of the supervised row (default: pretraining's)")
    parser.add_argument("--pretrain", default="", help='flags for train/pretrain.py only, e.g. "--steps 100"')
    parser.add_argument("--finetune", default="", help='flags for train/finetune.py only, e.g. "--lr 0.01"')
    parser.add_argument("--linear", default="", help='fine-tuning flags of the linear column only, e.g. "--steps 500"')
    parser.add_argument("--tuned", default="", help="fine-tuning flags of the tuned column (and supervised row) only")
    parser.add_argument("--out", help="output folder (default runs/pretext-table-<config>)")
    parser.add_argument("--title", default="", help="table title")
    return parser


@dataclasses.dataclass
class PretextGrid:
    """pretext_table.py's command line, parsed."""

    args: argparse.Namespace  # its own flags: --config, --data, --out, --title, --supervised-steps, ...
    methods: list[str]  # the rows' pretext methods
    pretrain_args: list[str]  # train/pretrain.py's flags for every method
    column_args: dict[str, list[str]]  # train/finetune.py's flags per column (linear, tuned)
    argv: list[str] | None  # the command line as given (None: sys.argv's), recorded in table.json


def parse(argv: list[str] | None) -> PretextGrid:
    args = arguments().parse_args(attach_stage_flags(sys.argv[1:] if argv is None else argv))
    shared = ["--config", args.config]
    shared += ["--data", args.data] if args.data else []
    shared += ["--loader", args.loader] if args.loader else []
    pretrain_args = [*shared, *shlex.split(args.pretrain)]
    finetune_args = [*shared, *shlex.split(args.finetune)] + (["--seeds", str(args.seeds)] if args.seeds else [])
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"--methods {args.methods}: expected some of {', '.join(METHODS)}")
    if args.seeds is not None and args.seeds <= 0:
        raise ConfigError(f"--seeds {args.seeds}: expected a positive number of seeds")
    column_args = {
        "linear": [*finetune_args, *shlex.split(args.linear), "--linear-probe"],
        "tuned": [*finetune_args, *shlex.split(args.tuned)],
    }
    given = [*pretrain_args, *finetune_args, *shlex.split(args.linear), *shlex.split(args.tuned)]
    refuse_owned_flags(given, TABLE_OWNED, "pretext_table.py", "--methods or --out")
    return PretextGrid(args, methods, pretrain_args, column_args, argv)


def check_fit(method: PretrainConfig, tuning: FinetuneConfig) -> None:
    """What fine-tuning would refuse once the pretraining exists, and what one process cannot run."""
    arch = tuning.finetune.arch
    if method.model.backbone not in pretrained_backbones(arch):
        raise ConfigError(
            f"model.backbone={method.model.backbone} (pretraining) cannot initialise finetune.arch={arch}; "
            f"expected {' or '.join(pretrained_backbones(arch))}"
        )
    if arch in POOLED_ARCHS and method_parts(METHODS[method.method], method).pool_prefix is None:
        raise ConfigError(f"finetune.arch={arch} reuses a pretrained attention pooling; {method.method} has none")
    for key in BACKBONE_KEYS:
        mine, theirs = getattr(method.model, key), getattr(tuning.model, key)
        if mine != theirs:
            raise ConfigError(f"model.{key}: {mine!r} for pretraining but {theirs!r} for fine-tuning; expected one")
    if arch in POOLED_ARCHS:
        mine, theirs = METHODS[method.method].pool_shape(to_dict(method)), pool_shape(to_dict(tuning))
        if mine is not None and dataclasses.replace(mine, dropout=theirs.dropout) != theirs:
            raise ConfigError(f"attention pooling: {mine} for pretraining but {theirs} for fine-tuning; expected one")
    # Every run shares this process, and Accelerate keeps the first run's mixed precision.
    resolve_precision(method.speed), resolve_precision(tuning.speed)  # auto is the launcher's choice
    if method.speed.precision != tuning.speed.precision:
        raise ConfigError(
            f"speed.precision: {method.speed.precision} for pretraining but {tuning.speed.precision} for "
            "fine-tuning; pretext_table.py runs both stages in one process, so they need one precision"
        )


def check_before_running(methods: list[str], pretrain_args: list[str], column_args: dict) -> list[PretrainConfig]:
    """Everything a run would refuse, refused before the first run spends an hour training; the methods'
    pretraining configs."""
    configs = []
    for method in methods:
        config, _ = parse_args(
            [*pretrain_args, "--method", method], stage_class(PretrainConfig), pretraining.stable_flags(), ""
        )
        pretraining.validate(config)
        configs.append(config)
    for column in COLUMNS:
        tuning, _ = parse_args(column_args[column], stage_class(FinetuneConfig), finetuning.STABLE_FLAGS, "")
        finetuning.validate(tuning)
        for config in configs:
            check_fit(config, tuning)
    return configs


def method_row(out: Path, config: PretrainConfig, pretrain_args: list[str], column_args: dict) -> dict:
    folder = run_pretraining(out / f"pretrain-{config.method}", [*pretrain_args, "--method", config.method])
    row = {c: cell(run_evaluation(out, config.method, c, str(folder), column_args[c])) for c in COLUMNS}
    row["pretext_acc"] = last_record(folder, METHODS[config.method].metric)
    row["chance_acc"] = last_record(folder, "chance_acc")
    row["pretrain_dir"] = str(folder)
    return row


def run(grid: PretextGrid) -> dict:
    """Every row's runs (reused when finished), then the table; returns the folder and the rows."""
    args, methods, pretrain_args, column_args = grid.args, grid.methods, grid.pretrain_args, grid.column_args
    configs = check_before_running(methods, pretrain_args, column_args)
    out = Path(args.out or Path("runs") / f"pretext-table-{Path(args.config).stem}")
    supervised_steps = args.supervised_steps or configs[0].train.steps
    supervised_args = [*column_args["tuned"], "--steps", str(supervised_steps)]
    rows: dict[str, dict] = {}
    rows["Supervised"] = {"tuned": cell(run_evaluation(out, "supervised", "tuned", "none", supervised_args))}
    rows["Random weight"] = {c: cell(run_evaluation(out, "random", c, "none", column_args[c])) for c in COLUMNS}
    for config in configs:
        rows[METHODS[config.method].table_label(config)] = method_row(out, config, pretrain_args, column_args)
    data = args.data or "the demo data"
    title = (
        args.title or f"{configs[0].model.backbone} on {data}: pretext methods (the Table 1 layout of Pham et al. 2021)"
    )
    summary = {"title": title, "rows": rows, "supervised_steps": supervised_steps, "argv": grid.argv}
    if write_table(out, format_table(rows, title), summary):
        print(f"wrote {out / 'table.md'}, {out / 'table.json'}")
    return {"out": str(out), "rows": rows}
