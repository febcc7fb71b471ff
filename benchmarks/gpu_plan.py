"""The steps of the two GPU-check calls (`benchmarks/gpu_check.sh OUT quick|full`) and their time limits.

A lent GPU machine runs one command of at most 600 s per call, so each call must end within `BUDGET_S`:
the sum over its steps of (time limit + `timeout -k` grace), plus what the runner itself needs between
and after them (`RESERVE_S`), is at most the budget (tests/test_gpu_check.py holds every plan to it).

- quick (first): the environment; the data and caches (untimed by the benchmarks, bounded like every
  step); the fast GPU tests (graph vs eager, the patch op against the reference, bf16 losses); the
  headline, Selfie 224/32 with the full-width ResNet-36 + A in bf16, eager vs CUDA graph vs compile +
  graph over a batch sweep, then end to end with the torch loader (and FFCV/DALI where they import)
  against its no-model rate; last the slow GPU tests (training processes), so that a step that runs long
  can never cost the headline its figures.
- full (second): RotNet with ResNet-50 and fine-tuning ResNet-50 at 224 px, eager vs graph; Selfie at
  32 px with ResNet-32, the torch loader vs synthetic, eager and graphed; every method's row of the
  per-method table at 32 and 224 px.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BUDGET_S = 540  # one call, everything included (the device tool allows 600 s per command)
KILL_AFTER_S = 3  # `timeout -k`: a step that ignores SIGTERM at its limit is killed this much later
RESERVE_S = 15  # the runner's own start, the outputs it rewrites after every step, the final summary
CALLS = ("quick", "full")
STEP_KINDS = ("env", "data", "tests", "throughput")
JPEG_IMAGES = 2048

TIMING = ("--precision", "bf16", "--channels-last", "--warmup", "3", "--window", "5", "--windows", "3")
SELFIE_224 = ("--image-size", "224", "--patch-size", "32", "--width", "1")
TABLE_ROW = ("--windows", "2", "--profile-steps", "0")  # the per-method steps: fewer windows, no profile
HEADLINE = ("selfie224_eager", "synthetic", 64)  # every headline figure's ratio to the eager batch-64 step


@dataclass(frozen=True)
class Step:
    name: str
    limit_s: int
    kind: str  # one of STEP_KINDS: how the runner checks it in a dry run and reads its results
    args: tuple[str, ...]  # the command after the interpreter
    baseline: str | None = None  # compare each figure with this step's figure of the same mode and batch
    anchor: tuple[str, str, int] | None = None  # (step, mode, batch): a fixed figure to compare each with

    @property
    def worst_case_s(self) -> int:
        return self.limit_s + KILL_AFTER_S


@dataclass(frozen=True)
class Where:
    """Paths and machine facts a plan is made for."""

    work: Path  # the runner's scratch folder (logs, JSON): archived into OUT, never OUT itself
    cache: str  # the benchmarks' data cache (throughput's --cache)
    workers: int  # loader processes/threads


def env_step(where: Where) -> Step:
    return Step("env", 20, "env", ("-m", "benchmarks.gpu_prepare", "env", "--json", str(where.work / "env.json")))


def throughput(where: Where, *flags: str) -> tuple[str, ...]:
    return ("-m", "benchmarks.throughput", *TIMING, "--cache", where.cache, *flags)


def tests(marks: str) -> tuple[str, ...]:
    # `-o addopts=`: no xdist workers (pyproject's), which the GPU machine need not have. `-v`: a line per
    # test, so a step cut at its limit still shows which tests ran and how they ended.
    return ("-m", "pytest", "-v", "-rfEs", "-p", "no:cacheprovider", "-o", "addopts=", "-m", marks, "tests/")


def data_step(where: Where, limit_s: int) -> Step:
    command = ("-m", "benchmarks.gpu_prepare", "data", "--cache", where.cache, "--images", str(JPEG_IMAGES))
    return Step("data", limit_s, "data", command)


def quick(where: Where, env: dict) -> list[Step]:
    loaders = env.get("loaders") or ["torch"]
    modes = ",".join(["synthetic", *(mode for loader in loaders for mode in (loader, f"no-model:{loader}"))])
    sweep = ("--modes", "synthetic", "--batch", "64,256,512,1024")
    return [
        data_step(where, 45),
        Step("gpu_tests_fast", 80, "tests", tests("(gpu or timm) and not slow")),
        Step("selfie224_eager", 60, "throughput", throughput(where, *SELFIE_224, *sweep), anchor=HEADLINE),
        Step(
            "selfie224_graph",
            60,
            "throughput",
            throughput(where, *SELFIE_224, *sweep, "--cuda-graph"),
            "selfie224_eager",
            HEADLINE,
        ),
        Step(
            "selfie224_compile_graph",  # compiling costs a minute per batch size: two of them
            95,
            "throughput",
            throughput(where, *SELFIE_224, "--modes", "synthetic", "--batch", "256,1024", "--compile", "--cuda-graph"),
            "selfie224_eager",
            HEADLINE,
        ),
        Step(
            "selfie224_loaders",
            50,
            "throughput",
            throughput(
                where, *SELFIE_224, "--modes", modes, "--batch", "256", "--cuda-graph", "--workers", f"{where.workers}"
            ),
        ),
        Step("gpu_tests_slow", 85, "tests", tests("(gpu or timm) and slow")),
    ]


def full(where: Where, env: dict) -> list[Step]:
    rotnet = ("--method", "rotnet", "--set", "model.backbone=resnet50", "--image-size", "224")
    finetune = ("--stage", "finetune", "--arch", "resnet50", "--image-size", "224")
    small = ("--set", "model.backbone=resnet32", "--width", "1", "--modes", "synthetic,torch")
    small += ("--workers", f"{where.workers}")
    steps = [data_step(where, 30)]
    for name, flags, limit in (("rotnet224", rotnet, 40), ("finetune224", finetune, 35), ("selfie32_r32", small, 35)):
        flags = (*flags, "--batch", "256") + (() if "--modes" in flags else ("--modes", "synthetic"))
        steps.append(Step(f"{name}_eager", limit, "throughput", throughput(where, *flags)))
        graphed = throughput(where, *flags, "--cuda-graph")
        steps.append(Step(f"{name}_graph", limit, "throughput", graphed, f"{name}_eager"))
    for method, backbone in env.get("methods", {}).items():  # none when the environment step failed
        row = ("--method", method, *TABLE_ROW)
        at32 = (*row, "--set", "model.backbone=resnet32", "--width", "1", "--modes", "synthetic,torch,no-model:torch")
        at32 += ("--batch", "256")
        steps.append(
            Step(f"method32_{method}", 25, "throughput", throughput(where, *at32, "--workers", f"{where.workers}"))
        )
        at224 = (*row, "--set", f"model.backbone={backbone}", *SELFIE_224, "--modes", "synthetic", "--batch", "64")
        steps.append(Step(f"method224_{method}", 25, "throughput", throughput(where, *at224)))
    return steps


def plan(call: str, where: Where, env: dict) -> list[Step]:
    """The call's steps after the environment step, for the machine `env` describes."""
    return {"quick": quick, "full": full}[call](where, env)


def worst_case_s(steps: list[Step]) -> int:
    """The longest a call with these steps can take: every limit and its kill grace, and the reserve."""
    return sum(step.worst_case_s for step in steps) + RESERVE_S
