"""Self-supervised pretraining of a backbone by a pretext task, `--method` (train/methods/: Selfie by
default; RotNet, Patch RotNet, Patch RelNet).

Launch:
    accelerate launch train/pretrain.py                                   # built-in demo data, CPU or GPU
    accelerate launch train/pretrain.py --method patch_rotnet --model.backbone=resnet8 --patch-ratio 0.4
    python train/pretext_table.py                                         # all methods, Table 1 on the demo
    accelerate launch train/pretrain.py --config cifar10 --data /data/cifar-10-batches-py
    accelerate launch --multi_gpu --num_processes 8 train/pretrain.py --config imagenet224 \\
        --data /data/imagenet --out runs/in224 --distributed.sync_bn=true --log.tracker=tensorboard
    accelerate launch train/pretrain.py --out runs/in224 --resume         # everything else from the run itself
    accelerate launch --multi_gpu --num_processes 8 train/pretrain.py --config imagenet224 --loader dali \\
        --data /data/imagenet --out runs/in224-dali                         # nvJPEG decode on the GPUs
    python -m pipeline.convert --src /data/imagenet/train --dst /data/imagenet/train.beton --max-resolution 256
    accelerate launch train/pretrain.py --config imagenet224 --loader ffcv --data /data/imagenet/train.beton
    torchrun --nproc_per_node 2 train/pretrain.py --steps 20              # 2 CPU processes (gloo)
    python train/pretrain.py --print-config --optim.name=lars --optim.base_lr=0.3   # the resolved config
    python -m train.export runs/in224 --format timm --out p.pth           # the backbone, for other tools

The run folder (--out, default runs/<config>-<time>) receives config.yaml (the resolved config), run.json
(every invocation: command, commit, versions, devices), log.jsonl (one JSON object per logging step, with
the clean pretext metric and the kNN monitor), checkpoints/step_XXXXXXXX.pt, and at every checkpoint the
method's pictures (pictures/<name>_step_XXXXXXXX.png) and curves.png.
Fine-tune the result with train/finetune.py --init RUN_DIR (its backbone: --arch resnet36, resnet8, ...).
"""

from __future__ import annotations

from accelerate import PartialState

from train.engine.cli import run_cli
from train.stages import pretraining


def main(argv: list[str] | None = None) -> dict:
    config, config_name = pretraining.parse(argv)
    return pretraining.run(config, config_name)


if __name__ == "__main__":
    run_cli(main)
    PartialState().destroy_process_group()  # here, not in main(): the grids call the stage again
