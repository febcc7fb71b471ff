"""Behaviour is pinned: every method's pretraining and three fine-tuning runs reach the weights (hashes) in
tests/behaviour_hashes.json, one set per CPU capability (tests/behaviour_hashes.py says why, and how to
re-pin). An AVX-512 machine checks both sets, forcing AVX2 for the second; an AVX2 machine checks its own."""

import json
from functools import partial
from pathlib import Path

import pytest
import torch

from tests.behaviour_hashes import pinned_environment, runnable_capabilities
from tests.conftest import HANG_GUARD_S, ROOT, run_concurrently, run_script

pytestmark = pytest.mark.slow
PINNED = json.loads((ROOT / "tests" / "behaviour_hashes.json").read_text())
PARTS = 2  # each capability's runs in two processes side by side: most of each is one core's arithmetic


def test_every_run_reaches_the_pinned_weights(tmp_path: Path) -> None:
    capabilities = runnable_capabilities()
    if torch.__version__ != PINNED["torch"] or not capabilities:
        pytest.skip(
            f"weights pinned for AVX2 and AVX512 on torch {PINNED['torch']}; this machine runs "
            f"{torch.backends.cpu.get_cpu_capability()} on torch {torch.__version__}"
        )
    jobs = [(capability, part) for capability in capabilities for part in range(PARTS)]
    outs = {job: tmp_path / f"{job[0]}-{job[1]}.json" for job in jobs}
    calls = [
        partial(
            run_script,
            ["-m", "tests.behaviour_hashes", str(outs[job]), str(job[1]), str(PARTS)],
            ROOT,
            timeout=HANG_GUARD_S,
            env=pinned_environment(job[0]),
        )
        for job in jobs
    ]
    got: dict[str, dict] = {capability: {} for capability in capabilities}
    for result, job in zip(run_concurrently(calls), jobs, strict=True):
        assert result.returncode == 0, result.stderr[-3000:]
        got[job[0]] |= json.loads(outs[job].read_text())
    for capability in capabilities:
        assert got[capability] == PINNED["pins"][capability], f"weights moved on {capability}"
