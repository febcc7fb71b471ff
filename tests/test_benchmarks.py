"""Smoke runs of the benchmark scripts: they run and print their table (no timing assertions)."""

import json

import pytest
import torch

from benchmarks import loaders, modes, patch_op, throughput


def test_patch_op_benchmark_prints_a_row_per_op_and_shape(capsys: pytest.CaptureFixture) -> None:
    patch_op.main(["--batch", "2", "--warmup", "1", "--repeats", "1", "--device", "cpu"])
    rows = [
        line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| 32/8") or line.startswith("| 224/32")
    ]
    assert len(rows) == 4 and {row.split("|")[2].strip() for row in rows} == {"reference", "numba"}


@pytest.mark.needs_loader("ffcv")
@pytest.mark.needs_loader("dali")
def test_loader_benchmark_times_every_backend(tmp_path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "loaders.json"
    loaders.main(
        [
            "--images",
            "24",
            "--size",
            "64",
            "--patch-size",
            "16",
            "--batch",
            "4",
            "--workers",
            "1",
            "--warmup",
            "1",
            "--window",
            "1",
            "--windows",
            "2",
            "--cache",
            str(tmp_path),
            "--json",
            str(out),
        ]
    )
    table = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in table[-3:]}
    assert set(rows) == {"torch", "dali", "ffcv"} and rows["torch"].endswith("1.00x")
    record = json.loads(out.read_text())
    assert set(record["results"]) == {"torch", "dali", "ffcv"}
    assert all(r["min"] <= r["median"] <= r["max"] for r in record["results"].values())


@pytest.mark.needs_loader("ffcv")
@pytest.mark.needs_loader("dali")
def test_throughput_benchmark_runs_every_mode(tmp_path, demo_root, capsys: pytest.CaptureFixture) -> None:
    tiny = ["--set", "selfie.attn_layers=1", "--set", "selfie.attn_heads=4", "--set", "selfie.attn_intermediate=32"]
    record = throughput.main(
        [
            *tiny,
            "--width",
            "0.125",
            "--batch",
            "4",
            "--workers",
            "1",
            "--warmup",
            "1",
            "--window",
            "1",
            "--windows",
            "2",
            "--cache",
            str(demo_root.parent),
            "--json",
            str(tmp_path / "t.json"),
            "--plot",
            str(tmp_path / "t.png"),
        ]
    )
    results = record["results"][4]
    assert list(record["results"]) == [4] and list(results) == list(throughput.MODES)
    for mode, result in results.items():
        assert result["min"] <= result["median"] <= result["max"], mode
        assert result["peak_memory_gib"] is None and "ops_per_step" in result  # profiled; no device memory
        assert result["ops_per_step"] > 0 or not modes.MODES[mode].trains  # a step's aten ops were counted
    stages = results["torch"]["stages_ms"]
    assert set(stages) == {"data", "patch op", "forward", "backward", "optimizer"}
    for mode, result in results.items():  # a training mode's last timed loss; none for the data side
        trains = modes.MODES[mode].trains
        assert (result.get("loss_finite") is True and result["loss"] > 0) if trains else "loss" not in result, mode
    assert set(results["no-model:dali"]["stages_ms"]) == {"data", "patch op"}
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["config"]["train"]["batch_size"] == 4 and saved["versions"]["ffcv"]
    assert (tmp_path / "t.png").stat().st_size > 0
    assert record["compute"][4]["step_gflop"] > 0 and record["compute"]["matmul_peak_tflops"] > 0
    assert 0 < results["synthetic"]["fraction_of_peak"] < 1.5
    out = capsys.readouterr().out
    assert "| synthetic |" in out and "| naive |" in out and "1.00x" in out


