"""Fine-tuning as a library: per seed, a labelled subset, a classifier (from a pretrained backbone or
from scratch) trained through the one loop with a test-evaluation hook, and the seeds' mean ± std.
train/finetune.py is its command line; the grids (train/experiments/) call it too."""

from __future__ import annotations

import hashlib
import json
import math
import sys
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
from pipeline.subsets import SubsetSource, carve_validation, class_quotas, holdout_split, select_labeled_subset
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
# finetune.epochs only sets train.steps, which is checked itself (a --steps on the command line sets it to 0).
FINETUNE_RESUMABLE_KEYS = (RESUMABLE_KEYS - {"train.steps"}) | {"finetune.seeds", "finetune.epochs"}
STEPS_KEYS = ("--steps", "--train.steps")  # the flags that fix the horizon, whatever finetune.epochs says

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
    # what accuracy is reported on: the test split or the fixed held-out images (finetune.selection=
    # extra_labels); None: each seed's validation images, carved from its own labelled subset
    evaluation: Source | None
    evaluation_name: str  # "test", or "validation (10% of the labelled subset, ...)"


class SeedImages(NamedTuple):
    """One seed's labelled images, as indices into the training split."""

    subset: np.ndarray  # the labelled subset: the seed's whole label budget
    train: np.ndarray  # what trains: the subset, less its validation part when one is carved from it
    validation: np.ndarray | None  # carved from the subset (finetune.selection=labelled_subset), else None


def label_amount(config: FinetuneConfig) -> str:
    """The flag and value that sized the labelled subset, for error lines."""
    ft = config.finetune
    return f"--per-class {ft.per_class}" if ft.per_class else f"--label-fraction {ft.label_fraction:g}"


def check_carvable(config: FinetuneConfig, counts: np.ndarray, classes: list[str]) -> None:
    """A validation set carved from the labelled subset (`counts` images per class) needs 2 images of
    every class: one to train on, one to score; otherwise one line that names the amount and the count."""
    short = np.flatnonzero(counts < 2)
    if len(short):
        raise DataError(
            f"{label_amount(config)}: the labelled subset has {counts.sum()} images, {counts[short[0]]} of class "
            f"{classes[short[0]]!r} ({len(short)} of {len(classes)} classes have fewer than 2); carving the lr's "
            "validation set from it (finetune.selection=labelled_subset) needs 2 of every class, one to train on "
            "and one to score; use more labels"
        )


def check_selection(config: FinetuneConfig, train: Source) -> None:
    """What `labeled_subset` would refuse about carving the validation set, from the class counts alone
    (every seed's subset has the same): for the grids, before any cell trains."""
    ft = config.finetune
    if not ft.holdout or ft.selection != "labelled_subset":
        return
    counts = np.bincount(train.labels, minlength=len(train.classes))
    quotas = np.full(len(counts), ft.per_class) if ft.per_class else class_quotas(counts, ft.label_fraction)
    check_carvable(config, np.minimum(quotas, counts), train.classes)


def labeled_subset(config: FinetuneConfig, splits: Splits, seed: int) -> SeedImages:
    """The seed's labelled subset (see pipeline/subsets.py) of the pool, its validation part carved when
    the validation set comes from it, the training part checked to hold one global batch."""
    ft, train = config.finetune, splits.train
    chosen = select_labeled_subset(train.labels[splits.pool], seed, ft.label_fraction, ft.per_class, train.classes)
    subset = splits.pool[chosen]
    training, validation = subset, None
    if splits.evaluation is None:
        check_carvable(config, np.bincount(train.labels[subset], minlength=len(train.classes)), train.classes)
        kept, held = carve_validation(train.labels[subset], seed, ft.holdout)
        training, validation = subset[kept], subset[held]
    if len(training) < config.train.batch_size:
        raise DataError(
            f"the labelled subset has {len(training)} images to train on, fewer than one global batch of "
            f"{config.train.batch_size}; lower --batch-size or use more labels"
        )
    return SeedImages(subset, training, validation)


