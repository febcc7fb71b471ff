"""The pretraining monitors (train/evaluation/monitors.py) as a run builds them, and their records and final line in
a real run (their parts: tests/test_clean_metric.py, tests/test_knn.py, tests/test_batch_norm.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.data import open_source
from train.config import ConfigError, PretrainConfig
from train.config.command_line import parse_args
from train.evaluation.monitors import build_monitors
from train.methods import stage_class
from train.stages import pretraining as pretrain

SMALL = ["--model.width=0.125", "--selfie.attn_heads=4", "--selfie.attn_intermediate=32", "--selfie.attn_layers=1"]
SMALL_CLEAN = ["--monitor.clean_images=8", "--monitor.clean_chunk=4", "--monitor.knn_random_inits=2"]
ABLATION = ("u_rolled_", "u_zero_")


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_the_clean_metric_cannot_see_the_augmentation(demo_root: Path) -> None:
    """The same network scored by monitors built for two augmentations gives the same clean values, and
    the same again when asked twice (fixed images, fixed masks)."""
    from accelerate import Accelerator

    values = []
    for augment in ("pad_crop_flip", "none"):
        args = [*SMALL, *SMALL_CLEAN, f"--data.path={demo_root}", f"--data.augment={augment}", "--monitor.knn=false"]
        config, _ = parse_args(args, stage_class(PretrainConfig), {}, "")
        method = pretrain.validate(config)(config, torch.device("cpu"))
        torch.manual_seed(0)
        net = pretrain.build_model(config)
        monitors = build_monitors(config, method, net, open_source(demo_root), Accelerator(cpu=True))
        values += [monitors.clean(), monitors.clean()]
    figures = {"loss", "patch_acc", "u_rolled_patch_acc", "u_zero_patch_acc", "query_spread", "query_norm"}
    assert all(v == values[0] for v in values)
    assert set(values[0]) == {f"clean_{key}{se}" for key in figures for se in ("", "_se")}


def test_a_run_logs_clean_and_knn_figures_with_errors_and_the_baselines(
    tmp_path: Path, demo_root: Path, capsys
) -> None:
    run = tmp_path / "run"
    args = [*SMALL, *SMALL_CLEAN, "--data.workers=0", "--batch-size=8", "--speed.cpu_threads=1", "--steps", "4"]
    args += ["--log.every=2", "--checkpoint.every=4", "--monitor.knn_train_images=64"]
    pretrain.main([*args, "--monitor.knn_test_images=32", "--data", str(demo_root), "--out", str(run)])
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    probes = [f"{p}{v}" for p in ("knn", "linear") for v in ("", "_grid")]  # Selfie's P: a patch network
    random = {f"{p}_acc_random_{b}{sd}" for p in probes for b in ("stored", "reestimated") for sd in ("", "_sd")}
    pixels = {f"{p}_acc_pixels{se}" for p in ("knn", "linear") for se in ("", "_se")}
    aliases = {"knn_acc_random", "knn_acc_random_sd"}  # the whole-image kNN under monitor.bn (stored)
    assert set(records[0]) == {"step", "knn_random_inits"} | random | pixels | aliases
    assert records[0]["knn_random_inits"] == 2 and records[0]["knn_acc_random_sd"] >= 0
    assert records[0]["knn_acc_random"] == records[0]["knn_acc_random_stored"]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [2, 4]
    for record in steps:
        for key in ("clean_loss", "clean_patch_acc", *(f"clean_{a}patch_acc" for a in ABLATION)):
            assert 0 <= record[key + "_se"] and math.isfinite(record[key])
    assert "knn_acc" not in steps[0] and 0 <= steps[1]["knn_acc"] <= 1  # the probes at the checkpoint only
    assert steps[1]["knn_acc_se"] == pytest.approx(
        math.sqrt(steps[1]["knn_acc"] * (1 - steps[1]["knn_acc"]) / 30), abs=1e-5
    )
    assert (steps[1]["knn_acc"], steps[1]["knn_acc_se"]) == (steps[1]["knn_acc_stored"], steps[1]["knn_acc_stored_se"])
    assert all(0 <= steps[1][f"{p}_acc_{b}"] <= 1 for p in probes for b in ("stored", "reestimated"))
    printed = capsys.readouterr().out.splitlines()
    first = next(line for line in printed if line.startswith("selfie: "))  # after the config notes, if any
    last = next(line for line in printed if line.startswith("done: "))
    assert "selfie.query=paper, selfie.logit_scale=plain" in first, first
    for words in ("clean patch_acc", "another image's context", "whole images: knn", "patch grid: knn", "), linear"):
        assert words in last, last
    for words in ("random networks", "sd over 2", "raw pixels", "BN stored"):
        assert words in last, last
    judged = printed[printed.index(next(line for line in printed if line.startswith("pretext: "))) :]
    assert len(judged) == 6 and [line.split(",")[0] for line in judged[1:5]] == ["features"] * 4
    assert judged[-1].startswith("verdict: on the whole images the features are ") and "on the patch grid" in judged[-1]
    quiet = tmp_path / "quiet"
    pretrain.main(
        [*args, "--monitor.clean=false", "--monitor.knn=false", "--data", str(demo_root), "--out", str(quiet)]
    )
    assert not any("clean" in line or "knn" in line for line in (quiet / "log.jsonl").read_text().splitlines())


def test_the_clean_metric_is_sane_from_the_first_step(tmp_path: Path, demo_root: Path) -> None:
    """Eval-mode batch norm with the running statistics of a step or two scored the demo's clean loss at
    12, 69 and 2,056 over the first three steps (training loss 3.3, 6.4, 3.1); with each batch's own
    statistics it stays in the range of the training loss, finite from step 1."""
    run = tmp_path / "run"
    args = [*SMALL, *SMALL_CLEAN, "--data.workers=0", "--batch-size=8", "--speed.cpu_threads=1", "--steps", "3"]
    pretrain.main([*args, "--log.every=1", "--monitor.knn=false", "--data", str(demo_root), "--out", str(run)])
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    highest = 0.0
    for record in records:
        highest = max(highest, record["loss"])
        assert math.isfinite(record["clean_loss"]) and record["clean_loss"] < 2 * highest, records


def test_the_batch_norm_protocol_is_a_checked_key() -> None:
    config, _ = parse_args(["--monitor.bn=reestimated"], stage_class(PretrainConfig), {}, "")
    assert config.monitor.bn == "reestimated" and PretrainConfig().monitor.bn == "stored"
    with pytest.raises(ConfigError, match="monitor.bn 'recalibrated': expected one of stored, reestimated"):
        parse_args(["--monitor.bn=recalibrated"], stage_class(PretrainConfig), {}, "")


def test_the_other_batch_norm_protocol_is_measured_in_the_final_record_only(demo_root: Path) -> None:
    from accelerate import Accelerator

    args = [*SMALL, *SMALL_CLEAN, f"--data.path={demo_root}", "--monitor.clean=false", "--train.steps=4"]
    args += ["--monitor.knn_train_images=20", "--monitor.knn_test_images=10", "--monitor.bn=reestimated"]
    config, _ = parse_args(args, stage_class(PretrainConfig), {}, "")
    method = pretrain.validate(config)(config, torch.device("cpu"))
    net = pretrain.build_model(config)
    monitors = build_monitors(config, method, net, open_source(demo_root), Accelerator(cpu=True))
    early, final = monitors(2, True), monitors(4, True)
    assert {k for k in early if k.endswith("_stored")} == set() and "linear_grid_acc_reestimated" in early
    assert early["knn_acc"] == early["knn_acc_reestimated"] == final["knn_acc_reestimated"]
    assert {"knn_acc_stored", "linear_grid_acc_stored_se"} <= final.keys()
