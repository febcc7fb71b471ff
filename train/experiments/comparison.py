"""The pretrained-vs-supervised comparison over label fractions (the paper's Table 1 and Figure 4) as a
library: the grid of fine-tuning runs, the lr chosen per cell on a validation split, the table and the
plot. train/compare.py is its command line."""

from __future__ import annotations

import argparse
import io
import math
from dataclasses import dataclass
from pathlib import Path

from pipeline.atomic import write_atomic
from train.config import ConfigError, FinetuneConfig
from train.config.command_line import parse_args
from train.config.schema import SELECTIONS
from train.engine.curves import pyplot
from train.engine.loading import open_data
from train.evaluation.pretrained import load_init
from train.experiments.grid import (
    RUN_OWNED,
    cell,
    format_cell,
    refuse_owned_flags,
    run_finetuning,
    seeds_note,
    write_table,
)
from train.methods import stage_class
from train.stages import finetuning

ROWS = (("supervised", "none"), ("pretrained", None))  # (row name, --init); None = the --init given


def parse_columns(text: str, kind: type, flag: str) -> list:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise ConfigError(f"{flag} {text}: expected comma-separated numbers ({error})") from error
    if not values:
        raise ConfigError(f"{flag} {text}: expected at least one value")
    return values


def column_label(value: float | int, per_class: bool) -> str:
    if per_class:
        return f"{value}/class"
    return f"{value * 100:g}%"


def format_table(
    cells: dict[str, dict[str, dict]], columns: list[str], title: str = "", chance: float | None = None,
    measured_on: str = "test",
) -> str:  # fmt: skip
    """Markdown in the paper's Table 1 layout. cells[row][column] = {"mean", "std", "seeds"} in percent;
    the delta row is pretrained mean minus supervised mean; `chance` (percent) and what the accuracy was
    measured on ("test", or a validation split) are said under it."""
    lines = [f"**{title}**", ""] if title else []
    lines.append("| | " + " | ".join(columns) + " |")
    lines.append("| --- |" + " ---: |" * len(columns))
    for row, _ in ROWS:
        lines.append(f"| {row} | " + " | ".join(format_cell(cells[row][c]) for c in columns) + " |")
    deltas = [cells["pretrained"][c]["mean"] - cells["supervised"][c]["mean"] for c in columns]
    lines.append("| Δ | " + " | ".join(f"{d:+.1f}" for d in deltas) + " |")
    if all("lr" in cells[row][c] for row, _ in ROWS for c in columns):
        lines += lr_rows(cells, columns)
    lines += ["", seeds_note({cells[row][c]["seeds"] for row, _ in ROWS for c in columns}, measured_on)]
    if chance is not None:
        several = any(cells["supervised"][c]["seeds"] > 1 for c in columns)
        spread = " A Δ smaller than the supervised row's sd is within its seed-to-seed spread." if several else ""
        lines.append(f"Chance: {chance:.1f} %.{spread}")
    if any("lr" in cells[row][c] for row, _ in ROWS for c in columns):
        lines += selection_notes(cells, columns)
    return "\n".join(lines) + "\n"


def lr_rows(cells: dict[str, dict[str, dict]], columns: list[str]) -> list[str]:
    """Each row's chosen lr per column, "(edge)" where it is the grid's smallest or largest, and how many
    labels choosing it read (both rows' selections read the same images: the same seeds' subsets)."""
    lines = []
    for row, _ in ROWS:
        chosen = [f"{cells[row][c]['lr']:g}" + (" (edge)" if cells[row][c].get("lr_edge") else "") for c in columns]
        lines.append(f"| lr, {row} | " + " | ".join(chosen) + " |")
    records = [cells["supervised"][c].get("selection") for c in columns]
    if all(records):
        counts = [
            f"{r['labels_read']:,}"
            + (f" ({r['labels_outside_budget']:,} outside)" if r["labels_outside_budget"] else "")
            for r in records
        ]
        lines.append("| labels read choosing the lr | " + " | ".join(counts) + " |")
    return lines


