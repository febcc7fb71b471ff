"""Loader backends by name. Each one opens its kind of data and yields the same `pipeline.data.Batch`
stream for training (endless, sharded by global rank, same images at the same step whatever the
backend) and for evaluation (every image once over all ranks, nothing padded)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.augment import PAD_MODES
from pipeline.data import Batch, Source, eval_loader, open_source, torch_loader
from pipeline.demo import demo_dataset


def _dali_train(*args, **kwargs) -> Iterator[Batch]:
    from pipeline.dali_loader import dali_loader

    return dali_loader(*args, **kwargs)


def _dali_eval(*args, **kwargs) -> Iterator[Batch]:
    from pipeline.dali_loader import dali_eval_loader

    return dali_eval_loader(*args, **kwargs)


def _ffcv_train(*args, **kwargs) -> Iterator[Batch]:
    from pipeline.ffcv_loader import ffcv_loader

    return ffcv_loader(*args, **kwargs)


def _ffcv_eval(*args, **kwargs) -> Iterator[Batch]:
    from pipeline.ffcv_loader import ffcv_eval_loader

    return ffcv_eval_loader(*args, **kwargs)


def _open_betons(path: str | os.PathLike, split: str) -> Source:
    from pipeline.ffcv_loader import open_betons

    return open_betons(path, split)


def _demo_betons(cache_dir: str | os.PathLike | None) -> Path:
    """The demo data written once as train.beton and val.beton (raw pixels) beside its folders."""
    from pipeline.beton_writer import ConvertOptions, convert

    root = demo_dataset(cache_dir)
    folder = root / "ffcv"
    folder.mkdir(exist_ok=True)
    for split, name in (("train", "train"), ("test", "val")):
        if not (folder / f"{name}.beton").is_file():
            convert(root, folder / f"{name}.beton", split, ConvertOptions(write_mode="raw", workers=1))
    return folder


@dataclass(frozen=True)
class Backend:
    train: Callable[..., Iterator[Batch]]  # see pipeline.data.torch_loader for the arguments
    evaluate: Callable[..., Iterator[Batch]]  # see pipeline.data.eval_loader
    open: Callable[[str | os.PathLike, str], Source]  # (path, "train" | "test") -> the data it reads
    demo: Callable[[str | os.PathLike | None], Path]  # cache dir -> the built-in demo data in its format
    worker_processes: bool  # its workers are forked processes (fork before any backend leaves threads behind)
    ready_batches: Callable[[int], int]  # workers -> batches it holds ready ahead of the consumer
    # keyword options of `train` beyond the common ones; "patch_spec": it can cut Selfie's patches itself
    options: frozenset[str] = frozenset()
    reads_beton: bool = False  # it reads .beton files (pipeline.convert's), not image folders
    pad_modes: tuple[str, ...] = ("zero",)  # the pad modes its pad_crop_flip implements
    package: str | None = None  # the optional package it needs (None: torch's own)

    def installed(self) -> bool:
        """Whether its package is there to import (a machine may lack FFCV or DALI: its tests skip)."""
        if self.package is None:
            return True
        try:
            return importlib.util.find_spec(self.package) is not None
        except (ModuleNotFoundError, ValueError):  # a missing parent package, or one hidden in sys.modules
            return False


LOADERS: dict[str, Backend] = {
    "torch": Backend(
        torch_loader,
        eval_loader,
        open_source,
        demo_dataset,
        True,
        lambda workers: 4 * max(1, workers),
        frozenset({"pad_mode"}),
        pad_modes=PAD_MODES,
    ),
    "dali": Backend(
        _dali_train, _dali_eval, open_source, demo_dataset, False, lambda workers: 2, package="nvidia.dali"
    ),
    "ffcv": Backend(
        _ffcv_train,
        _ffcv_eval,
        _open_betons,
        _demo_betons,
        False,
        lambda workers: 3,
        frozenset({"patch_spec", "os_cache", "quasi_random"}),
        reads_beton=True,
        package="ffcv",
    ),
}
