import dataclasses
import errno
from pathlib import Path

import pytest

from train import config as schema
from train.config import CONFIG_DIR, ConfigError, allowed_values, load_config, to_dict
from train.config import loading as config_module
from train.config.command_line import parse_args
from train.engine.cli import run_cli
from train.methods import stage_class
from train.stages import finetuning as finetune
from train.stages import pretraining as pretrain
from train.stages.pretraining import stable_flags

# The stage classes with the registry's methods, as the entry scripts parse them.
PretrainConfig, FinetuneConfig = stage_class(schema.PretrainConfig), stage_class(schema.FinetuneConfig)

STABLE_FLAGS = stable_flags()


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_builtin_configs_load(name: str) -> None:
    config = load_config(PretrainConfig, name)
    assert config.data.image_size % config.selfie.patch_size == 0
    tuning = load_config(FinetuneConfig, name)
    # One experiment, shared sections; only the augmentation may differ per stage (the demo pretrains unpadded).
    augmentation = {key: getattr(config.data, key) for key in ("augment", "pad", "pad_mode", "crop_scale")}
    assert dataclasses.replace(tuning.data, **augmentation) == config.data and tuning.model == config.model
    assert 0 < tuning.finetune.label_fraction <= 1


def test_stage_blocks_override_shared_sections_and_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(
        "optim: {lr: 0.3}\nmodel: {width: 0.5}\n"
        "pretraining: {selfie: {patch_size: 4}}\nfinetuning: {optim: {lr: 0.01}, finetune: {seeds: 5}}\n"
    )
    pre, tune = load_config(PretrainConfig, str(path)), load_config(FinetuneConfig, str(path))
    assert (pre.optim.lr, pre.model.width, pre.selfie.patch_size) == (0.3, 0.5, 4)
    assert (tune.optim.lr, tune.model.width, tune.finetune.seeds) == (0.01, 0.5, 5)
    path.write_text("finetuning: {optim: {learning_rate: 0.1}}\n")
    for cls in (PretrainConfig, FinetuneConfig):  # a typo in either block fails both scripts
        with pytest.raises(ConfigError, match="unknown config key 'finetuning.optim.learning_rate'"):
            load_config(cls, str(path))
    path.write_text("finetune: {seeds: 2}\nselfie: {patch_size: 4}\n")  # top-level sections of either stage
    assert load_config(FinetuneConfig, str(path)).finetune.seeds == 2
    assert load_config(PretrainConfig, str(path)).selfie.patch_size == 4
    path.write_text("pretrain: {optim: {lr: 1}}\n")
    with pytest.raises(ConfigError, match="unknown config key 'pretrain'"):
        load_config(PretrainConfig, str(path))


def test_paper_settings_in_builtin_configs() -> None:
    cifar, imagenet = load_config(PretrainConfig, "cifar10"), load_config(PretrainConfig, "imagenet224")
    assert (cifar.data.image_size, cifar.selfie.patch_size, cifar.train.batch_size) == (32, 8, 512)
    assert (imagenet.data.image_size, imagenet.selfie.patch_size, imagenet.train.batch_size) == (224, 32, 1024)
    for config in (cifar, imagenet):
        assert config.model.width == 1.0 and config.selfie.attn_heads == 32
        assert config.selfie.attn_intermediate == 640 and config.selfie.attn_layers == 3
        assert config.optim.momentum == 0.9 and config.optim.nesterov and config.optim.weight_decay == 1e-4
        assert config.optim.warmup_steps == 100 and config.train.steps == 120_000
    assert imagenet.data.augment == "random_resized_crop" and imagenet.model.stem == "imagenet"


def test_flags_and_dotted_overrides() -> None:
    argv = [
        "--config",
        "demo",
        "--lr",
        "0.3",
        "--steps",
        "7",
        "--selfie.position_on_context=false",
        "--data.crop_scale",
        "[0.2, 1.0]",
        "--resume",
        "--out",
        "x",
    ]
    config, name = parse_args(argv, PretrainConfig, STABLE_FLAGS, "test")
    assert name == "demo"
    assert config.optim.lr == 0.3 and config.train.steps == 7 and config.train.resume
    assert config.selfie.position_on_context is False and config.data.crop_scale == (0.2, 1.0)


