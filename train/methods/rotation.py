"""The rotation family on one backbone call: RotNet (Gidaris et al. 2018), Patch RotNet and Patch RelNet
(Pham et al. 2021). `rotation_views` makes every view of the batch on the device (pipeline/rotation_views.py)
and a `ViewClassifier` classifies them (model/view_classifier.py):

  rotnet        4 views (the image turned 0/90/180/270 degrees), 4-way
  patch_rotnet  8 views: the 4 turned images, and 4 upright images with a turned, shrunk copy pasted on
                (the patch ratio of `--patch-ratio`), 8-way
  patch_relnet  the same 8 views as (turned, patched) pairs, their features concatenated, 4-way
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from model.view_classifier import ViewClassifier, build_view_classifier
from pipeline.data import PICTURE_STREAM, Batch, Source, derive_seed
from pipeline.rotation_views import NUM_ROTATIONS, ViewFormat, patch_side, rotation_views
from train.config.schema import ConfigError, PretrainConfig, compute_dtype
from train.methods.base import PretextMethod
from train.methods.pictures import (
    FRAME_LEGEND,
    picture_images,
    view_column_centers,
    view_picture,
    with_header,
    write_png,
)


@dataclass
class RotationSection:
    patch_ratio: float = 0.4  # patched views: pasted patch side / image side (paper: 0.3, 0.4, 0.5)


class RotationMethod(PretextMethod):
    """A rotation task: `num_views` views per image, classified `num_classes`-way, singly or in pairs."""

    num_views: ClassVar[int]  # views per image that `rotation_views` makes: 4, or 8 with patched views
    num_classes: ClassVar[int]  # ways of the pretext classification
    relation: ClassVar[bool] = False  # classify concatenated (turned image, patched image) pairs
    metric = "rotation_acc"
    # not a patch network: every view, Patch RotNet's and Patch RelNet's pasted-patch ones too, is a whole
    # image, which its backbone embeds whole
    patch_network = False
    accuracy_name = "view"
    op_stage = "view op"
    section = "rotation"
    Settings = RotationSection
    flags = {"--patch-ratio": ("rotation.patch_ratio", float, "patched views: pasted patch side / image side")}

    @classmethod
    def check(cls, config: PretrainConfig) -> None:
        if cls.num_views > NUM_ROTATIONS:
            try:
                patch_side(config.data.image_size, config.rotation.patch_ratio)
            except ValueError as error:
                raise ConfigError(f"--patch-ratio {config.rotation.patch_ratio}: {error}") from error

    def __init__(self, config: PretrainConfig, device: torch.device) -> None:
        super().__init__(config, device)
        self.chance = 1.0 / self.num_classes

    @classmethod
    def build_model(cls, config: PretrainConfig) -> ViewClassifier:
        m = config.model
        return build_view_classifier(cls.num_classes, cls.relation, m.backbone, m.width, m.stem)

    def describe(self) -> str:
        patched = ""
        if self.num_views > NUM_ROTATIONS:
            ratio = self.config.rotation.patch_ratio
            patched = f", patch ratio {ratio:g} ({patch_side(self.config.data.image_size, ratio)}px patches)"
        pairs = " on (turned, patched) pairs" if self.relation else ""
        return (
            f"{self.num_views} views per image{patched}, {self.num_classes}-way{pairs}, "
            f"chance {self.chance:.1%}; {self.config.train.batch_size * self.num_views} views/step"
        )

    @classmethod
    def table_label(cls, config: PretrainConfig) -> str:
        return cls.label + (f" {config.rotation.patch_ratio:g}" if cls.num_views > NUM_ROTATIONS else "")

    def inputs(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """(views, labels) of every image of the batch."""
        data = self.config.data
        form = ViewFormat(data.mean, data.std, compute_dtype(self.config.speed), self.config.speed.channels_last)
        views = rotation_views(batch.images, self.num_views, self.config.rotation.patch_ratio, form, generator)
        return views.views, views.labels

    def pictures(self, source: Source, device: torch.device) -> ViewPictures:
        return ViewPictures(source, self, device)


class RotNet(RotationMethod):
    name = "rotnet"
    label = "RotNet"
    num_views = NUM_ROTATIONS
    num_classes = NUM_ROTATIONS


class PatchRotNet(RotationMethod):
    name = "patch_rotnet"
    label = "Patch RotNet"
    num_views = 2 * NUM_ROTATIONS
    num_classes = 2 * NUM_ROTATIONS


class PatchRelNet(RotationMethod):
    name = "patch_relnet"
    label = "Patch RelNet"
    num_views = 2 * NUM_ROTATIONS
    num_classes = NUM_ROTATIONS
    relation = True


def view_titles(num_views: int) -> list[str]:
    """What view v of `rotation_views` is: the image turned by v quarter turns, then (v >= 4) the upright image
    with a patch turned by v - 4."""
    turns = [f"{90 * k}°" for k in range(NUM_ROTATIONS)]
    return (turns + [f"patch {turn}" for turn in turns])[:num_views]


class ViewPictures:
    """Fixed images' views, framed by whether the model classifies them right, at every checkpoint (rank 0)."""

    name = "views"

    def __init__(self, source: Source, method: RotationMethod, device: torch.device) -> None:
        config = method.config
        images = picture_images(source, config.data.image_size, device)
        generator = torch.Generator(device=device).manual_seed(derive_seed(config.train.seed, PICTURE_STREAM))
        self.views, self.labels = method.inputs(Batch(images, None, None, ()), generator)
        self.num_images = len(images)
        self.config = config

    @torch.no_grad()
    def write(self, model: nn.Module, path: Path) -> np.ndarray:
        was_training = model.training
        model.eval()
        out = model(self.views, self.labels)
        model.train(was_training)
        right = out.logits.argmax(-1) == out.targets
        if len(right) < len(self.labels):  # relation pairs: both views of pair k share its verdict
            right = right.repeat(2)
        data = self.config.data
        picture = view_picture(self.views.float().cpu(), right.cpu(), self.num_images, data.mean, data.std)
        num_views = len(self.views) // self.num_images
        centers = view_column_centers(num_views, self.views.shape[-1])
        picture = with_header(picture, view_titles(num_views), centers, FRAME_LEGEND)
        write_png(path, picture)
        return picture
