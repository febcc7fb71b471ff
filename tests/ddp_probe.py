"""Run by tests/test_pretrain.py under `torchrun --nproc_per_node 2`: trains through the real
`train.stages.pretraining.main` (its eager step, train/engine/step.py), recording which images each rank read and its
final parameters."""

import sys
from pathlib import Path

import torch

import train.engine.step as step
import train.stages.pretraining as pretrain

seen: list[list[int]] = []
holder: dict = {}
original_step = step.train_step


def recording_step(parts, batches, *args, **kwargs):
    seen.extend(batch.indices.tolist() for batch in batches)
    holder["model"] = parts.model
    return original_step(parts, batches, *args, **kwargs)


step.train_step = recording_step  # the eager step every run calls
out = Path(sys.argv[1])
result = pretrain.main(sys.argv[2:])
rank = int(__import__("os").environ["RANK"])
model = holder["model"]
model = getattr(model, "module", model)
torch.save(
    {
        "seen": seen,
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "world": int(__import__("os").environ["WORLD_SIZE"]),
    },
    out / f"rank{rank}.pt",
)
