"""The clean pretext metric (train/evaluation/clean_metric.py): batch-norm statistics of the scored batches, standard
errors over groups, and Selfie's context ablation on toy models where the context is known to matter and
where it cannot."""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from model.selfie import patch_selection_loss
from pipeline.data import open_source
from train.config import PretrainConfig
from train.config.command_line import parse_args
from train.evaluation.clean_metric import CleanPretext, log_key
from train.evaluation.estimates import weighted_mean_se
from train.evaluation.monitors import whole_images
from train.methods import stage_class
from train.stages import pretraining as pretrain

SMALL = ["--model.width=0.125", "--selfie.attn_heads=4", "--selfie.attn_intermediate=32", "--selfie.attn_layers=1"]
GROUPS = ["--monitor.clean_images=8", "--monitor.clean_masks=2", "--monitor.clean_chunk=4"]


def selfie_method(extra: list[str] = ()):
    config, _ = parse_args([*SMALL, *GROUPS, *extra], stage_class(PretrainConfig), {}, "")
    return config, pretrain.validate(config)(config, torch.device("cpu"))


def clean_of(net: nn.Module, config, method, demo_root: Path) -> CleanPretext:
    images, _ = whole_images(open_source(demo_root, "test"), 32, config.monitor.clean_images, torch.device("cpu"))
    return CleanPretext(method, net, images, config.monitor, config.train.seed, Accelerator(cpu=True))


def test_the_clean_metric_uses_each_batchs_statistics_and_changes_nothing(demo_root: Path) -> None:
    """Stale running statistics (as a few steps leave them) change nothing: the figures are those of the
    same weights with any other running statistics, finite, and the model is left exactly as it was."""
    config, method = selfie_method()
    torch.manual_seed(0)
    net = pretrain.build_model(config).train()
    fresh = clean_of(net, config, method, demo_root)()
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.fill_(3.0)
            module.running_var.fill_(1e-3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    stale = clean_of(net, config, method, demo_root)()
    assert stale == fresh and all(v is None or torch.isfinite(torch.tensor(v)) for v in stale.values())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()) and net.training
    groups = clean_of(net, config, method, demo_root).groups()
    assert [len(g) for g in groups] == [4, 4, 4, 4]  # 8 images x 2 masks in groups of 4
    assert stale["clean_patch_acc_se"] is not None and stale["clean_loss_se"] > 0


def test_standard_error_over_groups() -> None:
    values = [0.2, 0.4, 0.6, 0.8]
    mean, se = weighted_mean_se(values, [5, 5, 5, 5])
    assert abs(mean - 0.5) < 1e-12 and abs(se - statistics.stdev(values) / 2) < 1e-12
    assert weighted_mean_se([0.3], [7]) == (0.3, None)
    assert abs(weighted_mean_se([0.0, 1.0], [3, 1])[0] - 0.25) < 1e-12
    assert log_key("acc", "patch_acc") == "clean_patch_acc"
    assert log_key("u_zero_acc", "patch_acc") == "clean_u_zero_patch_acc" and log_key("loss", "x") == "clean_loss"


class ToySelfie(nn.Module):
    """Patches are their own features. `knows`: the context state is the image's masked patches in slot
    order, so the queries point at the right patch of *this* image (the context decides everything).
    Otherwise the paper's formula with u in dimensions no patch feature has: every u.h_k is 0, so u
    varies over images and cannot change any logit."""

    def __init__(self, knows: bool, positions: torch.Tensor) -> None:
        super().__init__()
        self.knows, self.table = knows, positions

    def forward_features(self, patches: torch.Tensor) -> torch.Tensor:
        return patches.flatten(1)

    def logit_scale(self) -> None:
        return None

    def encode_context(self, features: torch.Tensor, context_pos: torch.Tensor):
        batch, num_context = context_pos.shape
        context = features[: batch * num_context].view(batch, num_context, -1)
        masked = features[batch * num_context :].view(batch, -1, features.shape[1])
        if self.knows:
            return masked.clone(), masked
        return torch.cat([torch.zeros_like(context[:, 0, :16]), context[:, 0, 16:]], dim=1), masked

    def queries(self, state: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.knows:  # slot j's query is the patch of masked slot j (asked for all 16 slots: repeated)
            return state.repeat(1, 4, 1)[:, : positions.shape[1]]
        return state.unsqueeze(1) + self.table[positions]


def toy_inputs(knows: bool) -> tuple[torch.Tensor, ...]:
    """6 images of 16 "patches" (32-d features), 12 context and 4 masked; for the position toy a masked
    patch is its position's one-hot (times 2) in the first 16 dims, 0 in the rest."""
    generator = torch.Generator().manual_seed(0)
    batch, context = 6, 12
    perm = torch.stack([torch.randperm(16, generator=generator) for _ in range(batch)])
    table = torch.cat([2 * torch.eye(16), torch.zeros(16, 16)], dim=1)
    features = torch.randn(batch * 16, 32, generator=generator)
    if not knows:
        features[batch * context :] = table[perm[:, context:]].reshape(-1, 32)
    return features.view(-1, 2, 4, 4), perm[:, :context], perm[:, context:], table


def test_the_ablation_tells_a_context_that_matters_from_one_that_cannot() -> None:
    _, method = selfie_method()
    *inputs, table = toy_inputs(knows=True)
    matters = method.clean_probe(ToySelfie(True, table), tuple(inputs))
    assert matters["acc"] == 1.0 and matters["u_rolled_acc"] < 0.6 and matters["u_zero_acc"] == 0.25
    assert matters["query_spread"] > 0.5
    *inputs, table = toy_inputs(knows=False)
    model = ToySelfie(False, table)
    cannot = method.clean_probe(model, tuple(inputs))
    reference = patch_selection_loss(table[inputs[2]], inputs[0].flatten(1)[-24:].view(6, 4, 32))
    assert cannot["acc"] == reference.accuracy == 1.0
    assert cannot["u_rolled_acc"] == cannot["u_zero_acc"] == cannot["acc"]  # no gap...
    assert cannot["query_spread"] > 0.1  # ...though u differs between images


class ImageMeanTask:
    """A task whose figure depends on the images only: every mask of an image gives the same value."""

    metric = "toy_acc"

    def inputs(self, batch, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        return (batch.images,)

    def clean_probe(self, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        return {"acc": inputs[0].float().mean() / 255}


def test_the_error_counts_groups_of_images_not_masks_of_the_same_images() -> None:
    images = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    config, _ = parse_args(["--monitor.clean_images=12", "--monitor.clean_masks=3", "--monitor.clean_chunk=4"],
                           stage_class(PretrainConfig), {}, "")  # fmt: skip
    clean = CleanPretext(ImageMeanTask(), nn.Linear(1, 1), images, config.monitor, 0, Accelerator(cpu=True))
    record = clean()
    groups = [(images[i : i + 4].float().mean() / 255).item() for i in (0, 4, 8)]
    mean, se = weighted_mean_se(groups, [12, 12, 12])  # three independent groups, each under three masks
    assert record["clean_toy_acc"] == round(mean, 5) and record["clean_toy_acc_se"] == round(se, 5)
