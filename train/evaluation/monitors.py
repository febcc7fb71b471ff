"""What a pretraining run measures besides its training loss, at logging time, on rank 0:

- the pretext task on clean held-out images (`train/evaluation/clean_metric.py`): `clean_loss`, `clean_<metric>`, each
  with its standard error (`_se`), and the method's own figures (Selfie: the context ablation);
- the standard probe of the features fine-tuning would start from (`train/evaluation/probes.py`): kNN and a
  linear probe of the frozen backbone, its batch norm under `monitor.bn` (and, in the run's final record, the
  other protocol beside it), on whole images and (a patch network) on its patch grid, each with its error;
  `knn_acc` +- `knn_acc_se` is the whole-image kNN under `monitor.bn`. What they are judged against is
  measured once at the start, under both protocols: random initialisations (`knn_acc_random` +-
  `knn_acc_random_sd` under `monitor.bn`, every other probe's too) and the raw pixels.

Both run on a bounded number of images (monitor.*), so their cost does not grow with the data set, and
their values do not depend on the number of processes. Neither changes what is trained: they draw from
their own seeded generators and leave the model's weights and statistics as they were.
"""

from __future__ import annotations

from functools import partial
from operator import attrgetter

import torch
from accelerate import Accelerator
from torch import nn

from pipeline.data import BatchAssembler, BatchSpec, DataError, Source
from pipeline.loaders import LOADERS
from train.config import to_dict
from train.evaluation.clean_metric import CleanPretext
from train.evaluation.knn import stratified_indices
from train.evaluation.probes import BN_PROTOCOLS, GRID, ProbeMonitor, acc_key, pixels_key, random_key
from train.methods.supervised import model_input


def spread_indices(count: int, available: int) -> tuple[int, ...]:
    """`count` indices spread evenly over `available` (all of them when there are fewer)."""
    if count >= available:
        return tuple(range(available))
    return tuple(torch.linspace(0, available - 1, count).round().long().unique().tolist())


def images_at(source: Source, image_size: int, indices: tuple[int, ...], device: torch.device) -> tuple:
    """(uint8 images (N, 3, S, S), labels (N,)) of `source` at `indices`, center-cropped."""
    batch = BatchAssembler(source, image_size, "center_crop")[BatchSpec(0, indices, 0)]
    return batch.images.to(device), batch.labels.to(device)


def whole_images(source: Source, image_size: int, count: int, device: torch.device) -> tuple:
    """`images_at` `count` images spread over `source`."""
    return images_at(source, image_size, spread_indices(count, len(source)), device)


def percent(value: float | None) -> str:
    return "?" if value is None else f"{100 * value:.1f}"


class Monitors:
    """The loop's `log_fields` hook: the clean metric at every log record, the probes when due (every
    `monitor.every` steps, or at every checkpoint), on rank 0. `protocol` is monitor.bn; the other batch-norm
    protocol is measured in the run's final record only, beside it (the probes' cost, halved elsewhere)."""

    def __init__(self, clean: CleanPretext | None, probes: ProbeMonitor | None, net: nn.Module, config) -> None:
        self.clean, self.knn, self.net = clean, probes, net
        self.every, self.protocol, self.last_step = config.monitor.every, config.monitor.bn, config.train.steps
        self.baselines: dict[str, float] | None = None  # set by `measure_baselines` at a run's start

    def __call__(self, done: int, checkpoint_due: bool) -> dict[str, float | None]:
        fields = self.clean() if self.clean is not None else {}
        due = done % self.every == 0 if self.every else checkpoint_due
        if self.knn is not None and due:
            figures = self.knn.figures(self.net, BN_PROTOCOLS if done == self.last_step else (self.protocol,))
            headline = acc_key("knn", "", self.protocol)
            fields |= {"knn_acc": figures[headline], "knn_acc_se": figures[f"{headline}_se"], **figures}
        return fields

    def measure_baselines(self, build, seed: int, device: torch.device) -> dict[str, float]:
        """The raw pixels and random initialisations under every probe, for the log's step-0 record."""
        self.baselines = self.knn.baselines(build, seed, device)
        headline = random_key("knn", "", self.protocol)
        aliases = {"knn_acc_random": self.baselines[headline], "knn_acc_random_sd": self.baselines[f"{headline}_sd"]}
        return aliases | self.baselines

    def summary(self, last: dict, metric: str) -> str:
        """The run's last clean and probe figures in words, with their errors, for its final line."""
        parts = []
        if f"clean_{metric}" in last:
            ablation = ""
            if f"clean_u_rolled_{metric}" in last:
                ablation = (
                    f" (with another image's context {percent(last[f'clean_u_rolled_{metric}'])} %, with none "
                    f"{percent(last[f'clean_u_zero_{metric}'])} %; query spread over images "
                    f"{last['clean_query_spread']:.3g} vs norm {last['clean_query_norm']:.3g})"
                )
            clean = f"clean {metric} {percent(last[f'clean_{metric}'])} ± {percent(last.get(f'clean_{metric}_se'))} %"
            parts.append(clean + ablation)
        for view, name in (("", "whole images"), (GRID, "patch grid")):
            if acc_key("knn", view, self.protocol) in last:
                parts.append(f"{name}: {self.probe_words(last, view)}")
        return "; ".join(parts)

    def probe_words(self, last: dict, view: str) -> str:
        """kNN and linear probe of one view, with the baselines measured at the start beside them."""
        words = []
        for probe in ("knn", "linear"):
            key, random = acc_key(probe, view, self.protocol), random_key(probe, view, self.protocol)
            figure = f"{probe} {percent(last.get(key))} ± {percent(last.get(f'{key}_se'))} %"
            if self.baselines is not None:
                b = self.baselines
                figure += (
                    f" (random networks {percent(b.get(random))} ± {percent(b.get(f'{random}_sd'))} % sd over "
                    f"{b['knn_random_inits']}, raw pixels {percent(b.get(pixels_key(probe)))} %)"
                )
            words.append(figure)
        return f"{', '.join(words)}, BN {self.protocol}"


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
        images, _ = whole_images(held_out, size, settings.clean_images, device)
        clean = CleanPretext(method, net, images, settings, config.train.seed, accelerator)
    probes = None
    if settings.knn and len(train_source.classes) > 1:  # unlabelled data: nothing to classify
        prepare = partial(model_input, config=config)
        backbone_of = attrgetter("backbone")  # every pretext model's reused network (train/methods/base.py)
        train = images_at(
            train_source, size, stratified_indices(train_source.labels, settings.knn_train_images), device
        )
        test = images_at(held_out, size, stratified_indices(held_out.labels, settings.knn_test_images), device)
        side = method.backbone_input(to_dict(config))[1] if method.patch_network else None
        probes = ProbeMonitor(backbone_of, prepare, (train, test), settings, accelerator, side)
    return Monitors(clean, probes, net, config)