def test_unknown_and_mistyped_keys_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown config key 'model.depth'"):
        parse_args(["--model.depth=3"], PretrainConfig, STABLE_FLAGS, "test")
    with pytest.raises(ConfigError, match="unknown config key 'nosection'"):
        parse_args(["--nosection.x=3"], PretrainConfig, STABLE_FLAGS, "test")
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        parse_args(["--train.steps=many"], PretrainConfig, STABLE_FLAGS, "test")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="bad.yaml.*optim.learning_rate"):
        load_config(PretrainConfig, str(bad))
    with pytest.raises(ConfigError, match="built-in config"):
        load_config(PretrainConfig, "nonesuch")
    with pytest.raises(SystemExit):
        parse_args(["stray"], PretrainConfig, STABLE_FLAGS, "test")


# Selfie's keys as the shared model section held them before they moved into its own section (issue 24).
OLD_LAYOUT = {"model": {"width": 0.5, "attn_heads": 4, "attn_layers": 1, "position_on_context": False}}


@pytest.mark.parametrize("cls", [PretrainConfig, FinetuneConfig], ids=["pretraining", "finetuning"])
def test_a_saved_config_in_the_old_layout_loads_into_the_new_one(cls: type) -> None:
    """A run folder's config.yaml written before Selfie's keys moved: each old key lands in its new place."""
    config = config_module.config_from(cls, OLD_LAYOUT, {"optim.lr": 0.2})
    assert config.model.width == 0.5 and config.optim.lr == 0.2
    assert (config.selfie.attn_heads, config.selfie.attn_layers, config.selfie.position_on_context) == (4, 1, False)
    assert config.selfie.attn_intermediate == 640  # not in the file: the default, as before
    assert "attn_heads" not in to_dict(config)["model"]


def test_a_moved_key_typed_is_one_error_naming_its_new_place(tmp_path: Path) -> None:
    message = "config key model.attn_heads moved to selfie.attn_heads"
    for cls in (PretrainConfig, FinetuneConfig):
        with pytest.raises(ConfigError, match=message):
            parse_args(["--model.attn_heads=4"], cls, {}, "test")
    shared, block = tmp_path / "shared.yaml", tmp_path / "block.yaml"
    shared.write_text("model:\n  width: 0.5\n  attn_heads: 4\n")
    block.write_text("pretraining:\n  model:\n    position_kind: full\n")
    with pytest.raises(ConfigError, match=f"shared.yaml: {message}$"):
        load_config(PretrainConfig, str(shared))
    with pytest.raises(
        ConfigError, match="block.yaml: config key pretraining.model.position_kind moved to pretraining.selfie"
    ):
        load_config(FinetuneConfig, str(block))
    with pytest.raises(ConfigError, match="config key model.attn_dropout moved to selfie.attn_dropout"):
        config_module.config_from(PretrainConfig, OLD_LAYOUT, {"model.attn_dropout": 0.0})  # on a resume


def test_the_shared_config_holds_no_method_key() -> None:
    assert {f.name for f in dataclasses.fields(schema.ModelSection)} == {"backbone", "width", "stem"}


def test_to_dict_round_trips() -> None:
    config = load_config(PretrainConfig, "imagenet224")
    assert to_dict(config)["data"]["crop_scale"] == [0.08, 1.0]


def choice_keys(cls: type) -> list[tuple[str, tuple[str, ...]]]:
    """(dotted key, allowed values) of every `choice` key of a stage's config class."""
    found = []

    def walk(section: type, prefix: str) -> None:
        for spec in dataclasses.fields(section):
            key = prefix + spec.name
            if "choices" in spec.metadata:
                found.append((key, allowed_values(spec)))
            elif dataclasses.is_dataclass(spec.type if isinstance(spec.type, type) else None):
                walk(spec.type, key + ".")
            elif spec.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(spec.default_factory):
                walk(spec.default_factory, key + ".")

    walk(cls, "")
    return found


STAGES = {"pretrain": (PretrainConfig, pretrain), "finetune": (FinetuneConfig, finetune)}
CHOICE_KEYS = [(stage, key, allowed) for stage, (cls, _) in STAGES.items() for key, allowed in choice_keys(cls)]


