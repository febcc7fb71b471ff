"""Never lose work, never hang, never a traceback: the faults and bad inputs of issue 17, each as a test."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import DataError, open_source
from tests.conftest import (
    HANG_GUARD_S,
    ROOT,
    SMALL_MONITORS,
    TINY,
    free_port,
    pretrain,
    run_concurrently,
    run_script,
    with_root_on_path,
)
from train.engine.cli import run_cli
from train.stages import pretraining as pretrain_module

# In-process runs set the thread count; the next test gets its own back.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("keep_threads")]


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def models(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: torch.load(p, weights_only=True)["model"] for p in sorted((run / "checkpoints").glob("*.pt"))}


BAD_VALUES = [
    (["--model.stem=bogus"], "model.stem 'bogus': expected one of imagenet, small"),
    (["--model.width=0"], "model.width 0.0: expected a positive multiplier"),
    (["--train.precision=bf16"], "config key train.precision moved to speed.precision"),
    (["--train.log_with", "tensorboard"], "config key train.log_with moved to log.tracker"),
    (["--model.width=-1"], "model.width -1.0: expected a positive multiplier"),
    (["--selfie.attn_heads=7"], "model settings do not build --method selfie"),
    (["--selfie.position_kind=bogus"], "selfie.position_kind 'bogus': expected one of auto, full, rowcol"),
    (["--data.augment=bogus"], "data.augment 'bogus': expected one of"),
    (["--data.workers=-1"], "data.workers -1: expected a number of processes >= 0"),
    (["--data.pad=-1"], "data.pad -1: expected a number of pixels >= 0"),
    (["--optim.momentum=-1"], "optim.momentum -1.0: expected a momentum in [0, 1)"),
    (["--lr", "-1"], "--lr -1.0 (optim.lr): expected a positive, finite learning rate"),
    (["--lr", "nan"], "--lr nan (optim.lr): expected a positive, finite learning rate"),
    (["--optim.weight_decay=-0.1"], "optim.weight_decay -0.1: expected a weight decay >= 0"),
    (["--optim.warmup_steps=-1"], "optim.warmup_steps -1: expected a number of steps >= 0"),
    (["--data.std=[0.2, 0, 0.2]"], "data.std (0.2, 0.0, 0.2): expected three positive numbers"),
    (["--data.image_size=0"], "data.image_size 0: expected a positive number of pixels"),
    (["--batch-size", "4096"], "fewer than one global batch of 4096"),
    (["--speed.precision=fp8"], "speed.precision 'fp8': expected one of auto, no, fp32, bf16, fp16"),
]


@pytest.mark.parametrize(("args", "message"), BAD_VALUES, ids=[a[0] for a, _ in BAD_VALUES])
def test_a_bad_value_is_one_line_and_exit_2_with_nothing_written(
    args: list[str], message: str, tmp_path: Path, demo_root: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(pretrain_module.main, [*TINY, *args, "--data", str(demo_root), "--out", str(tmp_path / "run")])
    error = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(error) == 1 and message in error[0], error
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_bad_files_and_folders_are_one_line(tmp_path: Path, demo_root: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("data:\n  pad: [1, 2\n  workers: 3\n")
    cases = [
        (["--out", str(tmp_path / "afile")], "a file; expected a run folder"),
        (["--config", str(bad_yaml), "--out", str(tmp_path / "r")], "not valid YAML at line"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(pretrain_module.main, [*TINY, "--data", str(demo_root), *args])
        error = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(error) == 1 and message in error[0], error
    assert not (tmp_path / "r").exists()


def cifar_folder(root: Path, labels_of: dict[str, list[int]] | None = None) -> Path:
    """A tiny CIFAR-10 python folder: 20 images per batch file, labels 0..9 unless `labels_of` says otherwise."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        labels = (labels_of or {}).get(name, [i % 10 for i in range(20)])
        data = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
        with open(root / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
    return root


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([0] * 19, "20 images but 19 labels"),
        ([-1] + [0] * 19, "labels run -1 .. 0"),
        ([10] * 20, "labels run 10 .. 10"),
    ],
)
def test_a_cifar_batch_with_wrong_labels_is_refused(tmp_path: Path, labels: list[int], message: str) -> None:
    folder = cifar_folder(tmp_path / "c10", {"data_batch_3": labels})
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        open_source(folder, "train")


def test_links_back_into_the_tree_and_sixteen_bit_images(tmp_path: Path, demo_root: Path) -> None:
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    (data / "loop").symlink_to(data, target_is_directory=True)  # a class folder that is the root itself
    deep = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(deep).save(data / "a" / "deep.png")
    source = open_source(data)
    assert source.classes == ["a"] and len(source) == 1  # the link is left out, no image counted twice
    pixels = np.asarray(source.load(0))[..., 0].astype(int)
    assert pixels.max() == 255 and pixels.min() == 0 and (pixels == 255).mean() < 0.01  # scaled, not clipped


