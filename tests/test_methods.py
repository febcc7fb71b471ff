"""A pretext method is one class and one `register` call: this module defines a toy method with the
required core alone (no presentation, no config section), nothing else of the project knows it, and it
trains through train/pretrain.py with every loader, resumes bit for bit, and initialises fine-tuning
through train/finetune.py; a second toy has its own config section and flag."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from model.view_classifier import build_view_classifier
from pipeline.loaders import LOADERS
from pipeline.patches import normalize
from tests.conftest import SMALL_MONITORS, TINY, demo_data_for
from train.config import PretrainConfig, load_config, to_dict
from train.methods import METHODS, PretextMethod, register, stage_class
from train.stages import finetuning as finetune
from train.stages import pretraining as pretrain

pytestmark = pytest.mark.slow


WAYS = 3  # the core toy's rolls per image


def roll_views(images: torch.Tensor, ways: int, config: PretrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image rolled horizontally by 0, 1/ways, 2/ways ... of its width, and which roll each view is."""
    size = images.shape[-1]
    x = normalize(images, config.data.mean, config.data.std)
    views = torch.cat([torch.roll(x, k * size // ways, dims=-1) for k in range(ways)])
    return views, torch.arange(ways, device=x.device).repeat_interleave(len(x))


class RollMethod(PretextMethod):
    """The required core alone: which of three horizontal rolls was applied to the image."""

    name = "toy_roll"
    metric = "roll_acc"
    chance = 1 / WAYS

    @classmethod
    def build_model(cls, config: PretrainConfig) -> torch.nn.Module:
        m = config.model
        return build_view_classifier(WAYS, False, m.backbone, m.width, m.stem)

    def inputs(self, batch, generator) -> tuple[torch.Tensor, ...]:
        return roll_views(batch.images, WAYS, self.config)


class ConfiguredRoll(PretextMethod):
    """The toy with its own config section and stable flag: --ways, the rolls to tell apart."""

    name = "toy_roll_ways"
    metric = "roll_acc"
    section = "toy_roll"
    flags = {"--ways": ("toy_roll.ways", int, "toy: number of rolls to tell apart")}

    @dataclass
    class Settings:
        ways: int = 2  # rolls per image: by 0, 1/ways, 2/ways ... of its width

    def __init__(self, config: PretrainConfig, device: torch.device) -> None:
        super().__init__(config, device)
        self.chance = 1.0 / config.toy_roll.ways

    @classmethod
    def build_model(cls, config: PretrainConfig) -> torch.nn.Module:
        m = config.model
        return build_view_classifier(config.toy_roll.ways, False, m.backbone, m.width, m.stem)

    def inputs(self, batch, generator) -> tuple[torch.Tensor, ...]:
        return roll_views(batch.images, self.config.toy_roll.ways, self.config)


register(RollMethod)
register(ConfiguredRoll)

TOY = [*TINY, *SMALL_MONITORS, "--method", "toy_roll", "--model.backbone=resnet8"]


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the runs set one thread (--speed.cpu_threads=1)


def log_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_the_core_alone_gets_the_presentation_defaults() -> None:
    config = load_config(stage_class(PretrainConfig), "demo", {"method": "toy_roll"})
    method = RollMethod(config, torch.device("cpu"))
    assert RollMethod.table_label(config) == "toy_roll" and method.describe() == "chance 33.3%"
    assert method.accuracy_name == "pretext" and method.op_stage == "input op"
    assert method.pictures(None, torch.device("cpu")) is None


def test_whether_a_method_is_a_patch_network_is_one_typed_line_its_backbone_input_agrees_with() -> None:
    """`patch_network` (default False) decides the probes' patch-grid view; a method that sets it says in
    `backbone_input` that its backbone was trained on patches, and one that does not, on whole images."""
    assert RollMethod.patch_network is False
    for name, method in METHODS.items():
        config = to_dict(load_config(stage_class(PretrainConfig), "demo", {"method": name}))
        assert isinstance(method.patch_network, bool)
        assert method.patch_network == (method.backbone_input(config)[0] == "patches"), name
    assert any(method.patch_network for method in METHODS.values())


def test_the_registry_gives_a_method_its_choice_section_and_flag(tmp_path: Path, demo_root: Path) -> None:
    config = load_config(stage_class(PretrainConfig), "demo", {"method": "toy_roll_ways", "toy_roll.ways": 5})
    assert "toy_roll_ways" in METHODS and config.toy_roll.ways == 5
    assert pretrain.stable_flags()["--ways"] == ("toy_roll.ways", int, "toy: number of rolls to tell apart")
    run = tmp_path / "run"
    argv = [*TOY, "--method", "toy_roll_ways", "--ways", "5", "--data", str(demo_root), "--out", str(run)]
    pretrain.main([*argv, "--steps", "1"])
    assert [r["chance_acc"] for r in log_of(run) if "loss" in r] == [pytest.approx(1 / 5, abs=1e-5)]
    state = torch.load(run / "checkpoints" / "step_00000001.pt", weights_only=True)
    assert state["config"]["toy_roll"] == {"ways": 5} and state["encoder_prefix"] == "backbone."


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_the_toy_trains_three_steps_with_every_loader(tmp_path: Path, demo_root: Path, loader: str) -> None:
    run = tmp_path / "run"
    data = demo_data_for(loader, demo_root)
    result = pretrain.main([*TOY, "--loader", loader, "--data", str(data), "--out", str(run), "--steps", "3"])
    records = [r for r in log_of(run) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3] and result["step"] == 3
    assert all(r["chance_acc"] == pytest.approx(1 / 3, abs=1e-5) and 0 <= r["roll_acc"] <= 1 for r in records)
    state = torch.load(run / "checkpoints" / "step_00000003.pt", weights_only=True)
    assert state["kind"] == "toy_roll_pretrain" and state["pool_prefix"] is None
    assert not (run / "pictures").exists()  # the toy draws no pictures, and the loop asks for none
    assert (run / "curves.png").stat().st_size > 0


def test_the_toy_resumes_bit_for_bit_and_initialises_fine_tuning(tmp_path: Path, demo_root: Path) -> None:
    common = [
        *TOY,
        "--data",
        str(demo_root),
        "--steps",
        "4",
        "--checkpoint.every=2",
        "--checkpoint.keep=5",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    pretrain.main([*common, "--out", str(straight)])
    pretrain.main([*common, "--out", str(resumed)])
    (resumed / "checkpoints" / "step_00000004.pt").unlink()  # as if killed after step 4's log record
    pretrain.main([*common, "--out", str(resumed), "--resume"])
    a, b = (torch.load(r / "checkpoints" / "step_00000004.pt", weights_only=True)["model"] for r in (straight, resumed))
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert [r["step"] for r in log_of(resumed) if "loss" in r] == [1, 2, 3, 4]

    tuned = tmp_path / "tuned"
    args = [*TINY, "--data", str(demo_root), "--init", str(straight), "--arch", "resnet8", "--linear-probe"]
    summary = finetune.main([*args, "--steps", "2", "--seeds", "1", "--out", str(tuned)])
    assert summary["init_method"] == "toy_roll" and 0 <= summary["accuracy"]["mean"] <= 100
    fine = torch.load(tuned / "seed_0" / "checkpoints" / "step_00000002.pt", weights_only=True)["model"]
    statistics = ("running_mean", "running_var", "num_batches_tracked")  # a probe recalibrates these first
    backbone = [name for name in fine if name.startswith("backbone.") and not name.endswith(statistics)]
    assert backbone and all(torch.equal(fine[name], a[name]) for name in backbone)  # frozen, as pretrained
