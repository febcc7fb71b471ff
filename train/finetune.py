"""Fine-tuning and linear evaluation on few labels (Selfie §2.3, §3.1, §4.2; Patch RotNet §4's Linear/Tuned).

Launch:
    accelerate launch train/finetune.py --init runs/demo-XXXX      # demo data: 10% of labels, 3 seeds
    accelerate launch train/finetune.py --init none                 # the supervised baseline, same recipe
    accelerate launch train/finetune.py --init runs/demo-XXXX --arch resnet36_attn --label-fraction 0.05 --seeds 5
    accelerate launch train/finetune.py --init runs/demo-XXXX --arch resnet36 --linear-probe
    accelerate launch train/finetune.py --init runs/rotnet-XXXX --arch resnet8 --head mlp --linear-probe
                                                                    # rotation paper: frozen + two FC layers
    accelerate launch --multi_gpu --num_processes 8 train/finetune.py --config imagenet224 \
        --data ~/data/imagenet --init runs/in224 --per-class 60 --out runs/in224-ft60
    accelerate launch train/finetune.py --config cifar10 --data ~/data/cifar-10-batches-py --init runs/c10 \
        --out runs/c10-ft --resume
    accelerate launch train/finetune.py --config imagenet224 --loader ffcv --data ~/data/imagenet-betons \
        --init runs/in224 --label-fraction 0.1              # a folder with train.beton and val.beton
    python train/compare.py --init runs/demo-XXXX                   # pretrained vs. supervised over label fractions

The labelled subset is stratified per class and depends only on the seed (pipeline/subsets.py), so the
pretrained and the supervised run of one seed train on the same images. Test accuracy always comes from
the held-out split (val/ or test/ of an ImageNet-layout folder, test_batch of CIFAR-10).

Run folder (--out, default runs/finetune-<config>-<time>): config.yaml; per seed, seed_<s>/ with
log.jsonl, checkpoints/, curves.png and result.json; results.json with every seed's test accuracy, their
mean and sample standard deviation, the subset sizes, the init and the config. The last line printed is
`accuracy: 80.3 ± 0.3 (5 seeds)`. --resume continues an interrupted run: finished seeds are kept, the
running one continues from its newest checkpoint, and a larger --seeds adds seeds.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm import tqdm

from model.classifier import ARCHS, HEADS, Classifier, build_classifier, load_pretrained
from pipeline.data import (
    AUGMENTS,
    INIT_STREAM,
    Batch,
    DataError,
    Source,
    check_readable,
    derive_seed,
)
from pipeline.patches import normalize
from pipeline.subsets import SubsetSource, select_labeled_subset
from train.common import (
    RESUMABLE_KEYS,
    RUN_FLAGS,
    Checkpoints,
    JsonlLogger,
    MetricWindow,
    all_rng_states,
    build_sgd,
    eval_batches,
    load_checkpoint,
    make_accelerator,
    open_data,
    per_process_batch,
    prepare_run_dir,
    restore_training_state,
    run_cli,
    train_batches,
    training_state,
    truncate_log,
    validate_run,
    warmup_cosine,
    write_atomic,
)
from train.config import ConfigError, FinetuneConfig, parse_args, to_dict
from train.diagnostics import plot_curves

CHECKPOINT_KIND = "finetune"
# A resumed fine-tuning run may add seeds; it may not change the horizon, or finished seeds and the
# continued one would be averaged over different schedules.
FINETUNE_RESUMABLE_KEYS = (RESUMABLE_KEYS - {"train.steps"}) | {"finetune.seeds"}
PRETRAINED_KIND_SUFFIX = "_pretrain"  # selfie_pretrain, rotnet_pretrain, ... (train/pretrain.py)
# Model keys that shape what a checkpoint provides: the backbone's for every arch, A's too for resnet36_attn.
PATCH_NET_KEYS = ("width", "stem")
POOL_KEYS = ("attn_layers", "attn_intermediate", "attn_heads")

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
    """Check what can be checked before any work starts."""
    ft = config.finetune
    validate_run(config)
    if config.data.augment not in AUGMENTS:
        raise ConfigError(f"data.augment {config.data.augment!r}: expected one of {', '.join(AUGMENTS)}")
    if ft.arch not in ARCHS:
        raise ConfigError(f"--arch {ft.arch}: expected one of {', '.join(ARCHS)}")
    if not 0.0 < ft.label_fraction <= 1.0:
        raise ConfigError(f"--label-fraction {ft.label_fraction}: expected a fraction in (0, 1], e.g. 0.05 for 5%")
    if ft.per_class < 0:
        raise ConfigError(f"--per-class {ft.per_class}: expected a positive count (0 = use --label-fraction)")
    if ft.seeds <= 0:
        raise ConfigError(f"--seeds {ft.seeds}: expected a positive number of seeds")
    if ft.head not in HEADS:
        raise ConfigError(f"--head {ft.head}: expected one of {', '.join(HEADS)}")
    if ft.head_hidden <= 0:
        raise ConfigError(f"finetune.head_hidden {ft.head_hidden}: expected a positive number of units")
    if ft.eval_every < 0 or ft.eval_batch_size <= 0:
        raise ConfigError("finetune.eval_every must be >= 0 and finetune.eval_batch_size positive")
    try:  # model settings (stem, heads dividing the width, ...) fail here, before a run folder exists
        build_model(config, num_classes=1)
    except ValueError as error:
        raise ConfigError(f"model settings do not build --arch {ft.arch}: {error}") from error


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


class Pretrained(NamedTuple):
    path: Path  # the checkpoint file
    model: dict[str, torch.Tensor]  # its model state dict (not its optimizer state: memory)
    step: int
    method: str  # the pretext task it was trained on
    backbone: str  # model.backbone of that run
    encoder_prefix: str  # where the backbone's tensors are in `model`


def load_init(config: FinetuneConfig) -> Pretrained | None:
    """The pretraining checkpoint named by --init (a run folder means its newest checkpoint), checked
    against this run's architecture; None for --init none."""
    init = config.finetune.init
    if init == "none":
        return None
    path = Path(init)
    if path.is_dir():
        latest = Checkpoints(path / "checkpoints").latest() or Checkpoints(path).latest()
        if latest is None and any(path.glob("seed_*/checkpoints/step_*.pt")):
            raise ConfigError(f"--init {init}: a fine-tuning run folder; expected a pretraining run folder")
        if latest is None:
            raise ConfigError(
                f"--init {init}: no checkpoint in {path / 'checkpoints'}; expected a pretraining run folder"
            )
        path = latest
    elif not path.is_file():
        raise ConfigError(f"--init {init}: no such file or folder; expected a pretraining run folder, a .pt, or none")
    state = load_checkpoint(path)
    kind = str(state.get("kind"))
    if not kind.endswith(PRETRAINED_KIND_SUFFIX):
        raise ConfigError(
            f"--init {path}: a {state.get('kind')!r} checkpoint; expected a pretraining checkpoint "
            f"(train/pretrain.py's, kind METHOD{PRETRAINED_KIND_SUFFIX})"
        )
    saved = state["config"]["model"]
    # Checkpoints from before the rotation methods hold Selfie's P, a resnet36, under patch_net.
    backbone = saved.get("backbone", "resnet36")
    prefix = state.get("encoder_prefix", "patch_net.")
    method = kind.removesuffix(PRETRAINED_KIND_SUFFIX)
    if config.finetune.linear_probe and config.finetune.arch == "resnet50" and backbone == "resnet36":
        with_pool = " or resnet36_attn (P + A)" if method == "selfie" else ""
        raise ConfigError(
            f"--init {path}: --linear-probe freezes the backbone, and resnet50's stage 4 is not pretrained "
            f"(the checkpoint holds a resnet36); use --arch resnet36 (its pooled features){with_pool}"
        )
    keys = PATCH_NET_KEYS + (POOL_KEYS if config.finetune.arch == "resnet36_attn" else ())
    for key in keys:
        if saved.get(key) != getattr(config.model, key):
            raise ConfigError(
                f"--init {path}: pretrained with model.{key}={saved.get(key)!r} but this run has "
                f"model.{key}={getattr(config.model, key)!r}; use the pretraining run's --config or "
                f"--model.{key}={saved.get(key)}"
            )
    try:  # a trial load on the CPU, so a broken checkpoint stops the run before any work starts
        load_pretrained(build_model(config, num_classes=1), config.finetune.arch, state["model"], prefix, backbone)
    except ValueError as error:
        raise ConfigError(f"--init {path}: does not fit --arch {config.finetune.arch}: {error}") from error
    return Pretrained(path, state["model"], int(state["step"]), method, backbone, prefix)


