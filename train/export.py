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
import json
from pathlib import Path

from pipeline.atomic import write_atomic
from train.config import ConfigError
from train.engine.cli import run_cli
from train.evaluation.backbone_file import backbone_of, find_checkpoint
from train.evaluation.export_formats import FORMATS, encoded, in_timm_names


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
