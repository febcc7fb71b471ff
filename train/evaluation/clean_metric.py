"""The pretext task scored on fixed, un-augmented held-out images: `clean_loss` and `clean_<metric>`.

The training accuracy can be reached by shortcuts the augmentation leaves in (a zero-padded border tells
an edge patch where it belongs); this one cannot, and it does not depend on the augmentation at all.

- Images: `monitor.clean_images` held-out images, center-cropped (no pad, no crop, no flip), each under
  `monitor.clean_masks` fixed masks (or views), cut into groups of `monitor.clean_chunk`; group k always
  draws the same masks.
- Batch norm: every group normalised with its own statistics (`train.evaluation.batch_norm.batch_statistics`), as
  the training forward does, so the figure is sane from the first step; dropout off.
- Errors: groups of different images are independent (the masks of one image are not: they share its
  content), so every figure's standard error (`<key>_se`) is the spread, over the image groups, of each
  group's mean under all its masks; about 1 point at the defaults (256 images x 2 masks, 8 groups).
- The method's own probe (`PretextMethod.clean_probe`) may add figures: Selfie adds its context ablation
  (the accuracy with another image's context and with none) and the spread of its queries over images.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn

from pipeline.data import CLEAN_STREAM, Batch, derive_seed
from train.evaluation.batch_norm import batch_statistics, chunks
from train.evaluation.estimates import weighted_mean_se


def log_key(key: str, metric: str) -> str:
    """A probe's key as logged: "acc" is the method's metric ("u_zero_acc" -> "clean_u_zero_patch_acc")."""
    if key == "acc":
        return f"clean_{metric}"
    if key.endswith("_acc"):
        return f"clean_{key[: -len('acc')]}{metric}"
    return f"clean_{key}"


class CleanPretext:
    def __init__(
        self, task, net: nn.Module, images: torch.Tensor, settings, seed: int, accelerator: Accelerator
    ) -> None:
        self.task, self.net, self.images = task, net, images
        self.masks, self.chunk = settings.clean_masks, settings.clean_chunk
        self.seed, self.accelerator = seed, accelerator

    def groups(self) -> list[torch.Tensor]:
        return [group for _ in range(self.masks) for group in chunks(self.images, self.chunk)]

    @torch.no_grad()
    def measure(self) -> list[tuple[int, dict[str, float]]]:
        """(images, the probe's figures) of every group."""
        model = self.accelerator.unwrap_model(self.net, keep_torch_compile=False)
        was_training = model.training
        model.eval()
        measured = []
        try:
            with batch_statistics(model):
                for k, images in enumerate(self.groups()):
                    generator = torch.Generator(device=images.device).manual_seed(
                        derive_seed(self.seed, CLEAN_STREAM, k)
                    )
                    indices = torch.arange(len(images), device=images.device)
                    inputs = self.task.inputs(Batch(images, indices, indices), generator)
                    with self.accelerator.autocast():
                        figures = self.task.clean_probe(model, inputs)
                    measured.append((len(images), {key: float(value) for key, value in figures.items()}))
        finally:
            model.train(was_training)
        return measured

    def __call__(self) -> dict[str, float | None]:
        measured = self.measure()
        per_image_group = len(measured) // self.masks  # group k holds the same images as k + per_image_group
        weights = [count * self.masks for count, _ in measured[:per_image_group]]
        record: dict[str, float | None] = {}
        for key in measured[0][1]:
            values = [
                sum(figures[key] for _, figures in measured[group::per_image_group]) / self.masks
                for group in range(per_image_group)
            ]
            mean, se = weighted_mean_se(values, weights)
            record[log_key(key, self.task.metric)] = round(mean, 5)
            record[log_key(key, self.task.metric) + "_se"] = None if se is None else round(se, 5)
        return record
