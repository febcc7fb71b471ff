"""Smoke runs of the benchmark scripts: they run and print their table (no timing assertions)."""

import json

import pytest

from benchmarks import loaders, patch_op, throughput


def test_patch_op_benchmark_prints_a_row_per_op_and_shape(capsys: pytest.CaptureFixture) -> None:
    patch_op.main(["--batch", "2", "--warmup", "1", "--repeats", "1", "--device", "cpu"])
    rows = [
        line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| 32/8") or line.startswith("| 224/32")
    ]
    assert len(rows) == 4 and {row.split("|")[2].strip() for row in rows} == {"reference", "numba"}


def test_loader_benchmark_times_every_backend(tmp_path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "loaders.json"
    loaders.main(
        [
            "--images",
            "24",
            "--size",
            "64",
            "--patch",
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


def test_throughput_benchmark_runs_every_mode(tmp_path, capsys: pytest.CaptureFixture) -> None:
    tiny = ["--set", "model.attn_layers=1", "--set", "model.attn_heads=4", "--set", "model.attn_intermediate=32"]
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
            str(tmp_path),
            "--json",
            str(tmp_path / "t.json"),
            "--plot",
            str(tmp_path / "t.png"),
        ]
    )
    assert list(record["results"]) == list(throughput.ALL_MODES)
    for mode, result in record["results"].items():
        assert result["min"] <= result["median"] <= result["max"], mode
    stages = record["results"]["torch"]["stages_ms"]
    assert set(stages) == {"data", "patch op", "forward", "backward", "optimizer"}
    assert set(record["results"]["no-model:dali"]["stages_ms"]) == {"data", "patch op"}
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["config"]["train"]["batch_size"] == 4 and saved["versions"]["ffcv"]
    assert (tmp_path / "t.png").stat().st_size > 0
    assert record["compute"]["step_gflop"] > 0 and record["compute"]["matmul_peak_tflops"] > 0
    assert 0 < record["results"]["synthetic"]["fraction_of_peak"] < 1.5
    out = capsys.readouterr().out
    assert "| synthetic |" in out and "| naive |" in out and "1.00x" in out


@pytest.mark.parametrize("method", ["rotnet", "patch_relnet"])
def test_throughput_benchmark_times_a_rotation_step(tmp_path, capsys: pytest.CaptureFixture, method: str) -> None:
    args = ["--method", method, "--set", "model.backbone=resnet8", "--width", "0.25", "--batch", "4"]
    args += ["--modes", "synthetic,torch,no-model:torch", "--workers", "1", "--warmup", "1", "--window", "1"]
    record = throughput.main([*args, "--windows", "2", "--cache", str(tmp_path)])
    assert list(record["results"]) == ["synthetic", "torch", "no-model:torch"]
    assert set(record["results"]["torch"]["stages_ms"]) == {"data", "view op", "forward", "backward", "optimizer"}
    assert set(record["results"]["no-model:torch"]["stages_ms"]) == {"data", "view op"}
    out = capsys.readouterr().out
    assert f"{4 if method == 'rotnet' else 8} views per image" in out and "| view op ms |" in out


def test_throughput_benchmark_refuses_the_naive_baseline_for_a_rotation_method(
    tmp_path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        throughput.main(["--method", "rotnet", "--modes", "naive", "--cache", str(tmp_path)])
    assert exit_info.value.code != 0
    assert "--modes naive: the naive baseline is Selfie's" in capsys.readouterr().err