def test_every_fixed_set_key_is_declared_as_a_choice() -> None:
    keys = {key for _, key, _ in CHOICE_KEYS}
    expected = {"method", "model.backbone", "model.stem", "data.loader", "data.augment", "speed.precision"}
    expected |= {"finetune.arch", "finetune.head", "selfie.patch_op", "selfie.position_kind"}
    assert expected <= keys


@pytest.mark.parametrize(("stage", "key", "allowed"), CHOICE_KEYS, ids=[f"{s}:{k}" for s, k, _ in CHOICE_KEYS])
def test_a_bad_choice_exits_2_naming_the_key_and_its_values_before_any_folder_exists(
    stage: str, key: str, allowed: tuple[str, ...], tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    module = STAGES[stage][1]
    setting = ["--method", "bogus"] if key == "method" else [f"--{key}=bogus"]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(module.main, [*setting, "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and key in error[0] and "bogus" in error[0], error
    assert all(value in error[0] for value in allowed), error
    assert list(tmp_path.iterdir()) == []  # no run folder, no runs/, no config.yaml


def test_command_line_values_are_read_by_the_keys_type() -> None:
    config, _ = parse_args(
        ["--speed.precision=no", "--optim.weight_decay=1e-4", "--optim.lr=1.0e30", "--data.path=1e3"],
        PretrainConfig,
        STABLE_FLAGS,
        "test",
    )
    assert config.speed.precision == "no" and config.optim.weight_decay == 1e-4 and config.optim.lr == 1e30
    assert config.data.path == "1e3"  # a string key keeps the text


def test_a_bad_range_names_the_flag_and_the_key() -> None:
    with pytest.raises(ConfigError, match=r"--steps 0 \(train.steps\): expected a positive number of steps"):
        parse_args(["--steps", "0"], PretrainConfig, STABLE_FLAGS, "test")
    with pytest.raises(ConfigError, match=r"model.width -1.0: expected a positive multiplier"):
        parse_args(["--model.width=-1"], PretrainConfig, STABLE_FLAGS, "test")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"data:\n  workers: \xff\xfe\n", "not UTF-8 text (byte 17)"),
        (b"data:\n  pad: 1\n  pad: 2\n", "not valid YAML at line 3, column 3 (key 'pad' appears twice"),
        (b"optim: {lr: 0.1}\noptim: {lr: 0.2}\n", "key 'optim' appears twice"),
        (b"data:\n  pad: [1, 2\n", "not valid YAML at line"),
    ],
)
def test_a_bad_config_file_is_one_line_naming_it_once(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as error:
        load_config(PretrainConfig, str(path))
    assert message in str(error.value) and str(error.value).count(str(path)) == 1, str(error.value)
    assert "\n" not in str(error.value)


def test_yaml_aliases_are_refused_at_once(tmp_path: Path) -> None:
    """Nine levels of nested aliases would expand to 10^9 items ("billion laughs")."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="aliases are not allowed"):
        load_config(PretrainConfig, str(path))
    overrides = parse_args(["--data.std=&s [0.5, 0.5, 0.5]"], PretrainConfig, STABLE_FLAGS, "")[0]
    assert overrides.data.std == (0.5, 0.5, 0.5)  # an anchor alone is harmless; only aliases expand


@pytest.mark.parametrize(
    ("wanted", "installed", "expected"),
    [
        ("auto", True, "demo_fmnist"),
        ("auto", False, "demo"),
        ("photos", True, "demo"),
        ("fashion-mnist", True, "demo_fmnist"),
    ],
)
def test_no_config_takes_fashion_mnist_where_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, wanted: str, installed: bool,
    expected: str,
) -> None:  # fmt: skip
    from tests.test_idx import make_idx

    system = make_idx(tmp_path / "fashion-mnist") if installed else tmp_path / "absent"
    monkeypatch.setattr(config_module, "SYSTEM_FASHION_MNIST", system)
    monkeypatch.setenv(config_module.DEMO_ENV, wanted)
    config, name = parse_args(["--steps", "3"], PretrainConfig, STABLE_FLAGS, "test")
    assert name == expected and config.train.steps == 3
    assert f"no --config: {expected}," in capsys.readouterr().out
    assert to_dict(config) == to_dict(load_config(PretrainConfig, expected, {"train.steps": 3}))
    tuning, _ = parse_args([], FinetuneConfig, finetune.STABLE_FLAGS, "test")
    assert tuning.data.path == config.data.path and tuning.model == config.model  # both stages, one demo


def test_the_demo_choice_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module, "SYSTEM_FASHION_MNIST", tmp_path)  # no IDX files in it
    monkeypatch.setenv(config_module.DEMO_ENV, "fashion-mnist")
    with pytest.raises(ConfigError, match=f"no IDX files in {tmp_path}.*dataset-fashion-mnist"):
        parse_args([], PretrainConfig, STABLE_FLAGS, "test")
    monkeypatch.setenv(config_module.DEMO_ENV, "mnist")
    with pytest.raises(ConfigError, match="SELFIE_TRAINER_DEMO=mnist: expected auto, fashion-mnist or photos"):
        parse_args([], PretrainConfig, STABLE_FLAGS, "test")
    config, name = parse_args(["--config", "demo"], PretrainConfig, STABLE_FLAGS, "test")  # a named config wins
    assert name == "demo" and config.data.path is None


def test_the_fashion_mnist_demo_is_the_reference_recipe_cut_short() -> None:
    demo, reference = (load_config(PretrainConfig, name) for name in ("demo_fmnist", "fmnist"))
    assert demo.data.path == str(config_module.SYSTEM_FASHION_MNIST) and not demo.data.require_path
    assert demo.model == reference.model and demo.selfie == reference.selfie and demo.optim == reference.optim
    assert demo.train.steps == 240 and demo.monitor == reference.monitor


def test_an_old_key_in_a_yaml_names_its_new_place(tmp_path: Path) -> None:
    """Keys that left `train:` (issue 24): a user's YAML that still has one is refused, naming the new key."""
    shared, block = tmp_path / "shared.yaml", tmp_path / "block.yaml"
    shared.write_text("train:\n  steps: 10\n  precision: bf16\n")
    block.write_text("pretraining:\n  train:\n    keep_checkpoints: 3\n")
    cls = stage_class(schema.PretrainConfig)
    with pytest.raises(ConfigError, match=f"{shared}: config key train.precision moved to speed.precision$"):
        load_config(cls, str(shared))
    with pytest.raises(
        ConfigError, match="config key pretraining.train.keep_checkpoints moved to pretraining.checkpoint.keep"
    ):
        load_config(cls, str(block))
    with pytest.raises(ConfigError, match="config key train.sync_bn moved to distributed.sync_bn"):
        load_config(cls, "demo", {"train.sync_bn": True})


def test_a_saved_config_in_the_old_train_layout_loads_into_the_new_one() -> None:
    """A run folder's config.yaml written before the split: every moved key lands in its new place."""
    old = {"train": {"steps": 7, "precision": "bf16", "log_every": 3, "log_with": "tensorboard", "keep_checkpoints": 4}}
    old["train"] |= {"collective_timeout": 60, "cpu_threads": 1}
    config = schema.config_from(stage_class(schema.PretrainConfig), old, {"train.steps": 9})
    assert (config.train.steps, config.speed.precision, config.speed.cpu_threads) == (9, "bf16", 1)
    assert (config.log.every, config.log.tracker, config.checkpoint.keep) == (3, "tensorboard", 4)
    assert config.distributed.collective_timeout == 60
    assert old["train"]["precision"] == "bf16"  # the saved dict itself is left as it was
    with pytest.raises(ConfigError, match="config key train.precision moved to speed.precision"):
        schema.config_from(stage_class(schema.PretrainConfig), old, {"train.precision": "no"})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: " + "[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("train:\n  steps: " + "9" * 5000, "a value Python cannot read"),
    ],
)
def test_a_config_too_deep_or_with_too_long_a_number_is_one_line(text: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as caught:
        config_module.read_yaml(path)
    assert f"{path}: not valid YAML" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "/full/run/log.jsonl"), "no space left"),
        (OSError(errno.EROFS, "Read-only file system", "/ro/out.json"), "a read-only file system"),
        (OSError(errno.ENAMETOOLONG, "File name too long", "/x/" + "y" * 300), "a name too long"),
    ],
)
def test_an_os_error_from_any_entry_point_is_one_line_naming_the_path(error: OSError, words: str, capsys) -> None:
    def main(argv):
        raise error

    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {error.filename}: {words}"), lines
