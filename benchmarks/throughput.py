"""Images/s reaching the pretext loss: every loader end to end, against the ceiling and a naive baseline.

    python -m benchmarks.throughput                                   # 32/8 on the demo data, all modes
    python -m benchmarks.throughput --method patch_rotnet --set model.backbone=resnet8 --modes synthetic,torch
    python -m benchmarks.throughput --image-size 224 --patch-size 32 --width 1 --precision bf16 \
        --channels-last --batch 64,256,512,1024 --modes synthetic --cuda-graph --json runs/bench224.json
    python -m benchmarks.throughput --modes synthetic,ffcv --compile
    python -m benchmarks.throughput --stage finetune --arch resnet50 --image-size 224 --modes synthetic

The modes (benchmarks/modes.py) run side by side in one invocation, with the same config, for every
batch size of `--batch`; `--stage finetune` times fine-tuning's supervised step instead of a pretext
method's. The step is the trainer's (train/engine/step.py): eager, compiled (`--compile`), replayed from a CUDA
graph (`--cuda-graph`), or both.

Timing is benchmarks/harness.py's: --warmup untimed steps (plus what the loader holds ready), then
--windows timed windows of --window steps. The table gives the median window's images/s, the slowest and
fastest, and ratios of medians to `synthetic` and `naive`; a second table splits a step into stages (data
wait, the input op, forward, backward, optimizer, or the graph's replay; host->device copies are inside
the loader's data wait). Then --profile-steps steps under torch's profiler give kernels and launches per
step and the fraction of time the GPU was busy (on a CPU: aten ops per step), and the device's peak
memory per mode. Images/s counts source images: a rotation method's step handles 4 or 8 views of each.
Each training mode also records the loss of its last timed step and whether it is finite (a graph
computing NaN would still report images/s). Last, one step's FLOPs (torch's FlopCounterMode on the eager
step, counted at a small batch on a model of its own once the measured one is freed, then scaled) and a
measured square-matmul peak in the step's dtype give each training mode's achieved TFLOP/s and its
fraction of that peak. --json writes all of it with the machine, device, versions, resolved config and date.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import math
import os
import platform
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch

from benchmarks.harness import (
    peak_memory_gib,
    prepare_profiler_for_graphs,
    profile_steps,
    reset_peak_memory,
    time_windows,
)
from benchmarks.modes import MODES, PRECISIONS, STAGES, Bench, build_config
from model.classifier import ARCHS
from pipeline.loaders import LOADERS
from train.config import COMPILE_MODES, ConfigError, to_dict
from train.config.checks import check_config
from train.engine.cli import run_cli
from train.methods import METHODS, default_method, method_flags
from train.stages import pretraining

INPUT_CHECK_BATCH = 4  # --check-inputs: images per batch (the sizes a run takes are checked by --check-args)
FLOP_COUNT_BATCH = 8  # images per step where FLOPs are counted (then scaled to each batch size)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRETEXT_ONLY_MODES = ("naive", "no-model:naive")  # per-image forwards: a batch-norm head needs more than one image


def release_memory(device: torch.device) -> None:
    """What one mode leaves behind (loader threads, DALI's and torch's device pools) before the next."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        try:
            from nvidia.dali.backend import ReleaseUnusedMemory

            ReleaseUnusedMemory()
        except ImportError:
            pass


def run_mode(bench: Bench, name: str, timed: Callable[[dict], None] = lambda result: None) -> dict:
    """Time one mode (handing its rates to `timed` at once, so a profiler that fails later loses nothing),
    then profile a few of its steps; its peak device memory over both."""
    bench.reset()
    mode, args = MODES[name], bench.args
    reset_peak_memory(bench.device)
    with mode.run(bench) as step:
        warmup = args.warmup + mode.ready(args.workers)
        result = time_windows(step, bench.device, bench.batch, warmup, args.windows, args.window)
        result |= loss_record(bench.last_loss)
        timed(result)
        if args.profile_steps:
            result |= profile_steps(step, bench.device, args.profile_steps)
    result["peak_memory_gib"] = peak_memory_gib(bench.device)
    return result


