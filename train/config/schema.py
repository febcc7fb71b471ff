"""The config schema: one typed dataclass per section, every field with a default and a comment; a key with
a fixed set of values (`choice`) or a range (`checked`) declares it where it is defined. A section's class
is named `<Name>Section` (a method's own too); a stage's whole config, `<Stage>Config`.

The pretext methods add to it without this package knowing them: the layer above (the registry,
train/methods/registry.py) hands a `Plugins` down, and `with_plugins` makes a stage's class with the
`--method` choices and every method's own section in it. Nothing here imports a method.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from model.backbones import BACKBONES
from model.classifier import ARCHS, HEADS
from model.resnet_v2 import STEMS
from pipeline.augment import PAD_MODES
from pipeline.data import AUGMENTS
from pipeline.loaders import LOADERS
from pipeline.patches import IMAGENET_MEAN, IMAGENET_STD

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
# auto = what `accelerate launch` / `accelerate config` chose, else no; fp32 is another name for no
PRECISIONS = ("auto", "no", "fp32", "bf16", "fp16")
# torch.compile modes; the two that capture CUDA graphs of their own cannot sit inside speed.cuda_graph's
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GRAPHING_COMPILE_MODES = ("reduce-overhead", "max-autotune")
OPTIMIZERS = ("sgd", "lars", "adamw")
TRACKERS = ("none", "tensorboard", "wandb", "mlflow")  # log.tracker (train/engine/tracking.py)
SELECTIONS = ("labelled_subset", "extra_labels")  # finetune.selection: where the lr's validation images come from
# monitor.bn: the probed network's batch norm, frozen as stored (the standard) or re-estimated on the fit
# images (train/evaluation/probes.py)
BN_PROTOCOLS = ("stored", "reestimated")
# the optimizer's implementation: auto = fused on CUDA, torch's own choice elsewhere
OPTIMIZER_IMPLEMENTATIONS = ("auto", "fused", "foreach", "for-loop")


class ConfigError(ValueError):
    """A bad configuration value or key; the message names it and says what was expected."""


def choice(
    allowed: Iterable[str] | Callable[[], Iterable[str]], default: Any = dataclasses.MISSING, **kwargs: Any
) -> Any:
    """A string key with a fixed set of values: a tuple, or a callable that lists a registry's names."""
    return field(default=default, metadata={"choices": allowed}, **kwargs)


def checked(default: Any, ok: Callable[[Any], bool], expected: str) -> Any:
    """A key whose value must satisfy `ok`; `expected` says what it must be ("a positive integer")."""
    return field(default=default, metadata={"ok": ok, "expected": expected})


def allowed_values(spec: dataclasses.Field) -> tuple[str, ...]:
    allowed = spec.metadata["choices"]
    return tuple(allowed() if callable(allowed) else allowed)


def positive(value: float) -> bool:
    return value > 0


def non_negative(value: float) -> bool:
    return value >= 0


@dataclass
class DataSection:
    path: str | None = None  # ImageNet-layout, CIFAR-10 python or IDX folder; None = built-in demo data
    # a reference recipe (cifar10, imagenet224, fmnist) trains on named data only: without data.path it is an error,
    # never a silent run of its 120k steps on the demo images
    require_path: bool = False
    loader: str = choice(lambda: LOADERS, "torch")  # loader backend (pipeline/loaders.py)
    image_size: int = checked(32, positive, "a positive number of pixels")  # training resolution S
    augment: str = choice(AUGMENTS, "pad_crop_flip")  # pad_crop_flip (32x32) | random_resized_crop (224) | none
    pad: int = checked(4, non_negative, "a number of pixels >= 0")  # padding of pad_crop_flip, per side
    pad_mode: str = choice(PAD_MODES, "zero")  # what fills that padding: zero (the paper's) | reflect | edge
    crop_scale: tuple[float, float] = (0.08, 1.0)  # area fraction range of random_resized_crop
    # loader worker processes per training process (0 = load in the main process)
    workers: int = checked(2, non_negative, "a number of processes >= 0")
    fail_on_corrupt: bool = False  # an unreadable image stops the run instead of being skipped and logged
    ffcv_os_cache: bool = True  # ffcv: read through the OS page cache (shared by the ranks of a node)
    ffcv_quasi_random: bool = False  # ffcv: quasi-random order for data larger than RAM (one process only)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per-channel normalisation, on a 0..1 scale
    std: tuple[float, float, float] = checked(
        IMAGENET_STD, lambda std: all(math.isfinite(v) and v > 0 for v in std), "three positive numbers"
    )
    cache_dir: str | None = None  # where the demo data is built; None = ~/.cache/selfie-trainer


