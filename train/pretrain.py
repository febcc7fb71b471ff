"""Selfie pretraining (Trinh, Luong, Le 2019): learn the patch network P by putting masked patches back.

Launch:
    accelerate launch train/pretrain.py                                   # built-in demo data, CPU or GPU
    accelerate launch train/pretrain.py --config cifar10 --data /data/cifar-10-batches-py
    accelerate launch --multi_gpu --num_processes 8 train/pretrain.py --config imagenet224 \
        --data /data/imagenet --out runs/in224
    accelerate launch train/pretrain.py --config imagenet224 --data /data/imagenet --out runs/in224 --resume
    accelerate launch --multi_gpu --num_processes 8 train/pretrain.py --config imagenet224 --loader dali \
        --data /data/imagenet --out runs/in224-dali                         # nvJPEG decode on the GPUs
    python -m pipeline.convert --src /data/imagenet/train --dst /data/imagenet/train.beton --max-resolution 256
    accelerate launch train/pretrain.py --config imagenet224 --loader ffcv --data /data/imagenet/train.beton
    torchrun --nproc_per_node 2 train/pretrain.py --steps 20              # 2 CPU processes (gloo)
    python train/pretrain.py --steps 50 --model.position_on_context=false

The run folder (--out, default runs/<config>-<time>) receives config.yaml (the resolved config),
log.jsonl (one JSON object per logging step), checkpoints/step_XXXXXXXX.pt, and at every checkpoint
pictures/patches_step_XXXXXXXX.png (the model putting masked patches back) and curves.png.
Fine-tune the result with train/finetune.py --init RUN_DIR.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm import tqdm

from model.selfie import Selfie, build_selfie
from pipeline.data import (
    MASK_STREAM,
    PICTURE_STREAM,
    Batch,
    BatchAssembler,
    BatchSpec,
    Source,
    check_readable,
    derive_seed,
)
from pipeline.fused_patches import PatchOp, agrees_with_reference, select_patch_op
from pipeline.patches import PatchSpec, grid_size, num_context_patches, patchify_and_mask, sample_context_permutation
from train.common import (
    RUN_FLAGS,
    Checkpoints,
    JsonlLogger,
    MetricWindow,
    all_rng_states,
    build_sgd,
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
)
from train.config import ConfigError, PretrainConfig, parse_args
from train.diagnostics import patch_picture, plot_curves, write_png

CHECKPOINT_KIND = "selfie_pretrain"
PICTURE_IMAGES = 4

STABLE_FLAGS = {
    **RUN_FLAGS,
    "--context-fraction": ("selfie.context_fraction", float, "fraction of patches given as context, in (0, 1)"),
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
    validate_run(config)
    try:
        num_patches = grid_size(config.data.image_size, config.selfie.patch_size) ** 2
        return num_patches, num_context_patches(num_patches, config.selfie.context_fraction)
    except ValueError as error:
        raise ConfigError(str(error)) from error


def choose_patch_op(config: PretrainConfig, device: torch.device, num_context: int) -> tuple[str, PatchOp]:
    """The configured patch op; on a GPU a fused kernel is first checked bitwise against the reference."""
    try:
        name, op = select_patch_op(device, config.selfie.patch_op)
    except ValueError as error:
        raise ConfigError(f"selfie.patch_op: {error}") from error
    if name != "reference" and device.type == "cuda":
        same = agrees_with_reference(
            op,
            device,
            config.data.image_size,
            config.selfie.patch_size,
            num_context=num_context,
            mean=config.data.mean,
            std=config.data.std,
            channels_last=config.train.channels_last,
        )
        if not same:
            if config.selfie.patch_op != "auto":
                raise ConfigError(f"selfie.patch_op={name}: its output differs from the reference on {device}")
            print(f"warning: the {name} patch op differs from the reference on {device}; using the reference")
            return "reference", patchify_and_mask
    return name, op


def in_loader_patch_spec(config: PretrainConfig, patch_op_name: str, num_context: int) -> PatchSpec | None:
    """FFCV on the CPU runs the numba patch op inside its pipeline (its threads emit patches ready for P);
    everywhere else the patch op runs in the step, on the training device."""
    if config.data.loader != "ffcv" or patch_op_name != "numba" or config.train.channels_last:
        return None
    return PatchSpec(config.selfie.patch_size, num_context, tuple(config.data.mean), tuple(config.data.std))


def train_step(
    model: torch.nn.Module,
    batch: Batch,
    mask_generator: torch.Generator,
    config: PretrainConfig,
    num_context: int,
    patch_op: PatchOp,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    accelerator: Accelerator,
    stage: Callable[[str], AbstractContextManager] = lambda name: nullcontext(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask, embed every patch in one call, pool, score, step. Returns detached (loss, accuracy).

    A batch whose loader already cut the patches (`batch.patches`, `batch.perm`) skips the patch op.
    `stage(name)` wraps each stage (benchmarks.throughput times them with it)."""
    patches, perm = batch.patches, batch.perm
    if patches is None:
        with stage("patch op"):
            images = batch.images
            perm = sample_context_permutation(
                images.shape[0], grid_size(images.shape[-1], config.selfie.patch_size) ** 2, mask_generator
            )
            patches = patch_op(
                images,
                perm,
                config.selfie.patch_size,
                num_context,
                config.data.mean,
                config.data.std,
                channels_last=config.train.channels_last,
            )
    with stage("forward"):
        out = model(patches, perm[:, :num_context], perm[:, num_context:])
    with stage("backward"):
        accelerator.backward(out.loss)
    with stage("optimizer"):
        if config.optim.grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return out.loss.detach(), out.accuracy.detach()


