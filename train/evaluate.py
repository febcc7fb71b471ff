"""Score a checkpoint's backbone offline: kNN and a linear probe on its features, against random networks
of the same architecture and the raw pixels, on a labelled data set (the way solo-learn and MAE users
judge a backbone).

    python -m train.evaluate runs/demo-XXXX                          # the run's newest checkpoint, its data
    python -m train.evaluate runs/c10/checkpoints/step_00120000.pt --data ~/data/cifar-10-batches-py
    python -m train.evaluate runs/finetune-XXXX --json eval.json    # a fine-tuned backbone (its first seed)

Features are the backbone's pooled feature map of whole images, center-cropped to the run's image size
and normalised with its mean and std, on a copy whose batch-norm statistics are recalibrated on the fit
images (pretraining normalised patches or rotated views, not these). The fit images (labelled, from the
training split) and the scored ones (the held-out split: val/, test/, test_batch, t10k) are stratified.
kNN is the monitors' (train/knn.py: centred cosine, k neighbours voting exp(similarity / T)); the linear
probe is a multinomial logistic regression on standardised features. Every accuracy has its standard
error; the random floor is the mean ± sd over `--random-inits` initialisations. One table is printed;
`--json FILE` also writes every figure. Nothing in the run folder is changed.
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn

from model.backbones import build_backbone
from pipeline.atomic import write_atomic
from pipeline.data import RANDOM_INIT_STREAM, DataError, derive_seed
from pipeline.loaders import LOADERS
from pipeline.patches import normalize
from train.backbone_file import backbone_of, find_checkpoint
from train.batch_norm import recalibrate_batch_norm
from train.checkpoint import load_checkpoint
from train.cli import run_cli
from train.config import ConfigError, MonitorConfig
from train.estimates import binomial_se, mean_sd
from train.knn import KnnMonitor, stratified_indices
from train.monitors import images_at


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


def labelled_sets(config: dict, data: str | None, settings: MonitorConfig, device: torch.device) -> tuple:
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
    settings = MonitorConfig(knn_train_images=args.fit_images, knn_test_images=args.test_images)
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


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="pretraining or fine-tuning run folder, or a checkpoint file")
    parser.add_argument("--data", help="labelled data set with a held-out split (default: the run's own data)")
    parser.add_argument("--fit-images", type=int, default=1000, help="labelled images fitted on, stratified")
    parser.add_argument("--test-images", type=int, default=1000, help="held-out images scored, stratified")
    parser.add_argument("--random-inits", type=int, default=3, help="random networks the floor averages")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random networks")
    parser.add_argument("--json", help="also write every figure here")
    args = parser.parse_args(argv)
    for name in ("fit_images", "test_images", "random_inits"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a positive number")
    if args.json and not Path(args.json).parent.is_dir():
        raise ConfigError(f"--json {args.json}: folder {Path(args.json).parent} does not exist")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    result = evaluate(args)
    print(table(result))
    if args.json:
        write_atomic(args.json, json.dumps(result, indent=1).encode())
    return result


if __name__ == "__main__":
    run_cli(main)
