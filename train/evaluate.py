"""Score a checkpoint's backbone offline with the standard probe: kNN and a linear probe on its frozen
features, against the strongest of raw pixels and random networks of the same architecture, on a
labelled data set (the way solo-learn and MAE users judge a backbone).

    python -m train.evaluate runs/demo-XXXX                          # the run's newest checkpoint, its data
    python -m train.evaluate runs/c10/checkpoints/step_00120000.pt --data ~/data/cifar-10-batches-py
    python -m train.evaluate runs/finetune-XXXX --json eval.json    # a fine-tuned backbone (its first seed)

The network is frozen in eval mode with the batch-norm statistics it stored (the standard protocol), and
again with them re-estimated on the fit images (reported beside it; `--bn reestimated` judges with it).
Whole images are center-cropped to the run's image size and normalised with its mean and std; a patch
network's backbone (Selfie's P) is also probed on the image's patch grid: each patch embedded, the vectors
concatenated in grid order. The fit images (labelled, from the training split) and the scored ones (the
held-out split: val/, test/, test_batch, t10k) are stratified. kNN: k = 20 cosine neighbours voting
exp(similarity / 0.07), as solo-learn; linear probe: logistic regression (C = 1, at most 1,000 lbfgs
iterations) on standardised features (train/evaluation/probes.py). Every accuracy has its standard error;
random networks are the mean ± sd over `--random-inits` initialisations. The tables and the judgement
against the strongest baseline are printed; `--json FILE` also writes every figure. Nothing in the run
folder is changed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.atomic import write_atomic
from train.config import ConfigError
from train.config.schema import BN_PROTOCOLS
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
    parser.add_argument("--bn", default=BN_PROTOCOLS[0], help="batch norm the judgement uses: stored | reestimated")
    parser.add_argument("--json", help="also write every figure here")
    args = parser.parse_args(argv)
    for name in ("fit_images", "test_images", "random_inits"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a positive number")
    if args.bn not in BN_PROTOCOLS:
        raise ConfigError(f"--bn {args.bn}: expected one of {', '.join(BN_PROTOCOLS)}")
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
