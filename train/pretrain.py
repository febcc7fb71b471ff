"""Selfie pretraining (Trinh, Luong, Le 2019): learn the patch network P by putting masked patches back.

Launch:
    accelerate launch train/pretrain.py                                   # built-in demo data, CPU or GPU
    accelerate launch train/pretrain.py --config cifar10 --data /data/cifar-10-batches-py
    accelerate launch --multi_gpu --num_processes 8 train/pretrain.py --config imagenet224 \
        --data /data/imagenet --out runs/in224
    accelerate launch train/pretrain.py --config imagenet224 --data /data/imagenet --out runs/in224 --resume
    torchrun --nproc_per_node 2 train/pretrain.py --steps 20              # 2 CPU processes (gloo)
    python train/pretrain.py --steps 50 --model.position_on_context=false

The run folder (--out, default runs/<config>-<time>) receives config.yaml (the resolved config),
log.jsonl (one JSON object per logging step) and checkpoints/step_XXXXXXXX.pt.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm import tqdm

from model.selfie import Selfie, build_selfie
from pipeline.data import LOADERS, MASK_STREAM, Batch, check_readable, derive_seed, open_source
from pipeline.demo import demo_dataset
from pipeline.patches import (
    grid_size,
    num_context_patches,
    patchify_and_mask,
    sample_context_permutation,
)
from train.common import (
    CHECKPOINT_FORMAT,
    Checkpoints,
    JsonlLogger,
    NonFiniteLoss,
    all_rng_states,
    build_sgd,
    load_checkpoint,
    make_accelerator,
    per_process_batch,
    prepare_run_dir,
    run_cli,
    set_rng_state,
    truncate_log,
    warmup_cosine,
)
from train.config import ConfigError, PretrainConfig, parse_args, to_dict

STABLE_FLAGS = {
    "--data": ("data.path", str, "ImageNet-layout or CIFAR-10 python folder (default: built-in demo data)"),
    "--out": ("train.out", str, "run folder (default: runs/<config>-<time>)"),
    "--steps": ("train.steps", int, "optimizer steps"),
    "--batch-size": ("train.batch_size", int, "global batch size, images per step over all processes"),
    "--lr": ("optim.lr", float, "peak learning rate"),
    "--context-fraction": ("selfie.context_fraction", float, "fraction of patches given as context, in (0, 1)"),
    "--seed": ("train.seed", int, "random seed"),
    "--resume": ("train.resume", "store_true", "continue from the newest checkpoint in --out"),
    "--loader": ("data.loader", str, f"loader backend: {', '.join(LOADERS)}"),
}


def build_model(config: PretrainConfig) -> Selfie:
    grid = grid_size(config.data.image_size, config.selfie.patch_size)
    model = build_selfie(
        width=config.model.width,
        stem=config.model.stem,
        grid=grid,
        attn_layers=config.model.attn_layers,
        attn_intermediate=config.model.attn_intermediate,
        attn_heads=config.model.attn_heads,
        attn_dropout=config.model.attn_dropout,
        position_kind=config.model.position_kind,
        position_on_context=config.model.position_on_context,
    )
    return model.to(memory_format=torch.channels_last) if config.train.channels_last else model


def validate(config: PretrainConfig) -> tuple[int, int]:
    """Check what can be checked before any work starts; returns (patches per image, context patches)."""
    if config.data.loader not in LOADERS:
        raise ConfigError(f"--loader {config.data.loader}: expected one of {', '.join(LOADERS)}")
    if config.train.seed < 0:
        raise ConfigError(f"--seed {config.train.seed}: expected a non-negative integer")
    if config.train.steps <= 0:
        raise ConfigError(f"--steps {config.train.steps}: expected a positive number of steps")
    if config.train.log_every <= 0 or config.train.checkpoint_every <= 0:
        raise ConfigError("train.log_every and train.checkpoint_every must be positive")
    try:
        num_patches = grid_size(config.data.image_size, config.selfie.patch_size) ** 2
        return num_patches, num_context_patches(num_patches, config.selfie.context_fraction)
    except ValueError as error:
        raise ConfigError(str(error)) from error


def train_step(
    model: torch.nn.Module,
    batch: Batch,
    mask_generator: torch.Generator,
    config: PretrainConfig,
    num_context: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    accelerator: Accelerator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask, embed every patch in one call, pool, score, step. Returns detached (loss, accuracy)."""
    images = batch.images
    perm = sample_context_permutation(
        images.shape[0], grid_size(images.shape[-1], config.selfie.patch_size) ** 2, mask_generator
    )
    patches = patchify_and_mask(
        images,
        perm,
        config.selfie.patch_size,
        num_context,
        config.data.mean,
        config.data.std,
        channels_last=config.train.channels_last,
    )
    out = model(patches, perm[:, :num_context], perm[:, num_context:])
    accelerator.backward(out.loss)
    if config.optim.grad_clip > 0:
        accelerator.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return out.loss.detach(), out.accuracy.detach()


