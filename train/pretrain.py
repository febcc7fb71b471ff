"""Self-supervised pretraining of a backbone by a pretext task, `--method`:

  selfie        (default) Selfie (Trinh, Luong, Le 2019): learn the patch network P by putting masked
                patches back (model/selfie.py, pipeline/patches.py)
  rotnet        RotNet (Gidaris et al. 2018): which of 4 quarter turns (model/rotation.py, pipeline/rotations.py)
  patch_rotnet  Patch RotNet (Pham et al. 2021): 8 views, the 4 turned images and 4 upright images with a
                turned, shrunk copy pasted on; 8-way
  patch_relnet  Patch RelNet (Pham et al. 2021): the same views as (turned, patched) pairs; 4-way

Launch:
    accelerate launch train/pretrain.py                                   # built-in demo data, CPU or GPU
    accelerate launch train/pretrain.py --method patch_rotnet --model.backbone=resnet8 --patch-ratio 0.4
    python train/pretext_table.py                                         # all methods, Table 1 on the demo
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
pictures/patches_step_XXXXXXXX.png (Selfie putting masked patches back) or views_step_XXXXXXXX.png (the
rotation views, framed white where classified right and red where wrong) and curves.png.
Fine-tune the result with train/finetune.py --init RUN_DIR (its backbone: --arch resnet36, resnet8, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from tqdm import tqdm

from model.backbones import BACKBONES
from model.rotation import ROTATION_METHODS, RotationPretext, build_rotation
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
from pipeline.rotations import NUM_ROTATIONS, patch_side, rotation_views
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
from train.diagnostics import patch_picture, plot_curves, view_picture, write_png

PICTURE_IMAGES = 4

STABLE_FLAGS = {
    **RUN_FLAGS,
    "--method": ("method", str, "pretext task: selfie (default) | rotnet | patch_rotnet | patch_relnet"),
    "--context-fraction": ("selfie.context_fraction", float, "selfie: fraction of patches given as context, in (0, 1)"),
    "--patch-ratio": ("rotation.patch_ratio", float, "patch_rotnet/relnet: pasted patch side / image side"),
}


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


class SelfieTask:
    """Selfie: the patch op cuts and masks, P embeds every patch, A pools the context, the masked patches
    are put back (model/selfie.py)."""

    metric = "patch_acc"
    accuracy_name = "patch-selection"
    op_stage = "patch op"
    picture_name = "patches"
    encoder_prefix = "patch_net."

    @staticmethod
    def check(config: PretrainConfig) -> tuple[int, int]:
        """(patches per image, context patches), or ConfigError."""
        try:
            num_patches = grid_size(config.data.image_size, config.selfie.patch_size) ** 2
            return num_patches, num_context_patches(num_patches, config.selfie.context_fraction)
        except ValueError as error:
            raise ConfigError(str(error)) from error

    def __init__(self, config: PretrainConfig, device: torch.device) -> None:
        self.config = config
        self.num_patches, self.num_context = self.check(config)
        self.patch_op_name, self.patch_op = choose_patch_op(config, device, self.num_context)
        self.loader_patch_spec = self.in_loader_patch_spec(config.data.loader)
        self.chance = 1.0 / (self.num_patches - self.num_context)

    def in_loader_patch_spec(self, loader: str) -> PatchSpec | None:
        """FFCV on the CPU runs the numba patch op inside its pipeline (its threads emit patches ready for P);
        everywhere else the patch op runs in the step, on the training device."""
        config = self.config
        if loader != "ffcv" or self.patch_op_name != "numba" or config.train.channels_last:
            return None
        return PatchSpec(config.selfie.patch_size, self.num_context, tuple(config.data.mean), tuple(config.data.std))

    @staticmethod
    def build_model(config: PretrainConfig) -> Selfie:
        return build_selfie(
            width=config.model.width,
            stem=config.model.stem,
            grid=grid_size(config.data.image_size, config.selfie.patch_size),
            backbone=config.model.backbone,
            attn_layers=config.model.attn_layers,
            attn_intermediate=config.model.attn_intermediate,
            attn_heads=config.model.attn_heads,
            attn_dropout=config.model.attn_dropout,
            position_kind=config.model.position_kind,
            position_on_context=config.model.position_on_context,
        )

    def describe(self) -> str:
        op = self.patch_op_name + (" (in the FFCV pipeline)" if self.loader_patch_spec else "")
        nm = self.num_patches - self.num_context
        return (
            f"{self.config.selfie.patch_size}px patches ({self.num_patches} per image: {self.num_context} context, "
            f"{nm} masked, chance {self.chance:.1%}; {op} patch op)"
        )

    def inputs(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """(patches, context positions, masked positions). A batch whose loader already cut the patches
        (`batch.patches`, `batch.perm`) skips the patch op."""
        patches, perm = batch.patches, batch.perm
        if patches is None:
            images = batch.images
            perm = sample_context_permutation(images.shape[0], self.num_patches, generator)
            data = self.config.data
            patches = self.patch_op(
                images,
                perm,
                self.config.selfie.patch_size,
                self.num_context,
                data.mean,
                data.std,
                channels_last=self.config.train.channels_last,
            )
        return patches, perm[:, : self.num_context], perm[:, self.num_context :]

    def pictures(self, source: Source, device: torch.device) -> PatchPictures:
        return PatchPictures(source, self.config, self.num_patches, self.num_context, device)


class RotationTask:
    """RotNet, Patch RotNet, Patch RelNet: `rotation_views` makes every view of the batch on the device,
    the backbone classifies them in one call (model/rotation.py)."""

    metric = "rotation_acc"
    accuracy_name = "view"
    op_stage = "view op"
    picture_name = "views"
    encoder_prefix = "backbone."
    loader_patch_spec = None  # the views are made on the training device, from the loader's images

    @staticmethod
    def check(config: PretrainConfig) -> None:
        if ROTATION_METHODS[config.method].num_views > NUM_ROTATIONS:
            try:
                patch_side(config.data.image_size, config.rotation.patch_ratio)
            except ValueError as error:
                raise ConfigError(f"--patch-ratio {config.rotation.patch_ratio}: {error}") from error

    def __init__(self, config: PretrainConfig, device: torch.device) -> None:
        self.check(config)
        self.config = config
        self.spec = ROTATION_METHODS[config.method]
        self.chance = 1.0 / self.spec.num_classes

    def in_loader_patch_spec(self, loader: str) -> None:
        return None

    @staticmethod
    def build_model(config: PretrainConfig) -> RotationPretext:
        m = config.model
        return build_rotation(config.method, m.backbone, m.width, m.stem)

    def describe(self) -> str:
        patched = ""
        if self.spec.num_views > NUM_ROTATIONS:
            ratio = self.config.rotation.patch_ratio
            patched = f", patch ratio {ratio:g} ({patch_side(self.config.data.image_size, ratio)}px patches)"
        pairs = " on (turned, patched) pairs" if self.spec.relation else ""
        return (
            f"{self.spec.num_views} views per image{patched}, {self.spec.num_classes}-way{pairs}, "
            f"chance {self.chance:.1%}; {self.config.train.batch_size * self.spec.num_views} views/step"
        )

    def inputs(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """(views, labels) of every image of the batch."""
        data = self.config.data
        views = rotation_views(
            batch.images,
            self.spec.num_views,
            self.config.rotation.patch_ratio,
            data.mean,
            data.std,
            generator,
            channels_last=self.config.train.channels_last,
        )
        return views.views, views.labels

    def pictures(self, source: Source, device: torch.device) -> ViewPictures:
        return ViewPictures(source, self.config, self, device)


PretextTask = SelfieTask | RotationTask
# Adding a method: its model module in model/, its input op in pipeline/, and a task here that builds
# the one and calls the other.
METHODS: dict[str, type[SelfieTask] | type[RotationTask]] = {
    "selfie": SelfieTask,
    **dict.fromkeys(ROTATION_METHODS, RotationTask),
}


def validate(config: PretrainConfig) -> None:
    """Check what can be checked before any work starts."""
    validate_run(config)
    if config.method not in METHODS:
        raise ConfigError(f"--method {config.method}: expected one of {', '.join(METHODS)}")
    if config.model.backbone not in BACKBONES:
        raise ConfigError(f"model.backbone {config.model.backbone!r}: expected one of {', '.join(BACKBONES)}")
    METHODS[config.method].check(config)


def make_task(config: PretrainConfig, device: torch.device) -> PretextTask:
    validate(config)
    return METHODS[config.method](config, device)


def build_model(config: PretrainConfig) -> torch.nn.Module:
    model = METHODS[config.method].build_model(config)
    return model.to(memory_format=torch.channels_last) if config.train.channels_last else model


def train_step(
    model: torch.nn.Module,
    batch: Batch,
    task: PretextTask,
    generator: torch.Generator,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    accelerator: Accelerator,
    grad_clip: float = 0.0,
    stage: Callable[[str], AbstractContextManager] = lambda name: nullcontext(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """The method's input op (on the device, `generator` drawing its randomness), one model call on all
    of the batch's inputs, the loss, a step. Returns detached (loss, pretext accuracy).

    `stage(name)` wraps each stage (benchmarks.throughput times them with it)."""
    with stage(task.op_stage):
        inputs = task.inputs(batch, generator)
    with stage("forward"):
        out = model(*inputs)
    with stage("backward"):
        accelerator.backward(out.loss)
    with stage("optimizer"):
        if grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return out.loss.detach(), out.accuracy.detach()


def picture_images(source: Source, config: PretrainConfig, device: torch.device) -> torch.Tensor:
    """PICTURE_IMAGES fixed images spread over the data set, center-cropped, on `device`."""
    picks = torch.linspace(0, len(source) - 1, PICTURE_IMAGES).round().long().unique().tolist()
    assembler = BatchAssembler(source, config.data.image_size, "center_crop")
    return assembler[BatchSpec(0, tuple(picks), 0)].images.to(device)


class PatchPictures:
    """Fixed images and one fixed mask, drawn with the model's choices at every checkpoint (rank 0)."""

    def __init__(self, source: Source, config: PretrainConfig, num_patches: int, num_context: int, device) -> None:
        self.images = picture_images(source, config, device)
        generator = torch.Generator().manual_seed(derive_seed(config.train.seed, PICTURE_STREAM))
        self.perm = torch.stack([torch.randperm(num_patches, generator=generator)] * len(self.images)).to(device)
        self.config = config
        self.num_context = num_context

    def write(self, model: torch.nn.Module, path: Path) -> None:
        data = self.config.data
        picture = patch_picture(
            model, self.images, self.perm, self.num_context, self.config.selfie.patch_size, data.mean, data.std
        )
        write_png(path, picture)