def selection_notes(cells: dict[str, dict[str, dict]], columns: list[str]) -> list[str]:
    """Where each lr was chosen, and every choice at an edge of the lr grid said in words."""
    modes = {(cells[row][c].get("selection") or {}).get("mode") for row, _ in ROWS for c in columns}
    if modes == {"labelled_subset"}:
        lines = [
            "Each cell's lr was chosen on a validation set carved from its own labelled subset (stratified, at "
            "least one image per class), trained on the rest: no label outside the budget was read."
        ]
    elif modes == {"extra_labels"}:
        lines = [
            "Each cell's lr was chosen on a validation split held out of the whole training split, outside the "
            "labelled subset: it read labels beyond the budget (counted above)."
        ]
    else:
        lines = ["Each cell's lr was chosen on a validation split held out of the training split."]
    edges = [
        f"{row} {c} ({cells[row][c]['lr_edge']})" for row, _ in ROWS for c in columns if cells[row][c].get("lr_edge")
    ]
    if edges:
        lines.append(
            "At an edge of the lr grid (the best lr may lie outside the grid; widen --lrs): " + ", ".join(edges) + "."
        )
    return lines


@dataclass(frozen=True)
class LabelAxis:
    """The plot's x axis: each column's amount of labels, and what that amount is."""

    values: list[float]  # a fraction of the training split, or images per class
    name: str  # "fraction of labels" | "labelled images per class"


def plot_comparison(
    cells: dict[str, dict[str, dict]], columns: list[str], label_axis: LabelAxis, path: Path, title: str,
    chance: float | None = None, measured_on: str = "test",
) -> None:  # fmt: skip
    """Accuracy against labels (each row with its seeds' sd; the supervised row's spread shaded; chance
    dashed) and the gain per column, its bar's error the spread of a difference of the two rows."""
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for row, _ in ROWS:
        means = [cells[row][c]["mean"] for c in columns]
        stds = [cells[row][c]["std"] for c in columns]
        left.errorbar(label_axis.values, means, yerr=stds, marker="o", capsize=4, label=row)
        if row == "supervised":
            low, high = (
                [m - s for m, s in zip(means, stds, strict=True)],
                [m + s for m, s in zip(means, stds, strict=True)],
            )
            left.fill_between(label_axis.values, low, high, alpha=0.15, color="grey", label="supervised ± sd")
    if chance is not None:
        left.axhline(chance, linestyle="--", color="grey", linewidth=0.8, label=f"chance {chance:.0f}%")
    gains = [cells["pretrained"][c]["mean"] - cells["supervised"][c]["mean"] for c in columns]
    spreads = [math.hypot(cells["pretrained"][c]["std"], cells["supervised"][c]["std"]) for c in columns]
    colours = ["tab:green" if g >= 0 else "tab:red" for g in gains]
    right.bar(range(len(columns)), gains, yerr=spreads, capsize=4, color=colours)
    right.set_xticks(range(len(columns)), columns)
    right.axhline(0, color="black", linewidth=0.8)
    for axis, ylabel in ((left, f"{measured_on} accuracy (%)"), (right, "gain from pretraining (points)")):
        axis.set_xlabel(label_axis.name)
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
    left.set_xscale("log")
    left.set_xticks(label_axis.values, columns)
    left.minorticks_off()
    left.legend()
    figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    write_atomic(path, buffer.getvalue())


def run_cell(
    out: Path, row: str, column_flag: str, value: float | int, init: str, flags: list[str], suffix: str = ""
) -> dict:
    """One fine-tuning run, reused or resumed when its folder holds one."""
    folder = out / f"{row}-{column_flag.lstrip('-')}-{value:g}{suffix}"
    return run_finetuning(folder, [*flags, "--init", init, column_flag, str(value)])


