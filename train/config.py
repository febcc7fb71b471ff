"""Typed configuration: dataclasses with defaults, one YAML per experiment in configs/, dotted overrides.

One YAML describes an experiment for both stages. Its top-level sections (data, model, ...) are shared;
a `pretraining:` block and a `finetuning:` block hold what differs per stage (optim, train, and the
stage's own section), so `--config demo` means the same data and network to both scripts.

Precedence: dataclass defaults < the YAML's shared sections < its block for this stage < stable flags
(--lr ...) and --section.key=value overrides. A key that no dataclass declares is an error that names it,
in either stage's block.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from pipeline.patches import IMAGENET_MEAN, IMAGENET_STD

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PRECISIONS = ("no", "bf16", "fp16")


class ConfigError(ValueError):
    """A bad configuration value or key; the message names it and says what was expected."""


@dataclass
class DataConfig:
    path: str | None = None  # ImageNet-layout folder or CIFAR-10 python folder; None = built-in demo data
    loader: str = "torch"  # loader backend: torch | dali | ffcv (see pipeline.loaders)
    image_size: int = 32  # training resolution S: images reach the patch op as S x S
    augment: str = "pad_crop_flip"  # pad_crop_flip (32x32) | random_resized_crop (224) | none
    pad: int = 4  # zero padding of pad_crop_flip, pixels per side
    crop_scale: tuple[float, float] = (0.08, 1.0)  # area fraction range of random_resized_crop
    workers: int = 2  # loader worker processes per training process (0 = load in the main process)
    fail_on_corrupt: bool = False  # an unreadable image stops the run instead of being skipped and logged
    ffcv_os_cache: bool = True  # ffcv: read through the OS page cache (shared by the ranks of a node)
    ffcv_quasi_random: bool = False  # ffcv: quasi-random order for data larger than RAM (one process only)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per-channel normalisation, on a 0..1 scale
    std: tuple[float, float, float] = IMAGENET_STD
    cache_dir: str | None = None  # where the demo data is built; None = ~/.cache/selfie-trainer


@dataclass
class OptimConfig:
    lr: float = 0.1  # peak learning rate for the global batch (paper tunes it in 0.01 .. 0.4)
    momentum: float = 0.9  # Nesterov momentum (paper §3.2)
    nesterov: bool = True
    weight_decay: float = 1e-4  # L2 on conv/linear weights (paper: 1e-4)
    decay_all: bool = False  # also decay norm scales, biases, embeddings and u0 (a literal "L2 on everything")
    warmup_steps: int = 100  # linear warm-up, then cosine decay to zero at train.steps
    grad_clip: float = 0.0  # max global gradient norm; 0 = no clipping (paper: none)


@dataclass
class RunConfig:
    steps: int = 120_000  # optimizer steps (paper: 120k)
    batch_size: int = 512  # global batch: images per optimizer step over all processes
    seed: int = 0  # drives data order, augmentation, masks and initialisation
    precision: str = "no"  # no | bf16 | fp16 autocast, through Accelerate
    cpu_threads: int = 0  # intra-op threads per process on a CPU; 0 = available cores / local processes
    channels_last: bool = False  # NHWC patches and weights (faster convolutions on tensor-core GPUs)
    log_every: int = 10  # steps between log.jsonl records
    checkpoint_every: int = 1000  # steps between checkpoints; a killed run loses at most this many
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    out: str | None = None  # run folder; None = runs/<config>-<timestamp>
    resume: bool = False  # continue from the newest checkpoint in `out`


@dataclass
class ModelConfig:
    backbone: str = "resnet36"  # encoder (model/backbones.py): resnet36 (Selfie's P) | resnet50 | resnet8 | resnet32
    width: float = 1.0  # width multiplier of the backbone (resnet36 at 1.0: ResNet-50 widths, 1024-d vectors)
    stem: str = "small"  # small (3x3 stride 1, for 8x8 patches) | imagenet (7x7 stride 2 + max-pool)
    attn_layers: int = 3  # attention pooling blocks (paper: 3)
    attn_intermediate: int = 640  # feed-forward size inside each block (paper: 640)
    attn_heads: int = 32  # attention heads (paper: 32); must divide the patch vector size
    attn_dropout: float = 0.1  # on attention weights and before each residual (paper: 0.1)
    position_kind: str = "auto"  # auto (per-position up to 4x4 grids, row+column above) | full | rowcol
    position_on_context: bool = True  # add position embeddings to context patches before A


@dataclass
class SelfieConfig:
    patch_size: int = 8  # patch side in pixels; must divide data.image_size (paper: 8 on 32, 32 on 224)
    context_fraction: float = 0.75  # fraction p of patches given as context (paper: 0.75 or 0.5)
    patch_op: str = "auto"  # auto (triton on CUDA, numba on CPU) | reference (plain torch) | triton | numba


@dataclass
class RotationConfig:
    patch_ratio: float = 0.4  # patch_rotnet/patch_relnet: pasted patch side / image side (paper: 0.3, 0.4, 0.5)


@dataclass
class PretrainConfig:
    STAGE: ClassVar[str] = "pretraining"
    method: str = "selfie"  # pretext task: selfie | rotnet | patch_rotnet | patch_relnet (train/pretrain.py)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    selfie: SelfieConfig = field(default_factory=SelfieConfig)
    rotation: RotationConfig = field(default_factory=RotationConfig)


@dataclass
class FinetuneSection:
    init: str = "none"  # pretraining run folder or checkpoint file that initialises the backbone; none = from scratch
    # resnet50 (a pretrained resnet36 as stages 1-3 + fresh stage 4, or a whole resnet50) | resnet36_attn
    # (Selfie's P + its pretrained A) | resnet36 | resnet8 | resnet32 (the pretrained backbone itself)
    arch: str = "resnet50"
    label_fraction: float = 1.0  # fraction of the training split used with labels, in (0, 1]; stratified per class
    per_class: int = 0  # labelled images per class; when > 0 it replaces label_fraction
    seeds: int = 1  # runs with seeds train.seed, train.seed + 1, ...; reports mean ± std (paper: 5)
    linear_probe: bool = False  # freeze the pretrained backbone (batch norm in eval mode); train only the head
    head: str = "linear"  # linear | mlp (two fully connected layers: the rotation paper's Linear/Tuned protocol)
    head_hidden: int = 512  # hidden units of the mlp head (the paper does not give its size)
    eval_every: int = 0  # steps between test-set evaluations in log.jsonl; 0 = only after the last step
    eval_batch_size: int = 256  # global batch size of test-set evaluation


@dataclass
class FinetuneConfig:
    STAGE: ClassVar[str] = "finetuning"
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)  # must match the pretraining run's (P and A shapes)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)


STAGE_CONFIGS: dict[str, type] = {cls.STAGE: cls for cls in (PretrainConfig, FinetuneConfig)}
C = TypeVar("C")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against the type hint of `key`, converting where the conversion is lossless."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if origin in (tuple, list):
        args = typing.get_args(hint)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key {key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(value):
            raise ConfigError(f"config key {key}: expected {len(args)} values, got {list(value)}")
        item_hints = args if origin is tuple and Ellipsis not in args else [args[0]] * len(value)
        return origin(_coerce(v, h, key) for v, h in zip(value, item_hints, strict=True))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key {key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key {key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key {key}: expected a string, got {value!r}")
    raise TypeError(f"config key {key}: unsupported type {hint}")


def _apply(config: Any, updates: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(config))
    names = [f.name for f in dataclasses.fields(config)]
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise ConfigError(
                f"unknown config key '{key}'; valid keys{' in ' + prefix.rstrip('.') if prefix else ''}: "
                f"{', '.join(names)}"
            )
        current = getattr(config, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {key}: expected a section of keys, got {value!r}")
            _apply(current, value, key + ".")
        else:
            setattr(config, name, _coerce(value, hints[name], key))


def resolve_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"--config {name_or_path}: no such file")
        return path
    builtin = CONFIG_DIR / f"{name_or_path}.yaml"
    if not builtin.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"--config {name_or_path}: not a YAML file nor a built-in config ({', '.join(names)})")
    return builtin


def load_config(cls: type[C], name_or_path: str, overrides: dict[str, Any] | None = None) -> C:
    """Defaults of `cls`, then the YAML file (shared sections, then this stage's block), then `overrides`
    ({"optim.lr": 0.2, ...}). Both stages' blocks are checked, so a typo anywhere in the file is an error."""
    path = resolve_config_path(name_or_path)
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from error
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    shared = {key: value for key, value in loaded.items() if key not in STAGE_CONFIGS}
    declared = {f.name for stage_cls in STAGE_CONFIGS.values() for f in dataclasses.fields(stage_cls)}
    built: dict[type, Any] = {}
    try:
        for key in shared:
            if key not in declared:
                raise ConfigError(
                    f"unknown config key '{key}'; valid top-level keys: {', '.join(sorted(declared))}, "
                    f"{', '.join(STAGE_CONFIGS)}"
                )
        for stage, stage_cls in STAGE_CONFIGS.items():
            block = loaded.get(stage) or {}
            if not isinstance(block, dict):
                raise ConfigError(f"config key {stage}: expected a section of keys, got {block!r}")
            names = {f.name for f in dataclasses.fields(stage_cls)}
            config = stage_cls()
            _apply(config, {key: value for key, value in shared.items() if key in names})
            _apply(config, block, f"{stage}.")
            built[stage_cls] = config
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error
    config = built[cls]
    for dotted, value in (overrides or {}).items():
        nested: Any = value
        for part in reversed(dotted.split(".")):
            nested = {part: nested}
        _apply(config, nested)
    return config


def to_dict(config: Any) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def parse_args(
    argv: Sequence[str] | None, cls: type[C], flags: dict[str, tuple[str, Any, str]], description: str
) -> tuple[C, str]:
    """Parse --config, the stable flags and --section.key=value overrides into a resolved config.

    `flags` maps a flag ("--lr") to (config key, argparse type or "store_true", help).
    Returns the config and the config name it started from.
    """
    parser = argparse.ArgumentParser(
        description=description,
        allow_abbrev=False,
        epilog="Any config key can be overridden as --section.key=value, e.g. --optim.warmup_steps=500.",
    )
    parser.add_argument("--config", default="demo", help="built-in config name or YAML path (default: demo)")
    for flag, (key, kind, help_text) in flags.items():
        if kind == "store_true":
            parser.add_argument(flag, dest=key, action="store_true", default=None, help=help_text)
        else:
            metavar = key.rsplit(".", 1)[-1].upper()
            parser.add_argument(flag, dest=key, type=kind, default=None, metavar=metavar, help=help_text)
    args, rest = parser.parse_known_args(argv)
    overrides = {key: value for key, value in vars(args).items() if key != "config" and value is not None}
    i = 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--") or "." not in token.split("=")[0]:
            parser.error(f"unrecognized argument {token!r}; overrides look like --section.key=value")
        if "=" in token:
            key, text = token[2:].split("=", 1)
        elif i + 1 < len(rest):
            key, text = token[2:], rest[i + 1]
            i += 1
        else:
            parser.error(f"override {token} has no value; write {token}=VALUE")
        overrides[key] = yaml.safe_load(text) if text.strip() else text
        i += 1
    return load_config(cls, args.config, overrides), Path(args.config).stem