class ViewPictures:
    """Fixed images' views, framed by whether the model classifies them right, at every checkpoint (rank 0)."""

    def __init__(self, source: Source, config: PretrainConfig, task: RotationTask, device) -> None:
        images = picture_images(source, config, device)
        generator = torch.Generator(device=device).manual_seed(derive_seed(config.train.seed, PICTURE_STREAM))
        self.views, self.labels = task.inputs(Batch(images, None, None, ()), generator)
        self.num_images = len(images)
        self.config = config

    @torch.no_grad()
    def write(self, model: torch.nn.Module, path: Path) -> None:
        was_training = model.training
        model.eval()
        out = model(self.views, self.labels)
        model.train(was_training)
        right = out.logits.argmax(-1) == out.targets
        if len(right) < len(self.labels):  # relation pairs: both views of pair k share its verdict
            right = right.repeat(2)
        data = self.config.data
        write_png(path, view_picture(self.views.float().cpu(), right.cpu(), self.num_images, data.mean, data.std))


def main(argv: list[str] | None = None) -> dict:
    config, config_name = parse_args(argv, PretrainConfig, STABLE_FLAGS, "Self-supervised pretraining")
    validate(config)
    accelerator = make_accelerator(config.train)
    batch_per_process = per_process_batch(config.train, accelerator)
    task = METHODS[config.method](config, accelerator.device)
    kind = f"{config.method}_pretrain"
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
            checkpoints.latest(), kind, model, optimizer, scheduler, accelerator, len(source)
        )
    logger = JsonlLogger(run_dir / "log.jsonl", accelerator.is_main_process)
    if config.train.resume and accelerator.is_main_process:
        truncate_log(logger.path, start_step)
    accelerator.print(
        f"{config.method}: {len(source)} images from {data_path}; {config.data.image_size}px, {task.describe()}; "
        f"{accelerator.num_processes} process(es) "
        f"on {accelerator.device}, {config.train.batch_size} images/step ({batch_per_process} per process), "
        f"peak lr {config.optim.lr:g}, precision {config.train.precision}; "
        f"{config.model.backbone} backbone, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
        f"run folder {run_dir}"
    )
    if start_step >= config.train.steps:
        accelerator.print(f"nothing to do: the checkpoint is at step {start_step} of {config.train.steps}")
        return {"run_dir": str(run_dir), "step": start_step}

    loader = train_batches(
        config, source, batch_per_process, config.train.seed, start_step, accelerator, task.loader_patch_spec
    )
    pictures = task.pictures(source, accelerator.device) if accelerator.is_main_process else None
    generator = torch.Generator(device=accelerator.device)
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
        generator.manual_seed(derive_seed(config.train.seed, MASK_STREAM, step, accelerator.process_index))
        loss, accuracy = train_step(
            model, batch, task, generator, optimizer, scheduler, accelerator, config.optim.grad_clip
        )
        window.add(batch.skipped, loss=loss, **{task.metric: accuracy})
        done = step + 1
        progress.update(1)
        checkpoint_due = done % config.train.checkpoint_every == 0 or done == config.train.steps
        if done % config.train.log_every == 0 or checkpoint_due:
            last = window.flush(
                done,
                chance_acc=round(task.chance, 5),
                lr=step_lr,
                epoch=round(done * config.train.batch_size / len(source), 4),
            )
            progress.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last[task.metric]:.1%}", refresh=False)
        if checkpoint_due:
            rng_states = all_rng_states(accelerator)
            if accelerator.is_main_process:
                checkpoints.save(
                    training_state(
                        kind, model, optimizer, scheduler, accelerator, done, config, rng_states, len(source)
                    )
                    | {"encoder_prefix": task.encoder_prefix},
                    done,
                )
                picture = run_dir / "pictures" / f"{task.picture_name}_step_{done:08d}.png"
                pictures.write(accelerator.unwrap_model(model), picture)
                plot_curves(logger.path, run_dir / "curves.png", f"{config.method} pretraining: {run_dir.name}")
            accelerator.wait_for_everyone()
    progress.close()
    loader.close()  # stops the backend's workers and threads before the process winds down
    accelerator.print(
        f"done: step {last.get('step')}, loss {last.get('loss')}, {config.method} {task.accuracy_name} accuracy "
        f"{last.get(task.metric, 0):.1%} (chance {task.chance:.1%}); {window.skipped_total} unreadable images "
        f"skipped; run folder {run_dir}"
    )
    return {"run_dir": str(run_dir), **last}


if __name__ == "__main__":
    run_cli(main)
    PartialState().destroy_process_group()  # here, not in main(): train/pretext_table.py calls main() again
