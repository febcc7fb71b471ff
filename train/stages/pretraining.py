"""Pretraining as a library: a pretext method (train/methods/) trained through the one loop, with its
monitors and, at the end, the verdict lines. train/pretrain.py is its command line; the grids
(train/experiments/) and the benchmark call it too."""

from __future__ import annotations

from functools import partial

import torch
from accelerate import Accelerator

from pipeline.data import Source, check_readable
from train.config import PretrainConfig, to_dict
from train.config.checks import check_config
from train.config.command_line import RUN_FLAGS, parse_args
from train.config.learning_rate import describe_lr, warmup_warning
from train.engine.curves import read_log
from train.engine.loading import check_batch_fits, open_data, train_batches
from train.engine.loop import Hooks, TrainingData, fit
from train.engine.run_folder import prepare_run_dir, record_invocation
from train.engine.run_lock import releasing_locks
from train.engine.session import check_model_builds, make_accelerator, per_process_batch
from train.engine.setup import RunSpec, Training, start_training
from train.engine.tracking import TrackerSink, start_trackers
from train.evaluation.monitors import build_monitors
from train.evaluation.verdict import floor_of, verdict_lines
from train.methods import METHODS, PretextMethod, method_flags, method_parts, stage_class

KIND_SUFFIX = "_pretrain"  # a checkpoint's kind is "<method>_pretrain"


def stable_flags() -> dict:
    methods = f"pretext task: {', '.join(METHODS)}"
    return {**RUN_FLAGS, "--method": ("method", str, methods), **method_flags()}


def build_model(config: PretrainConfig) -> torch.nn.Module:
    model = METHODS[config.method].build_model(config)
    return model.to(memory_format=torch.channels_last) if config.speed.channels_last else model


def validate(config: PretrainConfig) -> type[PretextMethod]:
    """Everything that can be checked before any work starts; returns the method's class."""
    method = METHODS[config.method]
    check_config(config)
    method.check(config)
    check_model_builds(lambda: method.build_model(config), f"--method {config.method}")
    return method


def describe(config: PretrainConfig, method: PretextMethod, training: Training, source: Source, batch: int) -> str:
    run, accelerator, precision = config.train, training.accelerator, config.speed.precision
    parameters = sum(p.numel() for p in training.net.parameters()) / 1e6
    accumulated = f", {run.grad_accum} micro-batches of {batch}" if run.grad_accum > 1 else f" ({batch} per process)"
    return (
        f"{config.method}: {len(source)} images from {config.data.path}; {config.data.image_size}px, "
        f"{method.describe()}; {accelerator.num_processes} process(es) on {accelerator.device}, {run.batch_size} "
        f"images/step{accumulated}, {config.optim.name} {describe_lr(config.optim, run.batch_size)}, precision "
        f"{precision}; {config.model.backbone} backbone, {parameters:.2f}M parameters; run folder {run.out}"
    )


def width_note(config: PretrainConfig) -> str | None:
    """A config's model.width sized for one backbone silently shrinks another (the demo's quarter-width
    ResNet-36 made a ResNet-8 of 4 channels): say so when a CIFAR ResNet is narrower than the paper's."""
    model = config.model
    if model.backbone not in ("resnet8", "resnet32") or model.width >= 1:
        return None
    channels = max(4, round(16 * model.width))
    return (
        f"note: {model.backbone} at model.width={model.width:g} has {channels} channels in its first stage (the "
        f"paper's has 16): --model.width=1, or --config pretext_demo (sized for it)"
    )


def start_tracking(config: PretrainConfig, training: Training) -> None:
    """The configured tracker, continuing the run's tracker run on a resume; records and pictures go to it."""
    run_id = start_trackers(training.accelerator, config.log, config.train.resume, training.folder, to_dict(config))
    if config.log.tracker != "none":
        training.extra_state["tracker_run_id"] = run_id
        training.tracker = TrackerSink(training.accelerator, config.log.tracker)
        training.logger.sink = training.tracker


