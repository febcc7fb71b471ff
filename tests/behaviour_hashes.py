"""The weights every method and fine-tuning reach after 20 fixed-seed, one-thread CPU steps, as hashes.

    python -m tests.behaviour_hashes OUT.json         # this process's CPU capability, as JSON
    python -m tests.behaviour_hashes OUT.json 0 2     # the first of two halves (run side by side, then merged)
    python -m tests.behaviour_hashes --pin            # rewrite tests/behaviour_hashes.json: every capability
                                                      # this machine can run (AVX-512 runs AVX2 forced too)

First recorded before the trainer was refactored into one loop with method plug-ins (issue 13); since then
a lock on behaviour: a change that moves these bits must say so and re-pin.

One-thread CPU bits are stable for one instruction set, not across them, so there is one set of pins per
ATen CPU capability, and every run is made under `pinned_environment(capability)`:
- `ATEN_CPU_CAPABILITY` and `ONEDNN_MAX_CPU_ISA` choose ATen's and oneDNN's kernels (an AVX-512 machine
  runs the AVX2 ones when told; oneDNN capped at AVX512_CORE so AMX/VNNI machines take the same kernels);
- `MKL_CBWR=AVX2`: MKL's GEMM takes its AVX2 code path on every x86 CPU. MKL runs AVX-512 code on Intel
  CPUs and AVX2 code on AMD ones by default, so the same commit gave other bits on an Intel and an AMD
  AVX-512 machine (issue 30);
- `SELFIE_TRAINER_DEMO=photos`: a run without --config would take Fashion-MNIST where it is installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

STEPS = "20"
TINY = [
    "--model.width=0.125",
    "--selfie.attn_heads=4",
    "--selfie.attn_intermediate=32",
    "--selfie.attn_layers=1",
    "--data.workers=0",
    "--batch-size=8",
    "--log.every=5",
    "--checkpoint.every=20",
    "--speed.cpu_threads=1",
    "--steps",
    STEPS,
]
# The monitors on few images: they must not change what is trained, which these runs show.
MONITORS = [
    "--monitor.knn_train_images=48",
    "--monitor.knn_test_images=24",
    "--monitor.knn_random_inits=2",
    "--monitor.clean_images=8",
    "--monitor.clean_chunk=4",
]
# The demo's pretraining augmentation when these were recorded (issue 15 made its pad 0).
AS_PINNED = ["--data.pad=4", "--data.pad_mode=zero", "--selfie.logit_scale=plain"]
# (name, pretraining flags); the rotation family runs on the CIFAR ResNet-8.
PRETRAINING = (
    ("selfie", []),
    ("rotnet", ["--method", "rotnet", "--model.backbone=resnet8"]),
    ("patch_rotnet", ["--method", "patch_rotnet", "--model.backbone=resnet8"]),
    ("patch_relnet", ["--method", "patch_relnet", "--model.backbone=resnet8"]),
)
# (name, the pretraining run it starts from or None, fine-tuning flags)
FINETUNING = (
    ("finetune_scratch_resnet50", None, ["--arch", "resnet50", "--seeds", "2"]),
    ("finetune_selfie_resnet36_attn", "selfie", ["--arch", "resnet36_attn"]),
    # The probe as it was pinned: without the batch-norm recalibration issue 15 added to the protocol.
    (
        "finetune_rotnet_mlp_probe",
        "rotnet",
        ["--arch", "resnet8", "--head", "mlp", "--linear-probe", "--finetune.recalibrate_bn=false"],
    ),
)


def state_hash(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def run_hash(folder: Path) -> str:
    """One hash over the newest checkpoint's model of every checkpoints/ folder in a run (one per seed)."""
    digest = hashlib.sha256()
    for checkpoints in sorted(folder.glob("**/checkpoints")):
        newest = sorted(checkpoints.glob("step_*.pt"))[-1]
        model = torch.load(newest, map_location="cpu", weights_only=True)["model"]
        digest.update(f"{newest.relative_to(folder)}:{state_hash(model)}".encode())
    return digest.hexdigest()


def compute(demo_root: Path, out: Path, part: int = 0, parts: int = 1) -> dict[str, str]:
    """The hashes of share `part` of `parts` of the runs: every `parts`-th pretraining with the fine-tuning
    that starts from it; fine-tuning from scratch in the last share."""
    from train.stages import finetuning as finetune
    from train.stages import pretraining as pretrain

    share = [name for index, (name, _) in enumerate(PRETRAINING) if index % parts == part]
    threads = torch.get_num_threads()
    hashes, runs = {}, {}
    try:
        for name, flags in PRETRAINING:
            if name not in share:
                continue
            runs[name] = out / name
            pretrain.main([*TINY, *MONITORS, *AS_PINNED, *flags, "--data", str(demo_root), "--out", str(runs[name])])
            hashes[name] = run_hash(runs[name])
        for name, init, flags in FINETUNING:
            if (init not in share) if init else part != parts - 1:  # from scratch: in the last share
                continue
            folder = out / name
            init_flag = str(runs[init]) if init else "none"
            result = finetune.main([*TINY, *flags, "--init", init_flag, "--data", str(demo_root), "--out", str(folder)])
            hashes[name] = run_hash(folder)
            hashes[name + ":test_accuracy"] = str(result["accuracy"]["per_seed"])
    finally:
        torch.set_num_threads(threads)
    return hashes


PINS = Path(__file__).with_name("behaviour_hashes.json")
ONEDNN_ISA = {"AVX2": "AVX2", "AVX512": "AVX512_CORE"}  # the oneDNN cap that goes with each ATen capability


def runnable_capabilities() -> list[str]:
    """The capabilities with pins that this machine can run: its own and, on AVX-512, AVX2 forced."""
    return {"AVX512": ["AVX2", "AVX512"], "AVX2": ["AVX2"]}.get(torch.backends.cpu.get_cpu_capability(), [])


def pinned_environment(capability: str) -> dict[str, str]:
    """The variables every pinned run is made under (module docstring)."""
    return {
        "ATEN_CPU_CAPABILITY": capability.lower(),
        "ONEDNN_MAX_CPU_ISA": ONEDNN_ISA[capability],
        "MKL_CBWR": "AVX2",
        "SELFIE_TRAINER_DEMO": "photos",
        "OMP_NUM_THREADS": "1",
    }


def pin() -> None:
    """Every runnable capability's hashes, each in its own processes, into tests/behaviour_hashes.json."""
    pins = {}
    with tempfile.TemporaryDirectory() as tmp:
        for capability in runnable_capabilities():
            out = Path(tmp) / f"{capability}.json"
            env = {**os.environ, **pinned_environment(capability)}
            subprocess.run([sys.executable, "-m", "tests.behaviour_hashes", str(out)], env=env, check=True)
            pins[capability] = json.loads(out.read_text())
    PINS.write_text(json.dumps({"torch": torch.__version__, "pins": pins}, indent=1) + "\n")


def main() -> None:
    from pipeline.demo import demo_dataset

    if sys.argv[1:] == ["--pin"]:
        return pin()
    os.environ["SELFIE_TRAINER_DEMO"] = "photos"
    part, parts = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (0, 1)
    with tempfile.TemporaryDirectory() as tmp:
        demo_root = demo_dataset(Path(tmp) / "cache")
        hashes = compute(demo_root, Path(tmp) / "runs", part, parts)
    hashes["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    hashes["mkl_cbwr"] = os.environ.get("MKL_CBWR", "")
    Path(sys.argv[1]).write_text(json.dumps(hashes, indent=1) + "\n")


if __name__ == "__main__":
    main()
