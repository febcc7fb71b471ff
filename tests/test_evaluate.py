"""python -m train.evaluate: a checkpoint's backbone scored offline by kNN and a linear probe, beside random
networks and raw pixels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY, pretrain
from train import evaluate
from train.engine.cli import run_cli
from train.evaluation import offline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, demo_root: Path) -> Path:
    folder = tmp_path_factory.mktemp("evaluate")
    result = pretrain([*TINY, "--steps", "2", "--data", str(demo_root), "--out", str(folder / "run")], folder)
    assert result.returncode == 0, result.stderr[-2000:]
    return folder / "run"


def test_a_run_is_scored_against_random_networks_and_pixels(run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval.json"
    before = {str(p): p.stat().st_mtime_ns for p in run.rglob("*")}
    args = [str(run), "--fit-images", "60", "--test-images", "40", "--random-inits", "2", "--json", str(out)]
    result = evaluate.main(args)
    printed = capsys.readouterr().out
    assert "| resnet36 (selfie, step 2) |" in printed and "| random resnet36 (mean ± sd of 2) |" in printed
    assert "| raw pixels |" in printed and "gain over random: kNN" in printed
    assert json.loads(out.read_text()) == result
    assert (result["fit_images"], result["scored_images"]) == (60, 40)  # 6 and 4 of each of the 10 classes
    for figures in (result["pretrained"], result["pixels"]):
        assert 0 <= figures["knn"] <= 1 and 0 <= figures["linear"] <= 1 and figures["knn_se"] > 0
    assert result["random"]["inits"] == 2 and result["random"]["knn_sd"] >= 0
    again = evaluate.main(args[:-2])  # seeded: the same figures
    assert again["pretrained"] == result["pretrained"] and again["random"] == result["random"]
    assert {str(p): p.stat().st_mtime_ns for p in run.rglob("*")} == before  # the run folder is only read


def test_the_linear_probe_separates_what_is_separable() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 4
    features = torch.randn(200, 8, generator=generator) + 4 * torch.nn.functional.one_hot(labels, 8).float()
    accuracy, se = offline.linear_probe(features[:100], labels[:100], features[100:], labels[100:])
    assert accuracy > 0.95 and se < 0.03


def test_bad_arguments_are_one_line(run: Path, tmp_path: Path, capsys) -> None:
    cases = [
        ([str(run), "--fit-images", "0"], "--fit-images 0: expected a positive number"),
        ([str(tmp_path / "nowhere")], "no such file or folder"),
        ([str(run), "--json", str(tmp_path / "missing" / "e.json")], "does not exist"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(evaluate.main, args)
        error = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(error) == 1 and message in error[0], (args, error)
