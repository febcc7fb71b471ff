"""What a pretraining run measures besides its training loss, at logging time: the pretext task on clean
held-out images, and a kNN classifier on the features fine-tuning would start from.

- `CleanPretext`: the method's loss and accuracy on fixed held-out images, center-cropped (no pad, no crop,
  no flip), under fixed masks or views, with the model in eval mode: `clean_loss` and `clean_<metric>`.
  The training accuracy can be reached by shortcuts the augmentation leaves in (a zero-padded border tells
  an edge patch where it belongs); this one cannot, and it does not depend on the augmentation at all.
- `KnnMonitor`: the backbone's pooled features of whole images (what fine-tuning reuses), batch-norm
  statistics first recalibrated on whole training images, a weighted cosine kNN (k neighbours, votes
  exp(similarity / T), as solo-learn and DINO do) fitted on labelled training images and scored on
  held-out ones: `knn_acc`; once per run the same for a randomly initialised network, `knn_acc_random`.

Both run on rank 0 only and on a bounded number of images (monitor.*), so their cost does not grow with
the data set, and their values do not depend on the number of processes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from pipeline.data import (
    CLEAN_STREAM,
    RANDOM_INIT_STREAM,
    Batch,
    BatchAssembler,
    BatchSpec,
    DataError,
    Source,
    derive_seed,
)
from pipeline.loaders import LOADERS
from train.methods.supervised import model_input


def spread_indices(count: int, available: int) -> tuple[int, ...]:
    """`count` indices spread evenly over `available` (all of them when there are fewer)."""
    if count >= available:
        return tuple(range(available))
    return tuple(torch.linspace(0, available - 1, count).round().long().unique().tolist())


def whole_images(
    source: Source, image_size: int, count: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images (N, 3, S, S), labels (N,)) of `count` images spread over `source`, center-cropped."""
    batch = BatchAssembler(source, image_size, "center_crop")[BatchSpec(0, spread_indices(count, len(source)), 0)]
    return batch.images.to(device), batch.labels.to(device)


def chunks(tensor: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [tensor[start : start + size] for start in range(0, len(tensor), size)]


class CleanPretext:
    """The pretext loss and accuracy on fixed, un-augmented held-out images (see the module docstring)."""

    def __init__(
        self, task, net: nn.Module, images: torch.Tensor, seed: int, batch: int, accelerator: Accelerator
    ) -> None:
        self.task, self.net, self.images = task, net, images
        self.seed, self.batch, self.accelerator = seed, batch, accelerator

    @torch.no_grad()
    def __call__(self) -> dict[str, float]:
        was_training = self.net.training
        self.net.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.images.device)
        for k, images in enumerate(chunks(self.images, self.batch)):
            generator = torch.Generator(device=images.device).manual_seed(derive_seed(self.seed, CLEAN_STREAM, k))
            indices = torch.arange(len(images), device=images.device)
            inputs = self.task.inputs(Batch(images, indices, indices), generator)
            with self.accelerator.autocast():
                loss, accuracy = self.task.objective(self.net, inputs)
            totals += torch.stack([loss.double(), accuracy.double()]) * len(images)
        self.net.train(was_training)
        loss, accuracy = (totals / len(self.images)).tolist()
        return {"clean_loss": round(loss, 5), f"clean_{self.task.metric}": round(accuracy, 5)}


