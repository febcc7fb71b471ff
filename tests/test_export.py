"""Backbone export (train/export.py): round trips into this project's model, timm's names checked against a
pinned list of timm's own (and against timm itself where it imports), bad input refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.backbones import build_backbone
from model.timm_names import from_timm
from tests.conftest import ROOT, TINY, pretrain
from train import export
from train.engine.cli import run_cli

pytestmark = pytest.mark.slow
TIMM_NAMES = json.loads((ROOT / "tests" / "timm_resnetv2_50.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, demo_root: Path) -> dict[str, Path]:
    """A Selfie run (ResNet-36 P at TINY width) and a RotNet run of a full ResNet-50 with the imagenet stem."""
    folder = tmp_path_factory.mktemp("export")
    found = {}
    for name, flags in (
        ("selfie", []),
        ("rotnet50", ["--method", "rotnet", "--model.backbone=resnet50", "--model.width=1", "--model.stem=imagenet"]),
    ):
        found[name] = folder / name
        result = pretrain([*TINY, *flags, "--steps", "1", "--data", str(demo_root), "--out", str(found[name])], folder)
        assert result.returncode == 0, result.stderr[-2000:]
    return found


def newest_model(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(sorted((run / "checkpoints").glob("*.pt"))[-1], weights_only=True)["model"]


@pytest.mark.parametrize("format_name", ["torch", "safetensors"])
def test_an_export_loads_back_into_the_backbone_and_computes_the_same(runs, tmp_path: Path, format_name: str) -> None:
    out = tmp_path / f"p.{'pt' if format_name == 'torch' else 'safetensors'}"
    info = export.main([str(runs["selfie"]), "--format", format_name, "--out", str(out)])
    if format_name == "torch":
        tensors = torch.load(out, weights_only=True)
    else:
        from safetensors.torch import load_file

        tensors = load_file(out)
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    assert sidecar == info and (info["backbone"], info["stem"], info["method"], info["step"]) == (
        "resnet36",
        "small",
        "selfie",
        1,
    )
    original = {
        k.removeprefix("patch_net."): v for k, v in newest_model(runs["selfie"]).items() if k.startswith("patch_net.")
    }
    assert tensors.keys() == original.keys() and all(torch.equal(tensors[k], original[k]) for k in tensors)
    mine, loaded = build_backbone("resnet36", 0.125, "small").eval(), build_backbone("resnet36", 0.125, "small").eval()
    mine.load_state_dict(original)
    loaded.load_state_dict(tensors)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(mine.forward_features(x), loaded.forward_features(x))


def test_the_timm_format_has_timms_names_and_shapes_and_maps_back(runs, tmp_path: Path) -> None:
    out = tmp_path / "r50.pth"
    info = export.main([str(runs["rotnet50"]), "--format", "timm", "--out", str(out)])
    tensors = torch.load(out, weights_only=True)
    pinned = {name: tuple(shape) for name, shape in TIMM_NAMES["state_dict"]}
    assert {k: tuple(v.shape) for k, v in tensors.items()} == pinned
    assert {k: v for k, v in info["timm"].items() if k != "pretrained_cfg"} == {
        "model": "resnetv2_50",
        "num_classes": 0,
        "not_filled": [],
    }
    assert info["timm"]["pretrained_cfg"] == {
        "input_size": [3, 32, 32],  # RotNet trains the backbone on whole images of data.image_size
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "interpolation": "bilinear",
        "crop_pct": 0.875,
        "num_classes": 0,
    }
    backbone = build_backbone("resnet50", 1.0, "imagenet").eval()
    backbone.load_state_dict(from_timm(tensors))
    original = build_backbone("resnet50", 1.0, "imagenet").eval()
    original.load_state_dict({k.removeprefix("backbone."): v for k, v in newest_model(runs["rotnet50"]).items()
                              if k.startswith("backbone.")})  # fmt: skip
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(backbone.forward_features(x), original.forward_features(x))


def test_the_sidecar_records_what_the_backbone_was_fed(runs, tmp_path: Path) -> None:
    """Selfie's P saw normalised 8-px patches of 32-px images; a loader that feeds it otherwise is wrong."""
    info = export.main([str(runs["selfie"]), "--format", "torch", "--out", str(tmp_path / "p.pt")])
    assert info["preprocessing"] == {
        "input": "patches",
        "input_size": [3, 8, 8],
        "image_size": 32,
        "pixels": "RGB, scaled to 0..1, then (x - mean) / std per channel",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "patch_size": 8,
        "eval_resize": "the image at 32 px, cut into 8 x 8 patches",
    }


@pytest.mark.timm
def test_timm_takes_the_exported_preprocessing(runs, tmp_path: Path) -> None:
    timm = pytest.importorskip("timm", reason="timm needs torchvision, which does not install beside this torch")
    out = tmp_path / "r50.pth"
    export.main([str(runs["rotnet50"]), "--format", "timm", "--out", str(out)])
    cfg = json.loads(out.with_name(out.name + ".json").read_text())["timm"]["pretrained_cfg"]
    model = timm.create_model("resnetv2_50", num_classes=0, pretrained_cfg_overlay=cfg)
    resolved = timm.data.resolve_data_config({}, model=model)
    for key in ("mean", "std", "input_size"):  # timm keeps what it is given (lists from JSON) or its tuples
        assert tuple(resolved[key]) == tuple(cfg[key]), key
    assert resolved["crop_pct"] == cfg["crop_pct"] and resolved["interpolation"] == "bilinear"


@pytest.mark.timm
def test_timm_itself_loads_the_export_and_computes_the_same_features(runs, tmp_path: Path) -> None:
    timm = pytest.importorskip("timm", reason="timm needs torchvision, which does not install beside this torch")
    out = tmp_path / "r50.safetensors"
    export.main([str(runs["rotnet50"]), "--format", "timm", "--out", str(out)])
    model = timm.create_model("resnetv2_50", num_classes=0, checkpoint_path=str(out)).eval()
    ours = build_backbone("resnet50", 1.0, "imagenet").eval()
    ours.load_state_dict(from_timm(dict(model.state_dict())))
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model.forward_features(x), ours.forward_features(x))


def test_bad_exports_are_one_line_and_write_nothing(runs, tmp_path: Path, capsys) -> None:
    cases = [
        ([str(runs["selfie"]), "--format", "timm"], "timm's resnetv2_50 is ResNet v2 at width 1"),
        ([str(tmp_path / "nowhere"), "--format", "torch"], "no such file or folder"),
        ([str(runs["selfie"]), "--format", "torch", "--seed", "0"], "not a fine-tuning run folder"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(export.main, [*args, "--out", str(tmp_path / "out.pt")])
        error = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(error) == 1 and message in error[0], (args, error)
    assert not list(tmp_path.glob("out*"))