def loss_record(loss: torch.Tensor | None) -> dict:
    """The loss of the last timed step and whether it is finite: a graph that computes NaN still reports
    images/s, so a rate is only a figure beside a finite loss. Nothing for a data-side mode (no loss)."""
    if loss is None:
        return {}
    value = float(loss)  # after the timing: this sync is not timed
    return {"loss": value if math.isfinite(value) else str(value), "loss_finite": math.isfinite(value)}


def loss_text(result: dict) -> str:
    if "loss_finite" not in result:
        return ""
    return f", loss {result['loss']:.4g}" if result["loss_finite"] else f", loss {result['loss']} (NOT FINITE)"


def step_flops(bench: Bench) -> int:
    """FLOPs of one training step (forward + backward of the model and the loss), counted by torch's
    FlopCounterMode on the eager step (a compiled or graphed one computes the same)."""
    from torch.utils.flop_counter import FlopCounterMode

    bench.reset()
    step, counter = bench.eager_step(), FlopCounterMode(display=False)
    with counter:
        step(bench.synthetic_pool()[:1], bench.generator)
    bench.reset()
    return counter.get_total_flops()


def flops_per_image(args: argparse.Namespace) -> float:
    """One training step's FLOPs per image, counted on a Bench of its own at a small batch (a step's FLOPs
    grow linearly with its images: every layer, the pooling and the loss work image by image). Called
    after the measured Bench is gone and the cache emptied, so the full batch's activations never need a
    second copy beside a CUDA graph's pool (an H100 ran out of memory that way)."""
    bench = Bench(args, min(FLOP_COUNT_BATCH, *args.batch))
    try:
        return step_flops(bench) / bench.batch
    finally:
        device = bench.device
        del bench
        release_memory(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """Measured FLOP/s of a square matmul in the step's dtype: the device's practical peak."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times)


def versions() -> dict:
    """Installed distributions' versions (ffcv's own `__version__` still says 0.0.3rc1 in 1.0.2)."""
    found = {"python": platform.python_version()}
    for name in ("torch", "accelerate", "numba", "triton", "ffcv", "nvidia-dali-cuda130", "numpy"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def rate(value: float) -> str:
    """Images/s to three significant figures at least (a CPU step's 0.52 must not print as 0)."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def rate_table(results: dict) -> list[str]:
    lines = [
        "| mode | batch | images/s | slowest .. fastest | all timed steps | vs synthetic | vs naive |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for batch, modes in results.items():
        synthetic = modes.get("synthetic", {}).get("median")
        for name, r in modes.items():
            trains = MODES[name].trains
            # Training modes against the naive step, data-side modes against the naive data side.
            naive = modes.get("naive" if trains else "no-model:naive", {}).get("median")
            vs_synthetic = f"{r['median'] / synthetic:.2f}x" if synthetic and trains else "-"
            vs_naive = f"{r['median'] / naive:.2f}x" if naive else "-"
            lines.append(
                f"| {name} | {batch} | {rate(r['median'])} | {rate(r['min'])} .. {rate(r['max'])} "
                f"| {rate(r['overall'])} | {vs_synthetic} | {vs_naive} |"
            )
    return lines


PROFILE_COLUMNS = (  # (result key, column title)
    ("kernels_per_step", "kernels/step"),
    ("launches_per_step", "launches/step"),
    ("gpu_busy", "GPU busy"),
    ("ops_per_step", "aten ops/step"),
    ("peak_memory_gib", "peak GiB"),
    ("achieved_tflops", "TFLOP/s"),
    ("fraction_of_peak", "of peak"),
)


def stage_table(results: dict) -> list[str]:
    rows = [(batch, name, r) for batch, modes in results.items() for name, r in modes.items()]
    stages = list(dict.fromkeys(stage for _, _, r in rows for stage in r["stages_ms"]))
    columns = [(key, title) for key, title in PROFILE_COLUMNS if any(r.get(key) is not None for _, _, r in rows)]
    titles = [f"{s} ms" for s in stages] + [title for _, title in columns]
    lines = ["| mode | batch | " + " | ".join(titles) + " |", "| --- | ---: |" + " ---: |" * len(titles)]
    for batch, name, r in rows:
        cells = [f"{r['stages_ms'][s]:.2f}" if s in r["stages_ms"] else "-" for s in stages]
        cells += [f"{r[key]:g}" if r.get(key) is not None else "-" for key, _ in columns]
        lines.append(f"| {name} | {batch} | " + " | ".join(cells) + " |")
    return lines


def format_tables(results: dict) -> str:
    return "\n".join([*rate_table(results), "", *stage_table(results)])


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    rows = [(f"{name}@{batch}", r) for batch, modes in results.items() for name, r in modes.items()]
    names, medians = [n for n, _ in rows], [r["median"] for _, r in rows]
    errors = [[r["median"] - r["min"] for _, r in rows], [r["max"] - r["median"] for _, r in rows]]
    figure, axes = plt.subplots(figsize=(max(9, 0.8 * len(rows)), 4.5))
    axes.bar(names, medians, yerr=errors, capsize=4, color="#4c72b0")
    axes.set_yscale("log")  # the data-side modes run orders of magnitude above the training step
    plain = FuncFormatter(lambda value, _: rate(value))  # "1,000" and "50", not "1.14x10^0" tick labels
    axes.yaxis.set_major_formatter(plain)
    axes.yaxis.set_minor_formatter(plain if max(medians) / max(min(medians), 1e-9) < 10 else NullFormatter())
    for x, value in enumerate(medians):
        axes.annotate(
            rate(value), (x, value), ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points"
        )
    axes.set_ylabel("images/s (median window;\nbars: slowest .. fastest)")
    width_inches = figure.get_size_inches()[0]
    axes.set_title(textwrap.fill(title, int(width_inches * 14)), fontsize=8)  # ~14 characters an inch at 8 pt
    axes.tick_params(axis="x", rotation=30)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive batch sizes separated by commas, got {text!r}")
    return sizes


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of: {', '.join(MODES)}")
    parser.add_argument("--loader", action="append", default=[], choices=sorted(LOADERS), help="add an end-to-end mode")
    parser.add_argument("--synthetic", action="store_true", help="add the synthetic mode")
    parser.add_argument("--no-model", action="store_true", help="add the no-model mode of every --loader")
    parser.add_argument("--naive", action="store_true", help="add the naive baseline")
    parser.add_argument("--stage", choices=tuple(STAGES), default="pretrain", help="pretext step or fine-tuning's")
    parser.add_argument("--method", default=default_method(), choices=list(METHODS), help="pretext task")
    for flag, (key, kind, help_text) in method_flags().items():
        parser.add_argument(flag, dest=key, type=kind, default=None, help=f"{help_text} (default: the config's)")
    parser.add_argument("--arch", choices=ARCHS, default="resnet50", help="--stage finetune: the network")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument(
        "--batch", "--batch-size", type=batch_sizes, default=[64], help="images per step; a comma list sweeps"
    )
    parser.add_argument(
        "--width", type=float, help="backbone width multiplier (default: the config's: 0.25 at <= 64 px, 1 at 224)"
    )
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (speed.compile)")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default="default", help="torch.compile's mode")
    parser.add_argument(
        "--cuda-graph", action="store_true", help="replay the step from a CUDA graph (speed.cuda_graph)"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="loader processes/threads")
    parser.add_argument(
        "--set", action="append", default=[], help="any config key, e.g. model.width=0.5 (or --model.width=0.5)"
    )
    parser.add_argument(
        "--data", default="auto", help="auto (demo at <=64 px, else the JPEG set) | jpeg | demo | folder"
    )
    parser.add_argument("--images", type=int, default=2048, help="size of the built-in JPEG set")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "selfie-trainer"))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--window", type=int, default=5, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--profile-steps", type=int, default=3, help="steps profiled after the timing (0: none)")
    parser.add_argument("--json", help="write the results here, again after every mode and batch size measured")
    parser.add_argument(
        "--check-args",
        action="store_true",
        help="only check: the flags parse and every batch size's config resolves (no data, model or device)",
    )
    inputs_help = "--check-args, then build the data, the model and a small batch of every mode's inputs (no step)"
    parser.add_argument("--check-inputs", action="store_true", help=inputs_help)
    parser.add_argument("--plot", help="write a bar chart of images/s by mode here (PNG)")
    return parser