@pytest.mark.parametrize("method", ["rotnet", "patch_relnet"])
def test_throughput_benchmark_times_a_rotation_step(demo_root, capsys: pytest.CaptureFixture, method: str) -> None:
    args = ["--method", method, "--set", "model.backbone=resnet8", "--width", "0.25", "--batch", "4"]
    args += ["--modes", "synthetic,torch,no-model:torch,naive", "--workers", "1", "--warmup", "1", "--window", "1"]
    results = throughput.main([*args, "--windows", "2", "--cache", str(demo_root.parent)])["results"][4]
    assert list(results) == ["synthetic", "naive", "torch", "no-model:torch"]
    assert set(results["torch"]["stages_ms"]) == {"data", "view op", "forward", "backward", "optimizer"}
    assert set(results["no-model:torch"]["stages_ms"]) == {"data", "view op"}
    # The naive baseline is every method's: its input op and its model, one image at a time.
    assert set(results["naive"]["stages_ms"]) == {"data", "view op", "forward", "backward", "optimizer"}
    out = capsys.readouterr().out
    assert f"{4 if method == 'rotnet' else 8} views per image" in out and "| view op ms |" in out


def test_every_registered_method_and_loader_has_its_modes() -> None:
    from pipeline.loaders import LOADERS
    from train.methods import METHODS

    assert {"synthetic", "naive", "no-model:naive", *LOADERS, *(f"no-model:{name}" for name in LOADERS)} <= set(
        modes.MODES
    )
    parser = throughput.arguments()
    assert parser.parse_args(["--method", list(METHODS)[-1]]).method == list(METHODS)[-1]
    with pytest.raises(SystemExit):
        parser.parse_args(["--method", "jigsaw"])


def test_a_batch_sweep_and_the_fine_tuning_step(tmp_path, demo_root) -> None:
    args = ["--width", "0.125", "--set", "selfie.attn_layers=1", "--set", "selfie.attn_heads=4", "--workers", "1"]
    args += [
        "--warmup",
        "1",
        "--window",
        "1",
        "--windows",
        "1",
        "--profile-steps",
        "1",
        "--cache",
        str(demo_root.parent),
    ]
    record = throughput.main([*args, "--modes", "synthetic", "--batch", "2,4"])
    assert list(record["results"]) == [2, 4] and {*record["compute"]} == {2, 4, "matmul_peak_tflops"}
    assert "| synthetic | 2 |" in record["table"] and "| synthetic | 4 |" in record["table"]
    tuned = throughput.main([*args, "--stage", "finetune", "--arch", "resnet8", "--modes", "synthetic,torch"])
    assert set(tuned["results"][64]["torch"]["stages_ms"]) == {"data", "input op", "forward", "backward", "optimizer"}
    with pytest.raises(SystemExit):
        throughput.parse_args(["--stage", "finetune", "--modes", "naive"])
    with pytest.raises(SystemExit):
        throughput.parse_args(["--batch", "64,0"])


def test_the_naive_baseline_computes_the_step_the_trainer_computes(demo_root) -> None:
    """Selfie per image through the model's public forward: the mean of the images' losses equals the
    batched step's loss on the same patches (eval mode: batch norm and dropout do not depend on the batch)."""
    import torch

    args = throughput.parse_args(["--batch", "4", "--width", "0.125", "--cache", str(demo_root.parent)])
    args.set = ["selfie.attn_layers=1", "selfie.attn_heads=4", "selfie.attn_intermediate=32"]
    bench = modes.Bench(args, 4)
    bench.net.eval()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    per_image = modes.naive_inputs(bench, images, torch.zeros(4, dtype=torch.int64))
    naive = torch.stack([bench.task.objective(bench.net, inputs)[0] for inputs in per_image]).mean()
    context = bench.task.num_context
    patches = torch.cat([p[:context] for p, _, _ in per_image] + [p[context:] for p, _, _ in per_image])  # group-major
    context_pos, masked_pos = (torch.cat([inputs[k] for inputs in per_image]) for k in (1, 2))
    batched, _ = bench.task.objective(bench.net, (patches, context_pos, masked_pos))
    torch.testing.assert_close(naive, batched, rtol=1e-5, atol=1e-5)


