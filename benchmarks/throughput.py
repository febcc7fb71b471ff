"""Images/s reaching the pretext loss: every loader end to end, against the ceiling and a naive baseline.

    python -m benchmarks.throughput                                   # 32/8 on the demo data, all modes
    python -m benchmarks.throughput --method patch_rotnet --set model.backbone=resnet8 --modes synthetic,torch
    python -m benchmarks.throughput --image-size 224 --patch-size 32 --width 1 --precision bf16 \
        --channels-last --batch 256 --json runs/bench224.json --plot runs/bench224.png
    python -m benchmarks.throughput --modes synthetic,ffcv --compile

Modes (side by side in one invocation, same config):
  torch | dali | ffcv   end to end: files (or the .beton) -> loader -> `train.pretrain.train_step` (the
                        function the trainer calls: the method's op (Selfie's patch op, the rotation
                        methods' view op), the model on all of it in one call, the loss, backward,
                        optimizer);
  synthetic             the same step on one uint8 batch already on the device: the ceiling a perfect
                        data pipeline would reach;
  no-model:LOADER       the pipeline alone, up to patches (or views) ready for the model: the data side's limit;
  raw-ffcv              FFCV's loader doing only decode + random resized crop on the same .beton, in its
                        own random order, with no flip, labels, copy-out or device copy (the reference for
                        "the patch op must add almost nothing");
  naive                 (Selfie only) what most people would write: a per-image `Dataset` decoding with PIL in a torch
                        `DataLoader`, masks drawn by a Python loop over samples (the host->device copy and
                        normalisation count as its patch op), and P called per image on its context and
                        on its masked patches, the loss per image;
  no-model:naive        the naive baseline's data side alone (its loader and Python masking loop).

Each mode runs --warmup untimed steps, then --windows timed windows of --window steps; the device is
synchronised before each clock read. The table gives the median window's images/s, the slowest and
fastest, and ratios of medians to `synthetic` and `naive`; a second table splits a step into stages
(data wait, patch or view op, forward, backward, optimizer; host->device copies are inside the loader's
data wait). Images/s counts source images: a rotation method's step handles 4 or 8 views of each.
Last, one step's FLOPs (torch's FlopCounterMode) and a measured square-matmul peak in the step's
dtype give each training mode's achieved TFLOP/s and its fraction of that peak. --json writes all of it
with the machine, device, versions, resolved config and date.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.metadata
import json
import os
import platform
import random
import statistics
import textwrap
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.loaders import benchmark_data
from model.selfie import Selfie, patch_selection_loss
from pipeline.augment import random_resized_crop_box
from pipeline.data import Batch, open_source
from pipeline.loaders import LOADERS
from pipeline.patches import normalize
from train.common import build_sgd, make_accelerator, train_batches, warmup_cosine
from train.config import PretrainConfig, load_config, to_dict
from train.pretrain import METHODS, build_model, make_task, train_step

# Modes that fork loader processes run before those that leave threads behind (forking a threaded process is unsafe).
ALL_MODES = (
    "synthetic",
    "naive",
    "no-model:naive",
    "torch",
    "no-model:torch",
    "dali",
    "no-model:dali",
    "ffcv",
    "no-model:ffcv",
    "raw-ffcv",
)
STAGES = ("data", "patch op", "view op", "forward", "backward", "optimizer")
SELFIE_ONLY_MODES = ("naive", "no-model:naive")


class StageClock:
    """Seconds per named stage, summed over steps. On a GPU the compute stages use CUDA events (read after
    the window's sync); "data" is always the host's wall-clock wait for the next batch, which is what a
    data-bound step loses."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)
        self.events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.cuda and name != "data":
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


def build_config(args: argparse.Namespace) -> PretrainConfig:
    overrides = {
        "method": args.method,
        "data.image_size": args.image_size,
        "data.augment": "pad_crop_flip" if args.image_size <= 64 else "random_resized_crop",
        "data.workers": args.workers,
        "selfie.patch_size": args.patch_size,
        "selfie.context_fraction": args.context_fraction,
        "train.batch_size": args.batch,
        "train.precision": {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[args.precision],
        "train.channels_last": args.channels_last,
        "model.width": args.width,
    }
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except ValueError:  # a bare word: the string itself
            overrides[key] = value
    return load_config(PretrainConfig, "demo" if args.image_size <= 64 else "imagenet224", overrides)


class Bench:
    """One model, optimizer and accelerator shared by the modes; each mode restarts from the same weights
    (the optimizer's momentum carries over: it changes no timing)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.config = build_config(args)
        self.accelerator = make_accelerator(self.config.train)
        self.device = self.accelerator.device
        self.task = make_task(self.config, self.device)
        torch.manual_seed(0)
        model = build_model(self.config)
        self.net = model  # the plain module, under any DDP or compile wrapper
        self.initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.optimizer = build_sgd(model, self.config.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(10, 10**9))
        self.model, self.optimizer = self.accelerator.prepare(model, self.optimizer)
        if args.compile:
            self.model = torch.compile(self.model)
        self.folder, self.beton = benchmark_data(
            "demo" if args.data == "auto" and args.image_size <= 64 else ("jpeg" if args.data == "auto" else args.data),
            args.cache,
            args.images,
        )
        self.generator = torch.Generator(device=self.device).manual_seed(0)

    def reset(self) -> None:
        self.net.load_state_dict(self.initial)
        self.model.train()

    def source(self, loader: str):
        return LOADERS[loader].open(self.beton if loader == "ffcv" else self.folder, "train")

    def stream(self, loader: str) -> Iterator[Batch]:
        config = dataclasses.replace(self.config, data=dataclasses.replace(self.config.data, loader=loader))
        spec = self.task.in_loader_patch_spec(loader)
        return train_batches(config, self.source(loader), self.args.batch, 0, 0, self.accelerator, spec)

    def step(self, batch: Batch, clock: StageClock) -> None:
        train_step(
            self.model,
            batch,
            self.task,
            self.generator,
            self.optimizer,
            self.scheduler,
            self.accelerator,
            self.config.optim.grad_clip,
            clock.stage,
        )

    def inputs_only(self, batch: Batch, clock: StageClock) -> None:
        """The data side of a step: the method's op on the loader's batch (nothing when FFCV cut the patches)."""
        if batch.patches is None:
            with clock.stage(self.task.op_stage):
                self.task.inputs(batch, self.generator)


def queued_batches(mode: str, workers: int) -> int:
    """How many batches a mode's loader holds ready: a warm-up drains them, or a fast consumer (no model)
    would time the queue instead of the loader."""
    loader = mode.split(":")[-1]
    workers = max(1, workers)
    return {"torch": 4 * workers, "naive": 2 * workers, "dali": 2, "ffcv": 3, "raw-ffcv": 3}.get(loader, 0)


def timed(steps: Iterator[Callable[[StageClock], None]], args, device, images_per_step: int, queued: int = 0) -> dict:
    """Run --warmup (+ `queued`) steps, then --windows windows of --window steps; images/s per window,
    over all timed steps, and stage seconds."""
    clock = StageClock(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for run in islice(steps, args.warmup + queued):
        run(clock)
    clock.collect()
    clock.seconds.clear()
    rates, total = [], 0.0
    for _ in range(args.windows):
        sync()
        start = time.perf_counter()
        for run in islice(steps, args.window):
            run(clock)
        sync()
        seconds = time.perf_counter() - start
        total += seconds
        rates.append(args.window * images_per_step / seconds)
    stage_seconds = clock.collect()
    steps_timed = args.windows * args.window
    return {
        "median": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "overall": steps_timed * images_per_step / total,
        "stages_ms": {k: round(1000 * v / steps_timed, 3) for k, v in stage_seconds.items()},
    }


def loader_steps(bench: Bench, loader: str, model: bool) -> Iterator[Callable[[StageClock], None]]:
    stream = bench.stream(loader)
    try:
        while True:

            def run(clock: StageClock) -> None:
                with clock.stage("data"):
                    batch = next(stream)
                (bench.step if model else bench.inputs_only)(batch, clock)

            yield run
    finally:
        stream.close()


def synthetic_steps(bench: Bench) -> Iterator[Callable[[StageClock], None]]:
    size = bench.config.data.image_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (bench.args.batch, 3, size, size), dtype=torch.uint8, generator=generator)
    batch = Batch(
        images.to(bench.device),
        torch.zeros(bench.args.batch, dtype=torch.int64, device=bench.device),
        torch.arange(bench.args.batch, device=bench.device),
    )
    while True:
        yield lambda clock: bench.step(batch, clock)


def raw_ffcv_steps(bench: Bench) -> Iterator[Callable[[StageClock], None]]:
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    size = bench.config.data.image_size
    threads = torch.get_num_threads()
    loader = Loader(
        str(bench.beton),
        batch_size=bench.args.batch,
        num_workers=max(1, bench.args.workers),
        order=OrderOption.RANDOM,
        seed=0,
        drop_last=True,
        pipelines={"image": [RandomResizedCropRGBImageDecoder((size, size)), ToTensor()], "label": None, "index": None},
    )
    torch.set_num_threads(threads)  # FFCV set it to its worker count

    def batches() -> Iterator:
        while True:
            epoch = iter(loader)
            try:
                yield from epoch
            finally:
                epoch.close()  # stops FFCV's loading thread when the mode ends

    stream = batches()

    def run(clock: StageClock) -> None:
        with clock.stage("data"):
            next(stream)
        if torch.get_num_threads() != threads:  # each FFCV epoch sets torch's threads to its worker count
            torch.set_num_threads(threads)

    try:
        while True:
            yield run
    finally:
        stream.close()
        torch.set_num_threads(threads)


class NaiveImages(torch.utils.data.Dataset):
    """Per-image decode and augmentation with PIL, the usual way: one sample per `__getitem__`."""

    def __init__(self, folder: Path, size: int, pad: int) -> None:
        self.source = open_source(folder)
        self.size, self.pad = size, pad

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.source.load(index)
        rng = np.random.default_rng()
        if self.size > 64:
            top, left, height, width = random_resized_crop_box(image.height, image.width, rng, (0.08, 1.0))
            image = image.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + width, top + height))
        else:
            image = image.resize((self.size, self.size))
            canvas = Image.new("RGB", (self.size + 2 * self.pad,) * 2)
            canvas.paste(image, (self.pad, self.pad))
            x, y = rng.integers(0, 2 * self.pad + 1, 2)
            image = canvas.crop((x, y, x + self.size, y + self.size))
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def naive_steps(bench: Bench, model: bool = True) -> Iterator[Callable[[StageClock], None]]:
    config, device = bench.config, bench.device
    size, patch = config.data.image_size, config.selfie.patch_size
    grid = size // patch
    loader = torch.utils.data.DataLoader(
        NaiveImages(bench.folder, size, config.data.pad),
        batch_size=bench.args.batch,
        shuffle=True,
        num_workers=bench.args.workers,
        drop_last=True,
        persistent_workers=bench.args.workers > 0,
    )
    net: Selfie = bench.net
    num_context = bench.task.num_context

    def step(images: torch.Tensor, clock: StageClock) -> None:
        with clock.stage("patch op"):  # masks by a Python loop, patches cut one by one
            images = normalize(images.to(device), config.data.mean, config.data.std)
            samples = []
            for b in range(len(images)):
                positions = list(range(grid * grid))
                random.shuffle(positions)
                cut = [
                    images[
                        b, :, (q // grid) * patch : (q // grid + 1) * patch, (q % grid) * patch : (q % grid + 1) * patch
                    ]
                    for q in positions
                ]
                samples.append((positions, cut))
        if not model:
            return
        with clock.stage("forward"), bench.accelerator.autocast():
            losses = []
            for positions, cut in samples:
                context = net.embed_patches(torch.stack(cut[:num_context]))
                masked = net.embed_patches(torch.stack(cut[num_context:]))
                where = torch.tensor(positions, device=device)
                if net.position_on_context:
                    context = context + net.position(where[:num_context])
                u = net.pool(context[None])
                queries = u[:, None] + net.position(where[num_context:])[None]
                losses.append(patch_selection_loss(queries, masked[None]).loss)
            loss = torch.stack(losses).mean()
        with clock.stage("backward"):
            bench.accelerator.backward(loss)  # through the fp16 scaler when there is one
        with clock.stage("optimizer"):
            bench.optimizer.step()
            bench.optimizer.zero_grad(set_to_none=True)

    def batches() -> Iterator[torch.Tensor]:
        while True:
            yield from loader

    stream = batches()

    def run(clock: StageClock) -> None:
        with clock.stage("data"):
            images = next(stream)
        step(images, clock)

    try:
        while True:
            yield run
    finally:
        stream.close()  # the DataLoader (and its persistent workers) goes with this generator's frame


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


def run_mode(bench: Bench, mode: str) -> dict:
    bench.reset()
    if mode == "synthetic":
        steps = synthetic_steps(bench)
    elif mode in LOADERS:
        steps = loader_steps(bench, mode, model=True)
    elif mode == "no-model:naive":
        steps = naive_steps(bench, model=False)
    elif mode.startswith("no-model:") and mode.split(":", 1)[1] in LOADERS:
        steps = loader_steps(bench, mode.split(":", 1)[1], model=False)
    elif mode == "raw-ffcv":
        steps = raw_ffcv_steps(bench)
    elif mode == "naive":
        steps = naive_steps(bench)
    else:
        raise SystemExit(f"error: --modes {mode}: expected some of {', '.join(ALL_MODES)}")
    try:
        return timed(steps, bench.args, bench.device, bench.args.batch, queued_batches(mode, bench.args.workers))
    finally:
        steps.close()


def step_flops(bench: Bench) -> int:
    """FLOPs of one training step (forward + backward of P, A and the loss), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    bench.reset()
    counter = FlopCounterMode(display=False)
    with counter:
        next(synthetic_steps(bench))(StageClock(bench.device))
    bench.reset()
    return counter.get_total_flops()


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


def format_tables(results: dict) -> str:
    synthetic = results.get("synthetic", {}).get("median")
    lines = [
        "| mode | images/s | slowest .. fastest | all timed steps | vs synthetic | vs naive |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode, r in results.items():
        data_side = mode.startswith("no-model") or mode == "raw-ffcv"
        # Training modes against the naive step, data-side modes against the naive data side.
        naive = results.get("no-model:naive" if data_side else "naive", {}).get("median")
        vs_synthetic = f"{r['median'] / synthetic:.2f}x" if synthetic and not data_side else "-"
        vs_naive = f"{r['median'] / naive:.2f}x" if naive else "-"
        lines.append(
            f"| {mode} | {r['median']:,.0f} | {r['min']:,.0f} .. {r['max']:,.0f} | {r['overall']:,.0f} "
            f"| {vs_synthetic} | {vs_naive} |"
        )
    stages = [s for s in STAGES if any(s in r["stages_ms"] for r in results.values())]
    lines += ["", "| mode | " + " | ".join(f"{s} ms" for s in stages) + " |", "| --- |" + " ---: |" * len(stages)]
    for mode, r in results.items():
        cells = [f"{r['stages_ms'][s]:.2f}" if s in r["stages_ms"] else "-" for s in stages]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(results)
    medians = [results[m]["median"] for m in modes]
    errors = [
        [results[m]["median"] - results[m]["min"] for m in modes],
        [results[m]["max"] - results[m]["median"] for m in modes],
    ]
    figure, axes = plt.subplots(figsize=(9, 4.5))
    axes.bar(modes, medians, yerr=errors, capsize=4, color="#4c72b0")
    axes.set_yscale("log")  # the data-side modes run orders of magnitude above the training step
    for x, value in enumerate(medians):
        axes.annotate(
            f"{value:,.0f}", (x, value), ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points"
        )
    axes.set_ylabel("images/s (median window;\nbars: slowest .. fastest)")
    axes.set_title(textwrap.fill(title, 120), fontsize=8)
    axes.tick_params(axis="x", rotation=30)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default=",".join(ALL_MODES), help=f"comma list of: {', '.join(ALL_MODES)}")
    parser.add_argument("--loader", action="append", default=[], choices=sorted(LOADERS), help="add an end-to-end mode")
    parser.add_argument("--synthetic", action="store_true", help="add the synthetic mode")
    parser.add_argument("--no-model", action="store_true", help="add the no-model mode of every --loader")
    parser.add_argument("--naive", action="store_true", help="add the naive baseline")
    parser.add_argument("--method", default="selfie", choices=sorted(METHODS), help="pretext task (default selfie)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--context-fraction", type=float, default=0.75)
    parser.add_argument("--batch", type=int, default=64, help="images per step")
    parser.add_argument("--width", type=float, default=1.0, help="width multiplier of the backbone")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="loader processes/threads")
    parser.add_argument("--set", action="append", default=[], help="any config key, e.g. model.attn_layers=1")
    parser.add_argument(
        "--data", default="auto", help="auto (demo at <=64 px, else the JPEG set) | jpeg | demo | folder"
    )
    parser.add_argument("--images", type=int, default=2048, help="size of the built-in JPEG set")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "selfie-trainer"))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--window", type=int, default=5, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="write a bar chart of images/s by mode here (PNG)")
    args = parser.parse_args(argv)
    picked = [*args.loader, *(["synthetic"] if args.synthetic else []), *(["naive"] if args.naive else [])]
    picked += [f"no-model:{loader}" for loader in args.loader] if args.no_model else []
    wanted = picked or [m for m in args.modes.split(",") if m]
    unknown = [m for m in wanted if m not in ALL_MODES]
    if unknown:
        parser.error(f"--modes {','.join(unknown)}: expected some of {', '.join(ALL_MODES)}")
    if args.method != "selfie":
        asked = [m for m in wanted if m in SELFIE_ONLY_MODES]
        if asked and (picked or args.modes != ",".join(ALL_MODES)):
            parser.error(f"--modes {','.join(asked)}: the naive baseline is Selfie's (per-image P calls); drop it")
        wanted = [m for m in wanted if m not in SELFIE_ONLY_MODES]
    args.mode_list = [m for m in ALL_MODES if m in wanted]  # forking modes first, whatever the order given
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    bench = Bench(args)
    config = bench.config
    device_name = f" ({torch.cuda.get_device_name(bench.device)})" if bench.device.type == "cuda" else ""
    header = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, device "
        f"{bench.device}{device_name}; {args.method} on {config.data.image_size}px: {bench.task.describe()}; "
        f"{config.model.backbone} backbone, width {config.model.width}, batch {args.batch} images, "
        f"{args.precision}{', channels-last' if args.channels_last else ''}{', compiled' if args.compile else ''}; "
        f"data {bench.folder} (ffcv: {bench.beton}); {args.workers} workers; "
        f"{args.windows} windows of {args.window} steps after {args.warmup}"
    )
    print(header)
    results = {}
    for mode in args.mode_list:
        results[mode] = run_mode(bench, mode)
        print(f"{mode}: {results[mode]['median']:,.0f} images/s", flush=True)
        release_memory(bench.device)
    table = format_tables(results)
    flops = step_flops(bench)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    peak = matmul_peak(bench.device, dtype, 8192 if bench.device.type == "cuda" else 2048)
    compute = {"step_gflop": round(flops / 1e9, 3), "matmul_peak_tflops": round(peak / 1e12, 4)}
    for mode, r in results.items():
        if mode in ("synthetic", *LOADERS):
            achieved = flops * r["median"] / args.batch
            r["achieved_tflops"] = round(achieved / 1e12, 4)
            r["fraction_of_peak"] = round(achieved / peak, 4)
    table += (
        f"\n\nOne step: {flops / 1e9:,.1f} GFLOP (forward + backward, torch's FlopCounterMode); measured "
        f"{args.precision} matmul peak {peak / 1e12:,.3f} TFLOP/s; achieved: "
        + ", ".join(
            f"{m} {r['achieved_tflops']:.4f} TFLOP/s ({r['fraction_of_peak']:.1%})"
            for m, r in results.items()
            if "achieved_tflops" in r
        )
    )
    print(table)
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "device": str(bench.device)
        + (f" ({torch.cuda.get_device_name(bench.device)})" if bench.device.type == "cuda" else ""),
        "versions": versions(),
        "args": {k: v for k, v in vars(args).items() if k != "mode_list"},
        "config": to_dict(config),
        "results": results,
        "compute": compute,
        "table": table,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))
    if args.plot:
        plot(results, Path(args.plot), header[:160])
    return record


if __name__ == "__main__":
    main()