def checkpoint_state(model, optimizer, scheduler, accelerator, step, config, rng_states) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "kind": "selfie_pretrain",
        "step": step,
        "model": accelerator.unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        "rng": rng_states,
        "world_size": accelerator.num_processes,
        "config": to_dict(config),
    }


def restore(path: Path, model, optimizer, scheduler, accelerator) -> int:
    """Load a checkpoint into the prepared objects on every rank; returns the next step to run."""
    state = load_checkpoint(path)
    if state.get("kind") != "selfie_pretrain":
        raise ConfigError(f"{path}: a {state.get('kind')!r} checkpoint, not a Selfie pretraining one")
    try:
        accelerator.unwrap_model(model).load_state_dict(state["model"])
    except RuntimeError as error:
        raise ConfigError(f"{path}: its model does not match this config's model ({error})") from error
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if accelerator.scaler is not None and state["scaler"] is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    if state["world_size"] == accelerator.num_processes:
        set_rng_state(state["rng"][accelerator.process_index])
    else:
        accelerator.print(
            f"note: checkpoint from {state['world_size']} processes, resuming on "
            f"{accelerator.num_processes}: dropout RNG streams restart"
        )
    return int(state["step"])


def main(argv: list[str] | None = None) -> dict:
    config, config_name = parse_args(argv, PretrainConfig, STABLE_FLAGS, "Selfie pretraining")
    num_patches, num_context = validate(config)
    accelerator = make_accelerator(config.train)
    batch_per_process = per_process_batch(config.train, accelerator)
    data_path = config.data.path or demo_dataset(config.data.cache_dir)
    source = open_source(data_path, "train")
    check_readable(source)
    run_dir = prepare_run_dir(config, config_name, accelerator)

    torch.manual_seed(config.train.seed)  # identical initial weights on every rank
    model = build_model(config)
    optimizer = build_sgd(model, config.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(config.optim.warmup_steps, config.train.steps)
    )
    # The loader is not prepared: it shards by global rank itself (pipeline.data) and must not be
    # re-sharded; the scheduler is not prepared so that it steps once per optimizer step.
    model, optimizer = accelerator.prepare(model, optimizer)
    torch.manual_seed(derive_seed(config.train.seed, accelerator.process_index))  # per-rank dropout

    checkpoints = Checkpoints(run_dir / "checkpoints", config.train.keep_checkpoints)
    start_step = 0
    if config.train.resume:
        start_step = restore(checkpoints.latest(), model, optimizer, scheduler, accelerator)
    logger = JsonlLogger(run_dir / "log.jsonl", accelerator.is_main_process)
    if config.train.resume and accelerator.is_main_process:
        truncate_log(logger.path, start_step)
    chance = 1.0 / (num_patches - num_context)
    accelerator.print(
        f"selfie: {len(source)} images from {data_path}; {config.data.image_size}px, "
        f"{config.selfie.patch_size}px patches ({num_patches} per image: {num_context} context, "
        f"{num_patches - num_context} masked, chance {chance:.1%}); {accelerator.num_processes} process(es) "
        f"on {accelerator.device}, {config.train.batch_size} images/step ({batch_per_process} per process), "
        f"peak lr {config.optim.lr:g}, precision {config.train.precision}; "
        f"P+A {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; run folder {run_dir}"
    )
    if start_step >= config.train.steps:
        accelerator.print(f"nothing to do: the checkpoint is at step {start_step} of {config.train.steps}")
        return {"run_dir": str(run_dir), "step": start_step}

    loader = LOADERS[config.data.loader](
        source,
        config.data.image_size,
        config.data.augment,
        batch_per_process,
        accelerator.process_index,
        accelerator.num_processes,
        config.train.seed,
        start_step,
        workers=config.data.workers,
        device=accelerator.device,
        pad=config.data.pad,
        crop_scale=config.data.crop_scale,
        fail_on_corrupt=config.data.fail_on_corrupt,
    )
    mask_generator = torch.Generator(device=accelerator.device)
    model.train()
    window_loss = torch.zeros((), device=accelerator.device)
    window_acc = torch.zeros((), device=accelerator.device)
    window_steps, window_start = 0, time.perf_counter()
    skipped_total, pending_skipped = 0, []
    last: dict = {}
    progress = tqdm(
        total=config.train.steps,
        initial=start_step,
        disable=None if accelerator.is_main_process else True,
        dynamic_ncols=True,
        mininterval=1.0,
    )
    for step, batch in zip(range(start_step, config.train.steps), loader, strict=False):
        pending_skipped.extend(f"rank {accelerator.process_index}: {entry}" for entry in batch.skipped)
        step_lr = optimizer.param_groups[0]["lr"]
        mask_generator.manual_seed(derive_seed(config.train.seed, MASK_STREAM, step, accelerator.process_index))
        loss, accuracy = train_step(
            model, batch, mask_generator, config, num_context, optimizer, scheduler, accelerator
        )
        window_loss += loss
        window_acc += accuracy
        window_steps += 1
        done = step + 1
        progress.update(1)
        if (
            done % config.train.log_every == 0
            or done % config.train.checkpoint_every == 0
            or done == config.train.steps
        ):
            means = accelerator.reduce(torch.stack([window_loss, window_acc]) / window_steps, "mean")
            mean_loss, mean_acc = means.tolist()
            if not torch.isfinite(means).all():
                raise NonFiniteLoss(
                    f"non-finite loss at step {done} (mean {mean_loss}); the newest checkpoint "
                    f"in {checkpoints.folder} holds the last good state"
                )
            # Every rank's unreadable files reach the rank-0 log (a collective: all ranks are here).
            skipped = gather_object(pending_skipped) if accelerator.num_processes > 1 else pending_skipped
            for entry in skipped:
                skipped_total += 1
                logger.write({"event": "skipped_image", "step": done, "image": entry, "skipped_total": skipped_total})
            pending_skipped = []
            elapsed = time.perf_counter() - window_start
            last = {
                "step": done,
                "loss": round(mean_loss, 5),
                "patch_acc": round(mean_acc, 5),
                "chance_acc": round(chance, 5),
                "lr": step_lr,
                "images_per_s": round(window_steps * config.train.batch_size / elapsed, 2),
                "epoch": round(done * config.train.batch_size / len(source), 4),
                "time": round(time.time(), 3),
            }
            logger.write(last)
            progress.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{mean_acc:.1%}", refresh=False)
            window_loss.zero_()
            window_acc.zero_()
            window_steps, window_start = 0, time.perf_counter()
        if done % config.train.checkpoint_every == 0 or done == config.train.steps:
            rng_states = all_rng_states(accelerator)
            if accelerator.is_main_process:
                checkpoints.save(
                    checkpoint_state(model, optimizer, scheduler, accelerator, done, config, rng_states), done
                )
            accelerator.wait_for_everyone()
    progress.close()
    accelerator.print(
        f"done: step {last.get('step')}, loss {last.get('loss')}, patch-selection accuracy "
        f"{last.get('patch_acc', 0):.1%} (chance {chance:.1%}); {skipped_total} unreadable images skipped; "
        f"run folder {run_dir}"
    )
    accelerator.end_training()
    return {"run_dir": str(run_dir), **last}


if __name__ == "__main__":
    run_cli(main)
