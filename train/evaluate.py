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
kNN is the monitors' (train/evaluation/knn.py: centred cosine, k neighbours voting exp(similarity / T)); the linear
probe is a multinomial logistic regression on standardised features. Every accuracy has its standard
error; the random floor is the mean ± sd over `--random-inits` initialisations. One table is printed;
`--json FILE` also writes every figure. Nothing in the run folder is changed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.atomic import write_atomic
from train.config import ConfigError
from train.engine.cli import run_cli
from train.evaluation.offline import evaluate, table


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
