"""Fused patch ops: normalise, grid, apply each sample's permutation and write P's input in one pass.

Each op returns exactly what `pipeline.patches.patchify_and_mask` returns for the same uint8 images and
permutation (same values bit for bit, layout, dtype, memory format); tests/test_fused_patches.py holds
them to that. The arithmetic is the reference's, in its order: x (fp32) minus 255 * mean (an fp32
product), divided by 255 * std with correct rounding, then one cast to the output dtype.

- `triton`: a GPU kernel, one program per output patch; it reads the patch's C x p x p pixels once
  and writes them where P reads them (NCHW or channels-last, fp32/bf16/fp16). Under TRITON_INTERPRET=1
  it also runs on the CPU, which is how CI tests it.
- `numba`: the CPU path, a parallel loop over output patches compiled by numba (fp32 out; a half-precision
  request is one torch cast after, the reference's own rounding).
- `reference`: the plain-torch function.

`select_patch_op(device, name)` picks one: "auto" means triton on CUDA, numba on the CPU, each only when
importable (else the reference); a named op that cannot run on the device is an error.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

from pipeline.patches import IMAGENET_MEAN, IMAGENET_STD, PATCH_OPS, PatchOp, grid_size, patchify_and_mask, scaled_stats

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install without triton still trains, on the numba or reference op
    triton = None

try:
    import numba
except ImportError:
    numba = None


def _check(
    images: torch.Tensor, perm: torch.Tensor, patch_size: int, num_context: int, mean: tuple, std: tuple
) -> tuple[int, int, int]:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
    batch, channels, height, width = images.shape
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean and std need {channels} values (one per channel), got {len(mean)} and {len(std)}")
    if height != width:
        raise ValueError(f"images must be square, got {height}x{width}")
    grid = grid_size(height, patch_size)
    if perm.shape != (batch, grid * grid):
        raise ValueError(f"perm must be (B, N) = ({batch}, {grid * grid}), got {tuple(perm.shape)}")
    if not 0 < num_context < grid * grid:
        raise ValueError(f"num_context must be in 1 .. {grid * grid - 1}, got {num_context}")
    return batch, grid, grid * grid


def _empty_like_reference(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, channels_last: bool
) -> torch.Tensor:
    """Storage with the reference's strides, also where a dimension of size 1 makes formats ambiguous,
    allocated in its final layout (no copy of an NCHW buffer into channels-last)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if channels_last and not out.is_contiguous(memory_format=torch.channels_last):
        return torch.empty(shape, dtype=dtype, device=device, memory_format=torch.channels_last)
    return out


