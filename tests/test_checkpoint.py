"""Checkpoints (train/engine/checkpoint.py, train/engine/checkpoint_schema.py): what this trainer writes loads with
weights_only=True; a file that would run code, a tampered field, non-finite weights or the old format is
one line and exit 2 through every entry point that reads checkpoints, with nothing run and nothing written."""

from __future__ import annotations

import builtins
import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import TINY, pretrain
from train import export
from train.config import ConfigError
from train.engine.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from train.engine.cli import run_cli
from train.methods.selfie import MOVED_KEYS
from train.stages import finetuning as finetune
from train.stages import pretraining as pretrain_module
from train.upgrade_checkpoint import main as upgrade_main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("keep_threads")]


class Marker:
    """Unpickling it creates the file `path`: what a hostile checkpoint or data file would do, harmlessly."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable, tuple[str, str]]:
        return builtins.open, (str(self.path), "w")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, demo_root: Path) -> Path:
    folder = tmp_path_factory.mktemp("checkpoint") / "run"
    result = pretrain([*TINY, "--steps", "2", "--data", str(demo_root), "--out", str(folder)], folder.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    return folder


def newest(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("*.pt"))[-1]


def refused(main: Callable, args: list[str], capsys) -> str:
    """The one line `main` ends with, asserting exit status 2."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, args)
    error = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(error) == 1, error
    return error[0]


def entry_points(checkpoint: Path, demo_root: Path, tmp_path: Path) -> dict[str, tuple[Callable, list[str]]]:
    """How each entry point reads `checkpoint`: export, fine-tuning's --init, pretraining's --resume (the
    file placed as the newest checkpoint of a run folder)."""
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True, exist_ok=True)
    (resumed / "checkpoints" / "step_00000009.pt").write_bytes(checkpoint.read_bytes())
    data = ["--data", str(demo_root)]
    return {
        "export": (export.main, [str(checkpoint), "--format", "torch", "--out", str(tmp_path / "p.pt")]),
        "init": (finetune.main, [*TINY, *data, "--init", str(checkpoint), "--out", str(tmp_path / "ft")]),
        "resume": (pretrain_module.main, [*TINY, *data, "--out", str(resumed), "--resume"]),
    }


def test_what_a_run_writes_loads_with_weights_only(run: Path) -> None:
    state = torch.load(newest(run), weights_only=True)
    assert state["format"] == CHECKPOINT_FORMAT and state["step"] == 2
    assert isinstance(state["rng"][0]["numpy"]["keys"], torch.Tensor)


