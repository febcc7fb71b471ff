"""What a caller asks of a loader backend (`pipeline.loaders`): one typed request per stream, training's and
evaluation's, read by every backend under the same names. A backend declares the optional fields
(`OPTIONAL_FIELDS`) and the pad modes it honours; a request asking for anything else is refused by name
(`unhonoured`), never silently ignored."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from pipeline.patches import PatchSpec

# Training-request fields only some backends implement. Left at their defaults they ask for what every
# backend does anyway (no patches cut in the loader, reads through the page cache, the sampler's order).
OPTIONAL_FIELDS = ("patch_spec", "os_cache", "quasi_random")


class ImageSource(Protocol):
    """What a loader reads: a source of `pipeline.data` (folder, CIFAR, IDX), a `pipeline.subsets.SubsetSource`
    of one, or a `pipeline.ffcv_loader.BetonSource`; index i is the i-th image. Each backend refuses the
    kinds it cannot read, naming them."""

    labels: np.ndarray  # int64 (N,)

    def __len__(self) -> int: ...

    def name(self, index: int) -> str: ...


@dataclass(frozen=True)
class ImageTransform:
    """What a backend's op list does to every image (see the op list atop each backend's module)."""

    image_size: int  # S: the side of the square uint8 images delivered
    augment: str  # pipeline.data.AUGMENTS, or "center_crop" (evaluation)
    pad: int = 0  # pad_crop_flip: pixels padded on each side before the random crop
    pad_mode: str = "zero"  # pad_crop_flip: what fills the pad (pipeline.augment.PAD_MODES)
    crop_scale: tuple[float, float] = (1.0, 1.0)  # random_resized_crop: range of the crop's area fraction


@dataclass(frozen=True, kw_only=True)
class TrainRequest:
    """The endless, rank-sharded training stream (the sharding contract of `pipeline.data`)."""

    source: ImageSource  # what the backend's `open` returned, or a SubsetSource of it
    image_size: int  # S: the training resolution
    augment: str  # pipeline.data.AUGMENTS: pad_crop_flip | random_resized_crop | none
    batch_size: int  # images per batch of this process; a step's global batch is batch_size x world_size
    seed: int  # the run's seed: the epoch order and the augmentation draws derive from it
    rank: int = 0  # this process's *global* index (Accelerate's process_index)
    world_size: int = 1  # processes over all machines (Accelerate's num_processes)
    start_step: int = 0  # the first step to read: a resumed run continues on the images it would have read
    workers: int = 2  # worker processes (torch; 0 = in this process) or threads (DALI, FFCV)
    device: torch.device = torch.device("cpu")  # where batches arrive (a name such as "cuda" is turned into one)
    pad: int = 4  # pad_crop_flip: pixels padded on each side
    pad_mode: str = "zero"  # pad_crop_flip: what fills the pad; a backend implements its `pad_modes` only
    crop_scale: tuple[float, float] = (0.08, 1.0)  # random_resized_crop: range of the crop's area fraction
    fail_on_corrupt: bool = False  # an unreadable image stops the stream instead of being replaced and named
    patch_spec: PatchSpec | None = None  # cut the method's patches in the loader (CPU only; "patch_spec")
    os_cache: bool = True  # FFCV: read through the OS page cache, shared by a node's ranks ("os_cache")
    quasi_random: bool = False  # FFCV: its quasi-random order, for data larger than RAM ("quasi_random")

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", torch.device(self.device))

    @property
    def transform(self) -> ImageTransform:
        return ImageTransform(self.image_size, self.augment, self.pad, self.pad_mode, self.crop_scale)


@dataclass(frozen=True, kw_only=True)
class EvalRequest:
    """Every image of `source` once over all ranks, in order, center-cropped, nothing padded (each rank a
    contiguous slice, its last batch short)."""

    source: ImageSource  # what the backend's `open` returned (the test split), or a SubsetSource of it
    image_size: int  # S: the side images are center-cropped to
    batch_size: int  # images per batch of this process (the last one may be short)
    rank: int = 0  # this process's *global* index
    world_size: int = 1  # processes over all machines
    workers: int = 2  # worker processes (torch) or threads (DALI, FFCV)
    device: torch.device = torch.device("cpu")  # where batches arrive (a name is turned into one)
    fail_on_corrupt: bool = False  # an unreadable image stops the pass instead of being left out and named

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", torch.device(self.device))

    @property
    def transform(self) -> ImageTransform:
        return ImageTransform(self.image_size, "center_crop")


def pad_mode_matters(augment: str, pad: int) -> bool:
    """Whether the pad mode changes any pixel: only pad_crop_flip pads, and only with a pad."""
    return augment == "pad_crop_flip" and pad > 0


def unhonoured(request: TrainRequest, options: frozenset[str], pad_modes: tuple[str, ...]) -> list[str]:
    """`name=value` of each setting of `request` that a backend honouring `options` and `pad_modes` cannot
    give: an optional field away from its default, a pad mode it lacks where padding happens."""
    defaults = {spec.name: spec.default for spec in dataclasses.fields(TrainRequest)}
    asked = [
        f"{name}={getattr(request, name)!r}"
        for name in OPTIONAL_FIELDS
        if name not in options and getattr(request, name) != defaults[name]
    ]
    if pad_mode_matters(request.augment, request.pad) and request.pad_mode not in pad_modes:
        asked.append(f"pad_mode={request.pad_mode!r}")
    return asked
