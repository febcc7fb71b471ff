"""The loader backend a config names (`data.loader`, pipeline/loaders.py), opened for a stage: the data it
reads, its rank-sharded training stream and its evaluation pass."""

from __future__ import annotations

from collections.abc import Iterator

from accelerate import Accelerator, PartialState

from pipeline.data import Batch, DataError, Source
from pipeline.loader_request import EvalRequest, TrainRequest
from pipeline.loaders import LOADERS
from pipeline.patches import PatchSpec
from train.config import StageConfig


def open_data(config: StageConfig, split: str) -> tuple[Source, str]:
    """The data `--loader` reads for `split` ("train" | "test"), and its path (default: the demo data)."""
    backend = LOADERS[config.data.loader]
    with PartialState().main_process_first():  # one process builds (or converts) the demo data
        path = config.data.path or str(backend.demo(config.data.cache_dir))
    return backend.open(path, split), path


def check_batch_fits(source: Source, global_batch: int) -> None:
    """One global batch must fit in the data (checked before the run folder exists)."""
    if len(source) < global_batch:
        raise DataError(
            f"the data set has {len(source)} images, fewer than one global batch of {global_batch}; lower --batch-size"
        )


def train_batches(
    config: StageConfig,
    source: Source,
    batch_per_process: int,
    seed: int,
    start_step: int,
    accelerator: Accelerator,
    patch_spec: PatchSpec | None = None,
) -> Iterator[Batch]:
    """The endless, rank-sharded training stream of `--loader` (each backend shards by global rank itself,
    so the loader is never passed to `accelerator.prepare`). `patch_spec`: the loader may cut the patches."""
    data, backend = config.data, LOADERS[config.data.loader]
    # The data.ffcv_* keys are documented as FFCV's: the other loaders ignore them (a run may resume
    # through another loader with the first one's config), so only a loader that implements them gets them.
    ffcv = {"os_cache": data.ffcv_os_cache, "quasi_random": data.ffcv_quasi_random}
    request = TrainRequest(
        source=source,
        image_size=data.image_size,
        augment=data.augment,
        batch_size=batch_per_process,
        seed=seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        start_step=start_step,
        workers=data.workers,
        device=accelerator.device,
        pad=data.pad,
        pad_mode=data.pad_mode,
        crop_scale=data.crop_scale,
        fail_on_corrupt=data.fail_on_corrupt,
        patch_spec=patch_spec,
        **{name: value for name, value in ffcv.items() if name in backend.options},
    )
    return backend.train(request)


def eval_batches(
    config: StageConfig, source: Source, batch_per_process: int, accelerator: Accelerator
) -> Iterator[Batch]:
    """Every image of `source` once over all ranks, center-cropped, through `--loader`."""
    request = EvalRequest(
        source=source,
        image_size=config.data.image_size,
        batch_size=batch_per_process,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        workers=config.data.workers,
        device=accelerator.device,
        fail_on_corrupt=config.data.fail_on_corrupt,
    )
    return LOADERS[config.data.loader].evaluate(request)
