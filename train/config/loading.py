"""Reading a config: the YAML file (shared sections, then the stage's block), dotted overrides, every value
coerced to its key's type and checked against what the key allows; and which built-in config a run
without --config takes."""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from pipeline.idx import split_file
from train.config import yaml_strict
from train.config.schema import (
    BASE_STAGES,
    CONFIG_DIR,
    MOVED_KEYS,
    C,
    ConfigError,
    Plugins,
    StageConfig,
    allowed_values,
    with_plugins,
)

# The demo when no --config is given: Selfie on Fashion-MNIST where Debian's dataset-fashion-mnist (which
# scripts/setup.sh installs) put its files, since there the pretext is learned within the demo's budget;
# else on the photo crops the Python packages ship, where it is not (benchmarks/RESULTS.md, 2026-12-02).
# DEMO_ENV picks one: auto (that rule), fashion-mnist or photos (the test suite pins photos).
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DEMO_CONFIGS = {"fashion-mnist": "demo_fmnist", "photos": "demo"}
DEMO_ENV = "SELFIE_TRAINER_DEMO"


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
        return _coerce_sequence(value, hint, key)
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


def _coerce_sequence(value: Any, hint: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if not isinstance(value, list | tuple):
        raise ConfigError(f"config key {key}: expected a list, got {value!r}")
    if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(value):
        raise ConfigError(f"config key {key}: expected {len(args)} values, got {list(value)}")
    item_hints = args if origin is tuple and Ellipsis not in args else [args[0]] * len(value)
    return origin(_coerce(v, h, key) for v, h in zip(value, item_hints, strict=True))


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


def check_values(config: Any, flags: dict[str, str] | None = None, prefix: str = "") -> None:
    """Every `choice` and `checked` key of `config` holds an allowed value, or ConfigError names the key
    (and the stable flag it came from, in `flags`: key -> flag) and what it allows."""
    for spec in dataclasses.fields(config):
        key, value = f"{prefix}{spec.name}", getattr(config, spec.name)
        if dataclasses.is_dataclass(value):
            check_values(value, flags, key + ".")
            continue
        if "choices" in spec.metadata and value not in allowed_values(spec):
            expected = f"one of {', '.join(allowed_values(spec))}"
        elif "ok" in spec.metadata and not spec.metadata["ok"](value):
            expected = spec.metadata["expected"]
        else:
            continue
        flag = (flags or {}).get(key)
        named = f"{flag} {value} ({key})" if flag else f"{key} {value!r}"
        raise ConfigError(f"{named}: expected {expected}")


def default_config_name() -> str:
    """The built-in config a run without --config takes (see DEMO_CONFIGS)."""
    wanted = os.environ.get(DEMO_ENV, "auto")
    if wanted not in ("auto", *DEMO_CONFIGS):
        raise ConfigError(f"{DEMO_ENV}={wanted}: expected auto, {' or '.join(DEMO_CONFIGS)}")
    installed = all(
        split_file(SYSTEM_FASHION_MNIST, split, kind) for split in ("train", "test") for kind in ("images", "labels")
    )
    if wanted == "fashion-mnist" and not installed:
        raise ConfigError(
            f"{DEMO_ENV}=fashion-mnist: no IDX files in {SYSTEM_FASHION_MNIST} (Debian: apt install "
            "dataset-fashion-mnist; elsewhere python -m pipeline.fetch fashion-mnist DIR, then --config fmnist "
            "--data DIR)"
        )
    return DEMO_CONFIGS["photos" if wanted == "photos" or not installed else "fashion-mnist"]


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


def read_yaml(path: Path) -> dict[str, Any]:
    """A config file's top-level mapping; every problem is a ConfigError naming the file once."""
    try:
        loaded = yaml_strict.load(path.read_bytes().decode("utf-8")) or {}
    except OSError as error:
        raise ConfigError(f"{path}: cannot be read ({error.strerror})") from error
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start}); expected a YAML file") from error
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{line} ({problem})") from error
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return loaded


def plugins_of(cls: type[StageConfig]) -> Plugins:
    """What the registry gave `cls`; a bare stage class lacks the methods' sections every config holds."""
    if cls.PLUGINS is None:
        raise TypeError(
            f"{cls.__name__} is the bare schema class: pass train.methods.stage_class({cls.__name__}), "
            "which adds the pretext methods' choices and sections"
        )
    return cls.PLUGINS


def moved_key_renames(plugins: Plugins) -> dict[str, str]:
    """Every config key that moved, old dotted key -> new dotted key: the run settings the `train` section
    gave to sections of their own (MOVED_KEYS), and the methods' (keys a method took into its own section)."""
    return {**MOVED_KEYS, **dict(plugins.moved)}


