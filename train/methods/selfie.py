"""Selfie (Trinh, Luong, Le 2019): the patch op cuts and masks every image of the batch, P embeds every
patch in one call, A pools the context, and each masked position picks its own patch among the image's
masked patches (model/selfie.py, pipeline/patches.py, pipeline/fused_patches.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.attention_pool import PoolShape
from model.backbones import zero_init_residual
from model.selfie import (
    LOGIT_SCALES,
    POSITION_KINDS,
    QUERY_KINDS,
    LogitScale,
    Selfie,
    build_selfie,
    patch_selection_loss,
)
from pipeline.data import PICTURE_STREAM, Batch, Source, derive_seed
from pipeline.loaders import LOADERS
from pipeline.patches import (
    PATCH_OPS,
    PatchOp,
    PatchSpec,
    grid_size,
    num_context_patches,
    patchify_and_mask,
    sample_context_permutation,
)
from train.config.schema import ConfigError, PretrainConfig, checked, choice, compute_dtype, positive
from train.methods.base import PretextMethod
from train.methods.pictures import (
    FRAME_LEGEND,
    PATCH_COLUMNS,
    patch_column_centers,
    picture_images,
    render_patch_picture,
    with_header,
    write_png,
)


@dataclass
class SelfieSection:
    patch_size: int = 8  # patch side in pixels; must divide data.image_size (paper: 8 on 32, 32 on 224)
    context_fraction: float = 0.75  # fraction p of patches given as context (paper: 0.75 or 0.5)
    patch_op: str = choice(PATCH_OPS, "auto")  # auto (triton on CUDA, numba on CPU) | reference | triton | numba
    # logits of the patch selection: plain v.h (the paper's) | sqrt_d (times 1/sqrt(D)) | learned (a
    # temperature learned from 1/sqrt(D)) | warmup (1/sqrt(D) rising to the paper's 1 over logit_warmup_steps)
    logit_scale: str = choice(LOGIT_SCALES, "plain")
    # logit_scale=warmup: training steps from 1/sqrt(D) to plain logits (counted in micro-batches x grad_accum)
    logit_warmup_steps: int = checked(500, positive, "a positive number of steps")
    # each masked slot's query: paper (v = u + pos_j, §2) | attend (A over the context with one u0 + pos_j
    # token per slot, so the context can tell the slots apart; model/selfie.py)
    query: str = choice(QUERY_KINDS, "paper")
    # every residual branch of P starts at zero (each block the identity; model/backbones.py): against the
    # plain logits' early blow-up, the paper's objective kept
    zero_init_residual: bool = False
    # the attention pooling A (fine-tuning's resnet36_attn reuses it with this shape)
    attn_layers: int = checked(3, positive, "a positive number of blocks")  # Transformer blocks (paper: 3)
    # feed-forward size inside each block (paper: 640)
    attn_intermediate: int = checked(640, positive, "a positive size")
    # attention heads (paper: 32); must divide the patch vector size
    attn_heads: int = checked(32, positive, "a positive number of heads")
    # on attention weights and before each residual (paper: 0.1)
    attn_dropout: float = checked(0.1, lambda p: 0 <= p < 1, "a probability in [0, 1)")
    # auto (per-position up to 4x4 grids, row+column above) | full | rowcol
    position_kind: str = choice(POSITION_KINDS, "auto")
    position_on_context: bool = True  # add position embeddings to context patches before A

    def pool(self) -> PoolShape:
        return PoolShape(self.attn_layers, self.attn_intermediate, self.attn_heads, self.attn_dropout)


POOL_FIELDS = ("attn_layers", "attn_intermediate", "attn_heads", "attn_dropout")  # PoolShape's, in its order
# Keys that were the shared model section's before they were Selfie's (a config.yaml of then still loads).
MOVED_KEYS = {f"model.{key}": f"selfie.{key}" for key in (*POOL_FIELDS, "position_kind", "position_on_context")}


def choose_patch_op(config: PretrainConfig, device: torch.device, num_context: int) -> tuple[str, PatchOp]:
    """The configured patch op; on a GPU a fused kernel is first checked bitwise against the reference."""
    from pipeline.fused_patches import agrees_with_reference, select_patch_op  # triton, numba: only for a run

    settings: SelfieSection = config.selfie
    try:
        name, op = select_patch_op(device, settings.patch_op)
    except ValueError as error:
        raise ConfigError(f"selfie.patch_op: {error}") from error
    if name == "reference" or device.type != "cuda":
        return name, op
    data = config.data
    same = agrees_with_reference(
        op,
        device,
        data.image_size,
        settings.patch_size,
        num_context=num_context,
        mean=data.mean,
        std=data.std,
        dtype=compute_dtype(config.speed),  # the dtype the step asks for: bf16 has its own rounding path
        channels_last=config.speed.channels_last,
    )
    if same:
        return name, op
    if settings.patch_op != "auto":
        raise ConfigError(f"selfie.patch_op={name}: its output differs from the reference on {device}")
    print(f"warning: the {name} patch op differs from the reference on {device}; using the reference")
    return "reference", patchify_and_mask


def patch_counts(config: PretrainConfig) -> tuple[int, int]:
    """(patches per image, context patches), or ConfigError."""
    try:
        num_patches = grid_size(config.data.image_size, config.selfie.patch_size) ** 2
        return num_patches, num_context_patches(num_patches, config.selfie.context_fraction)
    except ValueError as error:
        raise ConfigError(str(error)) from error


class SelfieMethod(PretextMethod):
    name = "selfie"
    label = "Selfie"
    metric = "patch_acc"
    accuracy_name = "patch-selection"
    op_stage = "patch op"
    patch_network = True  # P embeds the image's patches
    section = "selfie"
    Settings = SelfieSection
    flags = {
        "--patch-size": ("selfie.patch_size", int, "selfie: patch side in pixels; divides the image size"),
        "--context-fraction": ("selfie.context_fraction", float, "selfie: fraction of patches given as context"),
    }
    moved_keys = MOVED_KEYS

    @classmethod
    def check(cls, config: PretrainConfig) -> None:
        patch_counts(config)

    def __init__(self, config: PretrainConfig, device: torch.device) -> None:
        super().__init__(config, device)
        self.num_patches, self.num_context = patch_counts(config)
        self.patch_op_name, self.patch_op = choose_patch_op(config, device, self.num_context)
        self.in_loader = self.loader_patch_spec(config.data.loader) is not None
        self.chance = 1.0 / (self.num_patches - self.num_context)

    def loader_patch_spec(self, loader: str) -> PatchSpec | None:
        """A loader that can cut patches itself (FFCV on the CPU) runs the numba patch op inside its
        pipeline (its threads emit patches ready for P); everywhere else the patch op runs in the step."""
        config = self.config
        if "patch_spec" not in LOADERS[loader].options or self.patch_op_name != "numba" or config.speed.channels_last:
            return None
        return PatchSpec(config.selfie.patch_size, self.num_context, tuple(config.data.mean), tuple(config.data.std))

    @classmethod
    def build_model(cls, config: PretrainConfig) -> Selfie:
        model = cls._build(config)
        if config.selfie.zero_init_residual:
            zero_init_residual(model.patch_net)
        return model

    @classmethod
    def _build(cls, config: PretrainConfig) -> Selfie:
        m, settings = config.model, config.selfie
        return build_selfie(
            width=m.width,
            stem=m.stem,
            grid=grid_size(config.data.image_size, settings.patch_size),
            backbone=m.backbone,
            pool=settings.pool(),
            position_kind=settings.position_kind,
            position_on_context=settings.position_on_context,
            # the model counts forwards: grad_accum of them a step
            logit_scale=LogitScale(settings.logit_scale, settings.logit_warmup_steps * config.train.grad_accum),
            query=settings.query,
        )

    def describe(self) -> str:
        op = self.patch_op_name + (" (in the FFCV pipeline)" if self.in_loader else "")
        masked, settings = self.num_patches - self.num_context, self.config.selfie
        warmup = f" over {settings.logit_warmup_steps} steps" if settings.logit_scale == "warmup" else ""
        return (
            f"{settings.patch_size}px patches ({self.num_patches} per image: {self.num_context} context, "
            f"{masked} masked, chance {self.chance:.1%}; {op} patch op), selfie.query={settings.query}, "
            f"selfie.logit_scale={settings.logit_scale}{warmup}"
        )

    def inputs(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """(patches, context positions, masked positions). A batch whose loader already cut the patches
        (`batch.patches`, `batch.perm`) skips the patch op."""
        patches, perm = batch.patches, batch.perm
        if patches is None:
            perm = sample_context_permutation(batch.images.shape[0], self.num_patches, generator)
            data, settings = self.config.data, self.config.selfie
            patches = self.patch_op(
                batch.images,
                perm,
                settings.patch_size,
                self.num_context,
                data.mean,
                data.std,
                dtype=compute_dtype(self.config.speed),
                channels_last=self.config.speed.channels_last,
            )
        return patches, perm[:, : self.num_context], perm[:, self.num_context :]

    @classmethod
    def pool_shape(cls, config: dict) -> PoolShape:
        settings = config.get(cls.section)
        saved, defaults = settings if isinstance(settings, dict) else {}, SelfieSection()
        return PoolShape(*(saved.get(key, getattr(defaults, key)) for key in POOL_FIELDS))

    @classmethod
    def backbone_input(cls, config: dict) -> tuple[str, int]:
        settings = config.get("selfie")
        return "patches", int(
            settings.get("patch_size", SelfieSection().patch_size)
            if isinstance(settings, dict)
            else SelfieSection().patch_size
        )

    def clean_probe(self, model: Selfie, inputs: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """The clean figures and the context ablation: the accuracy with each image's context read by
        another image's queries (rolled over the batch: `u_rolled_acc`) and with a zero context
        (`u_zero_acc`; for the paper's query u = 0), and the queries' spread over images at each fixed
        slot against their norm (for the paper's query, u's spread). Equal accuracies: A adds nothing."""
        patches, context_pos, masked_pos = inputs
        context, masked = model.encode_context(model.forward_features(patches), context_pos)

        def select(state: torch.Tensor):
            return patch_selection_loss(model.queries(state, masked_pos), masked, model.logit_scale())

        real = select(context)
        every_slot = torch.arange(self.num_patches, device=patches.device).expand(len(context), -1)
        queries = model.queries(context, every_slot).float()
        spread = queries.std(dim=0).mean() if len(queries) > 1 else torch.zeros(())
        return {
            "loss": real.loss,
            "acc": real.accuracy,
            "u_rolled_acc": select(context.roll(1, dims=0)).accuracy,
            "u_zero_acc": select(torch.zeros_like(context)).accuracy,
            "query_spread": spread,
            "query_norm": queries.norm(dim=-1).mean(),
        }

    def pictures(self, source: Source, device: torch.device) -> PatchPictures:
        return PatchPictures(source, self.config, self.num_patches, self.num_context, device)


class PatchPictures:
    """ "Put the patches back" (paper Figure 2): fixed images under one fixed mask, the image, what the model
    is given (masked slots grey) and the patch it puts into each masked slot (white frame: right, red: wrong)."""

    name = "patches"

    def __init__(
        self, source: Source, config: PretrainConfig, num_patches: int, num_context: int, device: torch.device
    ) -> None:
        self.images = picture_images(source, config.data.image_size, device)
        generator = torch.Generator().manual_seed(derive_seed(config.train.seed, PICTURE_STREAM))
        self.perm = torch.stack([torch.randperm(num_patches, generator=generator)] * len(self.images)).to(device)
        self.config = config
        self.num_context = num_context

    def write(self, model: nn.Module, path: Path) -> np.ndarray:
        data = self.config.data
        patch_size = self.config.selfie.patch_size
        picture = patch_picture(model, self.images, self.perm, self.num_context, patch_size, data.mean, data.std)
        centers = patch_column_centers(self.images.shape[-1], patch_size)
        picture = with_header(picture, PATCH_COLUMNS, centers, FRAME_LEGEND)
        write_png(path, picture)
        return picture


@torch.no_grad()
def patch_picture(
    model: nn.Module,
    images: torch.Tensor,
    perm: torch.Tensor,
    num_context: int,
    patch_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> np.ndarray:
    """Run a Selfie model (unwrapped, eval mode for the call) on fixed images and mask; render its choices."""
    was_training = model.training
    model.eval()
    try:
        patches = patchify_and_mask(images, perm, patch_size, num_context, mean, std)
        out = model(patches, perm[:, :num_context], perm[:, num_context:])
    finally:
        model.train(was_training)
    return render_patch_picture(images.cpu(), perm.cpu(), num_context, patch_size, out.logits.argmax(-1).cpu())
