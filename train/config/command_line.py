"""The command line of the entry scripts: `--config NAME`, the stable flags (`--lr`, `--steps`, ...) and
`--section.key=value` overrides, parsed into a checked config (train/config/schema.py). A value is read by its
key's type, not as YAML: `--speed.precision=no` is the string "no", `--optim.weight_decay=1e-4` a number.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from pipeline.loaders import LOADERS
from train.config import (
    DEMO_ENV,
    SYSTEM_FASHION_MNIST,
    C,
    ConfigError,
    allowed_values,
    config_from,
    default_config_name,
    load_config,
    read_yaml,
    to_dict,
    yaml_strict,
)
from train.config.learning_rate import describe_lr


def key_hint(cls: type, dotted: str) -> Any:
    """The type hint of a dotted key of config class `cls`, or None when there is no such key."""
    hint: Any = cls
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(hint):
            return None
        hints = typing.get_type_hints(hint)
        if part not in hints or part not in {f.name for f in dataclasses.fields(hint)}:
            return None
        hint = hints[part]
    return hint


def parse_value(text: str, hint: Any) -> Any:
    """A command-line value read by its key's type: strings verbatim ("no" stays "no"), numbers as Python
    reads them ("1e-4" is a float), booleans and lists as YAML."""
    options = [h for h in typing.get_args(hint) if h is not type(None)] or [hint]
    if str in options:
        return text
    if float in options:
        try:
            return float(text)
        except ValueError:
            pass
    try:
        return yaml_strict.load(text) if text.strip() else text
    except yaml.YAMLError:
        return text  # not YAML: the key's check names the value and what it expects


# The stable flags both stages take: flag -> (config key, argparse type or "store_true", help)
RUN_FLAGS: dict[str, tuple[str, Any, str]] = {
    "--data": (
        "data.path",
        str,
        "ImageNet-layout folder, CIFAR-10 python folder or IDX folder (Fashion-MNIST); --loader ffcv: a .beton "
        "or a folder of them (default: the demo's data)",
    ),
    "--steps": ("train.steps", int, "optimizer steps"),
    "--batch-size": ("train.batch_size", int, "global batch size, images per step over all processes"),
    "--lr": ("optim.lr", float, "peak learning rate"),
    "--seed": ("train.seed", int, "random seed (fine-tuning: the first of --seeds)"),
    "--out": ("train.out", str, "run folder (default: runs/<config>-YYYYMMDD-HHMMSS)"),
    "--resume": ("train.resume", "store_true", "continue the run in --out from its newest checkpoint"),
    "--loader": ("data.loader", str, f"loader backend: {', '.join(LOADERS)}"),
}


def key_lines(cls: type, values: dict[str, Any], prefix: str = "") -> list[str]:
    """Every config key of `cls` with its value in `values` (flat dotted keys; else its built-in default)
    and what it allows, for --help."""
    lines = []
    for spec in dataclasses.fields(cls):
        key = prefix + spec.name
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        if dataclasses.is_dataclass(default):
            lines += key_lines(type(default), values, key + ".")
            continue
        default = values.get(key, default)
        allowed = f" ({' | '.join(allowed_values(spec))})" if "choices" in spec.metadata else ""
        expected = f" ({spec.metadata['expected']})" if "expected" in spec.metadata else ""
        lines.append(f"  --{key}={default}{allowed}{expected}")
    return lines


def flat_values(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out |= flat_values(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value}
    return out


def help_epilog(cls: type, argv: Sequence[str]) -> str:
    """Every key with the value a run of the --config on this command line (default: demo) would take, so
    --help shows what will run, not the dataclasses' built-in defaults."""
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--config")
    name = probe.parse_known_args(argv)[0].config or default_config_name()
    try:
        values, source = flat_values(to_dict(load_config(cls, name))), f"in --config {name}"
    except ConfigError as error:
        values, source = {}, f"built in (--config {name} does not load: {error})"
    keys = "\n".join(key_lines(cls, values))
    return (
        f"Every config key, as --section.key=value, with its value {source} (what a flag left out takes; "
        f"meanings in train/config/schema.py):\n{keys}"
    )


