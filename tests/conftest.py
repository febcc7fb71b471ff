from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. The switch is read when a
# kernel is defined, so it is set before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A cold compile cache for this test session, inherited by every run a test starts: the suite compiles as
# on a fresh machine. A warm inductor cache in the system's temporary folder (its default place) can hide
# what a fresh clone hits (issue 21); xdist workers each import this file, so each gets its own.
_COMPILE_CACHE = tempfile.mkdtemp(prefix="selfie-tests-compile-cache-")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(_COMPILE_CACHE, "inductor")
os.environ["TRITON_CACHE_DIR"] = os.path.join(_COMPILE_CACHE, "triton")
atexit.register(shutil.rmtree, _COMPILE_CACHE, ignore_errors=True)

# A run without --config takes Fashion-MNIST where Debian installed it (train/config/schema.py): the suite pins
# the photo demo, so what it trains and the weights it pins do not depend on what this machine installed.
os.environ["SELFIE_TRAINER_DEMO"] = "photos"

from pipeline.demo import demo_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")
# How long a test waits on a subprocess before calling it hung. A guard, never a measurement: on a busy
# 2-core machine a run takes several times its idle time (issue 30), and no outcome may hinge on that.
HANG_GUARD_S = 900
# A Selfie small enough that a few steps take a second on one CPU core.
TINY = [
    "--model.width=0.125",
    "--selfie.attn_heads=4",
    "--selfie.attn_intermediate=32",
    "--selfie.attn_layers=1",
    "--data.workers=0",
    "--batch-size=8",
    "--log.every=1",
    "--speed.cpu_threads=1",
]


def pytest_report_header(config: pytest.Config) -> str:
    """The machine's CPU capability and the behaviour pins it checks, at the top of every run (CI's
    output included), so a landing says which pins were checked (tests/test_behaviour.py)."""
    from tests.behaviour_hashes import runnable_capabilities

    pins = ", ".join(runnable_capabilities()) or "none (the behaviour test skips)"
    return f"cpu capability: {torch.backends.cpu.get_cpu_capability()}; behaviour pins checked: {pins}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test of a loader backend whose package is not installed here (FFCV, DALI: the GPU machine has
    neither) is skipped, never failed or aborted: the tests parametrized by the loader's name, and those
    marked `needs_loader(name)`."""
    from pipeline.loaders import LOADERS

    missing = {name for name, backend in LOADERS.items() if not backend.installed()}
    for item in items if missing else ():
        wanted = {marker.args[0] for marker in item.iter_markers("needs_loader")}
        callspec = getattr(item, "callspec", None)
        wanted |= {value for value in callspec.params.values() if isinstance(value, str)} if callspec else set()
        if absent := sorted(wanted & missing):
            names = ", ".join(LOADERS[name].package for name in absent)
            item.add_marker(pytest.mark.skip(reason=f"needs {names}, not installed here"))


def free_port() -> str:
    """A TCP port no one listens on now, for torchrun's rendezvous: a fixed one can still be held (TIME_WAIT,
    another job) when the test starts."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


@pytest.fixture
def keep_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_dataset(tmp_path_factory.mktemp("cache"))


def demo_data_for(loader: str, demo_root: Path) -> Path:
    """The demo data in the form `--loader` reads: the image folders, or (ffcv) their .beton files."""
    from pipeline.loaders import LOADERS

    return LOADERS[loader].demo(demo_root.parent)


def run_script(
    args: list[str],
    cwd: Path,
    timeout: float = HANG_GUARD_S,
    launcher: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    command = (launcher or [sys.executable]) + args
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run_concurrently(calls: list[Callable[[], T]], jobs: int | None = None) -> list[T]:
    """Each call's result, in order; the calls run side by side. Most of a short CLI run is starting
    Python and importing torch on one core, so independent runs overlap well on a CI machine's cores."""
    with ThreadPoolExecutor(max_workers=jobs or max(2, os.cpu_count() or 2)) as pool:
        return list(pool.map(lambda call: call(), calls))


# The monitors on few images: they score a run without changing it (tests/test_behaviour.py shows it), and
# at their defaults would cost a tiny test run more than its training.
# A test's own --monitor.* flags come after these and override them.
SMALL_MONITORS = [
    "--monitor.knn_train_images=48",
    "--monitor.knn_test_images=24",
    "--monitor.knn_random_inits=2",
    "--monitor.clean_images=8",
    "--monitor.clean_chunk=4",
]


def pretrain(args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return run_script([str(ROOT / "train" / "pretrain.py"), *SMALL_MONITORS, *args], cwd, **kwargs)


def finetune(args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return run_script([str(ROOT / "train" / "finetune.py"), *args], cwd, **kwargs)


def kill_when_exists(script: str, args: list[str], cwd: Path, marker: Path) -> None:
    """Start train/<script> and SIGKILL it as soon as `marker` (a checkpoint) exists: a crash mid-run."""
    monitors = SMALL_MONITORS if script == "pretrain.py" else []
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train" / script), *monitors, *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + HANG_GUARD_S
    while not marker.exists():
        assert process.poll() is None and time.time() < deadline, f"run ended before writing {marker}"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
