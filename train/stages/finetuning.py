"""Fine-tuning as a library: per seed, a labelled subset, a classifier (from a pretrained backbone or
from scratch) trained through the one loop with a test-evaluation hook, and the seeds' mean ± std.
train/finetune.py is its command line; the grids (train/experiments/) call it too."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from accelerate import Accelerator

from model.classifier import ARCHS, HEADS
from pipeline.atomic import write_atomic
from pipeline.data import INIT_STREAM, DataError, Source, check_readable, derive_seed
from pipeline.subsets import SubsetSource, holdout_split, select_labeled_subset
from train.config import FinetuneConfig, to_dict
from train.config.checks import check_config
from train.config.command_line import RUN_FLAGS, parse_args
from train.config.learning_rate import describe_lr, warmup_warning
from train.engine.loading import open_data, train_batches
from train.engine.loop import Hooks, TrainingData, fit
from train.engine.run_folder import RESUMABLE_KEYS, prepare_run_dir, record_invocation
from train.engine.run_lock import releasing_locks
from train.engine.session import check_model_builds, make_accelerator, per_process_batch
from train.engine.setup import RunSpec, Training, start_training
from train.engine.tracking import TrackerSink, start_trackers
from train.evaluation.batch_norm import recalibrate_batch_norm
from train.evaluation.monitors import whole_images
from train.evaluation.pretrained import Pretrained, initialise, load_init
from train.methods import stage_class
from train.methods.supervised import SupervisedTask, build_model, evaluate, model_input

KIND = "finetune"  # the checkpoint kind of fine-tuning runs
# A resumed fine-tuning run may add seeds; it may not change the horizon, or finished seeds and the
# continued one would be averaged over different schedules.
FINETUNE_RESUMABLE_KEYS = (RESUMABLE_KEYS - {"train.steps"}) | {"finetune.seeds"}

STABLE_FLAGS = {
    **RUN_FLAGS,
    "--init": ("finetune.init", str, "pretraining run folder or checkpoint file, or none (supervised baseline)"),
    "--arch": ("finetune.arch", str, f"network: {', '.join(ARCHS)}"),
    "--label-fraction": ("finetune.label_fraction", float, "fraction of training labels used, in (0, 1]"),
    "--per-class": ("finetune.per_class", int, "labelled images per class (replaces --label-fraction)"),
    "--seeds": ("finetune.seeds", int, "runs with seeds seed, seed+1, ...; reports mean ± std"),
    "--linear-probe": ("finetune.linear_probe", "store_true", "frozen backbone, train only the head"),
    "--head": ("finetune.head", str, f"classifier head: {', '.join(HEADS)} (mlp: two fully connected layers)"),
}


def validate(config: FinetuneConfig) -> None:
    """Check what can be checked before any work starts (every key's values are checked when parsed)."""
    check_config(config)
    check_model_builds(lambda: build_model(config, num_classes=1), f"--arch {config.finetune.arch}")


def check_same_classes(train_source: Source, test_source: Source) -> None:
    """Labels are class indices in sorted-name order: the splits must name the same classes, or every
    label after the first difference would silently mean another class."""
    if list(train_source.classes) != list(test_source.classes):
        train, test = set(train_source.classes), set(test_source.classes)
        difference = sorted(train ^ test)[:3] or ["(same names, different order)"]
        raise DataError(
            f"{test_source.root}: the test split's {len(test)} classes differ from the training split's "
            f"{len(train)} ({test_source.root} vs {train_source.root}), e.g. {', '.join(difference)}; expected "
            "the same class folders in both"
        )


class Splits(NamedTuple):
    train: Source  # the training split
    pool: np.ndarray  # its images labelled subsets are drawn from: all, or all but the held-out ones
    evaluation: Source  # what accuracy is reported on: the test split, or the held-out validation images
    evaluation_name: str  # "test", or "validation (10% of the training split)"


def labeled_subset(config: FinetuneConfig, splits: Splits, seed: int) -> np.ndarray:
    """The seed's labelled subset (see pipeline/subsets.py) of the pool, as indices into the training
    split, checked to hold one global batch."""
    ft, train = config.finetune, splits.train
    chosen = select_labeled_subset(train.labels[splits.pool], seed, ft.label_fraction, ft.per_class, train.classes)
    subset = splits.pool[chosen]
    if len(subset) < config.train.batch_size:
        raise DataError(
            f"the labelled subset has {len(subset)} images, fewer than one global batch of "
            f"{config.train.batch_size}; lower --batch-size or use more labels"
        )
    return subset


class TestEvaluation:
    """The loop's `after_step` hook: the test split's accuracy and loss every `finetune.eval_every` steps
    and after the last one, logged as a record of its own."""

    def __init__(self, training: Training, source: Source, config: FinetuneConfig) -> None:
        self.training, self.source, self.config = training, source, config
        self.last: dict | None = None

    def run(self) -> dict:
        return evaluate(self.training.net, self.source, self.config, self.training.accelerator)

    def __call__(self, done: int) -> None:
        every = self.config.finetune.eval_every
        if (every and done % every == 0) or done == self.config.train.steps:
            self.last = self.run()
            self.training.logger.write({"step": done, **self.last})


def seed_result(seed: int, subset: np.ndarray, labeled: SubsetSource, final: dict, config: FinetuneConfig) -> dict:
    return {
        "seed": seed,
        "test_accuracy": round(100 * final["test_acc"], 3),
        "test_loss": final["test_loss"],
        "labeled_images": len(labeled),
        "labeled_subset_sha1": hashlib.sha1(subset.astype(np.int64).tobytes()).hexdigest(),
        "labeled_per_class": np.bincount(labeled.labels, minlength=len(labeled.classes)).tolist(),
        "test_images": final["test_images"],
        "steps": config.train.steps,
    }


def seed_model(config: FinetuneConfig, num_classes: int, pretrained: Pretrained | None) -> torch.nn.Module:
    model = build_model(config, num_classes)
    return model if pretrained is None else initialise(model, config, pretrained)


def recalibrate_probe(training: Training, config: FinetuneConfig, splits: Splits) -> None:
    """A linear probe's frozen backbone: batch-norm statistics re-estimated on whole training images
    before the head trains (pretraining learned them on patches or views); saved with every checkpoint."""
    ft, pool = config.finetune, SubsetSource(splits.train, splits.pool)
    images, _ = whole_images(pool, config.data.image_size, ft.recalibration_images, training.accelerator.device)
    prepare = partial(model_input, config=config)
    recalibrate_batch_norm(training.net.backbone, images, ft.eval_batch_size, prepare)


@dataclass
class SeedRun:
    """What every seed of one fine-tuning run shares."""

    config: FinetuneConfig
    splits: Splits
    pretrained: Pretrained | None  # the backbone's initial weights; None: from scratch
    accelerator: Accelerator
    run_dir: Path  # each seed trains in run_dir/seed_<seed>
    tracker_id: str | None = None  # with a tracker, each seed's records go to it under seed_<seed>/


def finetune_seed(run: SeedRun, seed: int, subset: np.ndarray) -> dict:
    """Train and evaluate one seed on its labelled `subset` in run_dir/seed_<seed>; a finished seed is read
    back, not rerun."""
    config, splits, accelerator = run.config, run.splits, run.accelerator
    seed_dir, ft = run.run_dir / f"seed_{seed}", config.finetune
    if config.train.resume and (seed_dir / "result.json").is_file():
        return json.loads((seed_dir / "result.json").read_text())
    labeled, classes = SubsetSource(splits.train, subset), len(splits.train.classes)
    build = partial(seed_model, config, classes, run.pretrained)
    init_seed = derive_seed(seed, INIT_STREAM)  # the same fresh weights for every init and every rank
    state = {"seed": seed} | ({"tracker_run_id": run.tracker_id} if run.tracker_id else {})
    # The whole training set's size is recorded: the labelled subset is drawn from it.
    spec = RunSpec(seed_dir, KIND, seed, init_seed=init_seed, num_images=len(splits.train), extra_state=state)
    training = start_training(config, accelerator, build, spec)
    if config.log.tracker != "none":
        training.tracker = training.logger.sink = TrackerSink(accelerator, config.log.tracker, f"seed_{seed}/")
    if ft.linear_probe and ft.recalibrate_bn and run.pretrained is not None and training.start_step == 0:
        recalibrate_probe(training, config, splits)
    evaluation = TestEvaluation(training, splits.evaluation, config)
    per_process = per_process_batch(config.train, accelerator)  # one micro-batch's images per process
    batches = partial(train_batches, config, labeled, per_process, seed, accelerator=accelerator)
    title, task = f"fine-tuning {run.run_dir.name}, seed {seed}", SupervisedTask(config, classes)
    data = TrainingData(batches, len(labeled))
    fit(training, task, config, data, title, Hooks(after_step=evaluation), f"seed {seed}")
    # A run killed after its last checkpoint has its test record logged; the numbers are computed again.
    result = seed_result(seed, subset, labeled, evaluation.last or evaluation.run(), config)
    if accelerator.is_main_process:
        write_atomic(seed_dir / "result.json", json.dumps(result, indent=1).encode())
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # drop Accelerate's references to this seed's model and optimizer
    return result


def summarize(accuracies: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; 0 for a single seed)."""
    values = np.asarray(accuracies, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def format_accuracy(mean: float, std: float, count: int) -> str:
    """ "80.3 ± 0.3 (5 seeds)"; one seed has no spread to show: "80.3 (1 seed)"."""
    if count == 1:
        return f"{mean:.1f} (1 seed)"
    return f"{mean:.1f} ± {std:.1f} ({count} seeds)"


def summary_of(results: list[dict], config: FinetuneConfig, pretrained: Pretrained | None, splits: Splits) -> dict:
    ft = config.finetune
    accuracies = [r["test_accuracy"] for r in results]
    mean, std = summarize(accuracies)
    return {
        "accuracy": {"mean": round(mean, 3), "std": round(std, 3), "per_seed": accuracies, "unit": "percent"},
        "seeds": results,
        "arch": ft.arch,
        "linear_probe": ft.linear_probe,
        "head": ft.head,
        "init": "none" if pretrained is None else str(pretrained.path),
        "init_method": None if pretrained is None else pretrained.method,
        "init_step": None if pretrained is None else pretrained.step,
        "label_fraction": None if ft.per_class else ft.label_fraction,
        "per_class": ft.per_class or None,
        "labeled_images": [r["labeled_images"] for r in results],
        "train_images": len(splits.train),
        "evaluated_on": splits.evaluation_name,
        "classes": len(splits.train.classes),
        "test_images": len(splits.evaluation),
        "config": to_dict(config),
    }


def describe(config: FinetuneConfig, pretrained: Pretrained | None, splits: Splits, accelerator: Accelerator) -> str:
    ft, run, train = config.finetune, config.train, splits.train
    labels = f"{ft.per_class} per class" if ft.per_class else f"{ft.label_fraction:.1%}"
    init = "none (from scratch)"
    if pretrained is not None:
        init = f"{pretrained.path} ({pretrained.method} {pretrained.backbone}, step {pretrained.step})"
    per_process = run.batch_size // accelerator.num_processes
    return (
        f"finetune: {ft.arch}, {ft.head} head{', frozen backbone' if ft.linear_probe else ''}, init {init}; "
        f"labels {labels} of {len(splits.pool)} training images from {config.data.path}, {len(train.classes)} "
        f"classes; evaluated on {splits.evaluation_name} ({len(splits.evaluation)} images); {ft.seeds} seed(s) "
        f"from {run.seed}; {run.steps} steps of {run.batch_size} images ({per_process} per process, "
        f"{accelerator.num_processes} process(es) on {accelerator.device}), {config.optim.name} "
        f"{describe_lr(config.optim, run.batch_size)}, precision {config.speed.precision}; run folder {run.out}"
    )


def open_splits(config: FinetuneConfig) -> tuple[Splits, str]:
    """The training split and what evaluation reports on. With `finetune.holdout`, a fixed stratified part
    of the training split is the validation set and the test split is not even opened."""
    train, data_path = open_data(config, "train")
    check_readable(train, crop=config.data.image_size)
    holdout = config.finetune.holdout
    if holdout:
        pool, held_out = holdout_split(train.labels, holdout)
        name = f"validation ({holdout:.0%} of the training split)"
        return Splits(train, pool, SubsetSource(train, held_out), name), data_path
    test, _ = open_data(config, "test")
    check_readable(test)
    check_same_classes(train, test)
    return Splits(train, np.arange(len(train)), test, "test"), data_path


def parse(argv: list[str] | None) -> tuple[FinetuneConfig, str]:
    """The command line (sys.argv when None) -> (the checked config, the config name it started from)."""
    return parse_args(argv, stage_class(FinetuneConfig), STABLE_FLAGS, "Fine-tuning and linear evaluation")


def main(argv: list[str] | None = None) -> dict:
    """`parse` then `run`: what train/finetune.py does, for callers that hold a command line (the grids)."""
    return run(*parse(argv))


@releasing_locks
def run(config: FinetuneConfig, config_name: str) -> dict:
    """Fine-tune every seed of `config` into its run folder; returns the folder and the seeds' summary."""
    validate(config)
    accelerator = make_accelerator(config)
    per_process_batch(config.train, accelerator)
    splits, config.data.path = open_splits(config)  # config.yaml records where the data is
    seeds = [config.train.seed + k for k in range(config.finetune.seeds)]
    subsets = {seed: labeled_subset(config, splits, seed) for seed in seeds}
    pretrained = load_init(config)
    keys, pattern = FINETUNE_RESUMABLE_KEYS, "seed_*/checkpoints/step_*.pt"
    run_dir = prepare_run_dir(config, f"finetune-{config_name}", accelerator, pattern, keys)
    record_invocation(run_dir, accelerator, 0)
    tracker_id = start_trackers(accelerator, config.log, config.train.resume, run_dir, to_dict(config))
    for text in (describe(config, pretrained, splits, accelerator), warmup_warning(config.optim, config.train.steps)):
        if text:
            accelerator.print(text)
    shared = SeedRun(config, splits, pretrained, accelerator, run_dir, tracker_id)
    results = [finetune_seed(shared, seed, subsets[seed]) for seed in seeds]
    summary = summary_of(results, config, pretrained, splits)
    if accelerator.is_main_process:
        write_atomic(run_dir / "results.json", json.dumps(summary, indent=1).encode())
    mean, std = summarize(summary["accuracy"]["per_seed"])
    accelerator.print(f"results: {run_dir / 'results.json'}")
    which = "" if splits.evaluation_name == "test" else "validation "
    accelerator.print(f"{which}accuracy: {format_accuracy(mean, std, len(results))}")
    accelerator.end_training()
    return {"run_dir": str(run_dir), **summary}
