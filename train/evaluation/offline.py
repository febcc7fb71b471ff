"""Scoring a backbone offline (train/evaluate.py): the standard probe (train/evaluation/probes.py) of its
features, on whole images and (a patch network's) on its patch grid, against the strongest of raw pixels
and random networks of the same architecture, each with its standard error."""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator

from model.backbones import build_backbone
from pipeline.data import DataError
from pipeline.loaders import LOADERS
from pipeline.patches import normalize
from train.config import ConfigError, MonitorSection
from train.engine.checkpoint import load_checkpoint
from train.evaluation.backbone_file import backbone_of, find_checkpoint
from train.evaluation.knn import stratified_indices
from train.evaluation.monitors import images_at
from train.evaluation.probes import (
    BN_PROTOCOLS,
    GRID,
    LINEAR_C,
    LINEAR_MAX_ITER,
    PROBES,
    PROTOCOL_NAMES,
    ProbeMonitor,
    acc_key,
    pixels_key,
    random_key,
)
from train.evaluation.verdict import judged_lines


def labelled_sets(config: dict, data: str | None, settings: MonitorSection, device: torch.device) -> tuple:
    """(fit images and labels, scored images and labels), stratified, from the data's two splits."""
    path = data if data is not None else config["data"].get("path")
    if path is None:
        raise ConfigError("the checkpoint's config names no data set (data.path); give --data")
    loader = LOADERS["torch"]
    train, test = loader.open(path, "train"), loader.open(path, "test")
    if len(train.classes) < 2:
        raise DataError(f"--data {path}: {len(train.classes)} class; evaluation needs labelled images of several")
    size = int(config["data"]["image_size"])
    fit = images_at(train, size, stratified_indices(train.labels, settings.knn_train_images), device)
    scored = images_at(test, size, stratified_indices(test.labels, settings.knn_test_images), device)
    return fit, scored


def grid_words(preprocessing: dict) -> str | None:
    """How the patch-grid view is made, for the output; None: the backbone saw whole images."""
    if preprocessing["input"] != "patches":
        return None
    side, size = preprocessing["patch_size"], preprocessing["image_size"]
    return (
        f"each {side} px patch of the {size} px image embedded by the backbone (pooled), the {(size // side) ** 2} "
        "vectors concatenated in grid order, row by row"
    )


def evaluate(args: argparse.Namespace) -> dict:
    checkpoint = find_checkpoint(Path(args.source), None)
    tensors, info = backbone_of(checkpoint)
    config = load_checkpoint(checkpoint)["config"]
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device = accelerator.device
    settings = MonitorSection(
        knn_train_images=args.fit_images, knn_test_images=args.test_images, knn_random_inits=args.random_inits
    )
    fit, scored = labelled_sets(config, args.data, settings, device)
    preprocessing = info["preprocessing"]
    prepare = partial(normalize, mean=preprocessing["mean"], std=preprocessing["std"])
    side = preprocessing.get("patch_size") if preprocessing["input"] == "patches" else None
    probes = ProbeMonitor(lambda net: net, prepare, (fit, scored), settings, accelerator, side)
    build = partial(build_backbone, info["backbone"], info["width"], info["stem"])
    backbone = build().to(device)
    backbone.load_state_dict(tensors)
    figures, baselines = probes.figures(backbone), probes.baselines(build, args.seed, device)
    lines, verdict = judged_lines(figures, baselines, args.bn)
    return {
        "checkpoint": str(checkpoint),
        "backbone": info["backbone"],
        "method": info["method"],
        "step": info["step"],
        "fit_images": len(fit[1]),
        "scored_images": len(scored[1]),
        "bn": args.bn,
        "knn": f"k {settings.knn_k}, cosine, votes exp(similarity / {settings.knn_temperature:g})",
        "linear": f"LogisticRegression(C={LINEAR_C:g}, max_iter={LINEAR_MAX_ITER}) on standardised features",
        "patch_grid": grid_words(preprocessing),
        "pretrained": figures,
        "baselines": baselines,
        "judged": [*lines, f"verdict: {verdict}"],
    }


def pct(value: float | None) -> str:
    return "?" if value is None else f"{100 * value:.1f}"


def view_rows(result: dict, view: str) -> list[str]:
    """The table's rows of one view: the backbone and the random networks under both protocols, the pixels."""
    p, b, name = result["pretrained"], result["baselines"], f"{result['backbone']} ({result['method']}"
    rows = []
    for protocol in BN_PROTOCOLS:
        cells = [f"{pct(p[k])} ± {pct(p[f'{k}_se'])}" for k in (acc_key(pr, view, protocol) for pr in PROBES)]
        rows.append(f"| {name}, step {result['step']}), {PROTOCOL_NAMES[protocol]} | {' | '.join(cells)} |")
    for protocol in BN_PROTOCOLS:
        cells = [f"{pct(b[k])} ± {pct(b[f'{k}_sd'])}" for k in (random_key(pr, view, protocol) for pr in PROBES)]
        rows.append(
            f"| random {result['backbone']} (mean ± sd of {b['knn_random_inits']}), {PROTOCOL_NAMES[protocol]} | "
            f"{' | '.join(cells)} |"
        )
    cells = [f"{pct(b[pixels_key(probe)])} ± {pct(b[f'{pixels_key(probe)}_se'])}" for probe in PROBES]
    return [*rows, f"| raw pixels | {' | '.join(cells)} |"]


def table(result: dict) -> str:
    """One table per view, the judgement lines under them."""
    parts = ["whole images: the backbone's pooled feature map of each image"]
    parts += ["| features | kNN % | linear probe % |", "| --- | ---: | ---: |", *view_rows(result, "")]
    if result["patch_grid"] is not None:
        parts += ["", f"patch grid: {result['patch_grid']}"]
        parts += ["| features | kNN % | linear probe % |", "| --- | ---: | ---: |", *view_rows(result, GRID)]
    parts += [
        "",
        f"kNN: {result['knn']}; linear probe: {result['linear']}; fitted on {result['fit_images']} labelled images, "
        f"scored on {result['scored_images']} held-out; judged with BN {result['bn']}",
        *result["judged"],
    ]
    return "\n".join(parts)
