"""What fine-tuning starts from: the pretraining checkpoint `--init` names, read and checked against the
architecture before any work starts (a run folder means its newest checkpoint)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

import torch

from model.attention_pool import PoolShape
from model.classifier import POOLED_ARCHS, load_pretrained
from train.config import ConfigError, FinetuneConfig, ModelSection, PretrainConfig, move_old_keys, to_dict
from train.engine.checkpoint import Checkpoints, load_checkpoint
from train.methods import METHODS, default_parts
from train.methods.registry import pool_shape, stage_class
from train.methods.supervised import build_model

KIND_SUFFIX = "_pretrain"  # train/pretrain.py's checkpoints are kind "<method>_pretrain"
# Model keys that shape the backbone a checkpoint provides (A's shape, for resnet36_attn, is its method's).
BACKBONE_KEYS = ("width", "stem")


class Pretrained(NamedTuple):
    path: Path  # the checkpoint file
    model: dict[str, torch.Tensor]  # its model state dict (not its optimizer state: memory)
    step: int
    method: str  # the pretext task it was trained on
    backbone: str  # model.backbone of that run
    encoder_prefix: str  # where the backbone's tensors are in `model`
    pool_prefix: str | None  # where its attention pooling A is (None: it has none)
    model_config: dict  # the pretraining run's model section
    pool: PoolShape | None  # its attention pooling's shape, as its method reads it from the run's config


def checkpoint_of(init: str) -> Path:
    """The checkpoint file --init names: itself, or a pretraining run folder's newest checkpoint."""
    path = Path(init)
    if path.is_dir():
        latest = Checkpoints(path / "checkpoints").latest() or Checkpoints(path).latest()
        if latest is None and any(path.glob("seed_*/checkpoints/step_*.pt")):
            raise ConfigError(f"--init {init}: a fine-tuning run folder; expected a pretraining run folder")
        if latest is None:
            raise ConfigError(
                f"--init {init}: no checkpoint in {path / 'checkpoints'}; expected a pretraining run folder"
            )
        return latest
    if not path.is_file():
        raise ConfigError(f"--init {init}: no such file or folder; expected a pretraining run folder, a .pt, or none")
    return path


def read_pretrained(path: Path) -> Pretrained:
    state = load_checkpoint(path)
    kind = str(state.get("kind"))
    if not kind.endswith(KIND_SUFFIX):
        raise ConfigError(
            f"--init {path}: a {state.get('kind')!r} checkpoint; expected a pretraining checkpoint "
            f"(train/pretrain.py's, kind METHOD{KIND_SUFFIX})"
        )
    method = kind.removesuffix(KIND_SUFFIX)
    config = move_old_keys(state["config"], stage_class(PretrainConfig))
    # Checkpoints from before a key existed hold the default backbone.
    backbone = config["model"].get("backbone", ModelSection().backbone)
    recorded = {key: state[key] for key in ("encoder_prefix", "pool_prefix") if key in state}
    if len(recorded) < 2 and method in METHODS:  # written before checkpoints recorded them: the method's own
        recorded = default_parts(method).state() | recorded
    if "encoder_prefix" not in recorded:
        raise ConfigError(f"--init {path}: pretrained by method {method!r}, which is not registered here")
    prefix, pool_prefix = recorded["encoder_prefix"], recorded.get("pool_prefix")
    pool = METHODS[method].pool_shape(config) if method in METHODS else None
    step = int(state["step"])
    return Pretrained(path, state["model"], step, method, backbone, prefix, pool_prefix, config["model"], pool)


def check_fit(pretrained: Pretrained, config: FinetuneConfig) -> None:
    """Refuse a checkpoint that cannot initialise this run's network, naming why."""
    ft, path, saved_model = config.finetune, pretrained.path, pretrained.model_config
    if ft.linear_probe and ft.arch == "resnet50" and pretrained.backbone == "resnet36":
        with_pool = f" or {' or '.join(POOLED_ARCHS)} (P + A)" if pretrained.pool_prefix else ""
        raise ConfigError(
            f"--init {path}: --linear-probe freezes the backbone, and resnet50's stage 4 is not pretrained "
            f"(the checkpoint holds a resnet36); use --arch resnet36 (its pooled features){with_pool}"
        )
    for key in BACKBONE_KEYS:
        if saved_model.get(key) != getattr(config.model, key):
            raise ConfigError(
                f"--init {path}: pretrained with model.{key}={saved_model.get(key)!r} but this run has "
                f"model.{key}={getattr(config.model, key)!r}; use the pretraining run's --config or "
                f"--model.{key}={saved_model.get(key)}"
            )
    if ft.arch in POOLED_ARCHS:
        check_pool_fits(pretrained, config)
    try:  # a trial load on the CPU, so a broken checkpoint stops the run before any work starts
        initialise(build_model(config, num_classes=1), config, pretrained)
    except ValueError as error:
        raise ConfigError(f"--init {path}: does not fit --arch {ft.arch}: {error}") from error


def check_pool_fits(pretrained: Pretrained, config: FinetuneConfig) -> None:
    """This run's attention pooling has the pretrained one's shape (its dropout is this run's choice)."""
    theirs, mine = pretrained.pool, pool_shape(to_dict(config))
    if theirs is not None and dataclasses.replace(theirs, dropout=mine.dropout) != mine:
        raise ConfigError(
            f"--init {pretrained.path}: its attention pooling is {theirs} but this run's is {mine}; use the "
            f"pretraining run's --config or its {METHODS[pretrained.method].section} section's values"
        )


def initialise(model: torch.nn.Module, config: FinetuneConfig, pretrained: Pretrained) -> torch.nn.Module:
    """Copy the pretrained backbone (and A where the arch reuses it) into `model`."""
    p = pretrained
    load_pretrained(model, config.finetune.arch, p.model, p.encoder_prefix, p.backbone, p.pool_prefix)
    return model


def load_init(config: FinetuneConfig) -> Pretrained | None:
    """The pretraining checkpoint named by --init, checked against this run's network; None for none."""
    if config.finetune.init == "none":
        return None
    pretrained = read_pretrained(checkpoint_of(config.finetune.init))
    check_fit(pretrained, config)
    return pretrained