def dotted_settings(rest: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """--section.key=value (or --section.key value), the trainer's own spelling, as --set key=value."""
    settings, tokens = [], iter(rest)
    for token in tokens:
        key = token[2:].split("=", 1)[0]
        if not token.startswith("--") or "." not in key:
            parser.error(f"unrecognized argument {token!r}; config keys look like --section.key=value")
        settings.append(token[2:] if "=" in token else f"{key}={next(tokens, '')}")
    return settings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = arguments()
    args, rest = parser.parse_known_args(argv)
    args.set += dotted_settings(rest, parser)
    picked = [*args.loader, *(["synthetic"] if args.synthetic else []), *(["naive"] if args.naive else [])]
    picked += [f"no-model:{loader}" for loader in args.loader] if args.no_model else []
    wanted = picked or [m for m in args.modes.split(",") if m]
    unknown = [m for m in wanted if m not in MODES]
    if unknown:
        parser.error(f"--modes {','.join(unknown)}: expected some of {', '.join(MODES)}")
    if args.stage != "pretrain":
        asked = [m for m in wanted if m in PRETEXT_ONLY_MODES]
        if asked and (picked or args.modes != ",".join(MODES)):
            parser.error(f"--modes {','.join(asked)}: the naive baseline times a pretext method; drop it")
        wanted = [m for m in wanted if m not in PRETEXT_ONLY_MODES]
    args.mode_list = [m for m in MODES if m in wanted]  # forking modes first, whatever the order given
    return args


def describe(bench: Bench) -> str:
    args, config, device = bench.args, bench.config, bench.device
    device_name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    step = ", ".join(
        name for name, on in (("compiled", args.compile), ("CUDA graph", args.cuda_graph), ("eager", True)) if on
    ).removesuffix(", eager")
    what = (
        f"{args.method} on {config.data.image_size}px: {bench.task.describe()}"
        if args.stage == "pretrain"
        else (f"fine-tuning {args.arch} on {config.data.image_size}px")
    )
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, device "
        f"{device}{device_name}; {what}; {config.model.backbone} backbone, width {config.model.width}, batch "
        f"{','.join(map(str, args.batch))} images, {args.precision}{', channels-last' if args.channels_last else ''}"
        f", {step} step; data {bench.folder} (ffcv: {bench.beton}); {args.workers} workers; "
        f"{args.windows} windows of {args.window} steps after {args.warmup}"
    )