def finite_positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def finite_non_negative(value: float) -> bool:
    return math.isfinite(value) and value >= 0


@dataclass
class OptimSection:
    # sgd (Nesterov: the papers') | lars (SGD with layer-wise trust ratios; norms and biases neither decayed
    # nor adapted, as SimCLR's and solo-learn's) | adamw (decoupled weight decay)
    name: str = choice(OPTIMIZERS, "sgd")
    # peak learning rate for the global batch (paper tunes it in 0.01 .. 0.4); replaced by base_lr's when set
    lr: float = checked(0.1, finite_positive, "a positive, finite learning rate")
    # when > 0: the linear scaling rule, lr = base_lr x global batch / 256 (printed when a run starts)
    base_lr: float = checked(0.0, finite_non_negative, "a learning rate >= 0 (0 = use optim.lr)")
    momentum: float = checked(0.9, lambda m: 0 <= m < 1, "a momentum in [0, 1)")  # sgd/lars (paper §3.2: 0.9)
    nesterov: bool = True  # sgd/lars
    betas: tuple[float, float] = (0.9, 0.999)  # adamw's moment decays
    lars_eta: float = checked(0.001, finite_positive, "a positive trust coefficient")  # lars: trust coefficient
    # L2 on conv/linear weights (paper: 1e-4); adamw: its decoupled decay
    weight_decay: float = checked(1e-4, finite_non_negative, "a weight decay >= 0")
    decay_all: bool = False  # also decay norm scales, biases, embeddings and u0 (a literal "L2 on everything")
    # linear warm-up, then cosine decay to zero at train.steps
    warmup_steps: int = checked(100, non_negative, "a number of steps >= 0")
    # max global gradient norm; 0 = no clipping (paper: none)
    grad_clip: float = checked(0.0, finite_non_negative, "a norm >= 0 (0 = no clipping)")
    # fused (one kernel for all parameters, CUDA) | foreach (a few kernels) | for-loop | auto (fused on CUDA)
    implementation: str = choice(OPTIMIZER_IMPLEMENTATIONS, "auto")


@dataclass
class TrainSection:
    """What the run trains: its horizon, batch and seed, and where it writes."""

    steps: int = checked(120_000, positive, "a positive number of steps")  # optimizer steps (paper: 120k)
    # global batch: images per optimizer step over all processes
    batch_size: int = checked(512, positive, "a positive number of images")
    seed: int = checked(0, non_negative, "an integer >= 0")  # drives data order, augmentation, masks, init
    # optimizer steps are taken every grad_accum micro-batches of batch_size / grad_accum images each
    grad_accum: int = checked(1, positive, "a positive number of micro-batches")
    out: str | None = None  # run folder; None = runs/<config>-<timestamp>
    resume: bool = False  # continue from the newest checkpoint in `out`