@torch.no_grad()
def recalibrate_batch_norm(module: nn.Module, images: torch.Tensor, batch: int, prepare: Callable) -> nn.Module:
    """Re-estimate every batch-norm layer's running mean and variance of `module` on `images` (a cumulative
    average over the batches, in train mode); its weights and every other buffer stay as they were.
    `prepare` turns uint8 images into the module's input. Returns `module` in eval mode."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms if m.track_running_stats]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over all the batches
    module.train()
    for images_chunk in chunks(images, batch):
        module.forward_features(prepare(images_chunk))
    for norm, (momentum, tracked) in zip([m for m in norms if m.track_running_stats], saved, strict=True):
        norm.momentum = momentum
        norm.num_batches_tracked.copy_(tracked)
    return module.eval()


def knn_predict(
    train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor, k: int, temperature: float
) -> torch.Tensor:
    """Labels of `test_features` by their k nearest training features (cosine), each neighbour voting
    exp(similarity / temperature). Features are L2-normalised here."""
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    classes = int(train_labels.max()) + 1
    similarity, neighbours = (test @ train.T).topk(min(k, len(train)), dim=1)
    votes = torch.zeros(len(test), classes, device=test.device)
    votes.scatter_add_(1, train_labels[neighbours], (similarity / temperature).exp())
    return votes.argmax(dim=1)


class KnnMonitor:
    """kNN accuracy of the backbone's features (see the module docstring)."""

    def __init__(
        self, backbone_of: Callable, prepare: Callable, train: tuple, test: tuple, settings, accelerator
    ) -> None:
        self.backbone_of, self.prepare = backbone_of, prepare
        (self.train_images, self.train_labels), (self.test_images, self.test_labels) = train, test
        self.settings, self.accelerator = settings, accelerator

    @torch.no_grad()
    def features(self, backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
        with self.accelerator.autocast():
            parts = [
                backbone.forward_features(self.prepare(x)).mean(dim=(2, 3)).float()
                for x in chunks(images, self.settings.batch)
            ]
        return torch.cat(parts)

    def accuracy(self, net: nn.Module) -> float:
        """kNN test accuracy of `net`'s backbone, on a recalibrated copy (the training model is untouched)."""
        backbone = copy.deepcopy(self.backbone_of(net))
        recalibrate_batch_norm(backbone, self.train_images, self.settings.batch, self.prepare)
        train = self.features(backbone, self.train_images)
        test = self.features(backbone, self.test_images)
        predicted = knn_predict(train, self.train_labels, test, self.settings.knn_k, self.settings.knn_temperature)
        return round(float((predicted == self.test_labels).float().mean()), 5)


class Monitors:
    """The loop's `log_fields` hook: the clean metric at every log record, the kNN accuracy when due (every
    `monitor.every` steps, or at every checkpoint), on rank 0."""

    def __init__(self, clean: CleanPretext | None, knn: KnnMonitor | None, net: nn.Module, every: int) -> None:
        self.clean, self.knn, self.net, self.every = clean, knn, net, every

    def __call__(self, done: int, checkpoint_due: bool) -> dict[str, float]:
        fields = self.clean() if self.clean is not None else {}
        due = done % self.every == 0 if self.every else checkpoint_due
        if self.knn is not None and due:
            fields["knn_acc"] = self.knn.accuracy(self.net)
        return fields

    def summary(self, last: dict) -> str:
        """The run's last clean and kNN figures in words, for its final line."""
        parts = [f"{key} {last[key]:.1%}" for key in last if key.startswith("clean_") and key.endswith("_acc")]
        parts += [f"kNN {last['knn_acc']:.1%}"] if "knn_acc" in last else []
        return "; ".join(parts)


def held_out_source(config, train_source: Source) -> Source:
    """The data's held-out split (val/, test/, test_batch, val.beton) for the monitors; without one, the
    training images themselves (un-augmented, but not held out: the note says so). `config.data.path` is
    the resolved one (the run's set-up fills it in)."""
    try:  # rank 0 alone runs this: no collective (open_data's) may be called here
        return LOADERS[config.data.loader].open(config.data.path, "test")
    except DataError as error:
        print(f"note: the monitors score on training images, the data has no held-out split ({error})")
        return train_source


def build_monitors(config, method, net: nn.Module, train_source: Source, accelerator: Accelerator) -> Monitors | None:
    """The monitors `config.monitor` asks for, on rank 0 (None elsewhere, or when none is on)."""
    settings, size, device = config.monitor, config.data.image_size, accelerator.device
    if not accelerator.is_main_process or not (settings.clean or settings.knn):
        return None
    held_out = held_out_source(config, train_source)
    clean = None
    if settings.clean:
        images, _ = whole_images(held_out, size, min(settings.clean_images, config.train.batch_size), device)
        clean = CleanPretext(method, net, images, config.train.seed, settings.batch, accelerator)
    knn = None
    if settings.knn and len(train_source.classes) > 1:  # unlabelled data: nothing to classify
        prepare = partial(model_input, config=config)
        backbone_of = partial(submodule, prefix=method.encoder_prefix)
        train = whole_images(train_source, size, settings.knn_train_images, device)
        test = whole_images(held_out, size, settings.knn_test_images, device)
        knn = KnnMonitor(backbone_of, prepare, train, test, settings, accelerator)
    return Monitors(clean, knn, net, settings.every)


def submodule(net: nn.Module, prefix: str) -> nn.Module:
    """The part of `net` whose state-dict names start with `prefix` ("patch_net.", "backbone.")."""
    return net.get_submodule(prefix.rstrip("."))


def random_network_knn(monitors: Monitors, build: Callable[[], nn.Module], seed: int, device: torch.device) -> float:
    """kNN accuracy of a freshly initialised network of the run's kind: the floor pretraining must beat.
    Built under its own seed inside a forked RNG, so the run's random streams are untouched."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(derive_seed(seed, RANDOM_INIT_STREAM))
        random_net = build().to(device)
    return monitors.knn.accuracy(random_net)
