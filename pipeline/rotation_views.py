"""Rotation pretext views: RotNet (Gidaris et al. 2018), Patch RotNet and Patch RelNet (Pham et al. 2021).

For B images of S x S, `rotation_views` makes every view of the batch in one call of batched tensor ops
(no loop over images), on the images' device, ready for one backbone call:

- views (V * B, C, S, S), *view-major*: views[v * B + b] is view v of image b, so view v of the whole
  batch is the contiguous slice [v * B, (v + 1) * B) and the V views of an image share one batch.
- views 0..3, label k: the image turned by k quarter turns (`torch.rot90` over (H, W), k = 0..3 for
  0/90/180/270 degrees): exact pixel permutations, no interpolation.
- views 4..7, label 4 + k: the upright image with a patch pasted on it: the image resized to s x s,
  s = round(ratio * S) (bilinear, antialiased as PIL resizes), turned by k quarter turns, its top-left
  corner at `positions[b]` = (row, col). The position is drawn uniformly per image (paper §3) and shared
  by that image's four patched views, so only the patch's rotation tells them apart.
- RotNet uses V = 4 views, Patch RotNet and Patch RelNet V = 8.

Pixels are normalised first (per-channel affine), then resized and pasted: bilinear weights sum to one,
so this equals normalising the resized patch. Resizing once and turning the small image is 4x less
interpolation than resizing four turned copies; the two agree to float rounding (bilinear sampling on a
square grid commutes with quarter turns).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from pipeline.patches import normalize

NUM_ROTATIONS = 4
PATCH_RATIOS = (0.3, 0.4, 0.5)  # the paper's ratios; 0.4 its best


class RotationViews(NamedTuple):
    views: torch.Tensor  # (V * B, C, S, S) float, view-major, normalised
    labels: torch.Tensor  # (V * B,) int64: view v of every image has label v
    positions: torch.Tensor  # (B, 2) int64 (row, col) of the pasted patch's top-left corner; (B, 0) for V = 4
    patch_side: int  # s, the pasted patch's side in pixels; 0 for V = 4


def patch_side(image_size: int, ratio: float) -> int:
    """s = round(ratio * S); it must leave a patch of at least one pixel that is smaller than the image."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"patch ratio must lie in (0, 1) (paper: {PATCH_RATIOS}), got {ratio}")
    side = round(ratio * image_size)
    if not 0 < side < image_size:
        raise ValueError(f"patch ratio {ratio} of {image_size}px images gives a {side}px patch; expected 1 .. S-1")
    return side


def quarter_turns(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (4, B, C, W, H): turned by 0, 1, 2, 3 quarter turns (rotating back by -k recovers them)."""
    return torch.stack([torch.rot90(images, k, dims=(-2, -1)) for k in range(NUM_ROTATIONS)])


def sample_positions(
    batch_size: int, image_size: int, side: int, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """(B, 2) int64 (row, col) top-left corners, uniform over every place an s x s patch fits; drawn on the
    generator's device, returned on `device` (default: the generator's)."""
    where = generator.device if generator is not None else device
    positions = torch.randint(0, image_size - side + 1, (batch_size, 2), generator=generator, device=where)
    return positions.to(device) if device is not None else positions


def paste(out: torch.Tensor, patches: torch.Tensor, positions: torch.Tensor) -> None:
    """Write patches (K, B, C, s, s) into out (K, B, C, S, S), patches[k, b] with its top-left corner at
    positions[b] (B, 2), in place, by one batched index_put (no loop over images)."""
    copies, batch, _, side, _ = patches.shape
    offsets = torch.arange(side, device=out.device)
    rows = (positions[:, 0, None] + offsets)[:, :, None]  # (B, s, 1)
    cols = (positions[:, 1, None] + offsets)[:, None, :]  # (B, 1, s)
    image = torch.arange(batch, device=out.device)[:, None, None]  # (B, 1, 1)
    # The advanced indices (image, rows, cols) are split by the channel slice, so their broadcast shape
    # (B, s, s) leads: the target is (B, s, s, K, C).
    out[:, image, :, rows, cols] = patches.permute(1, 3, 4, 0, 2).to(out.dtype)


@dataclass(frozen=True)
class ViewFormat:
    """What the views are written as: normalised with `mean`/`std` (0..1 scale), in the dtype and memory
    format the network computes in (so autocast has nothing to cast)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    dtype: torch.dtype = torch.float32
    channels_last: bool = False


def rotation_views(
    images: torch.Tensor,
    num_views: int,
    ratio: float,
    form: ViewFormat,
    generator: torch.Generator | None = None,
) -> RotationViews:
    """uint8 images (B, C, S, S) -> the V = 4 (RotNet) or 8 (Patch RotNet/RelNet) views of each, see the
    module docstring. `generator` draws the paste positions (on the images' device). Every view is written
    once, straight into the output's dtype and memory format."""
    if num_views not in (NUM_ROTATIONS, 2 * NUM_ROTATIONS):
        raise ValueError(f"num_views must be 4 (rotations) or 8 (rotations and patched images), got {num_views}")
    batch, channels, height, width = images.shape
    if height != width:
        raise ValueError(f"rotation views need square images (quarter turns keep the shape), got {height}x{width}")
    x = normalize(images, form.mean, form.std)
    layout = torch.channels_last if form.channels_last else torch.contiguous_format
    views = torch.empty((num_views * batch, channels, height, width), dtype=form.dtype, device=images.device)
    views = views.contiguous(memory_format=layout)
    blocks = views.unflatten(0, (num_views, batch))  # a view: blocks[v] is view v of every image
    for k in range(NUM_ROTATIONS):
        blocks[k].copy_(torch.rot90(x, k, dims=(-2, -1)))
    positions = torch.zeros(batch, 0, dtype=torch.long, device=images.device)
    side = 0
    if num_views == 2 * NUM_ROTATIONS:
        side = patch_side(height, ratio)
        small = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
        positions = sample_positions(batch, height, side, generator, images.device)
        patched = blocks[NUM_ROTATIONS:]
        patched.copy_(x.expand_as(patched))
        paste(patched, quarter_turns(small), positions)
    labels = torch.arange(num_views, device=images.device).repeat_interleave(batch)
    return RotationViews(views, labels, positions, side)
