"""Fine-tuning and linear evaluation on few labels (Selfie §2.3, §3.1, §4.2; Patch RotNet §4's Linear/Tuned).

Launch:
    accelerate launch train/finetune.py --init runs/demo-XXXX      # demo data: 10% of labels, 3 seeds
    accelerate launch train/finetune.py --init none                 # the supervised baseline, same recipe
    accelerate launch train/finetune.py --init runs/demo-XXXX --arch resnet36_attn --label-fraction 0.05 --seeds 5
    accelerate launch train/finetune.py --init runs/demo-XXXX --arch resnet36 --linear-probe
    accelerate launch train/finetune.py --init runs/rotnet-XXXX --arch resnet8 --head mlp --linear-probe
                                                                    # rotation paper: frozen + two FC layers
    accelerate launch --multi_gpu --num_processes 8 train/finetune.py --config imagenet224 \
        --data ~/data/imagenet --init runs/in224 --per-class 60 --out runs/in224-ft60
    accelerate launch train/finetune.py --config cifar10 --data ~/data/cifar-10-batches-py --init runs/c10 \
        --out runs/c10-ft --resume
    accelerate launch train/finetune.py --config imagenet224 --loader ffcv --data ~/data/imagenet-betons \
        --init runs/in224 --label-fraction 0.1              # a folder with train.beton and val.beton
    python train/compare.py --init runs/demo-XXXX                   # pretrained vs. supervised over label fractions

Every seed trains through the same loop as pretraining (train/engine/loop.py) with the supervised task
(train/methods/supervised.py) and a test evaluation hook. The labelled subset is stratified per class and
depends only on the seed (pipeline/subsets.py), so the pretrained and the supervised run of one seed train
on the same images. Test accuracy always comes from the held-out split (val/ or test/ of an
ImageNet-layout folder, test_batch of CIFAR-10). With --finetune.holdout F (choosing the lr) the run
reports on a validation set instead, carved from each seed's labelled subset (F of it, stratified, at
least one image per class; --finetune.selection=extra_labels: F of the whole training split, labels beyond
the budget). --finetune.epochs E scales the horizon with the labels (at least --finetune.min_steps); a
--steps given wins; the run prints the steps it resolved.

Run folder (--out, default runs/finetune-<config>-<time>): config.yaml; per seed, seed_<s>/ with
log.jsonl, checkpoints/, curves.png and result.json; results.json with every seed's test accuracy, their
mean and sample standard deviation, the subset sizes, the init and the config. The last line printed is
`accuracy: 80.3 ± 0.3 (5 seeds)`. --resume continues an interrupted run: finished seeds are kept, the
running one continues from its newest checkpoint, and a larger --seeds adds seeds.
"""

from __future__ import annotations

from train.engine.cli import run_cli
from train.stages import finetuning


def main(argv: list[str] | None = None) -> dict:
    config, config_name = finetuning.parse(argv)
    return finetuning.run(config, config_name)


if __name__ == "__main__":
    run_cli(main)
