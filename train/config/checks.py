"""What several keys must satisfy together, checked from the config alone (before anything is written):
`check_config` runs every such check. What needs the machine (CUDA present, the number of processes, a
tracker's package installed) is checked in train/engine/ when the Accelerator starts."""

from __future__ import annotations

import os

from pipeline.loader_request import pad_mode_matters
from pipeline.loaders import LOADERS
from train.config.schema import GRAPHING_COMPILE_MODES, ConfigError, OptimSection, SpeedSection, StageConfig

LAUNCHER_PRECISION = "ACCELERATE_MIXED_PRECISION"  # what `accelerate launch` (or `accelerate config`) chose
# torch's SGD in its foreach and for-loop forms reads a tensor learning rate on the host (an `alpha`
# argument), which a CUDA graph cannot capture; the fused form reads it on the device.
GRAPHABLE_SGD_IMPLEMENTATIONS = ("auto", "fused")


def launcher_precision() -> str | None:
    launcher = os.environ.get(LAUNCHER_PRECISION)
    return launcher if launcher in ("no", "bf16", "fp16") else None


def settled_precision(speed: SpeedSection) -> str:
    """`speed.precision` as no | bf16 | fp16: `auto` is the launcher's choice (else no), `fp32` is `no`."""
    if speed.precision == "auto":
        return launcher_precision() or "no"
    return "no" if speed.precision == "fp32" else speed.precision


def check_step_options(speed: SpeedSection, grad_accum: int) -> None:
    """How the step runs: options that cannot work together, refused whatever the machine."""
    if not speed.cuda_graph:
        return
    if settled_precision(speed) == "fp16":
        launcher = "" if speed.precision == "fp16" else f" ({LAUNCHER_PRECISION}=fp16)"
        raise ConfigError(
            f"speed.cuda_graph=true with speed.precision={speed.precision}{launcher}: fp16's loss scaler reads its "
            "overflow check on the host every step, which a graph cannot; use speed.precision=bf16"
        )
    if speed.compile and speed.compile_mode in GRAPHING_COMPILE_MODES:
        raise ConfigError(
            f"speed.compile_mode={speed.compile_mode} captures CUDA graphs of its own, which cannot sit inside "
            "speed.cuda_graph's; use compile_mode default or max-autotune-no-cudagraphs"
        )
    if grad_accum > 1:
        raise ConfigError("speed.cuda_graph=true replays one batch per step; with train.grad_accum > 1 train eagerly")


def check_graphable(optim: OptimSection, cuda_graph: bool) -> None:
    """The optimizer a graphed step can capture, or ConfigError."""
    if cuda_graph and optim.name == "sgd" and optim.implementation not in GRAPHABLE_SGD_IMPLEMENTATIONS:
        raise ConfigError(
            f"optim.implementation={optim.implementation} with speed.cuda_graph=true: torch's {optim.implementation} "
            "SGD reads the tensor learning rate on the host, which a CUDA graph cannot capture; use "
            "optim.implementation=fused (or auto)"
        )


def check_loader_options(config: StageConfig) -> None:
    """Data settings that cannot work: a reference recipe without its data, an option the configured
    loader cannot honour."""
    data, backend = config.data, LOADERS[config.data.loader]
    if data.require_path and data.path is None:
        raise ConfigError(
            "this config is a reference recipe (data.require_path=true): it trains on named data, so give "
            "--data DATA_DIR; the built-in demo data is --config demo's"
        )
    if pad_mode_matters(data.augment, data.pad) and data.pad_mode not in backend.pad_modes:
        raise ConfigError(
            f"data.pad_mode={data.pad_mode}: the {data.loader} loader pads with {' or '.join(backend.pad_modes)} "
            f"only; loaders with {data.pad_mode} padding: "
            f"{', '.join(name for name, b in LOADERS.items() if data.pad_mode in b.pad_modes)}"
        )


def check_config(config: StageConfig) -> None:
    """Every check of several keys together, or ConfigError naming them (a stage's validate runs it)."""
    check_step_options(config.speed, config.train.grad_accum)
    check_graphable(config.optim, config.speed.cuda_graph)
    check_loader_options(config)
