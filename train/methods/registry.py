"""The method registry, in one place: the built-in pretext methods in the order every list shows them
(the default first), and `register` for one defined elsewhere (a test, a user's module) before its config
is parsed. Everything that depends on which methods exist derives from it here, on request: the `--method`
choices and config sections of a stage's config class (`stage_class`), and the methods' stable flags.
Registering fills this registry only; no other module changes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from model.attention_pool import PAPER_POOL, PoolShape
from train.config.schema import C, Plugins, PretrainConfig, base_stage, with_plugins
from train.methods.base import Parts, PretextMethod, method_parts
from train.methods.rotation import PatchRelNet, PatchRotNet, RotNet
from train.methods.selfie import SelfieMethod

BUILT_IN: tuple[type[PretextMethod], ...] = (SelfieMethod, RotNet, PatchRotNet, PatchRelNet)
METHODS: dict[str, type[PretextMethod]] = {method.name: method for method in BUILT_IN}


def register(method: type[PretextMethod]) -> type[PretextMethod]:
    """Make `method` a `--method` choice, its section a config section, its flags stable flags."""
    existing = METHODS.get(method.name)
    if existing is not None and (existing.__module__, existing.__qualname__) != (
        method.__module__,
        method.__qualname__,
    ):
        raise ValueError(f"method {method.name!r} is already registered by {existing.__module__}")
    if method.section is not None:
        _check_section(method)
    METHODS[method.name] = method
    return method


def _check_section(method: type[PretextMethod]) -> None:
    if method.section in {f.name for f in dataclasses.fields(PretrainConfig)}:
        raise ValueError(f"config section {method.section!r} is already a key of the pretraining config")
    for other in METHODS.values():
        if other.section == method.section and other.Settings is not method.Settings:
            raise ValueError(f"config section {method.section!r} is already registered by {other.name}")


def default_method() -> str:
    return next(iter(METHODS))


def method_flags() -> dict[str, tuple[str, Any, str]]:
    """Every registered method's stable flags (a family shares its own)."""
    return {flag: spec for method in METHODS.values() for flag, spec in method.flags.items()}


def plugins() -> Plugins:
    """What the registry adds to the config: the method names, their sections (a family's once) and the keys
    they moved into them."""
    sections = {method.section: method.Settings for method in METHODS.values() if method.section is not None}
    moved = {old: new for method in METHODS.values() for old, new in method.moved_keys.items()}
    pooled = {name: settings for name, settings in sections.items() if _pooling_method(name) is not None}
    return Plugins(tuple(METHODS), tuple(sections.items()), tuple(moved.items()), tuple(pooled.items()))


def _pooling_method(section: str) -> type[PretextMethod] | None:
    """The method of `section` whose model has an attention pooling its section sizes, if one has."""
    owners = [method for method in METHODS.values() if method.section == section]
    return next((method for method in owners if method.pool_shape({}) is not None), None)


def pool_shape(config: dict) -> PoolShape:
    """The attention pooling a config (a dict, current layout) sizes: its first pooling method's section's,
    else the paper's."""
    for method in METHODS.values():
        shape = method.pool_shape(config) if method.section in config else None
        if shape is not None:
            return shape
    return PAPER_POOL


def default_parts(name: str) -> Parts:
    """Where method `name`'s model keeps its backbone and pooling, under the default config: for checkpoints
    written before they recorded it, and for questions asked before any run."""
    return method_parts(METHODS[name], stage_class(PretrainConfig)(method=name))


def stage_class(cls: type[C]) -> type[C]:
    """`cls`'s stage config class with the registered methods' choices and sections, as the config
    functions (train.config.load_config, parse_args) take it."""
    return with_plugins(base_stage(cls), plugins())
