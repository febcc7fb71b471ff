"""The rotation view op (pipeline/rotation_views.py) against per-image references written with plain loops."""

import pytest
import torch
import torch.nn.functional as F

from pipeline.patches import normalize
from pipeline.rotation_views import PATCH_RATIOS, ViewFormat, patch_side, rotation_views

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def images(batch: int = 5, size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)


def make(x: torch.Tensor, num_views: int, ratio: float = 0.4, seed: int = 1):
    return rotation_views(x, num_views, ratio, ViewFormat(MEAN, STD), torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("num_views", [4, 8])
def test_the_views_are_view_major_with_their_labels_and_every_view_of_an_image_in_the_batch(num_views: int) -> None:
    x = images()
    out = make(x, num_views)
    batch = len(x)
    assert out.views.shape == (num_views * batch, 3, 32, 32) and out.views.dtype == torch.float32
    assert out.labels.tolist() == [v for v in range(num_views) for _ in range(batch)]
    upright = normalize(x, MEAN, STD)
    for b in range(batch):  # view 0 of every image is the image itself, in its place in each view block
        assert torch.equal(out.views[b], upright[b])


@pytest.mark.parametrize("size", [32, 17])
def test_each_rotation_is_exact_and_turning_back_recovers_the_image(size: int) -> None:
    x = images(3, size)
    out = make(x, 4)
    upright = normalize(x, MEAN, STD)
    for k in range(4):
        turned = out.views[k * 3 : (k + 1) * 3]
        assert torch.equal(torch.rot90(turned, -k, dims=(-2, -1)), upright)  # exact, no interpolation
    # A quarter turn is a transposition and a flip: pixel (i, j) of view 1 is pixel (j, S - 1 - i).
    assert torch.equal(out.views[3 + 0, :, 0, 0], upright[0, :, 0, size - 1])
    assert not torch.equal(out.views[3], upright[0])


@pytest.mark.parametrize("ratio", PATCH_RATIOS)
def test_pasted_patches_land_where_recorded_with_the_expected_size(ratio: float) -> None:
    x = images(6)
    out = make(x, 8, ratio)
    side = round(ratio * 32)
    assert out.patch_side == side == patch_side(32, ratio)
    assert out.positions.shape == (6, 2)
    assert ((out.positions >= 0) & (out.positions <= 32 - side)).all()
    upright = normalize(x, MEAN, STD)
    for b in range(6):
        top, left = out.positions[b].tolist()
        small = F.interpolate(upright[b : b + 1], size=(side, side), mode="bilinear", antialias=True)[0]
        for k in range(4):
            view = out.views[(4 + k) * 6 + b]
            region = view[:, top : top + side, left : left + side]
            # The recorded patch, exactly: the shrunk image turned k times ...
            assert torch.equal(region, torch.rot90(small, k, dims=(-2, -1)))
            # ... which is the turned image shrunk, to float rounding (the paper's order of operations).
            turned_then_shrunk = F.interpolate(
                torch.rot90(upright[b : b + 1], k, dims=(-2, -1)), size=(side, side), mode="bilinear", antialias=True
            )[0]
            torch.testing.assert_close(region, turned_then_shrunk, atol=1e-5, rtol=0)
            # Everywhere else the upright image is untouched.
            outside = torch.ones(32, 32, dtype=torch.bool)
            outside[top : top + side, left : left + side] = False
            assert torch.equal(view[:, outside], upright[b][:, outside])


def test_paste_positions_vary_over_images_and_follow_the_generator() -> None:
    x = images(64)
    first, again, other = make(x, 8, seed=5), make(x, 8, seed=5), make(x, 8, seed=6)
    assert torch.equal(first.views, again.views) and torch.equal(first.positions, again.positions)
    assert not torch.equal(first.positions, other.positions)
    assert len({tuple(p) for p in first.positions.tolist()}) > 32  # per image, not one place for the batch
    corners = first.positions.flatten()
    assert corners.min() == 0 and corners.max() == 32 - first.patch_side  # every place is reachable


def test_channels_last_and_dtype_change_the_layout_not_the_values() -> None:
    x = images()
    plain = make(x, 8)
    fast = rotation_views(x, 8, 0.4, ViewFormat(MEAN, STD, torch.bfloat16, True), torch.Generator().manual_seed(1))
    assert fast.views.is_contiguous(memory_format=torch.channels_last) and fast.views.dtype == torch.bfloat16
    assert torch.equal(fast.views, plain.views.to(torch.bfloat16))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_views": 6}, "num_views must be 4"),
        ({"ratio": 1.0}, "patch ratio must lie in (0, 1)"),
        ({"ratio": 0.01}, "gives a 0px patch"),
    ],
)
def test_bad_arguments_name_themselves(kwargs: dict, message: str) -> None:
    arguments = {"num_views": 8, "ratio": 0.4} | kwargs
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        rotation_views(images(), arguments["num_views"], arguments["ratio"], ViewFormat(MEAN, STD))
    with pytest.raises(ValueError, match="square images"):
        rotation_views(images()[..., :30], 4, 0.4, ViewFormat(MEAN, STD))
