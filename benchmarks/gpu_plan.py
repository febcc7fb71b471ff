"""The steps of the GPU check (`benchmarks/gpu_check.sh OUT [--from STEP]`), their time limits and their
estimated device memory, and which of them one call runs.

One call is the unit: a lent GPU machine gives one lease of 15 minutes, its start-up included, so a call
must end within the budget (`GPU_CHECK_BUDGET_S`, default `BUDGET_S`): the sum over its steps of (time
limit + `timeout -k` grace), plus what the runner needs between and after them (`RESERVE_S`). Every call
runs the prelude (the environment, the data and caches: a later lease is a fresh machine), then the steps
of `ORDER` from where it is told to start, in order, as long as they fit; the summary names the first
step left out and the command that runs the rest.

The order is the order of value: the headline (Selfie 224/32 with the full-width ResNet-36 + A in bf16:
eager vs CUDA graph over a batch sweep, compile + graph at one batch, then end to end with the torch
loader, and FFCV/DALI where they import, against its no-model rate), which fits the first call whole;
then the fast GPU tests; RotNet and fine-tuning ResNet-50 at 224 px, eager vs graph; the slow GPU tests
(training processes); Selfie at 32 px with ResNet-32; last every method's row of the per-method table.

Each step's memory estimate (`Step.memory_gib`) holds one copy of its activations: the benchmarks count
FLOPs at a small batch on a model of their own once the measured one is freed (benchmarks/throughput.py).
tests/test_gpu_check.py holds every plan to the budget and every estimate to an 80 GB device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

BUDGET_S = 420  # one call's work: a 15-minute lease less a few minutes of start-up, with room to rerun
KILL_AFTER_S = 3  # `timeout -k`: a step that ignores SIGTERM at its limit is killed this much later
RESERVE_S = 15  # the runner's own start, the outputs it rewrites after every step, the final summary
STEP_KINDS = ("env", "data", "tests", "throughput")
JPEG_IMAGES = 2048
DEVICE_MEMORY_GIB = 80e9 / 2**30  # an H100's 80 GB, the smaller of the lent cards
# Saved bf16 activations per image at 224 px, the GPU rehearsal's estimates (issue 32): 64.6 GiB for
# Selfie 224/32 (full-width ResNet-36 + A) at batch 1,024; 60.3 GiB for ResNet-50 over 1,024 views
# (RotNet at batch 256, four rotations each). At 32 px the 224 px figure scaled by the pixels.
ACTIVATION_GIB = {"selfie": 64.6 / 1024, "resnet50": 60.3 / 1024}
FIXED_GIB = 4.0  # weights, gradients, optimizer state, the synthetic pool, the matmul peak, cuDNN's workspace
MOST_VIEWS = 8  # the most views of an image a method's step makes (a rotation method's eight)

TIMING = ("--precision", "bf16", "--channels-last", "--warmup", "3", "--window", "5", "--windows", "3")
SELFIE_224 = ("--image-size", "224", "--patch-size", "32", "--width", "1")
TABLE_ROW = ("--windows", "2", "--profile-steps", "0")  # the per-method steps: fewer windows, no profile
HEADLINE = ("selfie224_eager", "synthetic", 64)  # every headline figure's ratio to the eager batch-64 step
SWEEP = (64, 256, 512, 1024)


@dataclass(frozen=True)
class Step:
    name: str
    limit_s: int
    kind: str  # one of STEP_KINDS: how the runner checks it in a dry run and reads its results
    args: tuple[str, ...]  # the command after the interpreter
    baseline: str | None = None  # compare each figure with this step's figure of the same mode and batch
    anchor: tuple[str, str, int] | None = None  # (step, mode, batch): a fixed figure to compare each with
    memory_gib: float = FIXED_GIB  # estimated peak device memory (one copy of its largest batch's activations)

    @property
    def worst_case_s(self) -> int:
        return self.limit_s + KILL_AFTER_S


@dataclass(frozen=True)
class Where:
    """Paths and machine facts a plan is made for."""

    work: Path  # the runner's scratch folder (logs, JSON): archived into OUT, never OUT itself
    cache: str  # the benchmarks' data cache (throughput's --cache)
    workers: int  # loader processes/threads


def memory_gib(net: str, batch: int, views: int = 1, size: int = 224) -> float:
    """Estimated peak device memory of a training step: the fixed part and one copy of the activations."""
    return round(FIXED_GIB + ACTIVATION_GIB[net] * batch * views * (size / 224) ** 2, 1)


def methods_224() -> dict[str, str]:
    """Each registered method and its P at 224 px: ResNet-36 for a method with an attention pooling
    (Selfie's P), ResNet-50 otherwise. The environment probe records them; the runner asks here itself
    when the probe was cut."""
    from train.methods import METHODS, default_parts

    return {name: "resnet36" if default_parts(name).pool_prefix else "resnet50" for name in METHODS}


def env_step(where: Where) -> Step:
    # 40 s: 10-16 s measured on a CPU; the runner falls back to the registered methods when it is cut.
    return Step("env", 40, "env", ("-m", "benchmarks.gpu_prepare", "env", "--json", str(where.work / "env.json")))


def data_step(where: Where) -> Step:
    command = ("-m", "benchmarks.gpu_prepare", "data", "--cache", where.cache, "--images", str(JPEG_IMAGES))
    return Step("data", 45, "data", command)


def prelude(where: Where) -> list[Step]:
    """What every call runs first: a later lease is a fresh machine with an empty cache."""
    return [env_step(where), data_step(where)]


def throughput(where: Where, *flags: str) -> tuple[str, ...]:
    return ("-m", "benchmarks.throughput", *TIMING, "--cache", where.cache, *flags)


def tests(marks: str) -> tuple[str, ...]:
    # `-o addopts=`: no xdist workers (pyproject's), which the GPU machine need not have. `-v`: a line per
    # test, so a step cut at its limit still shows which tests ran and how they ended.
    return ("-m", "pytest", "-v", "-rfEs", "-p", "no:cacheprovider", "-o", "addopts=", "-m", marks, "tests/")


def headline(where: Where, env: dict) -> list[Step]:
    loaders = env.get("loaders") or ["torch"]
    modes = ",".join(["synthetic", *(mode for loader in loaders for mode in (loader, f"no-model:{loader}"))])
    sweep = throughput(where, *SELFIE_224, "--modes", "synthetic", "--batch", ",".join(map(str, SWEEP)))
    # One batch, one cold compile (about a minute), then the capture and the timing.
    compiled = throughput(where, *SELFIE_224, "--modes", "synthetic", "--batch", str(max(SWEEP)), "--compile")
    loading = throughput(where, *SELFIE_224, "--modes", modes, "--batch", "256", "--workers", f"{where.workers}")
    largest = memory_gib("selfie", max(SWEEP))
    return [
        Step("selfie224_eager", 60, "throughput", sweep, None, HEADLINE, largest),
        Step("selfie224_graph", 60, "throughput", (*sweep, "--cuda-graph"), "selfie224_eager", HEADLINE, largest),
        Step(
            "selfie224_compile_graph",
            100,
            "throughput",
            (*compiled, "--cuda-graph"),
            "selfie224_eager",
            HEADLINE,
            largest,
        ),
        Step("selfie224_loaders", 50, "throughput", (*loading, "--cuda-graph"), memory_gib=memory_gib("selfie", 256)),
    ]


def pairs(where: Where) -> list[Step]:
    """Eager vs graph at one batch: RotNet and fine-tuning ResNet-50 at 224 px, Selfie with ResNet-32 at 32 px."""
    rotnet = ("--method", "rotnet", "--set", "model.backbone=resnet50", "--image-size", "224")
    finetune = ("--stage", "finetune", "--arch", "resnet50", "--image-size", "224")
    small = ("--set", "model.backbone=resnet32", "--width", "1", "--modes", "synthetic,torch")
    small += ("--workers", f"{where.workers}")
    steps = []
    for name, flags, limit, memory in (
        ("rotnet224", rotnet, 40, memory_gib("resnet50", 256, views=4)),
        ("finetune224", finetune, 35, memory_gib("resnet50", 256)),
        ("selfie32_r32", small, 35, memory_gib("resnet50", 256, size=32)),
    ):
        flags = (*flags, "--batch", "256") + (() if "--modes" in flags else ("--modes", "synthetic"))
        steps.append(Step(f"{name}_eager", limit, "throughput", throughput(where, *flags), memory_gib=memory))
        graphed = throughput(where, *flags, "--cuda-graph")
        steps.append(Step(f"{name}_graph", limit, "throughput", graphed, f"{name}_eager", memory_gib=memory))
    return steps


def method_rows(where: Where, env: dict) -> list[Step]:
    steps = []
    for method, backbone in env.get("methods", {}).items():
        row = ("--method", method, *TABLE_ROW)
        at32 = (*row, "--set", "model.backbone=resnet32", "--width", "1", "--modes", "synthetic,torch,no-model:torch")
        at32 += ("--batch", "256", "--workers", f"{where.workers}")
        small = memory_gib("resnet50", 256, MOST_VIEWS, 32)
        steps.append(Step(f"method32_{method}", 25, "throughput", throughput(where, *at32), memory_gib=small))
        at224 = (*row, "--set", f"model.backbone={backbone}", *SELFIE_224, "--modes", "synthetic", "--batch", "64")
        large = memory_gib("resnet50", 64, MOST_VIEWS)
        steps.append(Step(f"method224_{method}", 25, "throughput", throughput(where, *at224), memory_gib=large))
    return steps


def plan(where: Where, env: dict) -> list[Step]:
    """Every step after the prelude, in the order of value, for the machine `env` describes."""
    fast = Step("gpu_tests_fast", 80, "tests", tests("(gpu or timm) and not slow"))
    # Three tests, seven training processes (graphed, compiled + graphed, each resumed): two cold compiles.
    slow = Step("gpu_tests_slow", 200, "tests", tests("(gpu or timm) and slow"))
    rotnet_finetune, small = pairs(where)[:4], pairs(where)[4:]
    return [*headline(where, env), fast, *rotnet_finetune, slow, *small, *method_rows(where, env)]


def worst_case_s(steps: list[Step]) -> int:
    """The longest a call with these steps can take: every limit and its kill grace, and the reserve."""
    return sum(step.worst_case_s for step in steps) + RESERVE_S


def call_steps(first: list[Step], steps: list[Step], start: str | None, budget_s: int) -> tuple[list[Step], list[Step]]:
    """(this call's steps after the prelude `first`, the steps left for later calls): from `start` (the
    first step when None), in order, while the call's worst case stays within the budget."""
    names = [step.name for step in steps]
    todo = steps[names.index(start) :] if start else steps
    taken: list[Step] = []
    for step in todo:
        if worst_case_s([*first, *taken, step]) > budget_s:
            break
        taken.append(step)
    return taken, todo[len(taken) :]


def budget_s() -> int:
    """GPU_CHECK_BUDGET_S (whole seconds) or the default; ValueError with the one line to print."""
    text = os.environ.get("GPU_CHECK_BUDGET_S", "").strip() or str(BUDGET_S)
    if not text.isdigit() or int(text) <= 0:
        raise ValueError(f"GPU_CHECK_BUDGET_S={text}: expected a positive whole number of seconds")
    return int(text)
