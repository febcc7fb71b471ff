import pytest
import torch

from pipeline.patches import (
    grid_patches,
    grid_size,
    mask_from_permutation,
    normalize,
    num_context_patches,
    patchify_and_mask,
    sample_context_permutation,
    split_context_masked,
)


def test_grid_patches_row_major() -> None:
    images = torch.arange(2 * 3 * 8 * 8).reshape(2, 3, 8, 8)
    patches = grid_patches(images, 4)
    assert patches.shape == (2, 4, 3, 4, 4)
    for position in range(4):
        row, col = divmod(position, 2)
        assert torch.equal(patches[:, position], images[:, :, row * 4 : row * 4 + 4, col * 4 : col * 4 + 4])


@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize("num_patches,fraction", [(16, 0.75), (16, 0.5), (49, 0.75)])
def test_masking_properties(batch: int, num_patches: int, fraction: float) -> None:
    num_context = num_context_patches(num_patches, fraction)
    perm = sample_context_permutation(batch, num_patches, torch.Generator().manual_seed(0))
    # Each row covers every position once: context and masked are disjoint and cover the grid.
    assert torch.equal(perm.sort(dim=1).values, torch.arange(num_patches).expand(batch, -1))
    mask = mask_from_permutation(perm, num_context)
    assert (mask.sum(dim=1) == num_patches - num_context).all()
    assert not mask.gather(1, perm[:, :num_context]).any()
    assert mask.gather(1, perm[:, num_context:]).all()
    if batch > 1:
        assert len({tuple(row) for row in mask.tolist()}) > 1  # drawn per sample, not shared


def test_masks_reproducible_under_a_seed_and_vary_without() -> None:
    a = sample_context_permutation(32, 16, torch.Generator().manual_seed(5))
    b = sample_context_permutation(32, 16, torch.Generator().manual_seed(5))
    c = sample_context_permutation(32, 16, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_masking_is_uniform_over_positions() -> None:
    perm = sample_context_permutation(4000, 16, torch.Generator().manual_seed(1))
    rate = mask_from_permutation(perm, 12).float().mean(dim=0)
    assert torch.allclose(rate, torch.full((16,), 0.25), atol=0.03)


def test_context_counts_and_errors() -> None:
    assert num_context_patches(16, 0.75) == 12
    assert num_context_patches(49, 0.5) == 24
    for bad in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\)"):
            num_context_patches(16, bad)
    with pytest.raises(ValueError, match="masked"):
        num_context_patches(16, 0.99)
    with pytest.raises(ValueError, match="does not divide"):
        grid_size(30, 8)


def naive_patchify(images, perm, patch, num_context, mean, std):
    """Per-sample loop: what `patchify_and_mask` must equal."""
    context, masked = [], []
    x = normalize(images, mean, std)
    grid = images.shape[-1] // patch
    for b in range(images.shape[0]):
        for k, position in enumerate(perm[b].tolist()):
            row, col = divmod(position, grid)
            tile = x[b, :, row * patch : (row + 1) * patch, col * patch : (col + 1) * patch]
            (context if k < num_context else masked).append(tile)
    return torch.stack(context + masked)


@pytest.mark.parametrize("batch,size,patch,fraction", [(3, 32, 8, 0.75), (5, 64, 16, 0.5), (2, 224, 32, 0.75)])
def test_patchify_layout_equals_per_sample_reference(batch, size, patch, fraction) -> None:
    generator = torch.Generator().manual_seed(batch)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)
    num_patches = (size // patch) ** 2
    num_context = num_context_patches(num_patches, fraction)
    perm = sample_context_permutation(batch, num_patches, generator)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = patchify_and_mask(images, perm, patch, num_context, mean, std)
    assert out.shape == (batch * num_patches, 3, patch, patch) and out.dtype == torch.float32
    assert torch.equal(out, naive_patchify(images, perm, patch, num_context, mean, std))


def test_patchify_dtype_and_channels_last() -> None:
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    perm = sample_context_permutation(2, 16)
    out = patchify_and_mask(images, perm, 8, 12, dtype=torch.bfloat16, channels_last=True)
    assert out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_split_is_two_views_without_copies() -> None:
    features = torch.randn(4 * 16, 10)
    context, masked = split_context_masked(features, 4, 12)
    assert context.shape == (4, 12, 10) and masked.shape == (4, 4, 10)
    assert context.data_ptr() == features.data_ptr()
    assert masked.data_ptr() == features[48:].data_ptr()
    assert torch.equal(masked[1, 2], features[48 + 4 + 2])