def compute_figures(batch: int, per_image: float, results: dict, peak: float) -> tuple[dict, str]:
    """One step's FLOPs at this batch size (`per_image` scaled); each training mode's achieved TFLOP/s and
    fraction of `peak`."""
    flops = per_image * batch
    for name, r in results.items():
        if MODES[name].trainer_step:
            achieved = flops * r["median"] / batch
            r["achieved_tflops"] = round(achieved / 1e12, 4)
            r["fraction_of_peak"] = round(achieved / peak, 4)
    achieved = ", ".join(
        f"{m} {r['achieved_tflops']:.4f} TFLOP/s ({r['fraction_of_peak']:.1%})"
        for m, r in results.items()
        if "achieved_tflops" in r
    )
    text = f"batch {batch}: one step {flops / 1e9:,.1f} GFLOP (forward + backward, counted at batch "
    text += f"{FLOP_COUNT_BATCH} or less and scaled); achieved: {achieved}"
    return {"step_gflop": round(flops / 1e9, 3)}, text


@dataclass
class Sweep:
    """What a sweep has measured so far: results by batch size and mode, FLOPs by batch size, the figure
    lines, and {"header": the set-up in words, "config": the first batch size's resolved config}."""

    results: dict = field(default_factory=dict)
    compute: dict = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    about: dict = field(default_factory=dict)


def _keep(done: Sweep, modes: dict, name: str, save: Callable[[Sweep], None], result: dict) -> None:
    modes[name] = result
    save(done)