def resolve_steps(config: FinetuneConfig, labelled: int) -> str:
    """Set train.steps from finetune.epochs over the `labelled` images of the budget (so an lr's validation
    run trains as long as the test run it chooses for); returns how the horizon was set, for the output."""
    ft, run = config.finetune, config.train
    if ft.epochs <= 0:
        return f"steps: {run.steps} (train.steps as given; finetune.epochs 0)"
    scaled = math.ceil(ft.epochs * labelled / run.batch_size)
    run.steps = max(ft.min_steps, scaled)
    return (
        f"steps: {run.steps} (finetune.epochs {ft.epochs:g} over {labelled} labelled images at batch "
        f"{run.batch_size} = {scaled} steps; floor finetune.min_steps {ft.min_steps})"
    )


def evaluated_count(splits: Splits, images: SeedImages) -> int:
    """Images evaluation scores: the test split's, the fixed held-out ones, or a seed's validation part
    (the same size for every seed)."""
    return len(splits.evaluation) if splits.evaluation is not None else len(images.validation)


def selection_record(config: FinetuneConfig, splits: Splits, images: SeedImages) -> dict | None:
    """How many labels the validation set and its training part read (the same for every seed); None when
    evaluation is on the test split."""
    ft = config.finetune
    if not ft.holdout:
        return None
    carved = images.validation is not None
    validation = len(images.validation) if carved else len(splits.evaluation)
    return {
        "mode": ft.selection,
        "holdout": ft.holdout,
        "training_images": len(images.train),
        "validation_images": validation,
        "labels_read": len(images.train) + validation,
        "labels_outside_budget": 0 if carved else validation,
    }


def describe_selection(record: dict | None) -> str:
    if record is None:
        return ""
    if record["mode"] == "labelled_subset":
        return (
            f"lr selection: validation on {record['validation_images']} of the {record['labels_read']} labelled "
            f"images ({record['holdout']:.0%} of the subset, at least 1 per class), training on the other "
            f"{record['training_images']}; no label outside the subset read"
        )
    return (
        f"lr selection: validation on {record['validation_images']} images held out of the whole training split "
        f"(finetune.selection=extra_labels), training on {record['training_images']}: {record['labels_read']} "
        f"labels read, {record['labels_outside_budget']} of them outside the label budget"
    )


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


def finetune_seed(run: SeedRun, seed: int, images: SeedImages) -> dict:
    """Train one seed on its labelled `images` in run_dir/seed_<seed> and evaluate it (on the test split or
    its validation images); a finished seed is read back, not rerun."""
    config, splits, accelerator = run.config, run.splits, run.accelerator
    seed_dir, ft = run.run_dir / f"seed_{seed}", config.finetune
    if config.train.resume and (seed_dir / "result.json").is_file():
        return json.loads((seed_dir / "result.json").read_text())
    labeled, classes = SubsetSource(splits.train, images.train), len(splits.train.classes)
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
    scored = splits.evaluation or SubsetSource(splits.train, images.validation)
    evaluation = TestEvaluation(training, scored, config)
    per_process = per_process_batch(config.train, accelerator)  # one micro-batch's images per process
    batches = partial(train_batches, config, labeled, per_process, seed, accelerator=accelerator)
    title, task = f"fine-tuning {run.run_dir.name}, seed {seed}", SupervisedTask(config, classes)
    data = TrainingData(batches, len(labeled))
    fit(training, task, config, data, title, Hooks(after_step=evaluation), f"seed {seed}")
    # A run killed after its last checkpoint has its test record logged; the numbers are computed again.
    result = seed_result(seed, images.train, labeled, evaluation.last or evaluation.run(), config)
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


def summary_of(
    results: list[dict], config: FinetuneConfig, pretrained: Pretrained | None, splits: Splits, images: SeedImages
) -> dict:
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
        "test_images": evaluated_count(splits, images),
        "selection": selection_record(config, splits, images),
        "config": to_dict(config),
    }