@pytest.mark.parametrize("entry", ["export", "init", "resume"])
def test_a_checkpoint_that_would_run_code_runs_nothing(
    entry: str, tmp_path: Path, demo_root: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    marker, hostile = tmp_path / "marker", tmp_path / "hostile.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "kind": "selfie_pretrain", "payload": Marker(marker)}, hostile)
    main, args = entry_points(hostile, demo_root, tmp_path)[entry]
    line = refused(main, args, capsys)
    assert "refused" in line and "not a checkpoint of this trainer" in line and "upgrade" not in line, line
    assert not marker.exists()
    assert not (tmp_path / "p.pt").exists() and not (tmp_path / "ft").exists()


def tampered(state: dict[str, Any], change: str) -> dict[str, Any]:
    state = copy.deepcopy(state)
    if change == "config absent":
        del state["config"]
    elif change == "model not a dict":
        state["model"] = [1, 2]
    elif change == "config.model null":
        state["config"]["model"] = None
    elif change == "step a string":
        state["step"] = "3"
    elif change == "kind of another stage":
        state["kind"] = "finetune"
    return state


FIELD_OF = {
    "config absent": "field config is missing",
    "model not a dict": "field model is a list",
    "config.model null": "field config.model is None",
    "step a string": "field step is a str '3'",
    "kind of another stage": "field config.finetune is missing",
}


@pytest.mark.parametrize("change", list(FIELD_OF))
def test_a_tampered_field_is_one_line_naming_it(
    change: str, run: Path, tmp_path: Path, demo_root: Path, capsys
) -> None:
    path = tmp_path / "tampered.pt"
    torch.save(tampered(torch.load(newest(run), weights_only=True), change), path)
    for name, (main, args) in entry_points(path, demo_root, tmp_path).items():
        line = refused(main, args, capsys)
        assert str(path) in line or "step_00000009.pt" in line, (name, line)
        assert FIELD_OF[change] in line, (name, line)
    assert not (tmp_path / "ft").exists() and not (tmp_path / "p.pt").exists()


def test_a_checkpoint_of_another_stage_is_named(run: Path, tmp_path: Path, demo_root: Path, capsys) -> None:
    state = torch.load(newest(run), weights_only=True)
    path = tmp_path / "rotnet.pt"
    torch.save(state | {"kind": "rotnet_pretrain"}, path)
    line = refused(*entry_points(path, demo_root, tmp_path)["resume"], capsys)
    assert "a 'rotnet_pretrain' checkpoint, not a 'selfie_pretrain' one" in line
    torch.save({"format": 1}, path)  # what once read "a None checkpoint"
    line = refused(*entry_points(path, demo_root, tmp_path)["init"], capsys)
    assert f"{path}: a checkpoint of format 1" in line and "None" not in line


def test_non_finite_weights_are_refused_before_anything_is_written(
    run: Path, tmp_path: Path, demo_root: Path, capsys
) -> None:
    state = torch.load(newest(run), weights_only=True)
    name = next(k for k, v in state["model"].items() if v.is_floating_point() and v.numel() > 1)
    state["model"][name].view(-1)[0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(state, path)
    for entry in ("export", "init"):
        line = refused(*entry_points(path, demo_root, tmp_path)[entry], capsys)
        assert f"tensor {name} holds 1 non-finite values" in line, line
    assert not (tmp_path / "p.pt").exists() and not (tmp_path / "ft").exists()


def test_format_1_is_refused_with_the_command_that_converts_it(run: Path, tmp_path: Path) -> None:
    state = torch.load(newest(run), weights_only=True)
    old = copy.deepcopy(state) | {"format": 1}
    for rank in old["rng"]:  # format 1 held numpy's state as np.random.get_state() gives it
        n = rank["numpy"]
        rank["numpy"] = (n["algorithm"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], 0.0)
    path = tmp_path / "step_00000002.pt"
    torch.save(old, path)
    with pytest.raises(ConfigError, match=f"convert it: python -m train.upgrade_checkpoint {path}"):
        load_checkpoint(path)
    upgrade_main([str(tmp_path)])
    upgraded = load_checkpoint(path)
    assert torch.equal(upgraded["rng"][0]["numpy"]["keys"], state["rng"][0]["numpy"]["keys"])
    assert all(torch.equal(upgraded["model"][k], v) for k, v in state["model"].items())


def test_an_export_whose_tensors_are_under_another_prefix_is_one_line(run: Path, tmp_path: Path, capsys) -> None:
    state = torch.load(newest(run), weights_only=True)
    state["model"] = {"module." + k: v for k, v in state["model"].items()}
    path = tmp_path / "prefixed.pt"
    torch.save(state, path)
    line = refused(export.main, [str(path), "--format", "torch", "--out", str(tmp_path / "p.pt")], capsys)
    assert "backbone does not load: tensors" in line and "missing (e.g." in line, line


def test_a_run_folder_in_the_old_key_layout_resumes_bit_exact(tmp_path: Path, demo_root: Path) -> None:
    """A run whose config.yaml holds Selfie's keys where the shared model section held them (before issue 24)
    resumes from it, each key in its new place, and reaches the weights of a run never stopped."""
    common = [*TINY, "--data", str(demo_root), "--checkpoint.every=2"]
    straight, old = tmp_path / "straight", tmp_path / "old"
    assert pretrain([*common, "--steps", "4", "--out", str(straight)], tmp_path).returncode == 0
    assert pretrain([*common, "--steps", "2", "--out", str(old)], tmp_path).returncode == 0
    saved = yaml.safe_load((old / "config.yaml").read_text())
    for key in MOVED_KEYS.values():
        saved["model"][key.split(".")[1]] = saved["selfie"].pop(key.split(".")[1])
    (old / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    assert saved["model"]["attn_heads"] == 4  # TINY's, not the default: the resume must read it from there
    resumed = pretrain(["--data", str(demo_root), "--out", str(old), "--resume", "--steps", "4"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = (torch.load(run / "checkpoints" / "step_00000004.pt", weights_only=True)["model"] for run in (straight, old))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
