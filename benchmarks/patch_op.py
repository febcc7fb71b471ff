"""Images/s of the patch op alone (uint8 batch in memory -> P's input), each op against the reference.

    python -m benchmarks.patch_op                       # the ops this device can run, both paper shapes
    python -m benchmarks.patch_op --batch 512 --dtype bf16 --channels-last

Each call is one step of benchmarks/harness.py: --warmup untimed calls (numba compiles, Triton autotunes
and caches on the first), then --repeats timed calls, the device synchronised around each; the table
gives the median. The loader and the model are not involved: `python -m benchmarks.throughput` measures
images/s reaching the loss.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.harness import time_windows
from pipeline.fused_patches import patchify_numba, patchify_triton, triton_runs_on
from pipeline.patches import patchify_and_mask, sample_context_permutation

SHAPES = {"32/8": (32, 8, 12), "224/32": (224, 32, 37)}  # image size, patch size, context patches (p=0.75)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def time_op(op, images: torch.Tensor, perm: torch.Tensor, patch: int, num_context: int, args) -> float:
    """Median images/s of single calls, in the dtype, layout, warm-up and repeats of the command line `args`."""

    def step(clock) -> None:
        op(images, perm, patch, num_context, dtype=DTYPES[args.dtype], channels_last=args.channels_last)

    return time_windows(step, images.device, images.shape[0], args.warmup, args.repeats, 1)["median"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    ops = {"reference": patchify_and_mask}
    if device.type == "cpu":
        ops["numba"] = patchify_numba
    if device.type == "cuda" and triton_runs_on(device):
        ops["triton"] = patchify_triton
    print(
        f"device {device} ({torch.get_num_threads()} CPU threads), batch {args.batch}, {args.dtype}, "
        f"{'channels-last' if args.channels_last else 'NCHW'}; median of {args.repeats}"
    )
    print("| shape | op | ms/batch | images/s | vs. reference |\n| --- | --- | ---: | ---: | ---: |")
    for shape, (size, patch, num_context) in SHAPES.items():
        images = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8, device=device)
        perm = sample_context_permutation(args.batch, (size // patch) ** 2, device=device)
        reference = None
        for name, op in ops.items():
            rate = time_op(op, images, perm, patch, num_context, args)
            reference = reference or rate
            print(f"| {shape} | {name} | {1e3 * args.batch / rate:.2f} | {rate:,.0f} | {rate / reference:.2f}x |")


if __name__ == "__main__":
    main()
