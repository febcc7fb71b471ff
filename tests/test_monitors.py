"""The pretraining monitors (train/monitors.py): the clean pretext metric, the kNN monitor and batch-norm
recalibration, on known answers; and their records in a real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from model.resnet_cifar import resnet8
from pipeline.data import open_source
from train import pretrain
from train.arguments import parse_args
from train.config import PretrainConfig
from train.monitors import build_monitors, knn_predict, recalibrate_batch_norm

SMALL = ["--model.width=0.125", "--model.attn_heads=4", "--model.attn_intermediate=32", "--model.attn_layers=1"]


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_knn_on_a_toy_set_with_a_known_answer() -> None:
    """Two classes along two directions: every test point is nearest (by angle) to its own class, whatever
    its length; with k covering both classes, the closer and more similar neighbours outvote the others."""
    train = torch.tensor([[1.0, 0.0], [2.0, 0.1], [3.0, -0.1], [0.0, 1.0], [0.1, 5.0], [-0.1, 2.0]])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    test = torch.tensor([[10.0, 1.0], [0.5, 7.0], [1.0, 0.9], [0.9, 1.0]])
    assert knn_predict(train, labels, test, k=1, temperature=0.07).tolist() == [0, 1, 0, 1]
    assert knn_predict(train, labels, test, k=6, temperature=0.07).tolist() == [0, 1, 0, 1]
    # One far-away neighbour of the other class cannot outvote three near ones of the right class.
    assert knn_predict(train, labels, torch.tensor([[1.0, 0.2]]), k=4, temperature=0.5).tolist() == [0]


def test_batch_norm_recalibration_changes_only_the_running_statistics() -> None:
    torch.manual_seed(0)
    model = resnet8(width=0.25)
    for module in model.modules():  # statistics far from what the images give
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.fill_(5.0)
            module.running_var.fill_(9.0)
            module.num_batches_tracked.fill_(7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8)
    recalibrate_batch_norm(model, images, 8, lambda x: x.float() / 255)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("running_mean", "running_var")) for k in changed)
    assert not model.training and all(m.momentum == 0.1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    first = model.stem[1]  # the first norm sees the stem convolution's output: its stats are the batch's
    with torch.no_grad():
        features = model.stem[0](images.float() / 255)
    torch.testing.assert_close(first.running_mean, features.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_the_clean_metric_cannot_see_the_augmentation(demo_root: Path) -> None:
    """The same network scored by monitors built for two augmentations gives the same clean values, and
    the same again when asked twice (fixed images, fixed masks)."""
    from accelerate import Accelerator

    values = []
    for augment in ("pad_crop_flip", "none"):
        args = [*SMALL, f"--data.path={demo_root}", f"--data.augment={augment}", "--monitor.knn=false"]
        config, _ = parse_args(args, PretrainConfig, {}, "")
        method = pretrain.validate(config)(config, torch.device("cpu"))
        torch.manual_seed(0)
        net = pretrain.build_model(config)
        monitors = build_monitors(config, method, net, open_source(demo_root), Accelerator(cpu=True))
        values += [monitors.clean(), monitors.clean()]
    assert all(v == values[0] for v in values) and set(values[0]) == {"clean_loss", "clean_patch_acc"}


def test_a_run_logs_clean_and_knn_figures_and_the_random_floor(tmp_path: Path, demo_root: Path, capsys) -> None:
    run = tmp_path / "run"
    args = [*SMALL, "--data.workers=0", "--batch-size=8", "--train.cpu_threads=1", "--steps", "4"]
    args += ["--train.log_every=2", "--train.checkpoint_every=4", "--monitor.knn_train_images=64"]
    pretrain.main([*args, "--monitor.knn_test_images=32", "--data", str(demo_root), "--out", str(run)])
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert records[0] == {"step": 0, "knn_acc_random": records[0]["knn_acc_random"]}
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [2, 4] and all("clean_patch_acc" in r and "clean_loss" in r for r in steps)
    assert "knn_acc" not in steps[0] and 0 <= steps[1]["knn_acc"] <= 1  # kNN at the checkpoint only
    assert "clean_patch_acc" in capsys.readouterr().out.splitlines()[-1]
    quiet = tmp_path / "quiet"
    pretrain.main(
        [*args, "--monitor.clean=false", "--monitor.knn=false", "--data", str(demo_root), "--out", str(quiet)]
    )
    assert not any("clean" in line or "knn" in line for line in (quiet / "log.jsonl").read_text().splitlines())
