"""The standard probe of a frozen backbone, shared by the pretraining monitor and `python -m train.evaluate`.

The network is a frozen copy in eval mode with the batch-norm statistics it stored (the protocol of
solo-learn, lightly and MAE); `reestimated` re-estimates them on the fit images first (the view's inputs:
whole images, or their patches), which is a named option, always measured beside the standard figure:
it moves random networks far more than trained ones (issue 31: a random net's kNN from 67 % to 46 %).
Its features are probed two ways, each with its standard error:

- kNN: k neighbours (monitor.knn_k, 20) by cosine similarity, each voting exp(similarity / T) (T 0.07),
  as solo-learn's default; the features are not centred;
- a linear probe: scikit-learn's LogisticRegression (lbfgs, C = 1.0, at most 1,000 iterations, a fixed
  recipe, no tuning) on features standardised with the fit set's mean and sd.

Two views of an image: its whole-image feature (the backbone's pooled map, what fine-tuning reuses) and,
for a patch network (a method whose `patch_network` is set: Selfie's P), its patch grid as P sees it in
pretraining: the image cut into the method's patches, each embedded by P (pooled), the vectors
concatenated in grid order (row by row). Raw pixels need no second view: the grid is a permutation of
the pixels, and both probes are blind to one.

Keys of the figures (log.jsonl, train.evaluate's --json), for probe `knn` or `linear`, `_grid` for the
patch grid, protocol `stored` or `reestimated`: `<probe>[_grid]_acc_<protocol>` (+ `_se`) for the network
probed, `<probe>[_grid]_acc_random_<protocol>` (+ `_sd` over `knn_random_inits` random networks) and
`<probe>_acc_pixels` (+ `_se`).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable

import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn

from pipeline.data import RANDOM_INIT_STREAM, derive_seed
from train.config.schema import BN_PROTOCOLS
from train.evaluation.batch_norm import chunks, recalibrate_batch_norm
from train.evaluation.estimates import binomial_se, mean_sd
from train.evaluation.knn import knn_predict

PROBES = ("knn", "linear")
LINEAR_C, LINEAR_MAX_ITER = 1.0, 1000  # the linear probe's fixed recipe (inverse L2 strength, lbfgs iterations)
GRID = "_grid"  # the patch-grid view's suffix; the whole image's is ""
VIEW_NAMES = {"": "whole images", GRID: "patch grid"}
PROTOCOL_NAMES = {"stored": "BN as stored", "reestimated": "BN re-estimated"}


def acc_key(probe: str, view: str, protocol: str) -> str:
    return f"{probe}{view}_acc_{protocol}"


def random_key(probe: str, view: str, protocol: str) -> str:
    return f"{probe}{view}_acc_random_{protocol}"


def pixels_key(probe: str) -> str:
    return f"{probe}_acc_pixels"


def patch_grid(images: torch.Tensor, side: int) -> torch.Tensor:
    """Images (N, C, S, S) -> their patches (N * (S / side)^2, C, side, side), each image's in grid order."""
    n, c = images.shape[:2]
    cells = images.unfold(2, side, side).unfold(3, side, side)  # (N, C, rows, columns, side, side)
    return cells.permute(0, 2, 3, 1, 4, 5).reshape(-1, c, side, side)