def sweep(args: argparse.Namespace, save: Callable[[Sweep], None] = lambda done: None) -> Sweep:
    """Every mode at every batch size; `save` is called with what is measured after every mode's timing
    and every batch size's figures (a sweep stopped by a time limit or out of memory keeps them)."""
    done, peak, per_image = Sweep(), None, None
    for batch in args.batch:
        bench = Bench(args, batch)
        if not done.results:
            done.about = {"header": describe(bench), "config": to_dict(bench.config)}
            print(done.about["header"])
            peak = matmul_peak(bench.device, DTYPES[args.precision], 8192 if bench.device.type == "cuda" else 2048)
            done.compute["matmul_peak_tflops"] = round(peak / 1e12, 4)
            done.lines.append(f"measured {args.precision} matmul peak {peak / 1e12:,.3f} TFLOP/s")
        modes = done.results.setdefault(batch, {})
        for name in args.mode_list:
            modes[name] = run_mode(bench, name, partial(_keep, done, modes, name, save))
            print(f"{name} @ {batch}: {rate(modes[name]['median'])} images/s{loss_text(modes[name])}", flush=True)
            save(done)
            release_memory(bench.device)
        del bench  # its graph's pool and activations, before the FLOP count's own model
        release_memory(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        per_image = per_image or flops_per_image(args)
        done.compute[batch], line = compute_figures(batch, per_image, modes, peak)
        done.lines.insert(-1, line)
        save(done)
    return done


def make_record(args: argparse.Namespace, done: Sweep) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "versions": versions(),
        "args": {k: v for k, v in vars(args).items() if k != "mode_list"},
        **done.about,
        "results": done.results,
        "compute": done.compute,
        "table": format_tables(done.results) + "\n\n" + "\n".join(done.lines),
    }


def write_json(path: Path, record: dict) -> None:
    """Written whole or not at all: a process killed mid-write leaves the previous version."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record, indent=1))
    os.replace(partial, path)


def check_arguments(args: argparse.Namespace) -> None:
    """What `gpu_check.sh --dry-run` runs: every batch size's config resolves and passes the checks a run
    makes before it starts (config keys and values, train/config/checks.py's checks of several keys, the
    method's own), and every loader mode's package is installed. No data, model or device is touched."""
    for batch in args.batch:
        config = build_config(args, batch)
        check_config(config)  # the stage's validate runs it too; fine-tuning's checks are only these
        if args.stage == "pretrain":
            pretraining.validate(config)
    loaders = {m: m.removeprefix("no-model:") for m in args.mode_list}
    missing = [m for m, loader in loaders.items() if loader in LOADERS and not LOADERS[loader].installed()]
    missing += ["raw-ffcv"] if "raw-ffcv" in args.mode_list and not LOADERS["ffcv"].installed() else []
    if missing:
        raise ConfigError(f"--modes {','.join(missing)}: their loader's package is not installed here")
    print(f"arguments ok: batch {','.join(map(str, args.batch))}, modes {','.join(args.mode_list)}")


def check_inputs(args: argparse.Namespace) -> None:
    """What a dry run of the GPU check runs after `check_arguments`: the step's data built as a real run
    builds it (in the cache: the JPEG set, a .beton where a mode reads one), its model and step set up,
    and one batch of every mode's model inputs made (the loader's batch through the task's input op), at
    a small batch. Nothing is trained or timed; a package a mode needs that is missing fails here."""
    # The inputs do not depend on how the step runs, and a machine without CUDA refuses a graphed one.
    args = argparse.Namespace(**{**vars(args), "cuda_graph": args.cuda_graph and torch.cuda.is_available()})
    bench = Bench(args, min(INPUT_CHECK_BATCH, *args.batch))
    for name in args.mode_list:
        loader = name.removeprefix("no-model:").removeprefix("raw-")
        if loader in LOADERS:
            stream = bench.stream(loader)
            try:
                batch = next(stream)
            finally:
                stream.close()
        else:  # synthetic and naive: device batches of random images
            batch = bench.synthetic_pool()[0]
        shapes = [tuple(tensor.shape) for tensor in bench.task.inputs(batch, bench.generator)]
        print(f"inputs ok: {name} @ {bench.batch}: {shapes}")


def check(args: argparse.Namespace) -> None:
    """--check-args and --check-inputs: a refusal is one line and exit status 2."""
    try:
        check_arguments(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.check_inputs:
        check_inputs(args)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.check_args or args.check_inputs:
        check(args)
        return {}
    if args.cuda_graph and args.profile_steps and torch.cuda.is_available():
        prepare_profiler_for_graphs()
    save = (lambda done: write_json(Path(args.json), make_record(args, done))) if args.json else (lambda done: None)
    done = sweep(args, save)
    record = make_record(args, done)
    print(record["table"])
    if args.plot:
        plot(done.results, Path(args.plot), done.about["header"])
    return record


if __name__ == "__main__":
    run_cli(main)  # one line and exit 2 for bad input and for an OS error (an unwritable --json, a full disk)
