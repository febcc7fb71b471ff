"""The one timing harness of the benchmarks (throughput, loaders, patch_op): untimed warm-up steps, then
timed windows of steps with the device synchronised before each clock read, and per-stage times.

A step is a function of a `StageClock`; it wraps its parts in `clock.stage(name)` to have them timed by
name. On a GPU the compute stages are timed by CUDA events (read once, after the window's sync); "data",
the host's wait for the next batch, is always wall-clock time, which is what a data-bound step loses.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

DATA_STAGE = "data"


class StageClock:
    """Seconds per named stage, summed over steps."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)
        self.events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.cuda and name != DATA_STAGE:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((name, start, end))
        else:
            start = time.perf_counter()
            yield
            self.seconds[name] += time.perf_counter() - start

    def collect(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
            for name, start, end in self.events:
                self.seconds[name] += start.elapsed_time(end) / 1000
            self.events.clear()
        return dict(self.seconds)

    def reset(self) -> None:
        self.collect()
        self.seconds.clear()


Step = Callable[[StageClock], None]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_windows(
    step: Step, device: torch.device, images_per_step: int, warmup: int, windows: int, window: int
) -> dict:
    """Run `warmup` untimed steps, then `windows` windows of `window` steps. Returns images/s of the
    median, slowest and fastest window and over all timed steps, and each stage's ms per step."""
    clock = StageClock(device)
    for _ in range(warmup):
        step(clock)
    clock.reset()
    rates, total = [], 0.0
    for _ in range(windows):
        sync(device)
        start = time.perf_counter()
        for _ in range(window):
            step(clock)
        sync(device)
        seconds = time.perf_counter() - start
        total += seconds
        rates.append(window * images_per_step / seconds)
    steps_timed = windows * window
    return {
        "median": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "overall": steps_timed * images_per_step / total,
        "stages_ms": {k: round(1000 * v / steps_timed, 3) for k, v in clock.collect().items()},
    }


LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")


def profile_steps(step: Step, device: torch.device, steps: int) -> dict:
    """Per step, from torch's profiler: on CUDA, the kernels run, the launches the host issued (a graph
    replay is one) and the fraction of the wall time some kernel was running; on a CPU, the aten ops run."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    clock = StageClock(device)
    with profile(activities=activities) as prof:
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step(clock)
        sync(device)
        wall = time.perf_counter() - start
    events = prof.events()
    if not cuda:
        return {"ops_per_step": round(sum(e.name.startswith("aten::") for e in events) / steps, 1)}
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    launches = sum(e.name in LAUNCH_CALLS for e in events)
    busy = _covered_us([(e.time_range.start, e.time_range.end) for e in kernels])
    return {
        "kernels_per_step": round(len(kernels) / steps, 1),
        "launches_per_step": round(launches / steps, 1),
        "gpu_busy": round(min(1.0, busy / 1e6 / wall), 4),
    }


def prepare_profiler_for_graphs() -> None:
    """Call before any CUDA graph is captured in a process that will profile graph replays. CUPTI must be
    initialised before the capture for the profiler to see the graph's kernels, and must not be torn down
    and re-initialised between profiling sessions while graphs exist (a crash on CUDA 11 and 12): PyTorch's
    own workaround (pytorch/pytorch#75504), which torch.compile applies for its graph modes, is one empty
    profiling session up front and no teardown. gpu_check.sh also sets the variables in the environment."""
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("TEARDOWN_CUPTI", "0")
    os.environ.setdefault("DISABLE_CUPTI_LAZY_REINIT", "1")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]):
        pass


def _covered_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of intervals (kernels on several streams overlap)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def peak_memory_gib(device: torch.device) -> float | None:
    """The most device memory tensors held since the last `reset_peak_memory`; None on a CPU."""
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
