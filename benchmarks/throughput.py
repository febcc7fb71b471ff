"""Images/s reaching the pretext loss: every loader end to end, against the ceiling and a naive baseline.

    python -m benchmarks.throughput                                   # 32/8 on the demo data, all modes
    python -m benchmarks.throughput --method patch_rotnet --set model.backbone=resnet8 --modes synthetic,torch
    python -m benchmarks.throughput --image-size 224 --patch-size 32 --width 1 --precision bf16 \
        --channels-last --batch 256 --json runs/bench224.json --plot runs/bench224.png
    python -m benchmarks.throughput --modes synthetic,ffcv --compile

Modes (`MODES`, side by side in one invocation, same config; the loader modes come from the loader
registry, every method of the method registry runs in every mode):
  LOADER                end to end: files (or the .beton) -> loader -> `train.loop.train_step` (the
                        function the trainer calls: the method's input op (Selfie's patch op, the rotation
                        methods' view op), the model on all of it in one call, the loss, backward, optimizer);
  synthetic             the same step on one uint8 batch already on the device: the ceiling a perfect
                        data pipeline would reach;
  no-model:LOADER       the pipeline alone, up to the model's inputs (patches, views): the data side's limit;
  raw-ffcv              FFCV's loader doing only decode + random resized crop on the same .beton, in its
                        own random order, with no flip, labels, copy-out or device copy (the reference for
                        "the patch op must add almost nothing");
  naive                 what most people would write: a per-image `Dataset` decoding with PIL in a torch
                        `DataLoader`, then a Python loop over the batch's images: the method's input op on
                        one image, and the model's public forward on it (P on that image's patches, then the
                        method's head), the loss averaged over images;
  no-model:naive        the naive baseline's data side alone (its loader and per-image input op).

Timing is benchmarks/harness.py's: --warmup untimed steps (plus what the loader holds ready), then
--windows timed windows of --window steps. The table gives the median window's images/s, the slowest and
fastest, and ratios of medians to `synthetic` and `naive`; a second table splits a step into stages (data
wait, the input op, forward, backward, optimizer; host->device copies are inside the loader's data wait).
Images/s counts source images: a rotation method's step handles 4 or 8 views of each. Last, one step's
FLOPs (torch's FlopCounterMode) and a measured square-matmul peak in the step's dtype give each training
mode's achieved TFLOP/s and its fraction of that peak. --json writes all of it with the machine, device,
versions, resolved config and date.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.metadata
import json
import os
import platform
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.harness import DATA_STAGE, StageClock, Step, time_windows
from benchmarks.loaders import benchmark_data
from pipeline.augment import random_resized_crop_box
from pipeline.data import Batch, open_source
from pipeline.loaders import LOADERS
from train import pretrain
from train.config import PretrainConfig, load_config, to_dict
from train.loading import train_batches
from train.loop import train_step
from train.methods import METHODS, default_method, method_flags
from train.optim import build_sgd, warmup_cosine
from train.session import make_accelerator

PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # benchmark name -> train.precision
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_config(args: argparse.Namespace) -> PretrainConfig:
    overrides = {
        "method": args.method,
        "data.image_size": args.image_size,
        "data.augment": "pad_crop_flip" if args.image_size <= 64 else "random_resized_crop",
        "data.workers": args.workers,
        "train.batch_size": args.batch,
        "train.precision": PRECISIONS[args.precision],
        "train.channels_last": args.channels_last,
        "model.width": args.width,
    }
    overrides |= {key: getattr(args, key) for key, _, _ in method_flags().values() if getattr(args, key) is not None}
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
        self.task = pretrain.validate(self.config)(self.config, self.device)
        torch.manual_seed(0)
        model = pretrain.build_model(self.config)
        self.net = model  # the plain module, under any DDP or compile wrapper
        self.initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.optimizer = build_sgd(model, self.config.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(10, 10**9))
        self.model, self.optimizer = self.accelerator.prepare(model, self.optimizer)
        if args.compile:
            self.model = torch.compile(self.model)
        data = args.data
        if data == "auto":
            data = "demo" if args.image_size <= 64 else "jpeg"
        self.folder, self.beton = benchmark_data(data, args.cache, args.images)
        self.generator = torch.Generator(device=self.device).manual_seed(0)

    def reset(self) -> None:
        self.net.load_state_dict(self.initial)
        self.model.train()

    def stream(self, loader: str) -> Iterator[Batch]:
        config = dataclasses.replace(self.config, data=dataclasses.replace(self.config.data, loader=loader))
        backend = LOADERS[loader]
        source = backend.open(self.beton if backend.reads_beton else self.folder, "train")
        spec = self.task.loader_patch_spec(loader)
        return train_batches(config, source, self.args.batch, 0, 0, self.accelerator, spec)

    def step(self, batch: Batch, clock: StageClock) -> None:
        optimizer, scheduler, grad_clip = self.optimizer, self.scheduler, self.config.optim.grad_clip
        train_step(
            self.model, batch, self.task, self.generator, optimizer, scheduler, self.accelerator, grad_clip, clock.stage
        )

    def inputs_only(self, batch: Batch, clock: StageClock) -> None:
        """The data side of a step: the method's op on the loader's batch (nothing when FFCV cut the patches)."""
        if batch.patches is None:
            with clock.stage(self.task.op_stage):
                self.task.inputs(batch, self.generator)


@contextmanager
def loader_mode(bench: Bench, loader: str, model: bool) -> Iterator[Step]:
    stream = bench.stream(loader)

    def step(clock: StageClock) -> None:
        with clock.stage(DATA_STAGE):
            batch = next(stream)
        (bench.step if model else bench.inputs_only)(batch, clock)

    try:
        yield step
    finally:
        stream.close()


@contextmanager
def synthetic_mode(bench: Bench) -> Iterator[Step]:
    size, batch_size, device = bench.config.data.image_size, bench.args.batch, bench.device
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=generator)
    labels = torch.zeros(batch_size, dtype=torch.int64, device=device)
    batch = Batch(images.to(device), labels, torch.arange(batch_size, device=device))
    yield partial(bench.step, batch)


@contextmanager
def raw_ffcv_mode(bench: Bench) -> Iterator[Step]:
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    size, threads = bench.config.data.image_size, torch.get_num_threads()
    pipeline = [RandomResizedCropRGBImageDecoder((size, size)), ToTensor()]
    loader = Loader(
        str(bench.beton),
        batch_size=bench.args.batch,
        num_workers=max(1, bench.args.workers),
        order=OrderOption.RANDOM,
        seed=0,
        drop_last=True,
        pipelines={"image": pipeline, "label": None, "index": None},
    )
    stream = endless(loader)

    def step(clock: StageClock) -> None:
        with clock.stage(DATA_STAGE):
            next(stream)
        if torch.get_num_threads() != threads:  # each FFCV epoch sets torch's threads to its worker count
            torch.set_num_threads(threads)

    try:
        yield step
    finally:
        stream.close()  # stops FFCV's loading thread when the mode ends
        torch.set_num_threads(threads)


def endless(loader) -> Iterator:
    while True:
        epoch = iter(loader)
        try:
            yield from epoch
        finally:
            if hasattr(epoch, "close"):
                epoch.close()


class NaiveImages(torch.utils.data.Dataset):
    """Per-image decode and augmentation with PIL, the usual way: one sample per `__getitem__`."""

    def __init__(self, folder: Path, size: int, pad: int) -> None:
        self.source = open_source(folder)
        self.size, self.pad = size, pad

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
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
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1), int(self.source.labels[index])


def naive_inputs(bench: Bench, images: torch.Tensor, labels: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """The method's input op on each image alone: a Python loop over the batch's samples."""
    images, labels = images.to(bench.device), labels.to(bench.device)
    one = torch.zeros(1, dtype=torch.int64, device=bench.device)
    return [
        bench.task.inputs(Batch(images[b : b + 1], labels[b : b + 1], one), bench.generator) for b in range(len(images))
    ]


def naive_update(bench: Bench, per_image: list[tuple[torch.Tensor, ...]], clock: StageClock) -> None:
    """The model's public forward on each image (its backbone on that image's inputs, then the method's
    head), the mean loss, one update."""
    with clock.stage("forward"), bench.accelerator.autocast():
        loss = torch.stack([bench.task.objective(bench.net, inputs)[0] for inputs in per_image]).mean()
    with clock.stage("backward"):
        bench.accelerator.backward(loss)  # through the fp16 scaler when there is one
    with clock.stage("optimizer"):
        bench.optimizer.step()
        bench.optimizer.zero_grad(set_to_none=True)


@contextmanager
def naive_mode(bench: Bench, model: bool) -> Iterator[Step]:
    config, workers = bench.config, bench.args.workers
    dataset = NaiveImages(bench.folder, config.data.image_size, config.data.pad)
    loader = torch.utils.data.DataLoader(
        dataset, bench.args.batch, shuffle=True, num_workers=workers, drop_last=True, persistent_workers=workers > 0
    )
    stream = endless(loader)

    def step(clock: StageClock) -> None:
        with clock.stage(DATA_STAGE):
            images, labels = next(stream)
        with clock.stage(bench.task.op_stage):
            per_image = naive_inputs(bench, images, labels)
        if model:
            naive_update(bench, per_image, clock)

    try:
        yield step
    finally:
        stream.close()  # the DataLoader (and its persistent workers) goes with this generator's frame


@dataclass(frozen=True)
class Mode:
    run: Callable[[Bench], AbstractContextManager[Step]]  # sets up the mode's step, tears it down after
    trains: bool  # reaches the loss (a training mode), or stops at the model's inputs (the data side)
    leaves_threads: bool  # leaves threads behind: runs after the modes that fork worker processes
    ready: Callable[[int], int] = lambda workers: 0  # workers -> batches held ready (the warm-up drains them)
    trainer_step: bool = False  # runs the trainer's own step, so one step's FLOPs give its TFLOP/s


def build_modes() -> dict[str, Mode]:
    """Every mode, the loaders' from the loader registry, in the order they run (forking modes first)."""
    naive_ready = lambda workers: 2 * max(1, workers)  # noqa: E731
    found = {
        "synthetic": Mode(synthetic_mode, True, False, trainer_step=True),
        "naive": Mode(partial(naive_mode, model=True), True, False, naive_ready),
        "no-model:naive": Mode(partial(naive_mode, model=False), False, False, naive_ready),
    }
    for name, backend in LOADERS.items():
        threads, ready = not backend.worker_processes, backend.ready_batches
        found[name] = Mode(partial(loader_mode, loader=name, model=True), True, threads, ready, trainer_step=True)
        found[f"no-model:{name}"] = Mode(partial(loader_mode, loader=name, model=False), False, threads, ready)
    found["raw-ffcv"] = Mode(raw_ffcv_mode, False, True, LOADERS["ffcv"].ready_batches)
    return dict(sorted(found.items(), key=lambda item: item[1].leaves_threads))