def select_lr(
    args: argparse.Namespace, out: Path, row: str, column: tuple, init: str, passthrough: list[str]
) -> tuple[dict, dict]:
    """(cell, results) of the run with the lr of `--lrs` that scored best on the validation split
    (`--holdout` of the labelled subset, or with --selection extra_labels of the whole training split); the
    choice never reads the test split. The cell gets "lr", "validation" (mean validation accuracy per lr),
    "selection" (the labels it read) and "lr_edge" ("smallest"/"largest" of the grid, else "")."""
    column_flag, value = column
    validation, selection = {}, None
    seeds = ["--seeds", str(args.selection_seeds)] if args.selection_seeds else []
    for lr in args.lrs:
        flags = [*passthrough, *seeds, "--lr", f"{lr:g}", *selection_flags(args)]
        results = run_cell(out, row, column_flag, value, init, flags, f"-select-lr-{lr:g}")
        validation[f"{lr:g}"], selection = results["accuracy"]["mean"], results.get("selection")
    best = max(validation, key=lambda lr: (validation[lr], -float(lr)))  # ties: the smaller lr
    results = run_cell(out, row, column_flag, value, init, [*passthrough, "--lr", best])
    edge = ""
    if len(args.lrs) > 1 and float(best) in (min(args.lrs), max(args.lrs)):
        edge = "largest" if float(best) == max(args.lrs) else "smallest"
    return cell(results) | {
        "lr": float(best),
        "validation": validation,
        "selection": selection,
        "lr_edge": edge,
    }, results


def selection_flags(args: argparse.Namespace) -> list[str]:
    """What every lr's validation run adds: the holdout and where it is carved from."""
    return ["--finetune.holdout", f"{args.holdout:g}", f"--finetune.selection={args.selection}"]


COLUMN_OWNED = RUN_OWNED | {"--init", "--label-fraction", "--per-class", "--finetune.label_fraction"}
COLUMN_OWNED |= {"--finetune.per_class", "--finetune.init"}
# set per run when --lrs chooses the lr
SELECTION_OWNED = {"--lr", "--optim.lr", "--finetune.holdout", "--finetune.selection"}


def check_before_running(args: argparse.Namespace, passthrough: list[str], column_flag: str, values: list) -> None:
    """Everything a cell would refuse, refused before the first cell spends hours training."""
    refuse_owned_flags(passthrough, COLUMN_OWNED, "compare.py per column and row", "--fractions/--per-class")
    if args.lrs:
        owner = "--lrs/--holdout/--selection"
        refuse_owned_flags(passthrough, frozenset(SELECTION_OWNED), "compare.py's lr selection", owner)
    for value in values:
        if column_flag == "--per-class" and value <= 0:
            raise ConfigError(f"--per-class {value}: expected positive counts")
        if column_flag == "--label-fraction" and not 0.0 < value <= 1.0:
            raise ConfigError(f"--fractions {value}: expected fractions in (0, 1], e.g. 0.05 for 5%")
    selection = ["--lr", f"{args.lrs[0]:g}", *selection_flags(args)] if args.lrs else []
    for init in ("none", args.init):
        for extra in ([], selection) if selection else ([],):
            flags = [*passthrough, *extra, "--init", init, column_flag, str(values[0])]
            config, _ = parse_args(flags, stage_class(FinetuneConfig), finetuning.STABLE_FLAGS, "")
            finetuning.validate(config)
            load_init(config)
    if selection:
        check_every_column(passthrough, selection, column_flag, values)


def check_every_column(passthrough: list[str], selection: list[str], column_flag: str, values: list) -> None:
    """Every column's labelled subset large enough to carve the lr's validation set from: a small column
    refused before a larger one trains for hours (the training split's labels are read once)."""
    train = None
    for value in values:
        flags = [*passthrough, *selection, "--init", "none", column_flag, str(value)]
        config, _ = parse_args(flags, stage_class(FinetuneConfig), finetuning.STABLE_FLAGS, "")
        if config.finetune.selection != "labelled_subset":
            return
        train = train or open_data(config, "train")[0]
        finetuning.check_selection(config, train)


@dataclass
class Comparison:
    """compare.py's command line, parsed."""

    args: argparse.Namespace  # its own flags: --init, --lrs, --holdout, --selection, --selection-seeds, --out, --title
    passthrough: list[str]  # every other flag: train/finetune.py's, given to both rows
    column_flag: str  # --label-fraction or --per-class
    values: list  # the columns' values


