"""Supervised classification, the task fine-tuning trains through the same loop as pretraining: whole
images normalised, a classifier (model/classifier.py) on them, the cross-entropy against the labels; and
its test metric, accuracy and loss over every held-out image once."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from model.classifier import Classifier, HeadShape, build_classifier
from pipeline.data import Batch, Source
from pipeline.patches import normalize
from train.config import FinetuneConfig, to_dict
from train.engine.loading import eval_batches
from train.methods.registry import pool_shape


def build_model(config: FinetuneConfig, num_classes: int) -> Classifier:
    """The classifier; an arch with an attention pooling sizes it as the config's method section says."""
    m, ft = config.model, config.finetune
    model = build_classifier(
        ft.arch,
        num_classes,
        width=m.width,
        stem=m.stem,
        pool=pool_shape(to_dict(config)),
        frozen=ft.linear_probe,
        head=HeadShape(ft.head, ft.head_hidden),
    )
    return model.to(memory_format=torch.channels_last) if config.speed.channels_last else model


def model_input(images: torch.Tensor, config: FinetuneConfig) -> torch.Tensor:
    x = normalize(images, config.data.mean, config.data.std)
    return x.contiguous(memory_format=torch.channels_last) if config.speed.channels_last else x


class SupervisedTask:
    """The `Task` of fine-tuning (train/methods/base.py)."""

    metric = "train_acc"
    op_stage = "input op"

    def __init__(self, config: FinetuneConfig, num_classes: int) -> None:
        self.config = config
        self.chance = 1.0 / num_classes

    def inputs(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        return model_input(batch.images, self.config), batch.labels

    def loader_patch_spec(self, loader: str) -> None:
        return None  # whole images

    def objective(self, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-entropy, taken in fp32, and the accuracy."""
        images, labels = inputs
        logits = model(images).float()
        loss = F.cross_entropy(logits, labels)
        return loss, (logits.argmax(dim=-1) == labels).float().mean()


@torch.no_grad()
def evaluate(net: nn.Module, source: Source, config: FinetuneConfig, accelerator: Accelerator) -> dict:
    """Accuracy and mean loss over every test image once, summed over ranks (no padded duplicates).

    `net` is the plain module (under any DDP or compile wrapper): ranks may hold different numbers of
    batches, and a DDP forward would wait for its peers.
    """
    was_training = net.training
    net.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # correct, loss sum, count
    per_process = max(1, config.finetune.eval_batch_size // accelerator.num_processes)
    for batch in eval_batches(config, source, per_process, accelerator):
        for entry in batch.skipped:
            print(f"warning: unreadable test image, not counted: {entry}")
        if not len(batch.labels):
            continue
        with accelerator.autocast():
            logits = net(model_input(batch.images, config)).float()
        totals[0] += (logits.argmax(dim=-1) == batch.labels).sum()
        totals[1] += F.cross_entropy(logits, batch.labels, reduction="sum")
        totals[2] += len(batch.labels)
    correct, loss_sum, count = accelerator.reduce(totals, "sum").tolist()
    net.train(was_training)
    return {"test_acc": round(correct / count, 5), "test_loss": round(loss_sum / count, 5), "test_images": int(count)}