def make_hooks(config: PretrainConfig, method: PretextMethod, training: Training, source: Source) -> Hooks:
    """The pictures and monitors of rank 0; at a run's start, the probes' baselines (random networks, pixels)."""
    accelerator = training.accelerator
    hooks = Hooks(method.pictures(source, accelerator.device) if accelerator.is_main_process else None)
    hooks.log_fields = build_monitors(config, method, training.net, source, accelerator)
    if hooks.log_fields is not None and hooks.log_fields.knn is not None and training.start_step == 0:
        baselines = hooks.log_fields.measure_baselines(
            partial(build_model, config), config.train.seed, accelerator.device
        )
        training.logger.write({"step": 0, **baselines})
    return hooks


def set_up(config: PretrainConfig, config_name: str, accelerator: Accelerator) -> tuple:
    """(method, its training, the data, images per process per micro-batch): everything `fit` needs."""
    method = METHODS[config.method](config, accelerator.device)
    batch = per_process_batch(config.train, accelerator)
    source, config.data.path = open_data(config, "train")  # config.yaml records where the data is
    check_readable(source, crop=config.data.image_size)
    check_batch_fits(source, config.train.batch_size)
    run_dir = prepare_run_dir(config, config_name, accelerator)
    state = method_parts(METHODS[config.method], config).state()  # where fine-tuning finds the backbone
    seed = config.train.seed  # one seed for the initial weights (every rank) and the run's streams
    spec = RunSpec(
        run_dir, config.method + KIND_SUFFIX, seed, init_seed=seed, num_images=len(source), extra_state=state
    )
    training = start_training(config, accelerator, partial(build_model, config), spec)
    record_invocation(run_dir, accelerator, training.start_step)
    return method, training, source, batch


def parse(argv: list[str] | None) -> tuple[PretrainConfig, str]:
    """The command line (sys.argv when None) -> (the checked config, the config name it started from)."""
    return parse_args(argv, stage_class(PretrainConfig), stable_flags(), "Self-supervised pretraining")


def main(argv: list[str] | None = None) -> dict:
    """`parse` then `run`: what train/pretrain.py does, for callers that hold a command line (the grids)."""
    return run(*parse(argv))


@releasing_locks
def run(config: PretrainConfig, config_name: str) -> dict:
    """Train `config` into its run folder; returns the run folder and the last log record."""
    validate(config)
    accelerator = make_accelerator(config)
    method, training, source, batch = set_up(config, config_name, accelerator)
    start_tracking(config, training)
    notes = (warmup_warning(config.optim, config.train.steps), width_note(config))
    for text in (describe(config, method, training, source, batch), *notes):
        if text:
            accelerator.print(text)
    spec = method.loader_patch_spec(config.data.loader)
    batches = partial(train_batches, config, source, batch, config.train.seed, accelerator=accelerator, patch_spec=spec)
    hooks = make_hooks(config, method, training, source)
    data, title = TrainingData(batches, len(source)), f"{config.method} pretraining: {training.folder.name}"
    result = fit(training, method, config, data, title, hooks)
    accelerator.end_training()
    if not result.last:
        return {"run_dir": str(training.folder), "step": training.start_step}
    last, monitored = (
        result.last,
        "; " + hooks.log_fields.summary(result.last, method.metric) if hooks.log_fields else "",
    )
    accelerator.print(
        f"done: step {last['step']}, loss {last['loss']}, {config.method} {method.accuracy_name} accuracy "
        f"{last[method.metric]:.1%} (chance {method.chance:.1%}){monitored}; {result.skipped_images} unreadable "
        f"images skipped; run folder {training.folder}"
    )
    if accelerator.is_main_process:  # the monitors and the log are rank 0's
        floor = floor_of(read_log(training.logger.path))
        print("\n".join(verdict_lines(last, floor, method.metric, method.chance, config.monitor.bn)))
    return {"run_dir": str(training.folder), **last}
