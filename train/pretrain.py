"""Self-supervised pretraining of a backbone by a pretext task, `--method` (train/methods/: Selfie by
default; RotNet, Patch RotNet, Patch RelNet).

Launch:
    accelerate launch train/pretrain.py                                   # built-in demo data, CPU or GPU
    accelerate launch train/pretrain.py --method patch_rotnet --model.backbone=resnet8 --patch-ratio 0.4
    python train/pretext_table.py                                         # all methods, Table 1 on the demo
    accelerate launch train/pretrain.py --config cifar10 --data /data/cifar-10-batches-py
    accelerate launch --multi_gpu --num_processes 8 train/pretrain.py --config imagenet224 \
        --data /data/imagenet --out runs/in224
    accelerate launch train/pretrain.py --config imagenet224 --data /data/imagenet --out runs/in224 --resume
    accelerate launch --multi_gpu --num_processes 8 train/pretrain.py --config imagenet224 --loader dali \
        --data /data/imagenet --out runs/in224-dali                         # nvJPEG decode on the GPUs
    python -m pipeline.convert --src /data/imagenet/train --dst /data/imagenet/train.beton --max-resolution 256
    accelerate launch train/pretrain.py --config imagenet224 --loader ffcv --data /data/imagenet/train.beton
    torchrun --nproc_per_node 2 train/pretrain.py --steps 20              # 2 CPU processes (gloo)
    python train/pretrain.py --steps 50 --model.position_on_context=false

The run folder (--out, default runs/<config>-<time>) receives config.yaml (the resolved config),
log.jsonl (one JSON object per logging step), checkpoints/step_XXXXXXXX.pt, and at every checkpoint the
method's pictures (pictures/<name>_step_XXXXXXXX.png) and curves.png.
Fine-tune the result with train/finetune.py --init RUN_DIR (its backbone: --arch resnet36, resnet8, ...).
"""

from __future__ import annotations

from functools import partial

import torch
from accelerate import PartialState

from pipeline.data import check_readable
from train.arguments import RUN_FLAGS, parse_args
from train.cli import run_cli
from train.config import PretrainConfig
from train.loading import check_loader_options, open_data, train_batches
from train.loop import Hooks, fit, start_training
from train.methods import METHODS, PretextMethod, method_flags
from train.monitors import build_monitors, random_network_knn
from train.run_folder import prepare_run_dir
from train.session import check_model_builds, make_accelerator, per_process_batch

KIND_SUFFIX = "_pretrain"  # a checkpoint's kind is "<method>_pretrain"


def stable_flags() -> dict:
    methods = f"pretext task: {', '.join(METHODS)}"
    return {**RUN_FLAGS, "--method": ("method", str, methods), **method_flags()}


def build_model(config: PretrainConfig) -> torch.nn.Module:
    model = METHODS[config.method].build_model(config)
    return model.to(memory_format=torch.channels_last) if config.train.channels_last else model


def validate(config: PretrainConfig) -> type[PretextMethod]:
    """Everything that can be checked before any work starts; returns the method's class."""
    method = METHODS[config.method]
    check_loader_options(config)
    method.check(config)
    check_model_builds(lambda: method.build_model(config), f"--method {config.method}")
    return method


def main(argv: list[str] | None = None) -> dict:
    config, config_name = parse_args(argv, PretrainConfig, stable_flags(), "Self-supervised pretraining")
    method_class = validate(config)
    accelerator = make_accelerator(config.train)
    batch_per_process = per_process_batch(config.train, accelerator)
    method = method_class(config, accelerator.device)
    source, data_path = open_data(config, "train")
    check_readable(source)
    run_dir = prepare_run_dir(config, config_name, accelerator)
    state = {"encoder_prefix": method.encoder_prefix, "pool_prefix": method.pool_prefix}
    seed = config.train.seed  # one seed for the initial weights (every rank) and the run's streams
    kind = config.method + KIND_SUFFIX
    training = start_training(
        config, accelerator, run_dir, lambda: build_model(config), kind, seed, seed, len(source), state
    )
    parameters = sum(p.numel() for p in training.model.parameters()) / 1e6
    accelerator.print(
        f"{config.method}: {len(source)} images from {data_path}; {config.data.image_size}px, {method.describe()}; "
        f"{accelerator.num_processes} process(es) on {accelerator.device}, {config.train.batch_size} images/step "
        f"({batch_per_process} per process), peak lr {config.optim.lr:g}, precision {config.train.precision}; "
        f"{config.model.backbone} backbone, {parameters:.2f}M parameters; run folder {run_dir}"
    )
    patch_spec = method.loader_patch_spec(config.data.loader)
    batches = partial(
        train_batches, config, source, batch_per_process, seed, accelerator=accelerator, patch_spec=patch_spec
    )
    hooks = Hooks(method.pictures(source, accelerator.device) if accelerator.is_main_process else None)
    hooks.log_fields = build_monitors(config, method, training.net, source, accelerator)
    if hooks.log_fields is not None and hooks.log_fields.knn is not None and training.start_step == 0:
        random = random_network_knn(hooks.log_fields, partial(build_model, config), seed, accelerator.device)
        training.logger.write({"step": 0, "knn_acc_random": random})
    result = fit(training, method, config, batches, len(source), f"{config.method} pretraining: {run_dir.name}", hooks)
    last = result.last
    if not last:
        return {"run_dir": str(run_dir), "step": training.start_step}
    monitored = "; " + hooks.log_fields.summary(last) if hooks.log_fields is not None else ""
    accelerator.print(
        f"done: step {last.get('step')}, loss {last.get('loss')}, {config.method} {method.accuracy_name} accuracy "
        f"{last.get(method.metric, 0):.1%} (chance {method.chance:.1%}){monitored}; {result.skipped_images} "
        f"unreadable images skipped; run folder {run_dir}"
    )
    return {"run_dir": str(run_dir), **last}


if __name__ == "__main__":
    run_cli(main)
    PartialState().destroy_process_group()  # here, not in main(): train/pretext_table.py calls main() again