class PatchPictures:
    """Fixed images and one fixed mask, drawn with the model's choices at every checkpoint (rank 0)."""

    def __init__(self, source: Source, config: PretrainConfig, num_patches: int, num_context: int, device) -> None:
        picks = torch.linspace(0, len(source) - 1, PICTURE_IMAGES).round().long().unique().tolist()
        assembler = BatchAssembler(source, config.data.image_size, "center_crop")
        self.images = assembler[BatchSpec(0, tuple(picks), 0)].images.to(device)
        generator = torch.Generator().manual_seed(derive_seed(config.train.seed, PICTURE_STREAM))
        self.perm = torch.stack([torch.randperm(num_patches, generator=generator)] * len(picks)).to(device)
        self.config = config
        self.num_context = num_context

    def write(self, model: torch.nn.Module, path: Path) -> None:
        data = self.config.data
        picture = patch_picture(
            model, self.images, self.perm, self.num_context, self.config.selfie.patch_size, data.mean, data.std
        )
        write_png(path, picture)


def main(argv: list[str] | None = None) -> dict:
    config, config_name = parse_args(argv, PretrainConfig, STABLE_FLAGS, "Selfie pretraining")
    num_patches, num_context = validate(config)
    accelerator = make_accelerator(config.train)
    batch_per_process = per_process_batch(config.train, accelerator)
    patch_op_name, patch_op = choose_patch_op(config, accelerator.device, num_context)
    patch_spec = in_loader_patch_spec(config, patch_op_name, num_context)
    if patch_spec is not None:
        patch_op_name += " (in the FFCV pipeline)"
    source, data_path = open_data(config, "train")
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
        start_step = restore_training_state(
            checkpoints.latest(), CHECKPOINT_KIND, model, optimizer, scheduler, accelerator, len(source)
        )
    logger = JsonlLogger(run_dir / "log.jsonl", accelerator.is_main_process)
    if config.train.resume and accelerator.is_main_process:
        truncate_log(logger.path, start_step)
    chance = 1.0 / (num_patches - num_context)
    accelerator.print(
        f"selfie: {len(source)} images from {data_path}; {config.data.image_size}px, "
        f"{config.selfie.patch_size}px patches ({num_patches} per image: {num_context} context, "
        f"{num_patches - num_context} masked, chance {chance:.1%}; {patch_op_name} patch op); "
        f"{accelerator.num_processes} process(es) "
        f"on {accelerator.device}, {config.train.batch_size} images/step ({batch_per_process} per process), "
        f"peak lr {config.optim.lr:g}, precision {config.train.precision}; "
        f"P+A {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; run folder {run_dir}"
    )
    if start_step >= config.train.steps:
        accelerator.print(f"nothing to do: the checkpoint is at step {start_step} of {config.train.steps}")
        return {"run_dir": str(run_dir), "step": start_step}

    loader = train_batches(config, source, batch_per_process, config.train.seed, start_step, accelerator, patch_spec)
    pictures = (
        PatchPictures(source, config, num_patches, num_context, accelerator.device)
        if accelerator.is_main_process
        else None
    )
    mask_generator = torch.Generator(device=accelerator.device)
    model.train()
    window = MetricWindow(
        accelerator,
        logger,
        config.train.batch_size,
        f"the newest checkpoint in {checkpoints.folder} is the last good state",
    )
    last: dict = {}
    progress = tqdm(
        total=config.train.steps,
        initial=start_step,
        disable=None if accelerator.is_main_process else True,
        dynamic_ncols=True,
        mininterval=1.0,
    )
    for step, batch in zip(range(start_step, config.train.steps), loader, strict=False):
        step_lr = optimizer.param_groups[0]["lr"]
        mask_generator.manual_seed(derive_seed(config.train.seed, MASK_STREAM, step, accelerator.process_index))
        loss, accuracy = train_step(
            model, batch, mask_generator, config, num_context, patch_op, optimizer, scheduler, accelerator
        )
        window.add(batch.skipped, loss=loss, patch_acc=accuracy)
        done = step + 1
        progress.update(1)
        checkpoint_due = done % config.train.checkpoint_every == 0 or done == config.train.steps
        if done % config.train.log_every == 0 or checkpoint_due:
            last = window.flush(
                done,
                chance_acc=round(chance, 5),
                lr=step_lr,
                epoch=round(done * config.train.batch_size / len(source), 4),
            )
            progress.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['patch_acc']:.1%}", refresh=False)
        if checkpoint_due:
            rng_states = all_rng_states(accelerator)
            if accelerator.is_main_process:
                checkpoints.save(
                    training_state(
                        CHECKPOINT_KIND, model, optimizer, scheduler, accelerator, done, config, rng_states, len(source)
                    ),
                    done,
                )
                pictures.write(accelerator.unwrap_model(model), run_dir / "pictures" / f"patches_step_{done:08d}.png")
                plot_curves(logger.path, run_dir / "curves.png", f"Selfie pretraining: {run_dir.name}")
            accelerator.wait_for_everyone()
    progress.close()
    loader.close()  # stops the backend's workers and threads before the process winds down
    accelerator.print(
        f"done: step {last.get('step')}, loss {last.get('loss')}, patch-selection accuracy "
        f"{last.get('patch_acc', 0):.1%} (chance {chance:.1%}); {window.skipped_total} unreadable images skipped; "
        f"run folder {run_dir}"
    )
    accelerator.end_training()
    return {"run_dir": str(run_dir), **last}


if __name__ == "__main__":
    run_cli(main)