def labeled_subset(config: FinetuneConfig, train_source: Source, seed: int) -> np.ndarray:
    """The seed's labelled subset (see pipeline/subsets.py), checked to hold one global batch."""
    ft = config.finetune
    subset = select_labeled_subset(train_source.labels, seed, ft.label_fraction, ft.per_class, train_source.classes)
    if len(subset) < config.train.batch_size:
        raise DataError(
            f"the labelled subset has {len(subset)} images, fewer than one global batch of "
            f"{config.train.batch_size}; lower --batch-size or use more labels"
        )
    return subset


def build_model(config: FinetuneConfig, num_classes: int) -> Classifier:
    m = config.model
    model = build_classifier(
        config.finetune.arch,
        num_classes,
        width=m.width,
        stem=m.stem,
        attn_layers=m.attn_layers,
        attn_intermediate=m.attn_intermediate,
        attn_heads=m.attn_heads,
        attn_dropout=m.attn_dropout,
        frozen=config.finetune.linear_probe,
        head=config.finetune.head,
        head_hidden=config.finetune.head_hidden,
    )
    return model.to(memory_format=torch.channels_last) if config.train.channels_last else model


def model_input(images: torch.Tensor, config: FinetuneConfig) -> torch.Tensor:
    x = normalize(images, config.data.mean, config.data.std)
    return x.contiguous(memory_format=torch.channels_last) if config.train.channels_last else x


