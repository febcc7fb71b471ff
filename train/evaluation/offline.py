"""Scoring a backbone offline (train/evaluate.py): kNN and a linear probe on its features against random
networks of the same architecture and the raw pixels, each with its standard error."""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn

from model.backbones import build_backbone
from pipeline.data import RANDOM_INIT_STREAM, DataError, derive_seed
from pipeline.loaders import LOADERS
from pipeline.patches import normalize
from train.config import ConfigError, MonitorSection
from train.engine.checkpoint import load_checkpoint
from train.evaluation.backbone_file import backbone_of, find_checkpoint
from train.evaluation.batch_norm import recalibrate_batch_norm
from train.evaluation.estimates import binomial_se, mean_sd
from train.evaluation.knn import KnnMonitor, stratified_indices
from train.evaluation.monitors import images_at


@dataclass(frozen=True)
class Scores:
    knn: float
    knn_se: float
    linear: float
    linear_se: float


def linear_probe(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor):
    """(accuracy, standard error) of a logistic regression fitted on standardised `train` features."""
    scaler = StandardScaler().fit(train.cpu().numpy())
    probe = LogisticRegression(max_iter=2000, C=1.0).fit(scaler.transform(train.cpu().numpy()), train_labels.cpu())
    accuracy = float((probe.predict(scaler.transform(test.cpu().numpy())) == test_labels.cpu().numpy()).mean())
    return accuracy, binomial_se(accuracy, len(test_labels))


def scores(monitor: KnnMonitor, train: torch.Tensor, test: torch.Tensor) -> Scores:
    knn = monitor.score(train, test)
    linear = linear_probe(train, monitor.train_labels, test, monitor.test_labels)
    return Scores(*knn, *linear)


def network_scores(monitor: KnnMonitor, backbone: nn.Module) -> Scores:
    """kNN and linear probe of `backbone`'s features, batch norm recalibrated on the fit images (a copy)."""
    backbone = copy.deepcopy(backbone)
    recalibrate_batch_norm(backbone, monitor.train_images, monitor.settings.batch, monitor.prepare)
    return scores(
        monitor, monitor.features(backbone, monitor.train_images), monitor.features(backbone, monitor.test_images)
    )


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


def evaluate(args: argparse.Namespace) -> dict:
    checkpoint = find_checkpoint(Path(args.source), None)
    tensors, info = backbone_of(checkpoint)
    config = load_checkpoint(checkpoint)["config"]
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device = accelerator.device
    settings = MonitorSection(knn_train_images=args.fit_images, knn_test_images=args.test_images)
    fit, scored = labelled_sets(config, args.data, settings, device)
    mean, std = info["preprocessing"]["mean"], info["preprocessing"]["std"]
    monitor = KnnMonitor(lambda net: net, partial(normalize, mean=mean, std=std), fit, scored, settings, accelerator)
    build = partial(build_backbone, info["backbone"], info["width"], info["stem"])
    backbone = build().to(device)
    backbone.load_state_dict(tensors)
    trained = network_scores(monitor, backbone)
    floors = []
    for init in range(args.random_inits):
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(derive_seed(args.seed, RANDOM_INIT_STREAM, init))
            floors.append(network_scores(monitor, build().to(device)))
    pixels = scores(monitor, fit[0].flatten(1).float(), scored[0].flatten(1).float())
    return report(info, checkpoint, trained, floors, pixels, len(fit[1]), len(scored[1]))


def report(info: dict, checkpoint: Path, trained: Scores, floors: list[Scores], pixels: Scores, fit: int, scored: int):
    knn_floor, linear_floor = mean_sd([f.knn for f in floors]), mean_sd([f.linear for f in floors])
    return {
        "checkpoint": str(checkpoint),
        "backbone": info["backbone"],
        "method": info["method"],
        "step": info["step"],
        "fit_images": fit,
        "scored_images": scored,
        "pretrained": trained.__dict__,
        "random": {
            "knn": knn_floor[0],
            "knn_sd": knn_floor[1],
            "linear": linear_floor[0],
            "linear_sd": linear_floor[1],
            "inits": len(floors),
        },  # fmt: skip
        "pixels": pixels.__dict__,
    }


def table(result: dict) -> str:
    p, r, x = result["pretrained"], result["random"], result["pixels"]

    def pct(value: float) -> str:
        return f"{100 * value:.1f}"

    rows = [
        "| features | kNN % | linear probe % |",
        "| --- | ---: | ---: |",
        f"| {result['backbone']} ({result['method']}, step {result['step']}) | {pct(p['knn'])} ± {pct(p['knn_se'])} "
        f"| {pct(p['linear'])} ± {pct(p['linear_se'])} |",
        f"| random {result['backbone']} (mean ± sd of {r['inits']}) | {pct(r['knn'])} ± {pct(r['knn_sd'])} "
        f"| {pct(r['linear'])} ± {pct(r['linear_sd'])} |",
        f"| raw pixels | {pct(x['knn'])} ± {pct(x['knn_se'])} | {pct(x['linear'])} ± {pct(x['linear_se'])} |",
        "",
        f"gain over random: kNN {100 * (p['knn'] - r['knn']):+.1f} points, linear "
        f"{100 * (p['linear'] - r['linear']):+.1f} points; fitted on {result['fit_images']} labelled images, scored "
        f"on {result['scored_images']} held-out",
    ]
    return "\n".join(rows)
