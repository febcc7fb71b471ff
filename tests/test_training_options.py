"""What users of solo-learn, lightly and MAE shop for: gradient accumulation, LARS/AdamW and the linear
scaling rule, SyncBN, trackers, run metadata, progress lines, and the footguns a new user hits."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator

from pipeline.data import Batch
from tests.conftest import ROOT, TINY, free_port, pretrain, run_concurrently, run_script
from train.config import OptimSection
from train.config.learning_rate import describe_lr, peak_lr
from train.engine.optim import LARS, build_optimizer
from train.engine.step import EagerStep, StepParts
from train.methods.supervised import SupervisedTask, build_model

# In-process runs set the thread count; the next test gets its own back.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("keep_threads")]


def supervised_parts(accumulate: int):
    from train.config import FinetuneConfig
    from train.config.command_line import parse_args
    from train.methods import stage_class
    from train.stages.finetuning import STABLE_FLAGS

    config, _ = parse_args(["--arch", "resnet8", "--model.width=0.25"], stage_class(FinetuneConfig), STABLE_FLAGS, "")
    torch.manual_seed(0)
    model = build_model(config, 10).eval()  # batch norm on running statistics: each image's loss on its own
    optimizer = build_optimizer(model, config.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulate)
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, EagerStep(StepParts(model, SupervisedTask(config, 10), optimizer, scheduler, accelerator))


def test_accumulated_micro_batches_take_the_step_of_one_large_batch() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (16,), generator=generator)
    whole, step = supervised_parts(1)
    step([Batch(images, labels, torch.arange(16))], generator)
    parts, accumulated = supervised_parts(4)
    micro = [Batch(images[k : k + 4], labels[k : k + 4], torch.arange(4)) for k in range(0, 16, 4)]
    loss, _ = accumulated(micro, generator)
    assert accumulated.parts.scheduler.last_epoch == step.parts.scheduler.last_epoch == 1  # one update each
    for (name, a), (_, b) in zip(whole.named_parameters(), parts.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert torch.isfinite(loss)


def test_lars_adapts_matrices_and_leaves_norms_and_biases_plain() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4))
    optimizer = build_optimizer(model, OptimSection(name="lars", momentum=0.0, weight_decay=0.0, lr=1.0))
    assert isinstance(optimizer, LARS) and [g["adapt"] for g in optimizer.param_groups] == [True, False]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model(torch.randn(16, 8)).square().sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    optimizer.step()
    weight = before["0.weight"]
    trust = 0.001 * weight.norm() / grads["0.weight"].norm()
    torch.testing.assert_close(model[0].weight, weight - trust * grads["0.weight"])
    torch.testing.assert_close(model[0].bias, before["0.bias"] - grads["0.bias"])  # not adapted: lr x grad


def test_adamw_and_the_linear_scaling_rule() -> None:
    optim = OptimSection(name="adamw", base_lr=0.3)
    assert isinstance(build_optimizer(torch.nn.Linear(2, 2), optim, global_batch=1024), torch.optim.AdamW)
    assert peak_lr(optim, 1024) == pytest.approx(1.2) and "base_lr 0.3 x 1024 / 256" in describe_lr(optim, 1024)
    assert peak_lr(OptimSection(lr=0.05), 1024) == 0.05


@pytest.mark.xdist_group("torchrun")  # two processes each: one such test at a time
def test_sync_batch_norm_over_two_processes_equals_one_large_batch(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    result = run_script(
        [str(ROOT / "tests" / "sync_bn_probe.py"), str(tmp_path)],
        tmp_path,
        launcher=[torchrun, "--nproc_per_node", "2", "--master_port", free_port()],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    from tests.sync_bn_probe import reference

    expected = reference()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), expected["out"], rtol=1e-4, atol=1e-5)
    summed = {k: ranks[0]["grads"][k] + ranks[1]["grads"][k] for k in expected["grads"]}
    for name, grad in expected["grads"].items():
        torch.testing.assert_close(summed[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    for rank in ranks:
        torch.testing.assert_close(rank["running_mean"], expected["running_mean"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(rank["running_var"], expected["running_var"], rtol=1e-4, atol=1e-6)


def test_tensorboard_receives_every_record_and_a_resume_continues_it(tmp_path: Path, demo_root: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    args = [*TINY, "--data", str(demo_root), "--out", str(run), "--log.tracker=tensorboard"]
    first = pretrain([*args, "--steps", "2", "--checkpoint.every=2"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    again = pretrain([*args, "--steps", "4", "--resume"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run / "trackers.json").read_text())["log_with"] == "tensorboard"
    events = EventAccumulator(str(run / "trackers" / "selfie-trainer"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]  # both invocations, one folder
    scalars = events.Tags()["scalars"]
    assert {"monitor/clean_patch_acc", "speed/images_per_s", "train/lr"} <= set(scalars)
    assert not any(tag.endswith("time") for tag in scalars) and "pictures/patches" in events.Tags()["images"]
    # The hyperparameters sit in the run's own event folder, not in a timestamped second "run".
    assert [p.name for p in (run / "trackers" / "selfie-trainer").iterdir() if p.is_dir()] == []
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")
    state = torch.load(sorted((run / "checkpoints").glob("*.pt"))[-1], weights_only=True)
    assert state["tracker_run_id"] == str(run / "trackers")


def test_run_metadata_progress_lines_and_the_data_path(tmp_path: Path, demo_root: Path) -> None:
    run = tmp_path / "run"
    result = pretrain([*TINY, "--data", str(demo_root), "--out", str(run), "--steps", "2"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    invocation = json.loads((run / "run.json").read_text())["invocations"][0]
    assert invocation["world_size"] == 1 and invocation["versions"]["torch"] == torch.__version__
    assert invocation["command"][0].endswith("pretrain.py")
    assert invocation["git"]["commit"] is None or len(invocation["git"]["commit"]) == 40  # None outside a checkout
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["path"] == str(demo_root)
    assert "step 2/2: loss" in result.stdout  # stdout is a pipe here, as in a batch job's log


def test_footguns_a_new_user_hits(tmp_path: Path, demo_root: Path) -> None:
    reference = pretrain(["--config", "cifar10", "--out", str(tmp_path / "c10")], tmp_path)
    assert reference.returncode == 2 and "reference recipe" in reference.stderr and "--data" in reference.stderr
    assert not (tmp_path / "c10").exists()
    run = tmp_path / "run"
    args = [*TINY, "--data", str(demo_root), "--out", str(run), "--speed.precision=fp32", "--optim.warmup_steps=50"]
    first = pretrain([*args, "--steps", "2"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "warmup_steps=50 is longer than the run's 2 steps" in first.stdout
    resumed = pretrain(["--out", str(run), "--resume", "--speed.cpu_threads=1"], tmp_path)  # nothing else given
    assert resumed.returncode == 0 and "nothing to do: the checkpoint is at step 2 of 2" in resumed.stdout
    longer = pretrain(["--out", str(run), "--resume", "--steps", "3", "--speed.cpu_threads=1"], tmp_path)
    assert longer.returncode == 0 and "horizon changes from 2 to 3 steps" in longer.stdout, longer.stderr[-2000:]
    script = str(ROOT / "train" / "pretrain.py")
    printed = run_script([script, "--print-config", "--optim.name=lars", "--optim.base_lr=0.3"], tmp_path)
    assert printed.returncode == 0 and yaml.safe_load(printed.stdout)["optim"]["name"] == "lars"
    # Both lr keys are printed; the last line says which one the run uses (demo: batch 64).
    assert printed.stdout.splitlines()[-1] == (
        "# the run's peak lr 0.075 (base_lr 0.3 x 64 / 256) (optim.base_lr is set: optim.lr is not used)"
    )
    assert not (tmp_path / "runs").exists()
    helped, cifar = run_concurrently(
        [
            partial(run_script, [script, "--help"], tmp_path),
            partial(run_script, [script, "--config", "cifar10", "-h"], tmp_path),
        ]
    )
    assert "--data.loader=torch (torch | dali | ffcv)" in helped.stdout and "--print-config" in helped.stdout
    # The values of the config that would run, not the dataclasses' built-in ones (120000 steps, pad 4).
    assert "--train.steps=240 " in helped.stdout and "--data.pad=0 " in helped.stdout
    assert "--train.steps=120000 " in cifar.stdout and "--data.pad=4 " in cifar.stdout


def test_a_tracker_that_is_not_installed_is_one_clear_line(tmp_path: Path, demo_root: Path) -> None:
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    result = pretrain([*TINY, "--data", str(demo_root), "--out", str(tmp_path / "r"), "--log.tracker=wandb"], tmp_path)
    assert result.returncode == 2 and "log.tracker=wandb: wandb is not installed" in result.stderr
    assert not (tmp_path / "r").exists() and "Traceback" not in result.stderr


def test_the_time_left_follows_the_recent_pace_not_the_warm_up(monkeypatch, capsys) -> None:
    """10 slow warm-up steps (100 s), then 0.1 s a step: by the third line the estimate is the recent pace."""
    from types import SimpleNamespace

    import train.engine.loop

    clock = iter([0.0, 100.0, 101.0, 102.0])
    monkeypatch.setattr(train.engine.loop.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(train.engine.loop.sys.stdout, "isatty", lambda: False)
    lines = train.engine.loop.ProgressLines(0, 100, "acc", 0, SimpleNamespace(is_main_process=True))
    for done in (10, 20, 30):
        lines.line(done, {"loss": 1.0, "acc": 0.5, "images_per_s": 10.0})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].endswith("15.0 min left")  # one line: all there is to go on is the warm-up
    assert printed[-1].endswith("0.1 min left")  # 70 steps at 0.1 s (was 102 s / 30 steps * 70 = 4.0 min)


def test_the_first_command_starts_without_accelerates_defaults_warning(tmp_path: Path) -> None:
    """README's `accelerate launch train/pretrain.py` after scripts/setup.sh: no '--num_cpu_threads_per_process
    was set' warning (setup writes or mends the default config)."""
    from accelerate.commands.config.config_args import default_config_file

    if not Path(default_config_file).is_file():
        pytest.skip(f"no Accelerate config at {default_config_file}: scripts/setup.sh writes it")
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    result = run_script([str(ROOT / "train" / "pretrain.py"), "--print-config"], tmp_path, launcher=launch)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "had defaults used instead" not in result.stderr, result.stderr
