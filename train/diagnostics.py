"""Pictures of a run: "put the patches back" (paper Figure 2) and training curves from log.jsonl.

    python train/diagnostics.py RUN_DIR        # (re)draw RUN_DIR/curves.png from RUN_DIR/log.jsonl

Pretraining writes both into its run folder at every checkpoint: pictures/patches_step_XXXXXXXX.png
shows, for a few fixed images under one fixed mask, each image (left), what the model is given with the
masked slots greyed out (middle), and the patch the model puts into each masked slot (right) framed white
when it is the right one and red when it is not. The rotation methods draw pictures/views_step_XXXXXXXX.png
instead: a few fixed images' views (turned, patched), framed white when the model classifies the view (or
its relation pair) right and red when not. Fine-tuning draws curves.png for each seed.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image

from pipeline.patches import patchify_and_mask

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

PICTURE_GAP = 4  # pixels between panels and rows
PICTURE_BACKGROUND = (32, 32, 32)
MASKED_FILL = (128, 128, 128)
RIGHT_BORDER = (255, 255, 255)
WRONG_BORDER = (230, 30, 30)
MIN_PATCH_PIXELS = 32  # small patches are enlarged (nearest neighbour) to at least this side


def picture_scale(patch_size: int) -> int:
    return max(1, -(-MIN_PATCH_PIXELS // patch_size))


def picture_size(num_images: int, image_size: int, patch_size: int) -> tuple[int, int]:
    """(width, height) in pixels of `render_patch_picture`'s output: 3 panels per image row."""
    panel = image_size * picture_scale(patch_size)
    return 3 * panel + 4 * PICTURE_GAP, num_images * panel + (num_images + 1) * PICTURE_GAP


def render_patch_picture(
    images: torch.Tensor, perm: torch.Tensor, num_context: int, patch_size: int, choices: torch.Tensor
) -> np.ndarray:
    """images uint8 (B, 3, S, S), perm (B, N) (first `num_context` are context), choices (B, Nm): for masked
    slot j, the index k (into the masked slots) of the patch the model put there; k == j is right.

    Returns an (H, W, 3) uint8 picture of size `picture_size`.
    """
    batch, _, size, _ = images.shape
    grid = size // patch_size
    scale = picture_scale(patch_size)
    cell, panel = patch_size * scale, size * scale
    border = max(1, cell // 16)
    width, height = picture_size(batch, size, patch_size)
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    canvas[:] = PICTURE_BACKGROUND
    masked = perm[:, num_context:].tolist()
    for b in range(batch):
        original = images[b].permute(1, 2, 0).cpu().numpy().repeat(scale, axis=0).repeat(scale, axis=1)
        given, answer = original.copy(), original.copy()
        for j, (position, k) in enumerate(zip(masked[b], choices[b].tolist(), strict=True)):
            top, left = (position // grid) * cell, (position % grid) * cell
            source = masked[b][k]
            src_top, src_left = (source // grid) * cell, (source % grid) * cell
            given[top : top + cell, left : left + cell] = MASKED_FILL
            slot = answer[top : top + cell, left : left + cell]
            slot[:] = original[src_top : src_top + cell, src_left : src_left + cell]
            color = RIGHT_BORDER if k == j else WRONG_BORDER
            slot[:border], slot[-border:], slot[:, :border], slot[:, -border:] = color, color, color, color
        y = PICTURE_GAP + b * (panel + PICTURE_GAP)
        for column, content in enumerate((original, given, answer)):
            x = PICTURE_GAP + column * (panel + PICTURE_GAP)
            canvas[y : y + panel, x : x + panel] = content
    return canvas


@torch.no_grad()
def patch_picture(
    model: torch.nn.Module,
    images: torch.Tensor,
    perm: torch.Tensor,
    num_context: int,
    patch_size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
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


def view_picture(
    views: torch.Tensor, right: torch.Tensor, num_images: int, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """View-major views (V * B, C, S, S), normalised, and whether each was classified right (V * B,) ->
    uint8 RGB picture: one row per image, its V views side by side, framed white when classified right
    and red when not."""
    pixels = views * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    pixels = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
    num_views = len(views) // num_images
    size, frame = views.shape[-1], 2
    cell = size + 2 * frame
    picture = np.full((num_images * cell, num_views * cell, 3), 255, dtype=np.uint8)
    for v in range(num_views):
        for b in range(num_images):
            index = v * num_images + b
            top, left = b * cell, v * cell
            picture[top : top + cell, left : left + cell] = RIGHT_BORDER if right[index] else WRONG_BORDER
            picture[top + frame : top + frame + size, left + frame : left + frame + size] = (
                pixels[index].permute(1, 2, 0).numpy()
            )
    scale = max(1, 96 // size)
    return picture.repeat(scale, axis=0).repeat(scale, axis=1)


def write_png(path: Path, picture: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(picture).save(tmp, format="PNG")
    os.replace(tmp, path)


# Panels of the curves figure: title and the log keys drawn in it (those present in the log).
CURVE_PANELS = (
    ("loss", ("loss", "test_loss")),
    ("accuracy", ("patch_acc", "rotation_acc", "chance_acc", "train_acc", "test_acc")),
    ("learning rate", ("lr",)),
    ("images/s", ("images_per_s",)),
)


def read_log(path: Path) -> list[dict]:
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if "event" not in record and "step" in record:
                records.append(record)
    return records


def plot_curves(log_path: Path, png_path: Path, title: str = "") -> None:
    """Draw every panel of `CURVE_PANELS` that the log has data for, against the step; atomic write."""
    records = read_log(log_path)
    panels = [(name, [k for k in keys if any(k in r for r in records)]) for name, keys in CURVE_PANELS]
    panels = [(name, keys) for name, keys in panels if keys]
    if not panels:
        return
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (name, keys) in zip(axes[0], panels, strict=True):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            style = {"linestyle": "--", "color": "grey"} if key == "chance_acc" else {}
            marker = "o" if key.startswith("test_") else None
            ax.plot(*zip(*points, strict=True), label=key, marker=marker, markersize=3, **style)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = png_path.with_name(f".{png_path.name}.tmp")
    figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
    os.replace(tmp, png_path)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not (Path(argv[0]) / "log.jsonl").is_file():
        print("usage: python train/diagnostics.py RUN_DIR   (a folder holding log.jsonl)", file=sys.stderr)
        return 2
    run_dir = Path(argv[0])
    plot_curves(run_dir / "log.jsonl", run_dir / "curves.png", run_dir.name)
    print(run_dir / "curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
