"""End-to-end runs of train/pretrain.py as users launch it (subprocesses, tiny model, demo data)."""

import json
import shutil
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.beton_writer import ConvertOptions, convert
from pipeline.loaders import LOADERS
from tests.conftest import (
    ROOT,
    SMALL_MONITORS,
    TINY,
    demo_data_for,
    free_port,
    kill_when_exists,
    pretrain,
    run_concurrently,
    run_script,
)
from train.methods import METHODS
from train.methods.pictures import picture_size
from train.methods.rotation import RotationMethod

pytestmark = pytest.mark.slow


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_a_short_run_writes_config_log_and_checkpoints(tmp_path: Path, demo_root: Path) -> None:
    run = tmp_path / "run"
    result = pretrain(
        [*TINY, "--data", str(demo_root), "--out", str(run), "--steps", "4", "--checkpoint.every=2"], tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "patch-selection accuracy" in result.stdout and "chance 25.0%" in result.stdout
    # the run's verdict ends its output: Selfie's P is a patch network, so kNN and linear on both views
    pretext, *features, verdict = result.stdout.strip().splitlines()[-6:]
    assert pretext.startswith("pretext: clean patch_acc ") and "vs chance 25.0 %" in pretext
    assert [line.split(":")[0].split(" (")[0] for line in features] == [
        f"features, {probe} on the {view}"
        for view in ("whole images", "patch grid")
        for probe in ("kNN", "linear probe")
    ]
    assert all("random networks (BN as stored) " in line and "raw pixels" in line for line in features)
    assert verdict.startswith("verdict: on the whole images the features are ")
    records = [r for r in read_log(run) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:
        assert {"step", "loss", "patch_acc", "lr", "images_per_s"} <= record.keys()
    assert "batch_size: 8" in (run / "config.yaml").read_text()
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_00000002.pt", "step_00000004.pt"]  # atomic: no temporary files left
    state = torch.load(run / "checkpoints" / "step_00000004.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "step", "rng", "config"} <= state.keys()
    assert state["step"] == 4 and state["config"]["train"]["steps"] == 4
    # The pictures people look at: one "put the patches back" per checkpoint, and the curves.
    assert sorted(p.name for p in (run / "pictures").iterdir()) == [
        "patches_step_00000002.png",
        "patches_step_00000004.png",
    ]
    width, height = Image.open(run / "pictures" / "patches_step_00000004.png").size
    grid_width, grid_height = picture_size(4, 32, 8)
    assert width == grid_width and height > grid_height  # the column titles and frame legend above the grid
    assert (run / "curves.png").stat().st_size > 0


def final_model(run: Path) -> dict:
    checkpoint = sorted((run / "checkpoints").glob("step_*.pt"))[-1]
    return torch.load(checkpoint, weights_only=True)["model"]


def test_kill_then_resume_continues_at_the_right_step_with_the_same_state(tmp_path: Path, demo_root: Path) -> None:
    common = [
        *TINY,
        "--data",
        str(demo_root),
        "--steps",
        "40",
        "--checkpoint.every=4",
        "--checkpoint.keep=10",
    ]
    straight = tmp_path / "straight"
    assert pretrain([*common, "--out", str(straight)], tmp_path).returncode == 0

    killed = tmp_path / "killed"
    kill_when_exists(
        "pretrain.py", [*common, "--out", str(killed)], tmp_path, killed / "checkpoints" / "step_00000008.pt"
    )
    kept = sorted(p.name for p in (killed / "checkpoints").glob("step_*.pt"))
    resumed_from = int(kept[-1][5:13])
    assert 8 <= resumed_from < 40

    result = pretrain([*common, "--out", str(killed), "--resume"], tmp_path)
    assert result.returncode == 0, result.stderr
    # The log holds every step once: records written after the checkpoint, before the kill, were dropped.
    assert [r["step"] for r in read_log(killed) if "loss" in r] == list(range(1, 41))

    def timeless(records: list[dict]) -> list[dict]:  # wall-clock fields differ run to run
        return [{k: v for k, v in r.items() if k not in ("time", "images_per_s")} for r in records]

    assert timeless(read_log(killed)) == timeless(read_log(straight))
    a, b = final_model(straight), final_model(killed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.xdist_group("torchrun")  # two processes each: one such test at a time
@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_two_processes_stay_in_sync_and_read_disjoint_shards(tmp_path: Path, demo_root: Path, loader: str) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    result = run_script(
        [
            str(ROOT / "tests" / "ddp_probe.py"),
            str(tmp_path),
            *TINY,
            *SMALL_MONITORS,
            "--loader",
            loader,
            "--data",
            str(demo_data_for(loader, demo_root)),
            "--out",
            str(tmp_path / "run"),
            "--steps",
            "5",
            "--batch-size",
            "8",
        ],
        tmp_path,
        launcher=[torchrun, "--nproc_per_node", "2", "--master_port", free_port()],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["world"] == 2
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name
    for a, b in zip(rank0["seen"], rank1["seen"], strict=True):
        assert len(a) == len(b) == 4  # global batch 8 over 2 processes
        assert not set(a) & set(b)
    assert "2 process(es)" in result.stdout
    assert ("in the FFCV pipeline" in result.stdout) == (loader == "ffcv")  # CPU: ffcv's threads cut the patches
    # Rank 0 alone writes the log, once per step.
    assert [r["step"] for r in read_log(tmp_path / "run") if "loss" in r] == [1, 2, 3, 4, 5]
    # Training moved the weights away from their shared initialisation.
    torch.manual_seed(0)
    from train.config import PretrainConfig, load_config
    from train.methods import stage_class
    from train.stages.pretraining import build_model

    config = load_config(
        stage_class(PretrainConfig),
        "demo",
        {"model.width": 0.125, "selfie.attn_heads": 4, "selfie.attn_intermediate": 32, "selfie.attn_layers": 1},
    )
    initial = dict(build_model(config).named_parameters())
    assert any(not torch.equal(initial[n], rank0["params"][n]) for n in initial)


def test_unreadable_images_are_skipped_and_logged(tmp_path: Path, demo_root: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(demo_root / "train", data)
    bad = sorted((data / "coffee").iterdir())[3]
    bad.write_bytes(b"\x89PNG broken")
    run = tmp_path / "run"
    result = pretrain([*TINY, "--data", str(data), "--out", str(run), "--steps", "60", "--batch-size", "32"], tmp_path)
    assert result.returncode == 0, result.stderr
    events = [r for r in read_log(run) if r.get("event") == "skipped_image"]
    assert events and all(str(bad) in e["image"] for e in events)
    fatal = pretrain(
        [
            *TINY,
            "--data.workers=1",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "run2"),
            "--steps",
            "60",
            "--batch-size",
            "32",
            "--data.fail_on_corrupt=true",
        ],
        tmp_path,
    )
    assert fatal.returncode == 2 and str(bad) in fatal.stderr
    assert "Traceback" not in fatal.stderr and len(fatal.stderr.strip().splitlines()) == 1


def test_a_diverging_run_stops_with_an_error(tmp_path: Path, demo_root: Path) -> None:
    result = pretrain(
        [
            *TINY,
            "--data",
            str(demo_root),
            "--out",
            str(tmp_path / "run"),
            "--steps",
            "30",
            "--lr",
            "1e12",
            "--optim.warmup_steps=1",
        ],
        tmp_path,
    )
    assert result.returncode == 1
    assert "non-finite loss" in result.stderr


def bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    (tmp / "empty").mkdir()
    (tmp / "junk" / "a").mkdir(parents=True)
    (tmp / "junk" / "a" / "notes.jpg").write_text("not a picture")
    (tmp / "fresh").mkdir()
    return [
        (["--data", str(tmp / "missing")], "no such file"),
        (["--data", str(tmp / "empty")], "no image files found"),
        (["--data", str(tmp / "junk")], "no readable image"),
        (["--data.image_size=30"], "patch size 8 does not divide image size 30"),
        (["--context-fraction", "1.5"], "context fraction must lie in (0, 1)"),
        (["--context-fraction", "0"], "context fraction must lie in (0, 1)"),
        (["--model.depth=3"], "unknown config key 'model.depth'"),
        (["--resume", "--out", str(tmp / "fresh")], "no checkpoint"),
        (["--resume"], "--resume needs --out"),
        (["--config", "nonesuch"], "--config nonesuch"),
        (["--loader", "magic"], "--loader magic"),
        (["--batch-size", "0"], "--batch-size 0"),
        (["--seed", "-1"], "--seed -1"),
        (["--selfie.patch_op=magic"], "selfie.patch_op 'magic': expected one of auto, reference, triton, numba"),
        (
            ["--method", "jigsaw"],
            "--method jigsaw (method): expected one of selfie, rotnet, patch_rotnet, patch_relnet",
        ),
        (["--method", "patch_rotnet", "--patch-ratio", "1.2"], "--patch-ratio 1.2: patch ratio must lie in (0, 1)"),
        (["--model.backbone=vgg"], "model.backbone 'vgg': expected one of resnet36, resnet50, resnet8, resnet32"),
    ]


def test_bad_input_gets_one_clear_line_and_a_nonzero_exit(tmp_path: Path, demo_root: Path) -> None:
    cases = bad_inputs(tmp_path)
    runs = [
        partial(pretrain, [*TINY, *args] if "--data" in args else [*TINY, "--data", str(demo_root), *args], tmp_path)
        for args, _ in cases
    ]
    for (args, message), result in zip(cases, run_concurrently(runs), strict=True):
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert message in result.stderr, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, args
    assert not (tmp_path / "runs").exists()  # nothing half-made left behind


def test_refuses_to_overwrite_a_run_without_resume(tmp_path: Path, demo_root: Path) -> None:
    run = tmp_path / "run"
    args = [*TINY, "--data", str(demo_root), "--out", str(run), "--steps", "2"]
    assert pretrain(args, tmp_path).returncode == 0
    again = pretrain(args, tmp_path)
    assert again.returncode == 2 and "already holds checkpoints" in again.stderr


def test_resume_refuses_a_different_config(tmp_path: Path, demo_root: Path) -> None:
    run = tmp_path / "run"
    args = [*TINY, "--data", str(demo_root), "--out", str(run), "--steps", "2"]
    assert pretrain(args, tmp_path).returncode == 0
    changed = pretrain([*args, "--resume", "--seed", "1"], tmp_path)
    assert changed.returncode == 2 and "train.seed is 1 here but 0" in changed.stderr
    longer = pretrain([*args[:-1], "4", "--resume"], tmp_path)  # a longer horizon is allowed
    assert longer.returncode == 0, longer.stderr
    assert [r["step"] for r in read_log(run) if "loss" in r] == [1, 2, 3, 4]


@pytest.mark.needs_loader("ffcv")
@pytest.mark.needs_loader("dali")
def test_resume_may_switch_loader_but_not_the_data_size(tmp_path: Path, demo_root: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(demo_root / "train", data / "train")
    run = tmp_path / "run"
    args = [*TINY, "--out", str(run)]
    assert pretrain([*args, "--data", str(data), "--steps", "2"], tmp_path).returncode == 0
    switched = pretrain([*args, "--data", str(data), "--steps", "3", "--loader", "dali", "--resume"], tmp_path)
    assert switched.returncode == 0, switched.stderr[-2000:]  # the same images at step 3 whatever the backend
    (data / "train" / "coffee" / "0005.png").write_bytes(b"broken")  # the .beton will hold one image fewer
    convert(data, data / "train.beton", options=ConvertOptions(write_mode="raw", workers=1))
    fewer = pretrain([*args, "--data", str(data), "--steps", "4", "--loader", "ffcv", "--resume"], tmp_path)
    assert fewer.returncode == 2 and "trained on 1600 images and --data now holds 1599" in fewer.stderr
    assert [r["step"] for r in read_log(run) if "loss" in r] == [1, 2, 3]


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("method", [name for name, cls in METHODS.items() if issubclass(cls, RotationMethod)])
def test_every_rotation_method_trains_with_every_loader(
    tmp_path: Path, demo_root: Path, method: str, loader: str
) -> None:
    run = tmp_path / "run"
    args = [*TINY, "--method", method, "--model.backbone=resnet8", "--loader", loader, "--steps", "3"]
    args += ["--data", str(demo_data_for(loader, demo_root)), "--out", str(run), "--checkpoint.every=3"]
    result = pretrain(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    views = 4 if method == "rotnet" else 8
    assert f"{views} views per image" in result.stdout and f"{8 * views} views/step" in result.stdout
    assert f"{method} view accuracy" in result.stdout
    assert "resnet8 at model.width=0.125 has 4 channels in its first stage" in result.stdout  # TINY's width
    records = [r for r in read_log(run) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    classes = 8 if method == "patch_rotnet" else 4
    for record in records:
        assert 0 <= record["rotation_acc"] <= 1 and record["chance_acc"] == 1 / classes
        assert record["loss"] == pytest.approx(np.log(classes), abs=0.6)  # starts near chance
    state = torch.load(run / "checkpoints" / "step_00000003.pt", weights_only=True)
    assert state["kind"] == f"{method}_pretrain" and state["encoder_prefix"] == "backbone."
    assert state["config"]["method"] == method and state["config"]["model"]["backbone"] == "resnet8"
    assert [p.name for p in (run / "pictures").iterdir()] == ["views_step_00000003.png"]


def test_a_compiled_run_resumes_bit_for_bit(tmp_path: Path, demo_root: Path) -> None:
    """torch.compile (inductor, on the CPU) changes how the step runs, not where a resume continues: a run
    killed after its step-2 checkpoint and resumed compiled ends with the uninterrupted run's weights."""
    common = [*TINY, "--method", "rotnet", "--model.backbone=resnet8", "--steps", "4", "--speed.compile=true"]
    common += ["--checkpoint.every=2", "--checkpoint.keep=5", "--data", str(demo_root)]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    runs = [partial(pretrain, [*common, "--out", str(out)], tmp_path) for out in (straight, resumed)]
    for result in run_concurrently(runs):
        assert result.returncode == 0, result.stderr[-3000:]
    (resumed / "checkpoints" / "step_00000004.pt").unlink()  # as if killed after step 4's log record
    result = pretrain([*common, "--out", str(resumed), "--resume"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = final_model(straight), final_model(resumed)
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert [r["step"] for r in read_log(resumed) if "loss" in r] == [1, 2, 3, 4]