def test_the_benchmark_sets_up_through_the_trainers_path(demo_root, monkeypatch) -> None:
    """Its model, optimizer and schedule come from the trainer's own set-up (`prepare_training`, what
    pretraining and fine-tuning call), with a schedule that warms up over 10 steps and does not decay."""
    calls = []
    prepare = modes.prepare_training

    def recording(config, accelerator, build, init_seed):
        calls.append(config)
        return prepare(config, accelerator, build, init_seed)

    monkeypatch.setattr(modes, "prepare_training", recording)
    args = throughput.parse_args(["--batch", "4", "--width", "0.125", "--cache", str(demo_root.parent)])
    args.set = ["selfie.attn_layers=1", "selfie.attn_heads=4", "selfie.attn_intermediate=32"]
    bench = modes.Bench(args, 4)
    assert calls == [bench.config] and bench.parts.optimizer is bench.optimizer
    factor = bench.parts.scheduler.lr_lambdas[0]
    assert factor(0) == 0.1 and factor(10**4) > 0.99


def test_the_benchmark_speaks_the_trainers_vocabulary() -> None:
    args = throughput.parse_args(["--batch-size", "8,16", "--selfie.attn_layers=1", "--speed.cpu_threads", "1"])
    assert args.batch == [8, 16] and args.set == ["selfie.attn_layers=1", "speed.cpu_threads=1"]
    assert throughput.parse_args(["--precision", "fp32"]).precision == "fp32"
    with pytest.raises(SystemExit):
        throughput.parse_args(["--bogus"])


