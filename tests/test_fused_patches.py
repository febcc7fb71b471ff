"""The fused patch ops equal the plain-torch reference bit for bit (values, layout, dtype, memory format)."""

from pathlib import Path

import pytest
import torch

from pipeline.fused_patches import (
    agrees_with_reference,
    patchify_numba,
    patchify_triton,
    select_patch_op,
    triton_runs_on,
)
from pipeline.patches import patchify_and_mask, sample_context_permutation
from tests.conftest import TINY, pretrain

# (batch, image size, patch size, context patches): odd batch counts, both paper grids, a 4x4 of 16px,
# and 1-pixel patches (a size-1 dimension, where memory formats are ambiguous).
SHAPES = [(1, 32, 8, 12), (3, 32, 8, 8), (7, 32, 8, 1), (2, 224, 32, 37), (5, 64, 16, 15), (2, 4, 1, 5)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# CIFAR-10's statistics, and a pair whose 255 * mean = 0.5 and 255 * std = 1 make half of all pixel values
# land exactly halfway between two bf16 numbers: round-to-nearest-even is then really tested.
STATS = {"cifar": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)), "ties": ((0.5 / 255,) * 3, (1 / 255,) * 3)}


def random_batch(batch: int, size: int, patch: int, device: str = "cpu", seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)
    images[0, :, :2] = 255  # the extremes of the range, in every batch
    images[-1, :, -2:] = 0
    perm = sample_context_permutation(batch, (size // patch) ** 2, generator)
    return images.to(device), perm.to(device)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view({2: torch.int16, 4: torch.int32}[tensor.element_size()])


def assert_same(op, device: str, shape: tuple, dtype: torch.dtype, channels_last: bool) -> None:
    batch, size, patch, num_context = shape
    images, perm = random_batch(batch, size, patch, device, seed=batch * size)
    if batch % 2:  # also a non-contiguous (channels-last) uint8 input and an int32 permutation
        images, perm = images.contiguous(memory_format=torch.channels_last), perm.int()
    for mean, std in STATS.values():
        expected = patchify_and_mask(images, perm.long(), patch, num_context, mean, std, dtype, channels_last)
        got = op(images, perm, patch, num_context, mean, std, dtype, channels_last)
        assert got.dtype == expected.dtype and got.shape == expected.shape and got.stride() == expected.stride()
        assert torch.equal(bits(got), bits(expected))  # bitwise: -0.0 and +0.0 differ here


def test_the_tie_statistics_really_produce_bf16_ties() -> None:
    mean, std = STATS["ties"]
    values = patchify_and_mask(torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16),
                               torch.arange(4).view(1, 4), 8, 2, mean, std)  # fmt: skip
    assert int(((bits(values) & 0xFFFF) == 0x8000).sum()) > 100


@pytest.mark.skipif(not triton_runs_on(torch.device("cpu")), reason="needs triton and TRITON_INTERPRET=1")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_interpreted_equals_reference(shape: tuple, dtype: torch.dtype, channels_last: bool) -> None:
    assert_same(patchify_triton, "cpu", shape, dtype, channels_last)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_numba_equals_reference(shape: tuple, dtype: torch.dtype, channels_last: bool) -> None:
    assert_same(patchify_numba, "cpu", shape, dtype, channels_last)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_on_gpu_equals_reference(shape: tuple, dtype: torch.dtype, channels_last: bool) -> None:
    assert_same(patchify_triton, "cuda", shape, dtype, channels_last)


def test_the_op_is_chosen_by_device_and_can_be_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    assert select_patch_op("cpu")[0] == "numba"
    assert select_patch_op("cpu", "reference") == ("reference", patchify_and_mask)
    with pytest.raises(ValueError, match="patch op must be one of"):
        select_patch_op("cpu", "magic")
    with pytest.raises(ValueError, match="numba patch op cannot run on cuda"):
        select_patch_op("cuda", "numba")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="triton patch op cannot run on cpu"):
        select_patch_op("cpu", "triton")


def test_bad_inputs_are_named() -> None:
    images, perm = random_batch(2, 32, 8)
    with pytest.raises(ValueError, match="images must be uint8"):
        patchify_numba(images.float(), perm, 8, 12)
    with pytest.raises(ValueError, match="perm must be"):
        patchify_numba(images, perm[:, :8], 8, 12)
    with pytest.raises(ValueError, match="num_context must be"):
        patchify_numba(images, perm, 8, 16)
    with pytest.raises(ValueError, match="mean and std need 3 values"):
        patchify_numba(images, perm, 8, 12, (0.5,), (0.5,))
    with pytest.raises(ValueError, match="positions outside"):
        patchify_numba(images, perm + 1, 8, 12)


def test_the_self_check_catches_an_op_that_differs() -> None:
    def off_by_one_ulp(*args, **kwargs):
        out = patchify_and_mask(*args, **kwargs)
        return torch.nextafter(out, torch.full_like(out, float("inf")))

    assert agrees_with_reference(patchify_numba, torch.device("cpu"), 32, 8, num_context=12)
    assert not agrees_with_reference(off_by_one_ulp, torch.device("cpu"), 32, 8, num_context=12)


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("no", torch.float32)])
def test_the_run_time_check_covers_the_dtype_the_step_writes(monkeypatch, precision: str, dtype) -> None:
    """On a GPU the fused op is checked against the reference before a run uses it, in the dtype (bf16 has
    its own rounding path in the kernel) and layout the step will ask for."""
    from pipeline import fused_patches
    from train.config import PretrainConfig, load_config
    from train.methods import selfie, stage_class

    checked = []

    def stand_in(op, device, *args, **kwargs) -> None:
        checked.append(kwargs)

    monkeypatch.setattr(fused_patches, "agrees_with_reference", stand_in)
    overrides = {"speed.precision": precision, "speed.channels_last": True, "selfie.patch_op": "triton"}
    config = load_config(stage_class(PretrainConfig), "demo", overrides)
    with pytest.raises(selfie.ConfigError, match="differs from the reference"):  # the stand-in answered None
        selfie.choose_patch_op(config, torch.device("cuda"), 12)
    assert checked and checked[0]["dtype"] == dtype and checked[0]["channels_last"] is True


@pytest.mark.slow
def test_pretraining_with_the_fused_op_equals_the_reference(tmp_path: Path, demo_root: Path) -> None:
    models = []
    for op in ("numba", "reference"):
        run = tmp_path / op
        args = [*TINY, "--data", str(demo_root), "--steps", "3", "--out", str(run), f"--selfie.patch_op={op}"]
        result = pretrain(args, tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"{op} patch op" in result.stdout
        models.append(torch.load(run / "checkpoints" / "step_00000003.pt", weights_only=True)["model"])
    for name, tensor in models[0].items():
        assert torch.equal(tensor, models[1][name]), name
