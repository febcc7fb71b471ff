"""python -m train.evaluate: a checkpoint's backbone scored offline by the standard probe (kNN and a linear probe,
batch norm as stored and re-estimated, whole images and a patch network's patch grid), judged against the
strongest of random networks and raw pixels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TINY, pretrain
from train import evaluate
from train.engine.cli import run_cli

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
    assert "| resnet36 (selfie, step 2), BN as stored |" in printed and "| raw pixels |" in printed
    assert "| random resnet36 (mean ± sd of 2), BN re-estimated |" in printed
    assert (
        "patch grid: each 8 px patch of the 32 px image embedded by the backbone (pooled), the 16 vectors " in printed
    )
    assert "concatenated in grid order" in printed and "LogisticRegression(C=1, max_iter=1000)" in printed
    assert printed.rstrip().splitlines()[-1].startswith("verdict: on the whole images the features are ")
    assert "on the patch grid the features are " in printed.rstrip().splitlines()[-1]
    assert json.loads(out.read_text()) == result
    assert (result["fit_images"], result["scored_images"]) == (60, 40)  # 6 and 4 of each of the 10 classes
    assert result["bn"] == "stored" and result["baselines"]["knn_random_inits"] == 2
    for view in ("", "_grid"):
        for probe in ("knn", "linear"):
            for protocol in ("stored", "reestimated"):
                key = f"{probe}{view}_acc_{protocol}"
                assert 0 <= result["pretrained"][key] <= 1 and result["pretrained"][f"{key}_se"] > 0
                random = f"{probe}{view}_acc_random_{protocol}"
                assert 0 <= result["baselines"][random] <= 1 and result["baselines"][f"{random}_sd"] >= 0
        assert 0 <= result["baselines"][f"{'knn' if not view else 'linear'}_acc_pixels"] <= 1
    again = evaluate.main([*args[:-2], "--bn", "reestimated"])  # seeded: the same figures, judged the other way
    assert again["pretrained"] == result["pretrained"] and again["baselines"] == result["baselines"]
    assert again["judged"][0] != result["judged"][0] and "(BN re-estimated; BN as stored" in again["judged"][0]
    assert {str(p): p.stat().st_mtime_ns for p in run.rglob("*")} == before  # the run folder is only read


def test_bad_arguments_are_one_line(run: Path, tmp_path: Path, capsys) -> None:
    cases = [
        ([str(run), "--fit-images", "0"], "--fit-images 0: expected a positive number"),
        ([str(tmp_path / "nowhere")], "no such file or folder"),
        ([str(run), "--json", str(tmp_path / "missing" / "e.json")], "does not exist"),
        ([str(run), "--bn", "recalibrated"], "--bn recalibrated: expected one of stored, reestimated"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(evaluate.main, args)
        error = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(error) == 1 and message in error[0], (args, error)