def _parser(
    flags: dict[str, tuple[str, Any, str]], description: str, cls: type, argv: Sequence[str]
) -> argparse.ArgumentParser:
    wants_help = any(arg in ("-h", "--help") for arg in argv)
    parser = argparse.ArgumentParser(
        description=description,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=help_epilog(cls, argv) if wants_help else None,
    )
    parser.add_argument(
        "--config",
        help="built-in config name or YAML path (default: demo_fmnist where Debian's dataset-fashion-mnist is "
        f"installed, else demo; {DEMO_ENV}=photos|fashion-mnist chooses)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    for flag, (key, kind, help_text) in flags.items():
        if kind == "store_true":
            parser.add_argument(flag, dest=key, action="store_true", default=None, help=help_text)
        else:
            metavar = key.rsplit(".", 1)[-1].upper()
            parser.add_argument(flag, dest=key, type=kind, default=None, metavar=metavar, help=f"{help_text} ({key})")
    return parser


def _dotted_overrides(rest: list[str], cls: type, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """--section.key=value (or --section.key value) tokens -> {"section.key": value read by its type}."""
    overrides, i = {}, 0
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
        overrides[key] = parse_value(text, key_hint(cls, key))
        i += 1
    return overrides


def saved_config(overrides: dict[str, Any]) -> dict[str, Any] | None:
    """With --resume --out RUN: the run's own resolved config (RUN/config.yaml), which a resume starts
    from instead of --config, so only what is given on this command line changes."""
    out = overrides.get("train.out")
    if not overrides.get("train.resume") or out is None or not (Path(out) / "config.yaml").is_file():
        return None
    return read_yaml(Path(out) / "config.yaml")


def note(text: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # before the Accelerator exists: one note, not one per process
        print(text)


DEMO_NOTES = {
    "demo_fmnist": f"the demo on Fashion-MNIST (Debian's dataset-fashion-mnist, in {SYSTEM_FASHION_MNIST})",
    "demo": f"the demo on photo crops scikit-image and scikit-learn ship (Fashion-MNIST is not in "
    f"{SYSTEM_FASHION_MNIST}, or {DEMO_ENV}=photos)",
}


def parse_args(
    argv: Sequence[str] | None, cls: type[C], flags: dict[str, tuple[str, Any, str]], description: str
) -> tuple[C, str]:
    """Parse --config, the stable flags and --section.key=value overrides into a resolved, checked config.
    A resume (--resume --out RUN) starts from RUN's config, not from --config: values not given on the
    command line are the run's own.

    `cls` is a stage's class with the registry's plug-ins (train.methods.stage_class); `flags` maps a flag
    ("--lr") to (config key, argparse type or "store_true", help).
    Returns the config and the config name it started from.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser(flags, description, cls, argv)
    args, rest = parser.parse_known_args(argv)
    given = {
        key: value for key, value in vars(args).items() if key not in ("config", "print_config") and value is not None
    }
    by_key = {key: flag for flag, (key, _, _) in flags.items() if key in given}
    overrides = {**given, **_dotted_overrides(rest, cls, parser)}
    saved = saved_config(overrides)
    name = args.config or default_config_name()
    if saved is None:
        config = load_config(cls, name, overrides, by_key)
    else:
        config = config_from(cls, saved, overrides, by_key)
        before, after = saved.get("train", {}).get("steps"), config.train.steps
        if before != after:
            note(f"note: the resumed run's horizon changes from {before} to {after} steps (the schedule with it)")
    if args.print_config:
        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
        unused = " (optim.base_lr is set: optim.lr is not used)" if config.optim.base_lr > 0 else ""
        print(f"# the run's {describe_lr(config.optim, config.train.batch_size)}{unused}")
        sys.exit(0)
    if args.config is None and saved is None:
        note(f"no --config: {name}, {DEMO_NOTES[name]}")
    return config, Path(name).stem
