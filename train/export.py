"""Export a run's backbone as weights other tools load: the backbone alone, in plain tensor names.

    python -m train.export runs/demo-XXXX --format safetensors --out p.safetensors   # P of a Selfie run
    python -m train.export runs/rotnet-XXXX/checkpoints/step_00000240.pt --format torch --out backbone.pt
    python -m train.export runs/in224 --format timm --out resnet36_timm.pth           # timm's resnetv2_50 names
    python -m train.export runs/finetune-XXXX --seed 0 --format safetensors --out classifier_backbone.safetensors

RUN_OR_CKPT is a pretraining run folder (its newest checkpoint), a fine-tuning run folder (`--seed`'s, by
default its first seed's), or a checkpoint file. What is written is the backbone the run trained: Selfie's
P, a rotation method's backbone, a fine-tuned classifier's backbone. Formats:

  torch        a state dict in this project's names (`torch.load` -> `build_backbone(...).load_state_dict`)
  safetensors  the same tensors as a .safetensors file
  timm         the names and shapes of timm's `resnetv2_50` (ResNet v2 backbones with the imagenet stem at
               width 1): `timm.create_model("resnetv2_50", num_classes=0, checkpoint_path=FILE)` loads a
               ResNet-50's; a ResNet-36 (Selfie's P) fills the stem and stages 1-3 only, so load it with
               `timm.models.load_checkpoint(model, FILE, strict=False)` (stage 4 and the final norm keep
               timm's initialisation). Written as safetensors when FILE ends in .safetensors, else torch.

Beside FILE, FILE.json records the backbone (name, width, stem), the method, the step, the source
checkpoint, the sha256 of its resolved config, the format, the preprocessing the backbone was trained
with (`preprocessing`: whole images or the method's patches, their size, mean and std) and, for timm,
what it leaves unfilled and that preprocessing as timm's `pretrained_cfg` fields:

    cfg = json.load(open("p.pth.json"))["timm"]["pretrained_cfg"]
    model = timm.create_model("resnetv2_50", num_classes=0, pretrained_cfg_overlay=cfg)
    timm.models.load_checkpoint(model, "p.pth", strict=False)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model)) Both files
are written atomically; a bad argument is one line and exit status 2, with nothing written.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
from pathlib import Path

import torch

from model.backbones import build_backbone
from model.classifier import ARCH_BACKBONES
from model.timm_names import TIMM_MODEL, to_timm
from pipeline.atomic import write_atomic
from pipeline.data import EVAL_CROP_FRACTION
from train.checkpoint import Checkpoints, load_checkpoint
from train.cli import run_cli
from train.config import ConfigError
from train.methods import METHODS
from train.pretrained import KIND_SUFFIX, checkpoint_of, read_pretrained

FORMATS = ("safetensors", "timm", "torch")
TIMM_BACKBONES = {"resnet50": 4, "resnet36": 3}  # backbone -> its stages in timm's resnetv2_50


def find_checkpoint(path: Path, seed: int | None) -> Path:
    """The checkpoint RUN_OR_CKPT names: a file, a fine-tuning run's seed, or a pretraining run's newest."""
    seeds = sorted(path.glob("seed_*/checkpoints")) if path.is_dir() else []
    if not seeds:
        if seed is not None:
            raise ConfigError(f"--seed {seed}: {path} is not a fine-tuning run folder")
        return checkpoint_of(str(path))
    folder = path / f"seed_{seed}" / "checkpoints" if seed is not None else seeds[0]
    latest = Checkpoints(folder).latest()
    if latest is None:
        raise ConfigError(f"{path}: no checkpoint in {folder}; expected one of {', '.join(str(s) for s in seeds)}")
    return latest


def backbone_of(checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(the backbone's tensors in this project's names, what the sidecar says of it)."""
    state = load_checkpoint(checkpoint)  # fields checked, weights finite
    config, kind = state["config"], state["kind"]
    model = config["model"]
    if kind.endswith(KIND_SUFFIX):
        pretrained = read_pretrained(checkpoint)
        prefix, name, method = pretrained.encoder_prefix, pretrained.backbone, pretrained.method
    elif kind == "finetune":
        arch = config["finetune"]["arch"]
        if arch not in ARCH_BACKBONES:
            raise ConfigError(
                f"{checkpoint}: field config.finetune.arch is {arch!r}; expected one of {', '.join(ARCH_BACKBONES)}"
            )
        prefix, name, method = (
            "backbone.",
            ARCH_BACKBONES[arch],
            f"fine-tuned {arch} (init {config['finetune']['init']})",
        )
    else:
        raise ConfigError(f"{checkpoint}: a {kind!r} checkpoint; expected a pretraining or fine-tuning one")
    tensors = {k.removeprefix(prefix): v for k, v in state["model"].items() if k.startswith(prefix)}
    data = config.get("data")
    if not isinstance(data, dict) or not {"image_size", "mean", "std"} <= data.keys():
        raise ConfigError(
            f"{checkpoint}: field config.data lacks image_size, mean or std; expected the run's data section"
        )
    trained_on = METHODS[method].backbone_input(config) if method in METHODS else None
    info = {
        "backbone": name,
        "width": model["width"],
        "stem": model["stem"],
        "method": method,
        "kind": kind,
        "step": int(state["step"]),
        "source": str(checkpoint.resolve()),
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
        "preprocessing": preprocessing(data, trained_on),
    }
    check_loads(checkpoint, name, model, tensors)
    return tensors, info


