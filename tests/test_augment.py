import numpy as np
import pytest
import torch

from pipeline.augment import PAD_MODES, pad_crop_flip, random_resized_crop_box

TORCH_PAD_MODES = {"zero": "constant", "reflect": "reflect", "edge": "replicate"}


@pytest.mark.parametrize("mode", PAD_MODES)
def test_pad_crop_flip_equals_per_sample_reference(mode: str) -> None:
    """Against torch's own padding of the whole image, then the crop and flip one sample at a time."""
    images = torch.randint(1, 256, (16, 3, 32, 32), dtype=torch.uint8)
    out = pad_crop_flip(images, 4, torch.Generator().manual_seed(3), mode)
    # Replay the same draws one sample at a time.
    generator = torch.Generator().manual_seed(3)
    top = torch.randint(0, 9, (16, 1), generator=generator)
    left = torch.randint(0, 9, (16, 1), generator=generator)
    flip = torch.rand(16, 1, generator=generator) < 0.5
    padded = torch.nn.functional.pad(images.float(), (4, 4, 4, 4), mode=TORCH_PAD_MODES[mode]).to(torch.uint8)
    for b in range(16):
        row, col = int(top[b]), int(left[b])
        crop = padded[b, :, row : row + 32, col : col + 32]
        assert torch.equal(out[b], crop.flip(-1) if flip[b] else crop)
    assert out.shape == images.shape and out.dtype == torch.uint8 and out.is_contiguous()


def test_pad_crop_flip_shifts_at_most_pad_and_zero_fills() -> None:
    images = torch.full((64, 3, 32, 32), 200, dtype=torch.uint8)
    out = pad_crop_flip(images, 4, torch.Generator().manual_seed(0))
    assert set(out.unique().tolist()) <= {0, 200}
    # Zeros only within 4 pixels of the border, and some image shifted (not all identity crops).
    assert (out[:, :, 4:28, 4:28] == 200).all()
    assert (out == 0).any()
    for mode in ("reflect", "edge"):  # no black border: every output pixel is an image pixel
        assert (pad_crop_flip(images, 4, torch.Generator().manual_seed(0), mode) == 200).all()


@pytest.mark.parametrize("height,width", [(375, 500), (500, 333), (32, 32), (1000, 90)])
def test_random_resized_crop_box_within_image(height: int, width: int) -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(height, width, rng)
        assert 0 <= top and 0 <= left and h > 0 and w > 0
        assert top + h <= height and left + w <= width