def test_a_torn_log_line_does_not_stop_a_resume(tmp_path: Path, demo_root: Path) -> None:
    run = tmp_path / "run"
    args = [*TINY, "--data", str(demo_root), "--out", str(run), "--checkpoint.every=2"]
    assert pretrain([*args, "--steps", "2"], tmp_path).returncode == 0
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # killed while appending
    resumed = pretrain([*args, "--steps", "3", "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "last line was cut short" in resumed.stdout
    assert [r["step"] for r in read_log(run) if "loss" in r] == [1, 2, 3]


def test_a_diverging_update_is_never_checkpointed(tmp_path: Path, demo_root: Path) -> None:
    run = tmp_path / "run"
    args = [*TINY, "--data", str(demo_root), "--out", str(run), "--lr", "1e38", "--optim.warmup_steps=1"]
    result = pretrain([*args, "--steps", "6", "--checkpoint.every=1"], tmp_path)
    assert result.returncode == 1 and "non-finite" in result.stderr and "Traceback" not in result.stderr
    for name, state in models(run).items():
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()), name


def test_a_failed_checkpoint_write_is_one_line(tmp_path: Path, demo_root: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text('{"invocations": []}')  # a run folder (of a run killed before its checkpoint)
    (run / "checkpoints").write_text("a file where the checkpoint folder goes")
    result = pretrain([*TINY, "--data", str(demo_root), "--out", str(run), "--steps", "2"], tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert "step_00000002.pt: the checkpoint could not be written" in error
    assert not list(run.glob("**/.step_*"))  # no temporary file left


def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(tmp_path: Path, demo_root: Path) -> None:
    run = tmp_path / "run"
    args = [*TINY, "--data", str(demo_root), "--out", str(run), "--checkpoint.every=2"]
    assert pretrain([*args, "--steps", "4", "--checkpoint.keep=5"], tmp_path).returncode == 0
    newest = run / "checkpoints" / "step_00000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    resumed = pretrain([*args, "--steps", "4", "--resume", "--checkpoint.keep=5"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"skipping {newest}" in resumed.stdout
    assert [r["step"] for r in read_log(run) if "loss" in r] == [1, 2, 3, 4]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_stops_after_a_checkpoint_and_the_resume_is_bit_exact(tmp_path: Path, demo_root: Path, signum) -> None:
    """The checkpoint comes first: the stopped step's record holds no monitor figures (they ran at every
    record of a run before; a stop now skips them, they can take minutes)."""
    common = [*SMALL_MONITORS, *TINY, "--data", str(demo_root), "--steps", "12", "--checkpoint.every=100"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    script = str(ROOT / "train" / "pretrain.py")
    env = {**os.environ, "PYTHONPATH": with_root_on_path(os.environ.get("PYTHONPATH"))}
    process = subprocess.Popen([sys.executable, script, *common, "--out", str(stopped)], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    straight_run = partial(pretrain, [*common, "--out", str(straight)], tmp_path)
    deadline = time.time() + HANG_GUARD_S
    while not (stopped / "log.jsonl").exists() or '"loss"' not in (stopped / "log.jsonl").read_text():
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=HANG_GUARD_S)
    assert process.returncode == {signal.SIGTERM: 143, signal.SIGINT: 130, signal.SIGHUP: 129}[signum], stderr[-2000:]
    assert "resume with:" in stderr and "Traceback" not in stderr
    step = int(sorted((stopped / "checkpoints").glob("*.pt"))[-1].name[5:13])
    assert 0 < step < 12
    record = [r for r in read_log(stopped) if r.get("step") == step and "loss" in r][-1]
    assert not [key for key in record if key.startswith(("clean_", "knn_"))], record
    assert not (stopped / "curves.png").exists()
    resumed, done = run_concurrently(
        [partial(pretrain, [*common, "--out", str(stopped), "--resume"], tmp_path), straight_run]
    )
    assert resumed.returncode == 0 and done.returncode == 0, resumed.stderr[-2000:]
    a, b = models(straight)["step_00000012.pt"], models(stopped)["step_00000012.pt"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.xdist_group("torchrun")  # two processes each: one such test at a time
def test_a_wedged_peer_ends_the_job_within_the_timeout(tmp_path: Path, demo_root: Path) -> None:
    import shutil

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    args = [torchrun, "--nproc_per_node", "2", "--master_port", free_port(), str(ROOT / "train" / "pretrain.py")]
    args += [*SMALL_MONITORS, *TINY, "--data", str(demo_root), "--out", str(tmp_path / "run"), "--steps", "400"]
    env = {**os.environ, "PYTHONPATH": with_root_on_path(os.environ.get("PYTHONPATH"))}
    process = subprocess.Popen([*args, "--distributed.collective_timeout=10"], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)  # fmt: skip
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.time() + HANG_GUARD_S
    while not log.exists() or len(log.read_text().splitlines()) < 3:
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.1)
    ranks = subprocess.run(["pgrep", "-f", "-P", str(process.pid), "pretrain.py"], capture_output=True, text=True)
    wedged = int(ranks.stdout.split()[-1])
    subprocess.run(["kill", "-STOP", str(wedged)])
    started = time.time()
    try:
        stdout, stderr = process.communicate(timeout=HANG_GUARD_S)
    finally:
        subprocess.run(["kill", "-9", str(wedged)])
    # The 10 s collective timeout is what is tested: without it the job waits out gloo's 30 minutes. 300 s
    # leaves a busy machine room for the teardown and still tells the two apart.
    assert process.returncode != 0 and time.time() - started < 300
    assert "distributed.collective_timeout" in stderr, (stdout[-3000:], stderr[-1500:])


def photo(path: Path, width: int, height: int) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, quality=95)


@pytest.mark.needs_loader("ffcv")
def test_the_converter_takes_a_large_photo_with_default_options(tmp_path: Path) -> None:
    from pipeline.beton_writer import convert

    (tmp_path / "src" / "a").mkdir(parents=True)
    photo(tmp_path / "src" / "a" / "big.jpg", 2000, 1500)  # 9 MB of raw pixels: more than FFCV's default page
    photo(tmp_path / "src" / "a" / "small.jpg", 64, 48)
    started = time.time()
    info = convert(tmp_path / "src", tmp_path / "out.beton")
    assert info["images"] == 2 and time.time() - started < 120


@pytest.mark.needs_loader("ffcv")
def test_a_killed_converter_leaves_no_writer_and_its_temporary_file_is_cleaned(tmp_path: Path, demo_root: Path) -> None:
    code = (
        "import sys; from pipeline.beton_writer import convert, ConvertOptions; "
        "convert(sys.argv[1], sys.argv[2], options=ConvertOptions(write_mode='raw', workers=2))"
    )
    dst = tmp_path / "out.beton"
    process = subprocess.Popen([sys.executable, "-c", code, str(demo_root), str(dst)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + HANG_GUARD_S
    while not list(tmp_path.glob(".out.beton.tmp-*")):
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.02)
    children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    process.kill()
    process.wait()
    time.sleep(2)
    alive = [
        pid
        for pid in children
        if Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
    ]
    assert not alive, alive
    from pipeline.beton_writer import ConvertOptions, convert

    convert(demo_root, dst, options=ConvertOptions(write_mode="raw", workers=1))  # the next run cleans up
    assert not list(tmp_path.glob(".out.beton.tmp-*")) and dst.is_file()


@pytest.mark.needs_loader("ffcv")
def test_an_edited_sidecar_and_a_folder_as_destination_are_refused(tmp_path: Path, demo_root: Path) -> None:
    from pipeline.beton_writer import ConvertOptions, convert, sidecar_path
    from pipeline.ffcv_loader import BetonSource

    dst = tmp_path / "d.beton"
    convert(demo_root, dst, options=ConvertOptions(write_mode="raw", workers=1))
    sidecar = sidecar_path(dst)
    for key, value in (("uniform_size", [16, 16]), ("classes", ["x"] * 10)):
        info = json.loads(sidecar.read_text())
        original = info[key]
        sidecar.write_text(json.dumps(info | {key: value}))
        with pytest.raises(DataError, match="does not match the file"):
            BetonSource(dst)
        sidecar.write_text(json.dumps(info | {key: original}))
    BetonSource(dst)  # as written, it opens
    (tmp_path / "dir.beton").mkdir()
    result = run_script(["-m", "pipeline.convert", "--src", str(demo_root), "--dst", str(tmp_path / "dir.beton")], ROOT)
    assert result.returncode == 2 and "a folder; expected the .beton file" in result.stderr
    assert not sidecar_path(tmp_path / "dir.beton").exists()


def test_only_collective_failures_become_the_timeout_line() -> None:
    from train.engine.cli import is_collective_failure

    assert is_collective_failure(torch.distributed.DistError("anything"))
    # Without a process group a "timed out" RuntimeError is someone else's: it stays a traceback.
    assert not is_collective_failure(RuntimeError("Timed out waiting 10000ms for recv operation to complete"))


@pytest.mark.xdist_group("torchrun")  # two processes each: one such test at a time
def test_a_sigterm_under_torchrun_prints_one_resume_hint_with_the_launcher(tmp_path: Path, demo_root: Path) -> None:
    import shutil

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    launcher = [torchrun, "--nproc_per_node", "2", "--master_port", free_port()]
    args = [*SMALL_MONITORS, *TINY, "--data", str(demo_root), "--out", str(tmp_path / "run"), "--steps", "400"]
    process = subprocess.Popen([*launcher, str(ROOT / "train" / "pretrain.py"), *args], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.time() + HANG_GUARD_S
    while not log.exists() or '"loss"' not in log.read_text():
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)  # torchrun passes it to both ranks
    _, stderr = process.communicate(timeout=HANG_GUARD_S)
    hints = [line for line in stderr.splitlines() if "resume with:" in line]
    assert len(hints) == 1, stderr[-3000:]
    assert f"resume with: {torchrun} --nproc_per_node 2 " in hints[0] and hints[0].endswith("--resume"), hints[0]


# The `train:` section before issue 24 split it: old key -> (its section now, its name there).
OLD_TRAIN_KEYS = {
    "precision": ("speed", "precision"),
    "channels_last": ("speed", "channels_last"),
    "compile": ("speed", "compile"),
    "compile_mode": ("speed", "compile_mode"),
    "cuda_graph": ("speed", "cuda_graph"),
    "cudnn_benchmark": ("speed", "cudnn_benchmark"),
    "cpu_threads": ("speed", "cpu_threads"),
    "log_every": ("log", "every"),
    "print_every": ("log", "print_every"),
    "log_with": ("log", "tracker"),
    "tracker_project": ("log", "tracker_project"),
    "checkpoint_every": ("checkpoint", "every"),
    "keep_checkpoints": ("checkpoint", "keep"),
    "sync_bn": ("distributed", "sync_bn"),
    "collective_timeout": ("distributed", "collective_timeout"),
}


def in_old_layout(config: dict) -> dict:
    """A resolved config as the code before the split wrote it: every run key under `train:`."""
    config = {key: dict(value) if isinstance(value, dict) else value for key, value in config.items()}
    for old, (section, name) in OLD_TRAIN_KEYS.items():
        config["train"][old] = config[section].pop(name)
    for section in {section for section, _ in OLD_TRAIN_KEYS.values()}:
        assert not config.pop(section), section  # every key of the new sections was under train:
    return config


def test_a_run_written_in_the_old_layout_resumes_bit_for_bit(tmp_path: Path, demo_root: Path) -> None:
    """A run folder (config.yaml and checkpoint) from before `train:` was split resumes from its own config,
    given only --out and --resume, and ends where the uninterrupted run ends."""
    import yaml

    common = [*TINY, "--data", str(demo_root), "--checkpoint.every=2", "--checkpoint.keep=5"]
    straight, old = tmp_path / "straight", tmp_path / "old"
    assert pretrain([*common, "--steps", "4", "--out", str(straight)], tmp_path).returncode == 0
    assert pretrain([*common, "--steps", "2", "--out", str(old)], tmp_path).returncode == 0
    saved = yaml.safe_load((old / "config.yaml").read_text())
    (old / "config.yaml").write_text(yaml.safe_dump(in_old_layout(saved), sort_keys=False))
    checkpoint = old / "checkpoints" / "step_00000002.pt"
    state = torch.load(checkpoint, weights_only=True)
    torch.save({**state, "config": in_old_layout(state["config"])}, checkpoint)
    resumed = pretrain(["--out", str(old), "--resume", "--steps", "4"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = models(straight)["step_00000004.pt"], models(old)["step_00000004.pt"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    rewritten = yaml.safe_load((old / "config.yaml").read_text())
    assert "precision" not in rewritten["train"] and rewritten["checkpoint"] == {"every": 2, "keep": 5}


def test_a_run_whose_folder_is_deleted_stops_with_one_line_and_recreates_nothing(
    tmp_path: Path, demo_root: Path
) -> None:
    import shutil

    run = tmp_path / "run"
    args = [*TINY, "--data", str(demo_root), "--out", str(run), "--steps", "400", "--log.every=1"]
    process = subprocess.Popen([sys.executable, str(ROOT / "train" / "pretrain.py"), *args], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + HANG_GUARD_S
    while not (run / "log.jsonl").exists() or '"loss"' not in (run / "log.jsonl").read_text():
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.05)
    shutil.rmtree(run)
    _, stderr = process.communicate(timeout=HANG_GUARD_S)
    assert process.returncode == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert "the run folder was deleted or replaced while the run went on" in stderr.strip().splitlines()[-1]
    assert not run.exists()