MODES = build_modes()


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


def run_mode(bench: Bench, name: str) -> dict:
    bench.reset()
    mode, args = MODES[name], bench.args
    with mode.run(bench) as step:
        warmup = args.warmup + mode.ready(args.workers)
        return time_windows(step, bench.device, args.batch, warmup, args.windows, args.window)


def step_flops(bench: Bench) -> int:
    """FLOPs of one training step (forward + backward of the model and the loss), by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    bench.reset()
    counter = FlopCounterMode(display=False)
    with synthetic_mode(bench) as step, counter:
        step(StageClock(bench.device))
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


def rate_table(results: dict) -> list[str]:
    synthetic = results.get("synthetic", {}).get("median")
    lines = [
        "| mode | images/s | slowest .. fastest | all timed steps | vs synthetic | vs naive |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        trains = MODES[name].trains
        # Training modes against the naive step, data-side modes against the naive data side.
        naive = results.get("naive" if trains else "no-model:naive", {}).get("median")
        vs_synthetic = f"{r['median'] / synthetic:.2f}x" if synthetic and trains else "-"
        vs_naive = f"{r['median'] / naive:.2f}x" if naive else "-"
        lines.append(
            f"| {name} | {r['median']:,.0f} | {r['min']:,.0f} .. {r['max']:,.0f} | {r['overall']:,.0f} "
            f"| {vs_synthetic} | {vs_naive} |"
        )
    return lines


def format_tables(results: dict) -> str:
    stages = list(dict.fromkeys(stage for r in results.values() for stage in r["stages_ms"]))
    lines = [*rate_table(results), ""]
    lines += ["| mode | " + " | ".join(f"{s} ms" for s in stages) + " |", "| --- |" + " ---: |" * len(stages)]
    for name, r in results.items():
        cells = [f"{r['stages_ms'][s]:.2f}" if s in r["stages_ms"] else "-" for s in stages]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    medians = [results[m]["median"] for m in names]
    errors = [
        [results[m]["median"] - results[m]["min"] for m in names],
        [results[m]["max"] - results[m]["median"] for m in names],
    ]
    figure, axes = plt.subplots(figsize=(9, 4.5))
    axes.bar(names, medians, yerr=errors, capsize=4, color="#4c72b0")
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


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of: {', '.join(MODES)}")
    parser.add_argument("--loader", action="append", default=[], choices=sorted(LOADERS), help="add an end-to-end mode")
    parser.add_argument("--synthetic", action="store_true", help="add the synthetic mode")
    parser.add_argument("--no-model", action="store_true", help="add the no-model mode of every --loader")
    parser.add_argument("--naive", action="store_true", help="add the naive baseline")
    parser.add_argument("--method", default=default_method(), choices=list(METHODS), help="pretext task")
    for flag, (key, kind, help_text) in method_flags().items():
        parser.add_argument(flag, dest=key, type=kind, default=None, help=f"{help_text} (default: the config's)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64, help="images per step")
    parser.add_argument("--width", type=float, default=1.0, help="width multiplier of the backbone")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32")
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
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = arguments()
    args = parser.parse_args(argv)
    picked = [*args.loader, *(["synthetic"] if args.synthetic else []), *(["naive"] if args.naive else [])]
    picked += [f"no-model:{loader}" for loader in args.loader] if args.no_model else []
    wanted = picked or [m for m in args.modes.split(",") if m]
    unknown = [m for m in wanted if m not in MODES]
    if unknown:
        parser.error(f"--modes {','.join(unknown)}: expected some of {', '.join(MODES)}")
    args.mode_list = [m for m in MODES if m in wanted]  # forking modes first, whatever the order given
    return args


def describe(bench: Bench) -> str:
    args, config, device = bench.args, bench.config, bench.device
    device_name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, device "
        f"{device}{device_name}; {args.method} on {config.data.image_size}px: {bench.task.describe()}; "
        f"{config.model.backbone} backbone, width {config.model.width}, batch {args.batch} images, "
        f"{args.precision}{', channels-last' if args.channels_last else ''}{', compiled' if args.compile else ''}; "
        f"data {bench.folder} (ffcv: {bench.beton}); {args.workers} workers; "
        f"{args.windows} windows of {args.window} steps after {args.warmup}"
    )


def compute_figures(bench: Bench, results: dict) -> tuple[dict, str]:
    """One step's FLOPs and the measured matmul peak; each training mode's achieved TFLOP/s and fraction."""
    args = bench.args
    flops = step_flops(bench)
    peak = matmul_peak(bench.device, DTYPES[args.precision], 8192 if bench.device.type == "cuda" else 2048)
    for name, r in results.items():
        if MODES[name].trainer_step:
            achieved = flops * r["median"] / args.batch
            r["achieved_tflops"] = round(achieved / 1e12, 4)
            r["fraction_of_peak"] = round(achieved / peak, 4)
    achieved = ", ".join(
        f"{m} {r['achieved_tflops']:.4f} TFLOP/s ({r['fraction_of_peak']:.1%})"
        for m, r in results.items()
        if "achieved_tflops" in r
    )
    text = (
        f"One step: {flops / 1e9:,.1f} GFLOP (forward + backward, torch's FlopCounterMode); measured "
        f"{args.precision} matmul peak {peak / 1e12:,.3f} TFLOP/s; achieved: {achieved}"
    )
    return {"step_gflop": round(flops / 1e9, 3), "matmul_peak_tflops": round(peak / 1e12, 4)}, text


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    bench = Bench(args)
    header = describe(bench)
    print(header)
    results = {}
    for name in args.mode_list:
        results[name] = run_mode(bench, name)
        print(f"{name}: {results[name]['median']:,.0f} images/s", flush=True)
        release_memory(bench.device)
    compute, figures = compute_figures(bench, results)
    table = format_tables(results) + "\n\n" + figures
    print(table)
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "device": str(bench.device)
        + (f" ({torch.cuda.get_device_name(bench.device)})" if bench.device.type == "cuda" else ""),
        "versions": versions(),
        "args": {k: v for k, v in vars(args).items() if k != "mode_list"},
        "config": to_dict(bench.config),
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