def _subtree(tree: dict[str, Any], path: list[str]) -> dict[str, Any] | None:
    for part in path:
        tree = tree.get(part)
        if not isinstance(tree, dict):
            return None
    return tree


def move_old_keys(saved: dict[str, Any], cls: type[StageConfig]) -> dict[str, Any]:
    """A run's saved config (config.yaml, a checkpoint's) in the current layout: each moved key at its new
    place, silently; one whose new section `cls`'s stage lacks is dropped."""
    sections = {f.name for f in dataclasses.fields(cls)}
    saved = copy.deepcopy(saved)
    for old, new in moved_key_renames(plugins_of(cls)).items():
        *path, name = old.split(".")
        parent = _subtree(saved, path)
        if parent is None or name not in parent:
            continue
        value = parent.pop(name)
        *where, key = new.split(".")
        if where[0] in sections:
            target = saved
            for part in where:
                target = target.setdefault(part, {})
            target.setdefault(key, value)
    return saved


def refuse_old_keys(given: dict[str, Any], cls: type[StageConfig], prefix: str = "") -> None:
    """A user's config (a YAML's sections, a command line's overrides) holds no moved key: one is a
    ConfigError naming its new place."""
    sections = {f.name for f in dataclasses.fields(cls)}
    for old, new in moved_key_renames(plugins_of(cls)).items():
        *path, name = old.split(".")
        parent = _subtree(given, path)
        if parent is not None and name in parent:
            lacking = "" if new.split(".")[0] in sections else f", which {cls.STAGE} does not have"
            raise ConfigError(f"config key {prefix}{old} moved to {prefix}{new}{lacking}")


def _stage_configs(loaded: dict[str, Any], plugins: Plugins) -> dict[str, StageConfig]:
    """Every stage's config from one YAML: its shared sections, then the stage's block, values checked."""
    classes = {cls.STAGE: with_plugins(cls, plugins) for cls in BASE_STAGES}
    shared = {key: value for key, value in loaded.items() if key not in classes}
    declared = {f.name for stage_cls in classes.values() for f in dataclasses.fields(stage_cls)}
    for key in shared:
        if key not in declared:
            raise ConfigError(
                f"unknown config key '{key}'; valid top-level keys: {', '.join(sorted(declared))}, {', '.join(classes)}"
            )
    built = {}
    for stage, stage_cls in classes.items():
        block = loaded.get(stage) or {}
        if not isinstance(block, dict):
            raise ConfigError(f"config key {stage}: expected a section of keys, got {block!r}")
        names = {f.name for f in dataclasses.fields(stage_cls)}
        config = stage_cls()
        mine = {key: value for key, value in shared.items() if key in names}
        refuse_old_keys(mine, stage_cls)
        refuse_old_keys(block, stage_cls, f"{stage}.")
        _apply(config, mine)
        _apply(config, block, f"{stage}.")
        check_values(config, prefix=f"{stage}.")
        built[stage] = config
    return built


def nest(dotted: str, value: Any) -> dict[str, Any]:
    """ "a.b.c", v -> {"a": {"b": {"c": v}}}."""
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


def _apply_overrides(config: StageConfig, overrides: dict[str, Any] | None) -> None:
    """{"optim.lr": 0.2, ...} onto `config`; an old key is refused, naming its new place."""
    for dotted, value in (overrides or {}).items():
        refuse_old_keys(nest(dotted, value), type(config))
        _apply(config, nest(dotted, value))


def load_config(
    cls: type[C], name_or_path: str, overrides: dict[str, Any] | None = None, flags: dict[str, str] | None = None
) -> C:
    """Defaults of `cls`, then the YAML file (shared sections, then this stage's block), then `overrides`
    ({"optim.lr": 0.2, ...}). Both stages' blocks are checked, so a typo anywhere in the file is an error;
    `flags` (key -> flag) lets an error name the flag a bad value came from. `cls` is a stage's class
    with the registry's plug-ins (train.methods.stage_class)."""
    plugins = plugins_of(cls)
    path = resolve_config_path(name_or_path)
    loaded = read_yaml(path)  # its errors name the file already
    try:
        config = _stage_configs(loaded, plugins)[cls.STAGE]
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error
    _apply_overrides(config, overrides)
    check_values(config, flags)
    return config


def config_from(
    cls: type[C], saved: dict[str, Any], overrides: dict[str, Any] | None = None, flags: dict[str, str] | None = None
) -> C:
    """A run's saved config (its config.yaml) with `overrides` on top, checked like `load_config`'s."""
    config = cls()
    try:
        _apply(config, move_old_keys(saved, cls))
    except ConfigError as error:
        raise ConfigError(f"the run's config.yaml: {error}") from error
    _apply_overrides(config, overrides)
    check_values(config, flags)
    return config


def to_dict(config: Any) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))