def preprocessing(data: dict, trained_on: tuple[str, int] | None) -> dict:
    """What the backbone's input was: whole images or a method's patches, their side, the normalisation.
    Another tool that feeds it differently (timm's resnetv2_50 defaults to mean = std = 0.5) gets wrong
    features without any error."""
    kind, side = trained_on or ("images", int(data["image_size"]))
    record = {
        "input": kind,
        "input_size": [3, side, side],
        "image_size": int(data["image_size"]),
        "pixels": "RGB, scaled to 0..1, then (x - mean) / std per channel",
        "mean": list(data["mean"]),
        "std": list(data["std"]),
    }
    if kind == "images":
        record["eval_resize"] = (
            f"an image of another size: shorter side to {side} / {EVAL_CROP_FRACTION}, bilinear, then the "
            f"center {side} x {side}"
        )
    else:
        record["patch_size"] = side
        record["eval_resize"] = f"the image at {data['image_size']} px, cut into {side} x {side} patches"
    return record


def timm_pretrained_cfg(record: dict) -> dict:
    """The preprocessing as timm's pretrained_cfg fields: `timm.create_model(..., pretrained_cfg_overlay=cfg)`
    makes `timm.data.resolve_data_config` return them."""
    return {
        "input_size": record["input_size"],
        "mean": record["mean"],
        "std": record["std"],
        "interpolation": "bilinear",
        "crop_pct": EVAL_CROP_FRACTION if record["input"] == "images" else 1.0,
        "num_classes": 0,
    }


def check_loads(checkpoint: Path, name: str, model: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor of the backbone present, in its place, and no other; said in one line."""
    try:
        backbone = build_backbone(name, model["width"], model["stem"])
        missing, unexpected = backbone.load_state_dict(tensors, strict=False)
    except (RuntimeError, ValueError, KeyError) as error:  # a shape mismatch, a stem or width that does not build
        first = " ".join(str(error).split())[:300]
        raise ConfigError(f"{checkpoint}: its {name} backbone does not load ({first})") from error
    if missing or unexpected:
        parts = [
            f"{len(keys)} {what} (e.g. {keys[0]})"
            for what, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        ]
        raise ConfigError(
            f"{checkpoint}: its {name} backbone does not load: tensors {', '.join(parts)}; expected the "
            "backbone's tensors under the method's prefix"
        )


def in_timm_names(tensors: dict[str, torch.Tensor], info: dict) -> tuple[dict[str, torch.Tensor], dict]:
    name = info["backbone"]
    if name not in TIMM_BACKBONES or info["stem"] != "imagenet" or info["width"] != 1.0:
        raise ConfigError(
            f"--format timm: timm's {TIMM_MODEL} is ResNet v2 at width 1 with the 7x7 imagenet stem; this "
            f"backbone is {name}, width {info['width']:g}, stem {info['stem']} (use --format torch or safetensors)"
        )
    renamed, missing = to_timm(tensors, TIMM_BACKBONES[name])
    cfg = timm_pretrained_cfg(info["preprocessing"])
    return renamed, {"model": TIMM_MODEL, "num_classes": 0, "not_filled": missing, "pretrained_cfg": cfg}


def encoded(tensors: dict[str, torch.Tensor], out: Path, format_name: str) -> bytes:
    if format_name == "safetensors" or (format_name == "timm" and out.suffix == ".safetensors"):
        from safetensors.torch import save

        return save({k: v.contiguous() for k, v in tensors.items()})
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.getvalue()


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="pretraining or fine-tuning run folder, or a checkpoint file")
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--out", required=True, help="the weights file; FILE.json is written beside it")
    parser.add_argument("--seed", type=int, help="fine-tuning run folder: whose checkpoint (default: its first seed)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    out = Path(args.out)
    if out.is_dir() or not out.parent.is_dir():
        raise ConfigError(f"--out {out}: expected a file name in an existing folder")
    tensors, info = backbone_of(find_checkpoint(Path(args.source), args.seed))
    if args.format == "timm":
        tensors, info["timm"] = in_timm_names(tensors, info)
    info |= {"format": args.format, "tensors": len(tensors)}
    write_atomic(out, encoded(tensors, out, args.format))
    write_atomic(out.with_name(out.name + ".json"), json.dumps(info, indent=1).encode())
    print(f"wrote {out} ({len(tensors)} tensors of {info['backbone']}, {info['method']}, step {info['step']})")
    return info


if __name__ == "__main__":
    run_cli(main)