if triton is not None:

    @triton.jit
    def _patchify_kernel(
        images_ptr,  # uint8 (B, C, H, W) contiguous
        perm_ptr,  # int64 (B, N) contiguous
        mean_ptr,  # fp32 (C,): 255 * mean
        std_ptr,  # fp32 (C,): 255 * std
        out_ptr,  # (B * N, C, p, p) in NCHW or channels-last storage
        num_context,
        num_patches,
        batch,
        grid,
        height,
        CHANNELS: tl.constexpr,
        PATCH: tl.constexpr,
        BLOCK: tl.constexpr,
        CHANNELS_LAST: tl.constexpr,
        OUT_BF16: tl.constexpr,
    ):
        out_index = tl.program_id(0).to(tl.int64)  # int64 offsets: large batches pass 2**31 elements
        context_total = batch * num_context
        is_context = out_index < context_total
        num_masked = num_patches - num_context
        masked_index = out_index - context_total
        sample = tl.where(is_context, out_index // num_context, masked_index // num_masked)
        slot = tl.where(is_context, out_index % num_context, num_context + masked_index % num_masked)
        position = tl.load(perm_ptr + sample * num_patches + slot)
        top = (position // grid) * PATCH
        left = (position % grid) * PATCH

        offsets = tl.arange(0, BLOCK)  # c * p * p + i * p + j over the patch, NCHW order
        valid = offsets < CHANNELS * PATCH * PATCH
        channel = offsets // (PATCH * PATCH)
        row = (offsets // PATCH) % PATCH
        column = offsets % PATCH
        source = ((sample * CHANNELS + channel) * height + top + row) * height + left + column
        pixels = tl.load(images_ptr + source, mask=valid, other=0).to(tl.float32)
        mean = tl.load(mean_ptr + channel, mask=valid, other=0.0)
        std = tl.load(std_ptr + channel, mask=valid, other=1.0)
        values = tl.math.div_rn(pixels - mean, std)  # correctly rounded, as torch divides
        if CHANNELS_LAST:
            target = (row * PATCH + column) * CHANNELS + channel
        else:
            target = offsets
        if OUT_BF16:
            # Round to nearest even by hand: the interpreter's cast truncates, and both must match torch.
            bits = values.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            result = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            result = values.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + out_index * CHANNELS * PATCH * PATCH + target, result, mask=valid)


def patchify_triton(
    images: torch.Tensor,
    perm: torch.Tensor,
    patch_size: int,
    num_context: int,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> torch.Tensor:
    """The Triton op (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1); same contract as the reference."""
    if triton is None:
        raise RuntimeError("the triton patch op needs the triton package")
    batch, grid, num_patches = _check(images, perm, patch_size, num_context, mean, std)
    channels = images.shape[1]
    out = _empty_like_reference(
        (batch * num_patches, channels, patch_size, patch_size), dtype, images.device, channels_last
    )
    if not out.numel():
        return out
    # The kernel writes channels-last offsets; where C or p is 1 those equal the NCHW ones the
    # reference's strides then keep, so one formula serves both.
    launch_device = torch.cuda.device(images.device) if images.device.type == "cuda" else contextlib.nullcontext()
    block = triton.next_power_of_2(channels * patch_size * patch_size)
    with launch_device:
        _patchify_kernel[(batch * num_patches,)](
            images.contiguous(),
            perm.to(images.device, torch.int64).contiguous(),
            scaled_stats(tuple(mean), images.device),
            scaled_stats(tuple(std), images.device),
            out,
            num_context,
            num_patches,
            batch,
            grid,
            images.shape[2],
            CHANNELS=channels,
            PATCH=patch_size,
            BLOCK=block,
            CHANNELS_LAST=channels_last,
            OUT_BF16=dtype == torch.bfloat16,
        )
    return out


if numba is not None:

    @numba.njit(parallel=True, cache=True)
    def _patchify_numba(images, perm, patch, num_context, mean255, std255, out):  # pragma: no cover (compiled)
        batch, channels, _, _ = images.shape
        num_patches = perm.shape[1]
        grid = images.shape[2] // patch
        num_masked = num_patches - num_context
        context_total = batch * num_context
        for out_index in numba.prange(batch * num_patches):
            if out_index < context_total:
                sample, slot = out_index // num_context, out_index % num_context
            else:
                masked_index = out_index - context_total
                sample, slot = masked_index // num_masked, num_context + masked_index % num_masked
            position = perm[sample, slot]
            top, left = (position // grid) * patch, (position % grid) * patch
            for c in range(channels):
                for i in range(patch):
                    for j in range(patch):
                        value = np.float32(images[sample, c, top + i, left + j])
                        out[out_index, c, i, j] = (value - mean255[c]) / std255[c]


def patchify_numba(
    images: torch.Tensor,
    perm: torch.Tensor,
    patch_size: int,
    num_context: int,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> torch.Tensor:
    """The numba op for CPU tensors; same contract as the reference."""
    if numba is None:
        raise RuntimeError("the numba patch op needs the numba package")
    if images.device.type != "cpu":
        raise ValueError(f"the numba patch op runs on CPU tensors, got {images.device}")
    batch, _, num_patches = _check(images, perm, patch_size, num_context, mean, std)
    # numba does not bounds-check: a bad position would read outside the image. (The Triton op trusts
    # `sample_context_permutation` instead: checking a GPU tensor would cost a host sync every step.)
    if perm.numel() and (int(perm.min()) < 0 or int(perm.max()) >= num_patches):
        raise ValueError(f"perm holds positions outside 0 .. {num_patches - 1}")
    channels = images.shape[1]
    out = np.empty((batch * num_patches, channels, patch_size, patch_size), dtype=np.float32)
    # As many threads as torch uses in this process, so ranks sharing a machine do not oversubscribe it.
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    _patchify_numba(
        images.contiguous().numpy(),
        perm.to(torch.int64).contiguous().numpy(),
        patch_size,
        num_context,
        scaled_stats(tuple(mean), images.device).numpy(),
        scaled_stats(tuple(std), images.device).numpy(),
        out,
    )
    result = torch.from_numpy(out).to(dtype)
    return result.contiguous(memory_format=torch.channels_last) if channels_last else result


def triton_runs_on(device: torch.device) -> bool:
    return triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def agrees_with_reference(op: PatchOp, device: torch.device, image_size: int, patch_size: int, **kwargs) -> bool:
    """One small random batch through `op` and the reference on `device`: bitwise the same?"""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, image_size, image_size), dtype=torch.uint8, generator=generator)
    perm = torch.stack([torch.randperm((image_size // patch_size) ** 2, generator=generator) for _ in range(3)])
    images, perm = images.to(device), perm.to(device)
    expected = patchify_and_mask(images, perm, patch_size, **kwargs)
    got = op(images, perm, patch_size, **kwargs)
    return got.stride() == expected.stride() and torch.equal(_bits(got), _bits(expected))


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that -0.0 and +0.0 (and NaN payloads) compare as different."""
    return tensor.contiguous().view(
        {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    )


def select_patch_op(device: torch.device | str, name: str = "auto") -> tuple[str, PatchOp]:
    """(name, op) for `device`; see the module docstring."""
    device = torch.device(device)
    if name not in PATCH_OPS:
        raise ValueError(f"patch op must be one of {PATCH_OPS}, got {name!r}")
    if name == "auto":
        if device.type == "cuda" and triton is not None:
            name = "triton"
        elif device.type == "cpu" and numba is not None:
            name = "numba"
        else:
            name = "reference"
    if name == "triton" and not triton_runs_on(device):
        raise ValueError(f"the triton patch op cannot run on {device} (needs triton and CUDA, or TRITON_INTERPRET=1)")
    if name == "numba" and (numba is None or device.type != "cpu"):
        raise ValueError(f"the numba patch op cannot run on {device} (needs numba and CPU tensors)")
    ops = {"reference": patchify_and_mask, "triton": patchify_triton, "numba": patchify_numba}
    return name, ops[name]
