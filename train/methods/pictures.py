"""Drawing what a model does on a few fixed images: "put the patches back" (Selfie Figure 2) and framed
views (the rotation tasks). The methods (train/methods/) decide what to draw; this module only renders.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from pipeline.atomic import write_atomic
from pipeline.data import BatchAssembler, BatchSpec, Source

PICTURE_IMAGES = 4  # fixed images per picture
PICTURE_GAP = 4  # pixels between panels and rows
PICTURE_BACKGROUND = (32, 32, 32)
MASKED_FILL = (128, 128, 128)
RIGHT_BORDER = (255, 255, 255)
WRONG_BORDER = (230, 30, 30)
MIN_PATCH_PIXELS = 32  # small patches are enlarged (nearest neighbour) to at least this side
HEADER_TEXT = (235, 235, 235)
HEADER_LINE = 14  # pixels per line of header text (Pillow's built-in font is 11 px high)
PATCH_COLUMNS = ("image", "what the model sees", "the patch it puts there")
FRAME_LEGEND = "frame: white = right, red = wrong"


def picture_images(source: Source, image_size: int, device: torch.device) -> torch.Tensor:
    """PICTURE_IMAGES fixed images spread over the data set, center-cropped, uint8 on `device`."""
    picks = torch.linspace(0, len(source) - 1, PICTURE_IMAGES).round().long().unique().tolist()
    assembler = BatchAssembler(source, image_size, "center_crop")
    return assembler[BatchSpec(0, tuple(picks), 0)].images.to(device)


def picture_scale(patch_size: int) -> int:
    return max(1, -(-MIN_PATCH_PIXELS // patch_size))


def picture_size(num_images: int, image_size: int, patch_size: int) -> tuple[int, int]:
    """(width, height) in pixels of `render_patch_picture`'s output: 3 panels per image row."""
    panel = image_size * picture_scale(patch_size)
    return 3 * panel + 4 * PICTURE_GAP, num_images * panel + (num_images + 1) * PICTURE_GAP


def _frame(slot: np.ndarray, border: int, color: tuple[int, int, int]) -> None:
    slot[:border], slot[-border:], slot[:, :border], slot[:, -border:] = color, color, color, color


def render_patch_picture(
    images: torch.Tensor, perm: torch.Tensor, num_context: int, patch_size: int, choices: torch.Tensor
) -> np.ndarray:
    """images uint8 (B, 3, S, S), perm (B, N) (first `num_context` are context), choices (B, Nm): for masked
    slot j, the index k (into the masked slots) of the patch the model put there; k == j is right.

    Returns an (H, W, 3) uint8 picture of size `picture_size`: per image, the image, what the model is
    given (masked slots grey) and the patch it puts in each masked slot (framed white if right, red if not).
    """
    batch, _, size, _ = images.shape
    grid, scale = size // patch_size, picture_scale(patch_size)
    cell, panel = patch_size * scale, size * scale
    width, height = picture_size(batch, size, patch_size)
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    canvas[:] = PICTURE_BACKGROUND
    masked = perm[:, num_context:].tolist()
    for b in range(batch):
        original = images[b].permute(1, 2, 0).cpu().numpy().repeat(scale, axis=0).repeat(scale, axis=1)
        given, answer = original.copy(), original.copy()
        for j, (position, k) in enumerate(zip(masked[b], choices[b].tolist(), strict=True)):
            top, left = (position // grid) * cell, (position % grid) * cell
            src_top, src_left = (masked[b][k] // grid) * cell, (masked[b][k] % grid) * cell
            given[top : top + cell, left : left + cell] = MASKED_FILL
            slot = answer[top : top + cell, left : left + cell]
            slot[:] = original[src_top : src_top + cell, src_left : src_left + cell]
            _frame(slot, max(1, cell // 16), RIGHT_BORDER if k == j else WRONG_BORDER)
        y = PICTURE_GAP + b * (panel + PICTURE_GAP)
        for column, content in enumerate((original, given, answer)):
            x = PICTURE_GAP + column * (panel + PICTURE_GAP)
            canvas[y : y + panel, x : x + panel] = content
    return canvas


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
    scale = view_scale(size)
    return picture.repeat(scale, axis=0).repeat(scale, axis=1)


def view_scale(size: int) -> int:
    return max(1, 96 // size)


def view_column_centers(num_views: int, size: int, frame: int = 2) -> list[int]:
    """x of the middle of each view column of `view_picture`, for `with_header`."""
    cell = (size + 2 * frame) * view_scale(size)
    return [v * cell + cell // 2 for v in range(num_views)]


def patch_column_centers(image_size: int, patch_size: int) -> list[int]:
    """x of the middle of each panel of `render_patch_picture`, for `with_header`."""
    panel = image_size * picture_scale(patch_size)
    return [PICTURE_GAP + column * (panel + PICTURE_GAP) + panel // 2 for column in range(3)]


def with_header(picture: np.ndarray, titles: Sequence[str], centers: Sequence[int], legend: str) -> np.ndarray:
    """`picture` below a band holding each column's title centred at its x and, under them, `legend`: the
    pictures say what their columns and frame colours mean without the README."""
    band = Image.new("RGB", (picture.shape[1], 2 * HEADER_LINE + PICTURE_GAP), PICTURE_BACKGROUND)
    draw, font = ImageDraw.Draw(band), ImageFont.load_default()
    for title, center in zip(titles, centers, strict=True):
        draw.text((center, 2), title, fill=HEADER_TEXT, font=font, anchor="ma")
    draw.text((PICTURE_GAP, 2 + HEADER_LINE), legend, fill=HEADER_TEXT, font=font)
    return np.concatenate([np.asarray(band), picture])


def write_png(path: Path, picture: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    write_atomic(path, buffer.getvalue())