@dataclass
class SpeedSection:
    """How the step executes on the machine, not what it computes (up to floating-point rounding)."""

    # autocast through Accelerate: no (= fp32) | bf16 | fp16 | auto (the launcher's choice, else no); a
    # value given here wins over the launcher's, and the run says so when they differ
    precision: str = choice(PRECISIONS, "auto")
    channels_last: bool = False  # NHWC patches and weights (faster convolutions on tensor-core GPUs)
    compile: bool = False  # torch.compile the model (the first steps compile; then fewer, fused kernels)
    compile_mode: str = choice(COMPILE_MODES, "default")  # torch.compile's mode
    # capture the whole step (forward, backward, optimizer) once as a CUDA graph and replay it: one launch
    # per step instead of ~1,000 (CUDA, one process, precision no or bf16)
    cuda_graph: bool = False
    cudnn_benchmark: bool = True  # CUDA: let cuDNN time its algorithms for the step's (static) shapes
    # intra-op threads per process on a CPU; 0 = available cores / local processes
    cpu_threads: int = checked(0, non_negative, "a number of threads >= 0")


@dataclass
class LogSection:
    """What a run reports while it trains, and where."""

    every: int = checked(10, positive, "a positive number of steps")  # steps between log.jsonl records
    # steps between plain progress lines when stdout is not a terminal (a batch job's log); 0 = every log record
    print_every: int = checked(0, non_negative, "a number of steps >= 0")
    tracker: str = choice(TRACKERS, "none")  # experiment tracker that also receives every log record
    tracker_project: str = "selfie-trainer"  # the tracker's project (W&B project, MLflow experiment, TB folder)


@dataclass
class CheckpointSection:
    # steps between checkpoints; a killed run loses at most this many
    every: int = checked(1000, positive, "a positive number of steps")
    keep: int = checked(2, positive, "a positive count")  # newest checkpoints kept on disk


@dataclass
class DistributedSection:
    """Settings that matter only with several processes."""

    sync_bn: bool = False  # batch-norm statistics over the global batch, not each rank's
    # seconds a process waits for its peers in a collective before the job ends with an error (a wedged node)
    collective_timeout: int = checked(300, positive, "a positive number of seconds")


# Keys that moved (old dotted key -> new): a run folder's config.yaml or checkpoint written before reads in
# the new layout; a user who types an old key is told the new one (train/config/loading.py, moved_key_renames).
MOVED_KEYS: dict[str, str] = {
    f"train.{old}": new
    for old, new in (
        ("precision", "speed.precision"),
        ("channels_last", "speed.channels_last"),
        ("compile", "speed.compile"),
        ("compile_mode", "speed.compile_mode"),
        ("cuda_graph", "speed.cuda_graph"),
        ("cudnn_benchmark", "speed.cudnn_benchmark"),
        ("cpu_threads", "speed.cpu_threads"),
        ("log_every", "log.every"),
        ("print_every", "log.print_every"),
        ("log_with", "log.tracker"),
        ("tracker_project", "log.tracker_project"),
        ("checkpoint_every", "checkpoint.every"),
        ("keep_checkpoints", "checkpoint.keep"),
        ("sync_bn", "distributed.sync_bn"),
        ("collective_timeout", "distributed.collective_timeout"),
    )
}


