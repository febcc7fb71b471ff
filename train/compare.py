"""Pretrained vs. supervised over a grid of label fractions and seeds: the paper's Table 1 and Figure 4.

Launch:
    accelerate launch train/pretrain.py --out runs/demo-pt                 # pretrain on the demo data first
    python train/compare.py --init runs/demo-pt                            # demo: 4 fractions x 3 seeds x 2 inits
    python train/compare.py --init runs/demo-pt --fractions 0.02,0.1 --seeds 5 --arch resnet36_attn
    python train/compare.py --init runs/demo-pt --lrs 0.01,0.03,0.1,0.3 --seeds 5   # lr per cell, own labels
    python train/compare.py --init runs/demo-pt --lrs 0.02,0.1 --selection-seeds 1 --seeds 5   # cheaper choice
    accelerate launch --multi_gpu --num_processes 8 train/compare.py --config cifar10 \
        --data ~/data/cifar-10-batches-py --init runs/c10 --fractions 0.05,0.08,0.2,1 --seeds 5 --out runs/c10-cmp
    accelerate launch train/compare.py --config imagenet224 --data ~/data/imagenet --init runs/in224 --per-class 60,130

For each column (a label fraction or a per-class count) it runs train/finetune.py twice, with --init none
and with --init INIT, same seeds and so the same labelled subsets, into OUT/supervised-<col> and
OUT/pretrained-<col>. With --lrs (say 0.01,0.03,0.1), each of those first runs once per lr with a
validation set carved from each seed's labelled subset (--holdout, default 0.1 of it, stratified, at least
one image per class; the test split is not read) into OUT/<row>-<col>-select-lr-<lr>, and the lr with the
best mean validation accuracy is the one the cell's test run uses on the whole subset (the paper tunes the
lr per experiment on 10 % of its training data, §3.2); --selection extra_labels holds the validation split
out of the whole training split instead (labels beyond the budget); with --selection-seeds N the
validation runs take N seeds instead of the cell's. The table counts the labels selection read and marks
an lr chosen at an edge of the grid.
Any other flag (--steps, --lr, --arch, --linear-probe, --section.key=value) goes to both. A cell whose
results.json exists is read back, an interrupted one resumed, so rerunning the same command after a
crash finishes the grid. Writes OUT/table.md (rows supervised / pretrained / delta,
cells mean ± std over seeds), OUT/table.json and OUT/accuracy_vs_labels.png (accuracy against labels with
error bars, and the gain).
"""

from __future__ import annotations

from train.engine.cli import run_cli
from train.experiments import comparison


def main(argv: list[str] | None = None) -> dict:
    return comparison.run(comparison.parse(argv))


if __name__ == "__main__":
    run_cli(main)
