"""Augmentation before gridding (Selfie §2.1, §3.2).

- 32x32 images: pad by 4 (zeros, the paper's; or reflected or edge pixels), random crop back to 32,
  random horizontal flip: `pad_crop_flip`, one batched call on a uint8 batch.
- 224x224 images: random resized crop + flip. Source images differ in size, so the crop box is drawn per
  image (`random_resized_crop_box`) and applied where the image is decoded.
"""

from __future__ import annotations

import math

import numpy as np
import torch

PAD_MODES = ("zero", "reflect", "edge")  # what fills the pad of pad_crop_flip


def _source_index(index: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Pixel coordinates that may fall outside 0 .. size-1 -> the coordinate each one reads: mirrored
    without repeating the border (reflect), the nearest border pixel (edge), or clamped (zero: masked after)."""
    if mode == "reflect":
        period = 2 * (size - 1)
        index = index.remainder(period) if period else index.zero_()
        return torch.where(index >= size, period - index, index)
    return index.clamp(0, size - 1)


def pad_crop_flip(
    images: torch.Tensor, pad: int, generator: torch.Generator | None = None, mode: str = "zero"
) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H, W): pad by `pad` (`mode`: zeros, reflected pixels, or the edge pixel),
    crop a random H x W window, flip half at random. The padded image is never built: each output pixel
    reads its source pixel directly.

    Offsets and flips are drawn independently per sample from `generator` (on the images' device).
    """
    if mode not in PAD_MODES:
        raise ValueError(f"pad mode must be one of {PAD_MODES}, got {mode!r}")
    batch, _, height, width = images.shape
    device = images.device
    top = torch.randint(0, 2 * pad + 1, (batch, 1), generator=generator, device=device)
    left = torch.randint(0, 2 * pad + 1, (batch, 1), generator=generator, device=device)
    flip = torch.rand(batch, 1, generator=generator, device=device) < 0.5
    rows = top - pad + torch.arange(height, device=device)  # (B, H) source rows, maybe outside the image
    cols_forward = torch.arange(width, device=device)
    cols = left - pad + torch.where(flip, cols_forward.flip(0), cols_forward)
    batch_index = torch.arange(batch, device=device)[:, None, None]
    source_rows, source_cols = _source_index(rows, height, mode), _source_index(cols, width, mode)
    # Advanced indexing over (batch, rows, cols) with the channel slice in between yields (B, H, W, C).
    out = images[batch_index, :, source_rows[:, :, None], source_cols[:, None, :]]
    if mode == "zero":
        inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
        out = out * inside[..., None].to(out.dtype)
    return out.permute(0, 3, 1, 2).contiguous()


def random_resized_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(top, left, crop_height, crop_width) of an Inception-style random resized crop.

    Area fraction uniform in `scale`, aspect ratio log-uniform in `ratio`; after 10 misses, the
    largest centred crop within the ratio range.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return top, left, crop_h, crop_w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        crop_h, crop_w = height, round(height * ratio[1])
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w