def test_the_json_holds_every_batch_size_measured_before_a_failure(tmp_path, demo_root, monkeypatch) -> None:
    """An out-of-memory (or a time limit) at a large batch keeps the smaller batches' figures on disk."""
    measure = throughput.run_mode

    def out_of_memory_at_4(bench, name, timed):
        if bench.batch == 4:
            raise torch.cuda.OutOfMemoryError("stand-in: out of memory at batch 4")
        return measure(bench, name, timed)

    monkeypatch.setattr(throughput, "run_mode", out_of_memory_at_4)
    path = tmp_path / "sweep.json"
    args = ["--width", "0.125", "--set", "selfie.attn_layers=1", "--set", "selfie.attn_heads=4", "--workers", "1"]
    args += ["--warmup", "1", "--window", "1", "--windows", "1", "--profile-steps", "0"]
    args += ["--cache", str(demo_root.parent), "--modes", "synthetic", "--batch", "2,4", "--json", str(path)]
    with pytest.raises(torch.cuda.OutOfMemoryError):
        throughput.main(args)
    record = json.loads(path.read_text())
    assert list(record["results"]) == ["2"] and record["results"]["2"]["synthetic"]["median"] > 0
    assert "2" in record["compute"] and "| synthetic | 2 |" in record["table"]
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.json"]  # no partial file left beside it


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--set", "model.bogus=1"], "unknown config key 'model.bogus'"),
        (["--cuda-graph", "--set", "optim.implementation=for-loop"], "optim.implementation=for-loop with speed"),
        (["--cuda-graph", "--precision", "fp16"], "speed.cuda_graph=true with speed.precision=fp16"),
        (["--image-size", "224", "--patch-size", "30"], "patch"),
    ],
)
def test_check_args_refuses_what_a_run_would_refuse(flags: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        throughput.main(["--check-args", "--modes", "synthetic", *flags])
    error = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(error) == 1 and message in error[0], error


def test_check_args_passes_the_headline_sweep_without_a_device(capsys) -> None:
    flags = ["--image-size", "224", "--patch-size", "32", "--precision", "bf16", "--channels-last", "--cuda-graph"]
    throughput.main(["--check-args", *flags, "--compile", "--batch", "64,1024", "--modes", "synthetic,torch"])
    assert capsys.readouterr().out.strip() == "arguments ok: batch 64,1024, modes synthetic,torch"


def test_the_default_benchmark_times_the_demo_model_and_builds_only_what_it_reads(tmp_path, demo_root, capsys) -> None:
    """At 32 px the default is the demo's model (not the full-width ResNet-36 that took a CPU past ten minutes),
    a CPU rate prints with significant figures (not "0 images/s"), and no .beton is built for torch modes."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / demo_root.name).symlink_to(demo_root)
    args = ["--modes", "synthetic,torch", "--batch", "4", "--workers", "1", "--warmup", "1", "--window", "1"]
    record = throughput.main([*args, "--windows", "2", "--profile-steps", "0", "--cache", str(cache)])
    assert record["config"]["model"]["width"] == 0.25  # configs/demo.yaml's
    assert not list(cache.glob("*.beton"))
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("synthetic @ 4: ")]
    assert float(printed[0].split()[3].replace(",", "")) > 0
    assert (
        throughput.rate(0.5234) == "0.523" and throughput.rate(12.34) == "12.3" and throughput.rate(1234.5) == "1,234"
    )


def test_a_non_finite_loss_is_marked_beside_its_rate() -> None:
    """A graph computing NaN still reports images/s: the record and the printed line say the loss is not finite."""
    assert throughput.loss_record(None) == {}
    assert throughput.loss_record(torch.tensor(2.5)) == {"loss": 2.5, "loss_finite": True}
    for bad, text in ((float("nan"), "nan"), (float("inf"), "inf")):
        record = throughput.loss_record(torch.tensor(bad))
        assert record == {"loss": text, "loss_finite": False}
        assert throughput.loss_text(record) == f", loss {text} (NOT FINITE)"
        assert json.loads(json.dumps(record)) == record  # plain JSON, no NaN literal


def test_flops_are_counted_at_a_small_batch_after_the_measured_model_is_freed(demo_root, monkeypatch) -> None:
    """The count per image times the batch is the count at that batch (FLOPs grow linearly), and the
    sweep counts only once the measured Bench (its graph's pool, its activations) is gone."""
    import gc
    import weakref

    args = ["--width", "0.125", "--set", "selfie.attn_layers=1", "--set", "selfie.attn_heads=4", "--workers", "0"]
    args += ["--warmup", "1", "--window", "1", "--windows", "1", "--profile-steps", "0"]
    args += ["--cache", str(demo_root.parent), "--modes", "synthetic", "--batch", "16"]
    parsed = throughput.parse_args(args)
    assert throughput.flops_per_image(parsed) * 16 == pytest.approx(throughput.step_flops(modes.Bench(parsed, 16)))
    measured, counted_at = [], []
    bench_class, count = throughput.Bench, throughput.flops_per_image

    def tracked(*bench_args):
        bench = bench_class(*bench_args)
        measured.append(weakref.ref(bench))
        return bench

    def count_when_freed(parsed_args):
        gc.collect()
        counted_at.append([ref() is None for ref in measured])
        return count(parsed_args)

    monkeypatch.setattr(throughput, "Bench", tracked)
    monkeypatch.setattr(throughput, "flops_per_image", count_when_freed)
    record = throughput.main(args)
    assert counted_at == [[True]] and record["compute"][16]["step_gflop"] > 0


def test_check_inputs_builds_every_modes_inputs_without_a_step(demo_root, capsys) -> None:
    args = ["--check-inputs", "--modes", "synthetic,torch,no-model:torch", "--batch", "64,256", "--workers", "0"]
    assert throughput.main([*args, "--cache", str(demo_root.parent)]) == {}
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "arguments ok: batch 64,256, modes synthetic,torch,no-model:torch"
    built = [line.removeprefix("inputs ok: ").rsplit(": ", 1)[0] for line in printed[1:]]
    assert built == ["synthetic @ 4", "torch @ 4", "no-model:torch @ 4"]