def describe(
    config: FinetuneConfig, pretrained: Pretrained | None, splits: Splits, accelerator: Accelerator, evaluated: int
) -> str:
    ft, run, train = config.finetune, config.train, splits.train
    labels = f"{ft.per_class} per class" if ft.per_class else f"{ft.label_fraction:.1%}"
    init = "none (from scratch)"
    if pretrained is not None:
        init = f"{pretrained.path} ({pretrained.method} {pretrained.backbone}, step {pretrained.step})"
    per_process = run.batch_size // accelerator.num_processes
    return (
        f"finetune: {ft.arch}, {ft.head} head{', frozen backbone' if ft.linear_probe else ''}, init {init}; "
        f"labels {labels} of {len(splits.pool)} training images from {config.data.path}, {len(train.classes)} "
        f"classes; evaluated on {splits.evaluation_name} ({evaluated} images); {ft.seeds} seed(s) "
        f"from {run.seed}; {run.steps} steps of {run.batch_size} images ({per_process} per process, "
        f"{accelerator.num_processes} process(es) on {accelerator.device}), {config.optim.name} "
        f"{describe_lr(config.optim, run.batch_size)}, precision {config.speed.precision}; run folder {run.out}"
    )


def open_splits(config: FinetuneConfig) -> tuple[Splits, str]:
    """The training split and what evaluation reports on. With `finetune.holdout` the test split is not even
    opened: the validation set is carved from each seed's labelled subset (finetune.selection=
    labelled_subset), or is a fixed stratified part of the whole training split (extra_labels)."""
    train, data_path = open_data(config, "train")
    check_readable(train, crop=config.data.image_size)
    holdout = config.finetune.holdout
    if holdout and config.finetune.selection == "labelled_subset":
        name = f"validation ({holdout:.0%} of the labelled subset, at least 1 per class)"
        return Splits(train, np.arange(len(train)), None, name), data_path
    if holdout:
        pool, held_out = holdout_split(train.labels, holdout)
        name = f"validation ({holdout:.0%} of the training split, outside the labelled subset)"
        return Splits(train, pool, SubsetSource(train, held_out), name), data_path
    test, _ = open_data(config, "test")
    check_readable(test)
    check_same_classes(train, test)
    return Splits(train, np.arange(len(train)), test, "test"), data_path


def parse(argv: list[str] | None) -> tuple[FinetuneConfig, str]:
    """The command line (sys.argv when None) -> (the checked config, the config name it started from). A
    horizon given on the command line wins over finetune.epochs, which it sets to 0."""
    argv = sys.argv[1:] if argv is None else list(argv)
    config, name = parse_args(argv, stage_class(FinetuneConfig), STABLE_FLAGS, "Fine-tuning and linear evaluation")
    if any(token.split("=", 1)[0] in STEPS_KEYS for token in argv):
        config.finetune.epochs = 0.0
    return config, name


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
    steps_line = resolve_steps(config, len(subsets[seeds[0]].subset))  # the same size for every seed
    pretrained = load_init(config)
    keys, pattern = FINETUNE_RESUMABLE_KEYS, "seed_*/checkpoints/step_*.pt"
    run_dir = prepare_run_dir(config, f"finetune-{config_name}", accelerator, pattern, keys)
    record_invocation(run_dir, accelerator, 0)
    tracker_id = start_trackers(accelerator, config.log, config.train.resume, run_dir, to_dict(config))
    first = subsets[seeds[0]]
    lines = (describe(config, pretrained, splits, accelerator, evaluated_count(splits, first)), steps_line)
    for text in (*lines, describe_selection(selection_record(config, splits, first))):
        if text:
            accelerator.print(text)
    if warning := warmup_warning(config.optim, config.train.steps):
        accelerator.print(warning)
    shared = SeedRun(config, splits, pretrained, accelerator, run_dir, tracker_id)
    results = [finetune_seed(shared, seed, subsets[seed]) for seed in seeds]
    summary = summary_of(results, config, pretrained, splits, first)
    if accelerator.is_main_process:
        write_atomic(run_dir / "results.json", json.dumps(summary, indent=1).encode())
    mean, std = summarize(summary["accuracy"]["per_seed"])
    accelerator.print(f"results: {run_dir / 'results.json'}")
    which = "" if splits.evaluation_name == "test" else "validation "
    accelerator.print(f"{which}accuracy: {format_accuracy(mean, std, len(results))}")
    accelerator.end_training()
    return {"run_dir": str(run_dir), **summary}