def parse(argv: list[str] | None) -> Comparison:
    parser = argparse.ArgumentParser(
        description="Pretrained vs. supervised fine-tuning over label fractions (paper Table 1 / Figure 4)",
        epilog="Other flags go to train/finetune.py for both rows: --config, --data, --steps, --arch, ...",
    )
    parser.add_argument("--init", required=True, help="pretraining run folder or checkpoint for the pretrained row")
    columns = parser.add_mutually_exclusive_group()
    columns.add_argument("--fractions", default="0.05,0.1,0.2,1", help="label fractions (default 0.05,0.1,0.2,1)")
    columns.add_argument("--per-class", help="labelled images per class instead, e.g. 60,130")
    parser.add_argument("--lrs", help="learning rates to choose from per cell on a validation split, e.g. 0.01,0.1")
    parser.add_argument("--holdout", type=float, default=0.1, help="the validation split's fraction (paper: 0.1)")
    parser.add_argument(
        "--selection",
        choices=SELECTIONS,
        default=SELECTIONS[0],
        help="where the validation split comes from: labelled_subset (default: each cell's own labels, at least one "
        "per class) or extra_labels (the whole training split: reads labels beyond the budget)",
    )
    parser.add_argument(
        "--selection-seeds", type=int, help="seeds of each lr's validation runs (default: the cell's --seeds)"
    )
    parser.add_argument("--out", help="output folder (default: runs/compare-<init folder name>)")
    parser.add_argument("--title", default="", help="table and plot title (default: data and init)")
    args, passthrough = parser.parse_known_args(argv)
    args.lrs = parse_columns(args.lrs, float, "--lrs") if args.lrs else []
    if args.lrs and not 0 < args.holdout < 1:
        raise ConfigError(f"--holdout {args.holdout}: expected a fraction in (0, 1), e.g. 0.1")
    if args.selection_seeds is not None and (args.selection_seeds < 1 or not args.lrs):
        raise ConfigError(f"--selection-seeds {args.selection_seeds}: expected a positive count, with --lrs")
    if args.per_class:
        return Comparison(args, passthrough, "--per-class", parse_columns(args.per_class, int, "--per-class"))
    return Comparison(args, passthrough, "--label-fraction", parse_columns(args.fractions, float, "--fractions"))


def run(comparison: Comparison) -> dict:
    """Every cell (reused when finished), then the table and the plot; returns the folder and the cells."""
    args, passthrough, column_flag, values = (
        comparison.args,
        comparison.passthrough,
        comparison.column_flag,
        comparison.values,
    )
    check_before_running(args, passthrough, column_flag, values)
    init_name = Path(args.init).name if Path(args.init).is_dir() else Path(args.init).parent.parent.name
    out = Path(args.out or Path("runs") / f"compare-{init_name}")
    labels = [column_label(v, bool(args.per_class)) for v in values]
    cells: dict[str, dict[str, dict]] = {row: {} for row, _ in ROWS}
    for value, label in zip(values, labels, strict=True):
        for row, init in ROWS:
            if args.lrs:
                cells[row][label], results = select_lr(
                    args, out, row, (column_flag, value), init or args.init, passthrough
                )
            else:
                results = run_cell(out, row, column_flag, value, init or args.init, passthrough)
                cells[row][label] = cell(results)
    data = results["config"]["data"]["path"] or "demo data"
    arch = results["arch"] + (" linear probe" if results["linear_probe"] else "")
    title = args.title or f"{arch} on {data}: supervised vs. pretrained ({args.init})"
    summary = {"title": title, "columns": labels, "values": values, "cells": cells, "init": args.init}
    chance = 100 / results["classes"]
    summary |= {"chance": chance, "measured_on": results["evaluated_on"], "per_class": bool(args.per_class)}
    write_comparison(out, summary)
    return {"out": str(out), "cells": cells}


def write_comparison(out: Path, summary: dict) -> None:
    """OUT/table.md, OUT/table.json and OUT/accuracy_vs_labels.png from a comparison's summary (the
    dict table.json holds: title, columns, values, cells, chance, measured_on, per_class)."""
    cells, labels, title, chance = summary["cells"], summary["columns"], summary["title"], summary["chance"]
    measured_on = summary["measured_on"].split(" (")[0]
    if write_table(out, format_table(cells, labels, title, chance, measured_on), summary):
        name = "labelled images per class" if summary.get("per_class") else "fraction of labels"
        label_axis = LabelAxis([float(v) for v in summary["values"]], name)
        plot_comparison(cells, labels, label_axis, out / "accuracy_vs_labels.png", title, chance, measured_on)
        print(f"wrote {out / 'table.md'}, {out / 'table.json'}, {out / 'accuracy_vs_labels.png'}")
