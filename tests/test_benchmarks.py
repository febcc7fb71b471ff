"""Smoke runs of the benchmark scripts: they run and print their table (no timing assertions)."""

import pytest

from benchmarks import patch_op


def test_patch_op_benchmark_prints_a_row_per_op_and_shape(capsys: pytest.CaptureFixture) -> None:
    patch_op.main(["--batch", "2", "--warmup", "1", "--repeats", "1", "--device", "cpu"])
    rows = [
        line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| 32/8") or line.startswith("| 224/32")
    ]
    assert len(rows) == 4 and {row.split("|")[2].strip() for row in rows} == {"reference", "numba"}