def compute_dtype(speed: SpeedSection) -> torch.dtype:
    """The dtype the model computes its convolutions in: what an input op should write (autocast would cast
    an fp32 input to it anyway, with the same rounding)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(speed.precision, torch.float32)


@dataclass
class ModelSection:
    # encoder (model/backbones.py): resnet36 (Selfie's P) | resnet50 | resnet8 | resnet32
    backbone: str = choice(lambda: BACKBONES, "resnet36")
    # width multiplier of the backbone (resnet36 at 1.0: ResNet-50 widths, 1024-d vectors)
    width: float = checked(1.0, positive, "a positive multiplier")
    stem: str = choice(STEMS, "small")  # small (3x3 stride 1, for 8x8 patches) | imagenet (7x7 stride 2 + max-pool)


@dataclass
class MonitorSection:
    clean: bool = True  # the pretext metric on fixed clean held-out images at every log record (clean_*)
    # held-out images it scores, each under clean_masks fixed masks (or views): 512 image-masks give a
    # standard error of about 1 point; the cost is one forward of them per log record
    clean_images: int = checked(256, positive, "a positive number of images")
    clean_masks: int = checked(2, positive, "a positive number of masks per image")
    # images per forward, normalised with their own batch statistics; the groups of different images give
    # the standard error
    clean_chunk: int = checked(32, positive, "a positive number of images")
    # kNN and a linear probe on the frozen backbone's features (train/evaluation/probes.py: knn_acc, linear_acc_*)
    knn: bool = True
    # the batch norm the verdict and knn_acc judge the features with: stored (eval mode, the standard) |
    # reestimated (on the fit images); both are measured and logged
    bn: str = choice(BN_PROTOCOLS, "stored")
    # steps between kNN evaluations; 0 = at every checkpoint
    every: int = checked(0, non_negative, "a number of steps >= 0 (0 = at every checkpoint)")
    # labelled images the probes are fitted on (and batch norm re-estimated on), as many of each class
    knn_train_images: int = checked(1000, positive, "a positive number of images")
    # held-out images it is scored on, as many of each class (1,000: a standard error of about 1.5 points)
    knn_test_images: int = checked(1000, positive, "a positive number of images")
    # randomly initialised networks whose probes (mean ± sd) are baselines, measured at a run's start
    knn_random_inits: int = checked(3, positive, "a positive number of networks")
    knn_k: int = checked(20, positive, "a positive number of neighbours")  # neighbours that vote
    knn_temperature: float = checked(0.07, positive, "a positive temperature")  # votes weigh exp(cosine / T)
    batch: int = checked(256, positive, "a positive number of images")  # images per forward of a monitor


@dataclass
class FinetuneSection:
    # pretraining run folder or checkpoint file that initialises the backbone; none = from scratch
    init: str = "none"
    # resnet50 (a pretrained resnet36 as stages 1-3 + fresh stage 4, or a whole resnet50) | resnet36_attn
    # (Selfie's P + its pretrained A) | resnet36 | resnet8 | resnet32 (the pretrained backbone itself)
    arch: str = choice(ARCHS, "resnet50")
    # fraction of the training split used with labels, in (0, 1]; stratified per class
    label_fraction: float = checked(1.0, lambda f: 0 < f <= 1, "a fraction in (0, 1], e.g. 0.05 for 5%")
    # labelled images per class; when > 0 it replaces label_fraction
    per_class: int = checked(0, non_negative, "a count >= 0 (0 = use label_fraction)")
    # runs with seeds train.seed, train.seed + 1, ...; reports mean ± std (paper: 5)
    seeds: int = checked(1, positive, "a positive number of seeds")
    linear_probe: bool = False  # freeze the pretrained backbone (batch norm in eval mode); train only the head
    head: str = choice(HEADS, "linear")  # linear | mlp (two fully connected layers: the rotation paper's protocol)
    # hidden units of the mlp head (the paper does not give its size)
    head_hidden: int = checked(512, positive, "a positive number of units")
    # steps between test-set evaluations in log.jsonl; 0 = only after the last step
    eval_every: int = checked(0, non_negative, "a number of steps >= 0")
    # global batch size of test-set evaluation
    eval_batch_size: int = checked(256, positive, "a positive number of images")
    # a linear probe from a pretrained backbone first re-estimates the backbone's batch-norm statistics on
    # whole training images (pretraining learned them on patches or views)
    recalibrate_bn: bool = True
    recalibration_images: int = checked(1024, positive, "a positive number of images")  # how many
    # fraction held out as the validation split that evaluation reports on instead of the test split, which
    # is then never read: for choosing the lr (paper: 0.1); where it comes from is finetune.selection
    holdout: float = checked(0.0, lambda f: 0 <= f < 1, "a fraction in [0, 1), e.g. 0.1 (0 = test on the test split)")
    # where the holdout comes from. labelled_subset: each seed's own labelled subset (stratified, at least one
    # image of every class), so choosing the lr reads no label beyond the budget (the paper tunes on 10 % of
    # each experiment's training data, §3.2); extra_labels: a fixed part of the whole training split outside
    # the subset, which reads labels the budget does not have (what the holdout did before issue 31)
    selection: str = choice(SELECTIONS, "labelled_subset")
    # passes over the labelled subset that set the horizon: train.steps = max(finetune.min_steps,
    # ceil(epochs x labelled images / train.batch_size)), so more labels train longer and the 100 % column
    # sees every label several times. 0 = train.steps as it is (what a saved config without the key did).
    # A --steps or --train.steps on the command line is the exact horizon and turns this off (0 in config.yaml).
    epochs: float = checked(0.0, non_negative, "a number of passes >= 0 (0 = train.steps as given)")
    # the horizon's floor under finetune.epochs: a small subset still trains this many steps
    min_steps: int = checked(100, positive, "a positive number of steps")


@dataclass(frozen=True)
class Plugins:
    """What the layer above the config adds to it, handed down instead of imported: the pretext methods'
    names (the default first) and their config sections, each once."""

    methods: tuple[str, ...] = ()
    sections: tuple[tuple[str, type], ...] = ()  # (section name, its dataclass; every field with a default)
    # (old dotted key, new dotted key) of keys a method took into its own section: a run's saved config.yaml
    # in the old layout still loads, and a user who types the old key is told the new one
    moved: tuple[tuple[str, str], ...] = ()
    # the sections fine-tuning has too: those that size a network it rebuilds (Selfie's attention pooling,
    # for resnet36_attn), so one YAML section sizes it in both stages
    finetune_sections: tuple[tuple[str, type], ...] = ()


@dataclass
class StageConfig:
    """What both stages share: the data, the optimizer, the run (its schedule, speed, logging, checkpoints
    and processes), the network."""

    STAGE: ClassVar[str] = ""  # the YAML block of this stage
    # what `with_plugins` gave this class; None on the bare classes below, which no config is loaded into
    PLUGINS: ClassVar[Plugins | None] = None
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    speed: SpeedSection = field(default_factory=SpeedSection)
    log: LogSection = field(default_factory=LogSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    model: ModelSection = field(default_factory=ModelSection)

    @classmethod
    def plugin_fields(cls, plugins: Plugins) -> list[tuple[str, type, Any]]:
        """The fields `plugins` adds to this stage, as `dataclasses.make_dataclass` takes them."""
        return []


@dataclass
class PretrainConfig(StageConfig):
    STAGE: ClassVar[str] = "pretraining"
    method: str = ""  # pretext task (train/methods/); its choices and default come from the registry
    monitor: MonitorSection = field(default_factory=MonitorSection)  # what a run measures besides its loss

    @classmethod
    def plugin_fields(cls, plugins: Plugins) -> list[tuple[str, type, Any]]:
        default = plugins.methods[0] if plugins.methods else ""
        sections = [(name, settings, field(default_factory=settings)) for name, settings in plugins.sections]
        return [("method", str, choice(plugins.methods, default)), *sections]


@dataclass
class FinetuneConfig(StageConfig):
    STAGE: ClassVar[str] = "finetuning"
    finetune: FinetuneSection = field(default_factory=FinetuneSection)

    @classmethod
    def plugin_fields(cls, plugins: Plugins) -> list[tuple[str, type, Any]]:
        return [(name, settings, field(default_factory=settings)) for name, settings in plugins.finetune_sections]


BASE_STAGES: tuple[type[StageConfig], ...] = (PretrainConfig, FinetuneConfig)
C = TypeVar("C", bound=StageConfig)


def base_stage(cls: type[StageConfig]) -> type[StageConfig]:
    """The bare stage class under `cls` (itself, or the one `with_plugins` derived it from)."""
    return next(base for base in cls.__mro__ if base in BASE_STAGES)


@functools.cache
def with_plugins(cls: type[C], plugins: Plugins) -> type[C]:
    """The config class of `cls`'s stage with what `plugins` adds (one class per registry state)."""
    base = base_stage(cls)
    fields = base.plugin_fields(plugins)
    return dataclasses.make_dataclass(base.__name__, fields, bases=(base,), namespace={"PLUGINS": plugins})
