"""Gridding and per-sample masking: the plain-torch reference that fused patch ops are tested against.

Terms, for a batch of B images of H x W cut into a G x G grid of p x p patches (G = H / p):

- position: a patch's row-major grid index, 0 .. N-1 with N = G * G.
- permutation `perm` (B, N) int64: for sample b, `perm[b, :Nc]` are its *context* positions (seen by the
  encoder, pooled by A) and `perm[b, Nc:]` its *masked* positions (to be put back by the decoder).
  Each row is a random permutation of 0 .. N-1, drawn independently per sample.
- mask (B, N) bool, MAE's convention: True = masked (hidden from the encoder), False = context.
- patch tensor (B * N, C, p, p), *group-major*: first the B * Nc context patches (sample 0's Nc patches
  in `perm` order, then sample 1's, ...), then the B * Nm masked patches in the same way. One call of
  the patch network embeds all of it, and its (B * N, D) output splits into context (B, Nc, D) and
  masked (B, Nm, D) by two contiguous views: no per-sample copies.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The ops that cut and mask patches: this module's reference and pipeline.fused_patches' kernels. Named here so
# that a config can offer them without importing triton and numba (0.6 s of start-up).
PATCH_OPS = ("auto", "reference", "triton", "numba")
PatchOp = Callable[..., torch.Tensor]  # (images, perm, patch_size, num_context, ...) -> patches, as the reference


@dataclass(frozen=True)
class PatchSpec:
    """What a loader needs to run the patch op itself (FFCV's CPU path): `patchify_and_mask`'s arguments."""

    patch_size: int
    num_context: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def grid_size(image_size: int, patch_size: int) -> int:
    if patch_size <= 0 or image_size % patch_size:
        raise ValueError(
            f"patch size {patch_size} does not divide image size {image_size}: expected the image to cut "
            "into a whole grid (e.g. 32/8 or 224/32)"
        )
    return image_size // patch_size


def num_context_patches(num_patches: int, context_fraction: float) -> int:
    """Nc = round(p * N); at least one context and one masked patch must remain."""
    if not 0.0 < context_fraction < 1.0:
        raise ValueError(f"context fraction must lie in (0, 1), got {context_fraction}")
    num_context = round(context_fraction * num_patches)
    if not 0 < num_context < num_patches:
        raise ValueError(
            f"context fraction {context_fraction} of {num_patches} patches leaves {num_context} context "
            f"and {num_patches - num_context} masked patches; both must be at least 1"
        )
    return num_context


def grid_patches(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C, p, p), positions in row-major order."""
    batch, channels, height, width = images.shape
    grid_h, grid_w = grid_size(height, patch_size), grid_size(width, patch_size)
    patches = images.reshape(batch, channels, grid_h, patch_size, grid_w, patch_size)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, grid_h * grid_w, channels, patch_size, patch_size)


def sample_context_permutation(
    batch_size: int,
    num_patches: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(B, N) int64: an independent random permutation of the N positions for every sample.

    Sorting uniform noise (MAE's `random_masking`) gives the permutations in one batched call.
    """
    device = generator.device if generator is not None else device
    noise = torch.rand(batch_size, num_patches, generator=generator, device=device)
    return noise.argsort(dim=1)


def mask_from_permutation(perm: torch.Tensor, num_context: int) -> torch.Tensor:
    """(B, N) bool, True where the position is masked (MAE convention), False where it is context."""
    mask = torch.ones_like(perm, dtype=torch.bool)
    mask.scatter_(1, perm[:, :num_context], False)
    return mask


@functools.lru_cache(maxsize=16)
def scaled_stats(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """fp32 (C,) 255 * values on `device`, made once per (values, device): no upload per step. Read-only."""
    return torch.tensor(values, dtype=torch.float32, device=device) * 255.0


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (B, C, H, W) in [0, 255] -> float32 (x - 255 * mean) / (255 * std), per channel."""
    mean_t = scaled_stats(tuple(mean), images.device).view(1, -1, 1, 1)
    std_t = scaled_stats(tuple(std), images.device).view(1, -1, 1, 1)
    return (images.float() - mean_t) / std_t


def patchify_and_mask(
    images: torch.Tensor,
    perm: torch.Tensor,
    patch_size: int,
    num_context: int,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> torch.Tensor:
    """uint8 images (B, C, H, W) + perm (B, N) -> normalised patch tensor (B * N, C, p, p), group-major.

    See the module docstring for the layout. `dtype` and `channels_last` set what the patch network
    consumes (e.g. bf16, channels-last on a GPU).
    """
    batch = images.shape[0]
    patches = grid_patches(normalize(images, mean, std), patch_size)
    channels = patches.shape[2]
    ordered = patches[torch.arange(batch, device=images.device)[:, None], perm]
    out = torch.cat(
        [
            ordered[:, :num_context].reshape(-1, channels, patch_size, patch_size),
            ordered[:, num_context:].reshape(-1, channels, patch_size, patch_size),
        ]
    ).to(dtype)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def split_context_masked(
    features: torch.Tensor, batch_size: int, num_context: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B * N, D) embeddings of a group-major patch tensor -> views (B, Nc, D) and (B, Nm, D)."""
    split = batch_size * num_context
    context = features[:split].view(batch_size, num_context, -1)
    masked = features[split:].view(batch_size, -1, features.shape[-1])
    return context, masked
