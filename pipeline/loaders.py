"""Loader backends by name. Each one opens its kind of data and yields the same `pipeline.data.Batch`
stream for training (endless, sharded by global rank, same images at the same step whatever the
backend) and for evaluation (every image once over all ranks, nothing padded), each built from one typed
request (`pipeline.loader_request`)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from pipeline.augment import PAD_MODES
from pipeline.data import Batch, Source, eval_loader, open_source, torch_loader
from pipeline.demo import demo_dataset
from pipeline.loader_request import EvalRequest, TrainRequest, unhonoured


@runtime_checkable
class LoaderBackend(Protocol):
    """What a loader backend is to its callers: two streams, each built from one request, and what it
    declares it honours beyond the fields every backend implements."""

    name: str  # its `--loader` name
    options: frozenset[str]  # the `pipeline.loader_request.OPTIONAL_FIELDS` it implements
    pad_modes: tuple[str, ...]  # the pad modes its pad_crop_flip implements

    def train(self, request: TrainRequest) -> Iterator[Batch]: ...

    def evaluate(self, request: EvalRequest) -> Iterator[Batch]: ...


# DALI's and FFCV's modules are imported when a stream is asked of them, not with the registry.
def _dali_train(request: TrainRequest) -> Iterator[Batch]:
    from pipeline.dali_loader import dali_loader

    return dali_loader(request)


def _dali_eval(request: EvalRequest) -> Iterator[Batch]:
    from pipeline.dali_loader import dali_eval_loader

    return dali_eval_loader(request)


def _ffcv_train(request: TrainRequest) -> Iterator[Batch]:
    from pipeline.ffcv_loader import ffcv_loader

    return ffcv_loader(request)


def _ffcv_eval(request: EvalRequest) -> Iterator[Batch]:
    from pipeline.ffcv_loader import ffcv_eval_loader

    return ffcv_eval_loader(request)


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
    """A registered backend (a `LoaderBackend`): its entry points and what it declares."""

    name: str  # its `--loader` name, the key of LOADERS
    train_stream: Callable[[TrainRequest], Iterator[Batch]]  # e.g. pipeline.data.torch_loader
    eval_stream: Callable[[EvalRequest], Iterator[Batch]]  # e.g. pipeline.data.eval_loader
    open: Callable[[str | os.PathLike, str], Source]  # (path, "train" | "test") -> the data it reads
    demo: Callable[[str | os.PathLike | None], Path]  # cache dir -> the built-in demo data in its format
    worker_processes: bool  # its workers are forked processes (fork before any backend leaves threads behind)
    ready_batches: Callable[[int], int]  # workers -> batches it holds ready ahead of the consumer
    # the optional request fields it implements; "patch_spec": it can cut Selfie's patches itself
    options: frozenset[str] = frozenset()
    reads_beton: bool = False  # it reads .beton files (pipeline.convert's), not image folders
    pad_modes: tuple[str, ...] = ("zero",)  # the pad modes its pad_crop_flip implements
    package: str | None = None  # the optional package it needs (None: torch's own)

    def train(self, request: TrainRequest) -> Iterator[Batch]:
        """The training stream; a request asking for what this backend cannot give is refused by name. (The
        trainer never asks it: it refuses such a pad mode at parse time and asks FFCV's options of FFCV only,
        train/engine/loading.py.)"""
        asked = unhonoured(request, self.options, self.pad_modes)
        if asked:
            implements = ", ".join(sorted(self.options)) or "none"
            raise ValueError(
                f"the {self.name} loader cannot honour {', '.join(asked)} (optional fields it implements: "
                f"{implements}; pad modes: {', '.join(self.pad_modes)})"
            )
        return self.train_stream(request)

    def evaluate(self, request: EvalRequest) -> Iterator[Batch]:
        return self.eval_stream(request)

    def installed(self) -> bool:
        """Whether its package is there to import (a machine may lack FFCV or DALI: its tests skip)."""
        if self.package is None:
            return True
        try:
            return importlib.util.find_spec(self.package) is not None
        except (ModuleNotFoundError, ValueError):  # a missing parent package, or one hidden in sys.modules
            return False


_BACKENDS = (
    Backend(
        "torch",
        torch_loader,
        eval_loader,
        open_source,
        demo_dataset,
        True,
        lambda workers: 4 * max(1, workers),
        pad_modes=PAD_MODES,
    ),
    Backend(
        "dali", _dali_train, _dali_eval, open_source, demo_dataset, False, lambda workers: 2, package="nvidia.dali"
    ),
    Backend(
        "ffcv",
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
)
LOADERS: dict[str, Backend] = {backend.name: backend for backend in _BACKENDS}