def train_step(
    model: torch.nn.Module,
    batch: Batch,
    config: FinetuneConfig,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    accelerator: Accelerator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One supervised step; the cross-entropy is taken in fp32. Returns detached (loss, accuracy)."""
    logits = model(model_input(batch.images, config)).float()
    loss = F.cross_entropy(logits, batch.labels)
    accelerator.backward(loss)
    if config.optim.grad_clip > 0:
        accelerator.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), (logits.argmax(dim=-1) == batch.labels).float().mean().detach()


@torch.no_grad()
def evaluate(model: torch.nn.Module, source: Source, config: FinetuneConfig, accelerator: Accelerator) -> dict:
    """Accuracy (%) and mean loss over every test image once, summed over ranks (no padded duplicates).

    Runs the unwrapped model: ranks may hold different numbers of batches, and a DDP forward would
    wait for its peers.
    """
    net = accelerator.unwrap_model(model)
    was_training = net.training
    net.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # correct, loss sum, count
    batches = eval_batches(
        config, source, max(1, config.finetune.eval_batch_size // accelerator.num_processes), accelerator
    )
    for batch in batches:
        for entry in batch.skipped:
            print(f"warning: unreadable test image, not counted: {entry}")
        if not len(batch.labels):
            continue
        with accelerator.autocast():
            logits = net(model_input(batch.images, config)).float()
        totals[0] += (logits.argmax(dim=-1) == batch.labels).sum()
        totals[1] += F.cross_entropy(logits, batch.labels, reduction="sum")
        totals[2] += len(batch.labels)
    correct, loss_sum, count = accelerator.reduce(totals, "sum").tolist()
    net.train(was_training)
    return {"test_acc": round(correct / count, 5), "test_loss": round(loss_sum / count, 5), "test_images": int(count)}


def summarize(accuracies: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; 0 for a single seed)."""
    values = np.asarray(accuracies, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def format_accuracy(mean: float, std: float, count: int) -> str:
    return f"{mean:.1f} ± {std:.1f} ({count} seed{'s' if count != 1 else ''})"


def finetune_seed(
    config: FinetuneConfig,
    seed: int,
    subset: np.ndarray,
    train_source: Source,
    test_source: Source,
    pretrained: Pretrained | None,
    accelerator: Accelerator,
    run_dir: Path,
) -> dict:
    """Train and test one seed in run_dir/seed_<seed>; a finished seed is read back, not rerun."""
    seed_dir = run_dir / f"seed_{seed}"
    result_path = seed_dir / "result.json"
    if config.train.resume and result_path.is_file():
        return json.loads(result_path.read_text())
    ft = config.finetune
    labeled = SubsetSource(train_source, subset)
    torch.manual_seed(derive_seed(seed, INIT_STREAM))  # same fresh weights for every init and every rank
    model = build_model(config, len(train_source.classes))
    if pretrained is not None:
        load_pretrained(model, ft.arch, pretrained.model, pretrained.encoder_prefix, pretrained.backbone)
    optimizer = build_sgd(model, config.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(config.optim.warmup_steps, config.train.steps)
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    torch.manual_seed(derive_seed(seed, accelerator.process_index))  # per-rank dropout
    checkpoints = Checkpoints(seed_dir / "checkpoints", config.train.keep_checkpoints)
    start_step = 0
    if config.train.resume and checkpoints.latest() is not None:
        start_step = restore_training_state(
            checkpoints.latest(), CHECKPOINT_KIND, model, optimizer, scheduler, accelerator, len(train_source)
        )
    logger = JsonlLogger(seed_dir / "log.jsonl", accelerator.is_main_process)
    if accelerator.is_main_process:
        seed_dir.mkdir(parents=True, exist_ok=True)
        if start_step:
            truncate_log(logger.path, start_step)
        elif logger.path.exists():
            logger.path.unlink()
    accelerator.wait_for_everyone()

    final = run_steps(
        model, optimizer, scheduler, config, seed, labeled, test_source, accelerator, checkpoints, logger, start_step
    )
    if final is None:  # killed after the last checkpoint: its test record is logged, the numbers come again
        final = evaluate(model, test_source, config, accelerator)
    result = {
        "seed": seed,
        "test_accuracy": round(100 * final["test_acc"], 3),
        "test_loss": final["test_loss"],
        "labeled_images": len(labeled),
        "labeled_subset_sha1": hashlib.sha1(subset.astype(np.int64).tobytes()).hexdigest(),
        "labeled_per_class": np.bincount(labeled.labels, minlength=len(train_source.classes)).tolist(),
        "test_images": final["test_images"],
        "steps": config.train.steps,
    }
    if accelerator.is_main_process:
        write_atomic(result_path, json.dumps(result, indent=1).encode())
        plot_curves(logger.path, seed_dir / "curves.png", f"fine-tuning {run_dir.name}, seed {seed}")
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # drop Accelerate's references to this seed's model and optimizer
    return result


def run_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: FinetuneConfig,
    seed: int,
    labeled: SubsetSource,
    test_source: Source,
    accelerator: Accelerator,
    checkpoints: Checkpoints,
    logger: JsonlLogger,
    start_step: int,
) -> dict | None:
    """The training loop of one seed: steps, logging, test evaluations, checkpoints. Returns the test
    evaluation after the last step (None when there was no step left to run).

    Every log record of a step is written before that step's checkpoint, so a resumed run that drops
    the records after its checkpoint (`truncate_log`) writes each one once."""
    if start_step >= config.train.steps:
        return None
    loader = train_batches(
        config, labeled, config.train.batch_size // accelerator.num_processes, seed, start_step, accelerator
    )
    window = MetricWindow(
        accelerator,
        logger,
        config.train.batch_size,
        f"the newest checkpoint in {checkpoints.folder} is the last good state",
    )
    model.train()
    progress = tqdm(
        total=config.train.steps,
        initial=start_step,
        desc=f"seed {seed}",
        disable=None if accelerator.is_main_process else True,
        dynamic_ncols=True,
        mininterval=1.0,
    )
    last_eval = None
    try:
        for step, batch in zip(range(start_step, config.train.steps), loader, strict=False):
            step_lr = optimizer.param_groups[0]["lr"]
            loss, accuracy = train_step(model, batch, config, optimizer, scheduler, accelerator)
            window.add(batch.skipped, loss=loss, train_acc=accuracy)
            done = step + 1
            progress.update(1)
            checkpoint_due = done % config.train.checkpoint_every == 0 or done == config.train.steps
            if done % config.train.log_every == 0 or checkpoint_due:
                record = window.flush(done, lr=step_lr, epoch=round(done * config.train.batch_size / len(labeled), 3))
                progress.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['train_acc']:.1%}", refresh=False)
            eval_every = config.finetune.eval_every
            if (eval_every and done % eval_every == 0) or done == config.train.steps:
                started = time.perf_counter()
                last_eval = evaluate(model, test_source, config, accelerator)
                logger.write({"step": done, **last_eval})
                window.exclude(time.perf_counter() - started)
            if checkpoint_due:
                rng_states = all_rng_states(accelerator)
                if accelerator.is_main_process:
                    state = training_state(
                        CHECKPOINT_KIND,
                        model,
                        optimizer,
                        scheduler,
                        accelerator,
                        done,
                        config,
                        rng_states,
                        len(labeled.source),  # the whole training set: the labelled subset is drawn from it
                    )
                    checkpoints.save({**state, "seed": seed}, done)
                accelerator.wait_for_everyone()
    finally:
        progress.close()
        loader.close()  # stops its worker processes before the next seed starts its own
    return last_eval


def main(argv: list[str] | None = None) -> dict:
    config, config_name = parse_args(argv, FinetuneConfig, STABLE_FLAGS, "Fine-tuning and linear evaluation")
    validate(config)
    accelerator = make_accelerator(config.train)
    batch_per_process = per_process_batch(config.train, accelerator)
    (train_source, data_path), (test_source, _) = open_data(config, "train"), open_data(config, "test")
    check_readable(train_source)
    check_readable(test_source)
    check_same_classes(train_source, test_source)
    seeds = [config.train.seed + k for k in range(config.finetune.seeds)]
    subsets = {seed: labeled_subset(config, train_source, seed) for seed in seeds}
    pretrained = load_init(config)
    run_dir = prepare_run_dir(
        config, f"finetune-{config_name}", accelerator, "seed_*/checkpoints/step_*.pt", FINETUNE_RESUMABLE_KEYS
    )
    ft = config.finetune
    labels = f"{ft.per_class} per class" if ft.per_class else f"{ft.label_fraction:.1%}"
    init = (
        "none (from scratch)"
        if pretrained is None
        else f"{pretrained.path} ({pretrained.method} {pretrained.backbone}, step {pretrained.step})"
    )
    accelerator.print(
        f"finetune: {ft.arch}, {ft.head} head{', frozen backbone' if ft.linear_probe else ''}, init {init}; "
        f"labels {labels} of "
        f"{len(train_source)} training images from {data_path}, {len(train_source.classes)} classes; test on "
        f"{len(test_source)} held-out images; {ft.seeds} seed(s) from {config.train.seed}; "
        f"{config.train.steps} steps of {config.train.batch_size} images ({batch_per_process} per process, "
        f"{accelerator.num_processes} process(es) on {accelerator.device}), peak lr {config.optim.lr:g}, "
        f"precision {config.train.precision}; run folder {run_dir}"
    )
    results = [
        finetune_seed(config, seed, subsets[seed], train_source, test_source, pretrained, accelerator, run_dir)
        for seed in seeds
    ]
    accuracies = [r["test_accuracy"] for r in results]
    mean, std = summarize(accuracies)
    summary = {
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
        "train_images": len(train_source),
        "test_images": len(test_source),
        "config": to_dict(config),
    }
    if accelerator.is_main_process:
        write_atomic(run_dir / "results.json", json.dumps(summary, indent=1).encode())
    accelerator.print(f"results: {run_dir / 'results.json'}")
    accelerator.print(f"accuracy: {format_accuracy(mean, std, len(accuracies))}")
    return {"run_dir": str(run_dir), **summary}


if __name__ == "__main__":
    run_cli(main)