def linear_probe(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor):
    """(accuracy, standard error) of the fixed-recipe logistic regression on standardised features. A fit
    that stops at the iteration cap is the recipe's figure, not an error: its warning is not shown."""
    scaler = StandardScaler().fit(train.cpu().numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe = LogisticRegression(C=LINEAR_C, max_iter=LINEAR_MAX_ITER)
        probe.fit(scaler.transform(train.cpu().numpy()), train_labels.cpu().numpy())
    predicted = probe.predict(scaler.transform(test.cpu().numpy()))
    accuracy = float((predicted == test_labels.cpu().numpy()).mean())
    return accuracy, binomial_se(accuracy, len(test_labels))


class ProbeMonitor:
    """The standard probe (see the module docstring) of the network `backbone_of(net)`, on fixed labelled
    images: `labelled` is ((fit images, labels), (scored images, labels)), uint8; `prepare` turns uint8
    images (or patches) into the network's input; `patch_side` the patch network's patch side (None: no
    patch-grid view)."""

    def __init__(
        self, backbone_of: Callable, prepare: Callable, labelled: tuple, settings, accelerator, patch_side=None
    ) -> None:
        self.backbone_of, self.prepare, self.settings, self.accelerator = backbone_of, prepare, settings, accelerator
        (self.train_images, self.train_labels), (self.test_images, self.test_labels) = labelled
        self.views: dict[str, Callable] = {"": prepare}
        if patch_side is not None:
            self.views[GRID] = lambda images: prepare(patch_grid(images, patch_side))

    @torch.no_grad()
    def features(self, backbone: nn.Module, images: torch.Tensor, view: str) -> torch.Tensor:
        """One row per image: its pooled feature, or its patches' pooled features concatenated."""
        with self.accelerator.autocast():
            parts = [
                backbone.forward_features(self.views[view](x)).mean(dim=(2, 3)).float().reshape(len(x), -1)
                for x in chunks(images, self.settings.batch)
            ]
        return torch.cat(parts)

    def frozen(self, backbone: nn.Module, view: str, protocol: str) -> nn.Module:
        """An eval-mode copy of `backbone` (the training model keeps its mode and statistics)."""
        frozen = copy.deepcopy(backbone).eval()
        if protocol == "reestimated":
            recalibrate_batch_norm(frozen, self.train_images, self.settings.batch, self.views[view])
        return frozen

    def score(self, train: torch.Tensor, test: torch.Tensor) -> dict[str, tuple[float, float]]:
        """probe -> (accuracy, its standard error) of probes fitted on `train` features, scored on `test`'s."""
        s = self.settings
        if not (torch.isfinite(train).all() and torch.isfinite(test).all()):
            # A diverged network: no probe can be fitted (scikit-learn refuses NaN); the run's non-finite
            # loss check stops it with its own message.
            return {"knn": (math.nan, math.nan), "linear": (math.nan, math.nan)}
        predicted = knn_predict(train, self.train_labels, test, s.knn_k, s.knn_temperature)
        accuracy = float((predicted == self.test_labels).float().mean())
        linear = linear_probe(train, self.train_labels, test, self.test_labels)
        return {"knn": (accuracy, binomial_se(accuracy, len(self.test_labels))), "linear": linear}

    def figures(self, net: nn.Module, protocols: tuple[str, ...] = BN_PROTOCOLS) -> dict[str, float]:
        """Every probe of `net`'s backbone, in every view and under `protocols`, with its error."""
        backbone, found = self.backbone_of(net), {}
        for protocol in protocols:
            for view in self.views:
                frozen = self.frozen(backbone, view, protocol)
                fit, scored = (self.features(frozen, images, view) for images in (self.train_images, self.test_images))
                scores = self.score(fit, scored)
                for probe, (accuracy, se) in scores.items():
                    key = acc_key(probe, view, protocol)
                    found |= {key: round(accuracy, 5), f"{key}_se": round(se, 5)}
        return found

    def pixels(self) -> dict[str, float]:
        """Both probes on the raw pixels of the same images."""
        scores = self.score(self.train_images.flatten(1).float(), self.test_images.flatten(1).float())
        return {
            key: round(value, 5)
            for probe, (accuracy, se) in scores.items()
            for key, value in ((pixels_key(probe), accuracy), (f"{pixels_key(probe)}_se", se))
        }

    def baselines(self, build: Callable[[], nn.Module], seed: int, device: torch.device) -> dict[str, float]:
        """The raw pixels and random networks (mean and sd over `monitor.knn_random_inits` of them) under every
        probe, view and protocol. Each network is built under its own seed inside a forked RNG, so the run's
        random streams are untouched."""
        devices = [device] if device.type == "cuda" else []
        each = []
        for init in range(self.settings.knn_random_inits):
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(derive_seed(seed, RANDOM_INIT_STREAM, init))
                random_net = build().to(device)
            each.append(self.figures(random_net))
        found: dict[str, float] = {"knn_random_inits": len(each)}
        for key in (k for k in each[0] if not k.endswith("_se")):
            mean, sd = mean_sd([figures[key] for figures in each])
            random = key.replace("_acc_", "_acc_random_")
            found |= {random: round(mean, 5), f"{random}_sd": round(sd, 5)}
        return found | self.pixels()
