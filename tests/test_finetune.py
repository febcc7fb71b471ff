"""train/finetune.py and train/compare.py as users run them (subprocesses, tiny model, demo data)."""

import json
import re
import shutil
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from model.attention_pool import PoolShape
from model.classifier import ARCHS, pretrained_backbones
from pipeline.beton_writer import ConvertOptions, convert
from pipeline.loaders import LOADERS
from tests.conftest import ROOT, TINY, finetune, free_port, kill_when_exists, pretrain, run_concurrently, run_script
from train.config import ConfigError
from train.evaluation.pretrained import read_pretrained
from train.experiments.comparison import format_table
from train.stages.finetuning import format_accuracy, parse, resolve_steps, summarize

FAST = [*TINY, "--steps", "2", "--seeds", "1", "--finetune.eval_batch_size=200"]


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory: pytest.TempPathFactory, demo_root: Path) -> Path:
    folder = tmp_path_factory.mktemp("pretrained")
    result = pretrain([*TINY, "--data", str(demo_root), "--out", str(folder / "run"), "--steps", "3"], folder)
    assert result.returncode == 0, result.stderr[-2000:]
    return folder / "run"


def results_of(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def test_summary_arithmetic_and_line() -> None:
    mean, std = summarize([80.0, 80.6, 79.7, 80.3, 80.9])
    assert mean == pytest.approx(80.3)
    assert std == pytest.approx((sum((a - 80.3) ** 2 for a in [80.0, 80.6, 79.7, 80.3, 80.9]) / 4) ** 0.5)
    assert summarize([42.0]) == (42.0, 0.0)
    assert format_accuracy(80.3, 0.3, 5) == "80.3 ± 0.3 (5 seeds)"
    assert format_accuracy(50, 0, 1) == "50.0 (1 seed)"  # one seed: no spread to show, not "± 0.0"


def test_table_writer_on_a_known_result() -> None:
    cells = {
        "supervised": {"8%": {"mean": 79.3, "std": 1.0, "seeds": 5}, "100%": {"mean": 95.5, "std": 0.2, "seeds": 5}},
        "pretrained": {"8%": {"mean": 80.3, "std": 0.3, "seeds": 5}, "100%": {"mean": 95.3, "std": 0.1, "seeds": 5}},
    }
    assert format_table(cells, ["8%", "100%"], "CIFAR-10") == (
        "**CIFAR-10**\n\n"
        "| | 8% | 100% |\n"
        "| --- | ---: | ---: |\n"
        "| supervised | 79.3 ± 1.0 | 95.5 ± 0.2 |\n"
        "| pretrained | 80.3 ± 0.3 | 95.3 ± 0.1 |\n"
        "| Δ | +1.0 | -0.2 |\n"
        "\nTest accuracy (%), mean ± sample standard deviation over 5 seeds.\n"
    )
    # A held-out validation split names itself, and chance is said (10 classes).
    marked = format_table(cells, ["8%", "100%"], "CIFAR-10", chance=10.0, measured_on="validation")
    assert "\nValidation accuracy (%), mean ± sample standard deviation over 5 seeds.\n" in marked
    assert marked.endswith(
        "Chance: 10.0 %. A Δ smaller than the supervised row's sd is within its seed-to-seed spread.\n"
    )


def test_the_table_counts_the_labels_selection_read_and_names_an_lr_at_the_grid_edge() -> None:
    def chosen(lr: float, edge: str, mode: str, outside: int) -> dict:
        record = {"mode": mode, "labels_read": 600 + outside, "labels_outside_budget": outside}
        return {"mean": 70.0, "std": 1.0, "seeds": 3, "lr": lr, "lr_edge": edge, "selection": record}

    honest = {row: {"1%": chosen(0.1, "", "labelled_subset", 0)} for row in ("supervised", "pretrained")}
    honest["supervised"]["1%"] = chosen(0.2, "largest", "labelled_subset", 0)
    table = format_table(honest, ["1%"])
    assert "| lr, supervised | 0.2 (edge) |" in table and "| lr, pretrained | 0.1 |" in table
    assert "| labels read choosing the lr | 600 |" in table and "no label outside the budget was read" in table
    assert (
        "At an edge of the lr grid (the best lr may lie outside the grid; widen --lrs): supervised 1% (largest)."
        in table
    )
    extra = {row: {"1%": chosen(0.1, "", "extra_labels", 6000)} for row in ("supervised", "pretrained")}
    table = format_table(extra, ["1%"])
    assert "| labels read choosing the lr | 6,600 (6,000 outside) |" in table and "beyond the budget" in table
    assert "At an edge" not in table


@pytest.mark.slow
def test_seeds_results_and_summary(tmp_path: Path, demo_root: Path, pretrained_run: Path) -> None:
    run = tmp_path / "run"
    args = [*FAST, "--data", str(demo_root), "--init", str(pretrained_run), "--out", str(run)]
    result = finetune([*args, "--seeds", "2", "--steps", "4", "--finetune.eval_every=2"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = results_of(run)
    accuracies = summary["accuracy"]["per_seed"]
    assert len(accuracies) == 2 and all(0 <= a <= 100 for a in accuracies)
    mean, std = summarize(accuracies)
    assert summary["accuracy"]["mean"] == round(mean, 3) and summary["accuracy"]["std"] == round(std, 3)
    assert re.search(rf"^accuracy: {mean:.1f} ± {std:.1f} \(2 seeds\)$", result.stdout, re.MULTILINE)
    assert summary["init"].endswith("step_00000003.pt") and summary["labeled_images"] == [160, 160]
    assert summary["test_images"] == 400 and summary["config"]["finetune"]["label_fraction"] == 0.1
    for seed in (0, 1):
        entry = summary["seeds"][seed]
        assert entry["seed"] == seed and entry["test_images"] == 400 and entry["labeled_per_class"] == [16] * 10
        folder = run / f"seed_{seed}"
        assert {"log.jsonl", "result.json", "curves.png", "checkpoints"} <= {p.name for p in folder.iterdir()}
        log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
        assert [r["step"] for r in log if "test_acc" in r] == [2, 4]  # periodic and final evaluation
    assert summary["seeds"][0]["labeled_subset_sha1"] != summary["seeds"][1]["labeled_subset_sha1"]
    # A larger --seeds on --resume adds seeds and keeps the finished ones.
    before = (run / "seed_0" / "result.json").stat().st_mtime_ns
    more = finetune([*args, "--seeds", "3", "--steps", "4", "--finetune.eval_every=2", "--resume"], tmp_path)
    assert more.returncode == 0, more.stderr[-3000:]
    assert (
        len(results_of(run)["accuracy"]["per_seed"]) == 3 and results_of(run)["accuracy"]["per_seed"][:2] == accuracies
    )
    assert (run / "seed_0" / "result.json").stat().st_mtime_ns == before


@pytest.fixture(scope="module")
def pretrained_with(tmp_path_factory: pytest.TempPathFactory, demo_root: Path, pretrained_run: Path):
    """backbone -> a finished pretraining of it: Selfie's for resnet36, a short RotNet for the others."""
    runs = {"resnet36": pretrained_run}

    def run_for(backbone: str) -> Path:
        if backbone not in runs:
            folder = tmp_path_factory.mktemp(backbone)
            args = [*TINY, "--method", "rotnet", f"--model.backbone={backbone}", "--steps", "2"]
            result = pretrain([*args, "--data", str(demo_root), "--out", str(folder / "run")], folder)
            assert result.returncode == 0, result.stderr[-2000:]
            runs[backbone] = folder / "run"
        return runs[backbone]

    return run_for


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "backbone"), [(arch, backbone) for arch in ARCHS for backbone in pretrained_backbones(arch)]
)
def test_every_arch_fine_tunes_from_pretraining_and_from_scratch(
    tmp_path: Path, demo_root: Path, pretrained_with, arch: str, backbone: str
) -> None:
    inits = ("none", str(pretrained_with(backbone)))
    runs = [tmp_path / init.replace("/", "_") for init in inits]
    calls = [
        partial(
            finetune, [*FAST, "--data", str(demo_root), "--arch", arch, "--init", init, "--out", str(run)], tmp_path
        )
        for init, run in zip(inits, runs, strict=True)
    ]
    for result in run_concurrently(calls):
        assert result.returncode == 0, result.stderr[-3000:]
    hashes = [results_of(run)["seeds"][0]["labeled_subset_sha1"] for run in runs]
    assert hashes[0] == hashes[1]  # the same labelled images for the baseline and the pretrained run


def test_a_checkpoint_that_does_not_record_its_parts_finds_them_on_the_methods_model(
    tmp_path: Path, pretrained_run: Path
) -> None:
    """Checkpoints written before they recorded where the backbone and the pooling are (encoder_prefix,
    pool_prefix): the method's model says it, by its `backbone` and `pool` attributes."""
    newest = sorted((pretrained_run / "checkpoints").glob("*.pt"))[-1]
    state = torch.load(newest, weights_only=True)
    assert (state["encoder_prefix"], state["pool_prefix"]) == ("patch_net.", "pool.")  # as Selfie always wrote
    del state["encoder_prefix"], state["pool_prefix"]
    torch.save(state, tmp_path / "old.pt")
    old = read_pretrained(tmp_path / "old.pt")
    assert (old.encoder_prefix, old.pool_prefix) == ("patch_net.", "pool.")
    state["kind"] = "unheard_of_pretrain"
    torch.save(state, tmp_path / "unknown.pt")
    with pytest.raises(ConfigError, match="method 'unheard_of', which is not registered here"):
        read_pretrained(tmp_path / "unknown.pt")


def test_a_checkpoint_in_the_old_key_layout_gives_its_attention_poolings_shape(
    tmp_path: Path, pretrained_run: Path
) -> None:
    """A checkpoint whose config holds Selfie's keys in the shared model section (before issue 24): its A's
    shape is read from there, not taken as the default."""
    state = torch.load(sorted((pretrained_run / "checkpoints").glob("*.pt"))[-1], weights_only=True)
    settings = state["config"].pop("selfie")
    state["config"]["model"] |= {key: settings[key] for key in ("attn_layers", "attn_intermediate", "attn_heads")}
    torch.save(state, tmp_path / "old.pt")
    old = read_pretrained(tmp_path / "old.pt")
    assert old.pool == PoolShape(layers=1, intermediate=32, heads=4)  # TINY's
    assert old.model_config == {"backbone": "resnet36", "width": 0.125, "stem": "small"}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet36", "resnet36_attn"])
def test_a_linear_probe_leaves_the_pretrained_backbone_untouched(
    tmp_path: Path, demo_root: Path, pretrained_run: Path, arch: str
) -> None:
    """Frozen weights stay the pretrained ones; the batch-norm statistics are re-estimated on whole images
    first (pretraining learned them on patches), or kept too with --finetune.recalibrate_bn=false."""
    selfie = torch.load(sorted((pretrained_run / "checkpoints").glob("*.pt"))[-1], weights_only=True)["model"]
    parts = [("backbone.", "patch_net.")] + ([("pool.", "pool.")] if arch == "resnet36_attn" else [])
    for recalibrate in (True, False):
        run = tmp_path / f"probe-{recalibrate}"
        args = [*FAST, "--data", str(demo_root), "--init", str(pretrained_run), "--out", str(run), "--arch", arch]
        result = finetune(
            [*args, "--linear-probe", "--steps", "3", f"--finetune.recalibrate_bn={recalibrate}"], tmp_path
        )
        assert result.returncode == 0, result.stderr[-3000:]
        tuned = torch.load(run / "seed_0" / "checkpoints" / "step_00000003.pt", weights_only=True)["model"]
        for mine, theirs in parts:
            names = [k for k in tuned if k.startswith(mine)]
            assert names
            for name in names:
                same = torch.equal(tuned[name], selfie[theirs + name.removeprefix(mine)])
                statistic = name.endswith(("running_mean", "running_var"))
                assert same != (recalibrate and statistic), name  # only the statistics move, and only then
        assert tuned["head.weight"].abs().sum() > 0


@pytest.mark.slow
def test_kill_then_resume_gives_the_same_model(tmp_path: Path, demo_root: Path) -> None:
    common = [*TINY, "--data", str(demo_root), "--steps", "40", "--checkpoint.every=4", "--seeds", "1"]
    common += ["--checkpoint.keep=20"]
    straight = tmp_path / "straight"
    assert finetune([*common, "--out", str(straight)], tmp_path).returncode == 0
    killed = tmp_path / "killed"
    kill_when_exists(
        "finetune.py", [*common, "--out", str(killed)], tmp_path, killed / "seed_0" / "checkpoints" / "step_00000008.pt"
    )
    assert not (killed / "results.json").exists()
    result = finetune([*common, "--out", str(killed), "--resume"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = (
        torch.load(run / "seed_0" / "checkpoints" / "step_00000040.pt", weights_only=True)["model"]
        for run in (straight, killed)
    )
    for name in a:
        assert torch.equal(a[name], b[name]), name
    log = [json.loads(line) for line in (killed / "seed_0" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 41))
    assert results_of(straight)["accuracy"] == results_of(killed)["accuracy"]
    # Killed after the last checkpoint but before the results were written: the resume tests again,
    # reports the same accuracy, and the log keeps its one final test record.
    log_before = (killed / "seed_0" / "log.jsonl").read_text()
    (killed / "seed_0" / "result.json").unlink()
    (killed / "results.json").unlink()
    again = finetune([*common, "--out", str(killed), "--resume"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert results_of(killed)["accuracy"] == results_of(straight)["accuracy"]
    assert (killed / "seed_0" / "log.jsonl").read_text() == log_before
    assert [json.loads(line)["step"] for line in log_before.splitlines() if "test_acc" in line] == [40]


@pytest.mark.xdist_group("torchrun")  # two processes each: one such test at a time
@pytest.mark.slow
@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_two_processes_count_every_test_image_once(
    tmp_path: Path, demo_root: Path, pretrained_run: Path, loader: str
) -> None:
    data = tmp_path / "data"
    shutil.copytree(demo_root, data, ignore=shutil.ignore_patterns("ffcv"))
    (data / "val" / "camera" / "0003.png").unlink()  # 399 test files: the ranks' shards differ in size
    (data / "val" / "coffee" / "0007.png").write_bytes(b"not a png")  # and one of them is unreadable
    if loader == "ffcv":  # the conversion leaves the unreadable file out: 398 images in val.beton
        for split, name in (("train", "train"), ("test", "val")):
            convert(data, data / f"{name}.beton", split, ConvertOptions(write_mode="raw", workers=1))
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    run = tmp_path / "run"
    args = [str(ROOT / "train" / "finetune.py"), *FAST, "--data", str(data), "--out", str(run), "--loader", loader]
    result = run_script(
        [*args, "--init", str(pretrained_run), "--steps", "3", "--finetune.eval_batch_size=126"],
        tmp_path,
        launcher=[torchrun, "--nproc_per_node", "2", "--master_port", free_port()],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = results_of(run)
    # 200 + 199 files over two ranks in batches of 63; the unreadable one is left out, none is counted twice.
    assert summary["test_images"] == (398 if loader == "ffcv" else 399)
    assert summary["seeds"][0]["test_images"] == 398
    if loader == "ffcv":
        assert "leaves out 1 unreadable source image(s), first" in result.stdout and "coffee/0007.png" in result.stdout
    else:
        assert "unreadable test image, not counted" in result.stdout and "coffee/0007.png" in result.stdout
    assert "2 process(es)" in result.stdout and result.stdout.count("\naccuracy: ") == 1
    log = [json.loads(line) for line in (run / "seed_0" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]


@pytest.mark.slow
def test_bad_input_gets_one_clear_line_and_a_nonzero_exit(
    tmp_path: Path, demo_root: Path, pretrained_run: Path
) -> None:
    no_test_split = tmp_path / "only-train"
    shutil.copytree(demo_root / "train", no_test_split)
    other_classes = tmp_path / "other-classes"
    shutil.copytree(demo_root, other_classes)
    shutil.copytree(other_classes / "val" / "camera", other_classes / "val" / "aardvark")
    wrong_kind = tmp_path / "tuned"
    assert finetune([*FAST, "--data", str(demo_root), "--out", str(wrong_kind)], tmp_path).returncode == 0
    cases = [
        (["--label-fraction", "0"], "--label-fraction 0.0 (finetune.label_fraction): expected a fraction in (0, 1]"),
        (["--label-fraction", "1.5"], "--label-fraction 1.5 (finetune.label_fraction): expected a fraction in"),
        (["--per-class", "170"], "has 160 training images, fewer than --per-class 170"),
        (["--data", str(no_test_split)], "no test split"),
        (["--data", str(other_classes)], "the test split's 11 classes differ from the training split's 10"),
        (["--model.stem=tiny"], "model.stem 'tiny': expected one of imagenet, small"),
        (["--selfie.attn_heads=7", "--arch", "resnet36_attn"], "model settings do not build --arch resnet36_attn"),
        (
            ["--init", str(wrong_kind / "seed_0" / "checkpoints" / "step_00000002.pt")],
            "a 'finetune' checkpoint; expected",
        ),
        (["--init", str(wrong_kind)], "a fine-tuning run folder; expected a pretraining run folder"),
        (["--init", str(pretrained_run), "--model.width=0.25"], "pretrained with model.width=0.125"),
        (
            ["--init", str(pretrained_run), "--arch", "resnet36_attn", "--selfie.attn_heads=8"],
            "its attention pooling is PoolShape(layers=1, intermediate=32, heads=4, dropout=0.1) but this run's is "
            "PoolShape(layers=1, intermediate=32, heads=8",
        ),
        (["--init", str(tmp_path / "nowhere")], "no such file or folder"),
        (["--init", str(pretrained_run), "--linear-probe"], "resnet50's stage 4 is not pretrained"),
        (
            ["--arch", "vit"],
            "--arch vit (finetune.arch): expected one of resnet50, resnet36_attn, resnet36, resnet8, resnet32",
        ),
        (["--head", "deep"], "--head deep (finetune.head): expected one of linear, mlp"),
        (["--init", str(pretrained_run), "--arch", "resnet8"], "a resnet36 backbone cannot initialise --arch resnet8"),
        (["--seeds", "0"], "--seeds 0"),
        (["--label-fraction", "0.01"], "the labelled subset has 16 images to train on, fewer than one global batch"),
        # 16 labels (2 or 1 of each class) cannot give every class an image to train on and one to score
        (
            ["--label-fraction", "0.01", "--finetune.holdout=0.1"],
            "--label-fraction 0.01: the labelled subset has 16 images, 1 of class",
        ),
    ]
    runs = []
    for args, _ in cases:
        data = [] if "--data" in args else ["--data", str(demo_root)]
        batch = ["--batch-size", "32"] if "0.01" in args else []
        runs.append(partial(finetune, [*FAST, *data, *args, *batch], tmp_path))
    for (args, message), result in zip(cases, run_concurrently(runs), strict=True):
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert message in result.stderr, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, args
        assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
            line for line in result.stderr.splitlines() if message in line
        ], args  # one line says it
    assert not (tmp_path / "runs").exists()  # nothing half-made left behind


@pytest.mark.slow
def test_compare_writes_table_and_plot_and_reuses_finished_cells(
    tmp_path: Path, demo_root: Path, pretrained_run: Path
) -> None:
    out = tmp_path / "cmp"
    args = [
        str(ROOT / "train" / "compare.py"),
        "--init",
        str(pretrained_run),
        "--fractions",
        "0.05,1",
        "--out",
        str(out),
    ]
    args += [*FAST, "--data", str(demo_root)]
    first = run_script(args, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    table = (out / "table.md").read_text()
    assert "| | 5% | 100% |" in table and "| supervised |" in table and "| pretrained |" in table and "| Δ |" in table
    cells = json.loads((out / "table.json").read_text())["cells"]
    for row in ("supervised", "pretrained"):
        for column, folder in (("5%", "label-fraction-0.05"), ("100%", "label-fraction-1")):
            assert cells[row][column]["mean"] == results_of(out / f"{row}-{folder}")["accuracy"]["mean"]
    assert (out / "accuracy_vs_labels.png").stat().st_size > 0
    finished = {p: p.stat().st_mtime_ns for p in out.glob("*/seed_*/result.json")}
    again = run_script(args, tmp_path)  # a rerun reads finished cells back
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "table.md").read_text() == table
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed_*/result.json")} == finished
    changed = run_script([*args, "--lr", "0.5"], tmp_path)  # ...and refuses ones made with another recipe
    assert changed.returncode == 2 and "optim.lr is 0.5 here but" in changed.stderr
    for bad, message in (
        (["--fractions", "0.05,1.5"], "--fractions 1.5"),
        (["--label-fraction", "0.1"], "set by compare.py"),
        (["--selection-seeds", "1"], "--selection-seeds 1: expected a positive count, with --lrs"),
        # the 1 % column cannot carve a validation set: refused before the 100 % column trains
        (["--lrs", "0.1,0.2", "--fractions", "1,0.01"], "--label-fraction 0.01: the labelled subset has 16 images"),
        (["--lrs", "0.1", "--finetune.selection=extra_labels"], "set by compare.py's lr selection"),
    ):
        early = run_script([*args, *bad, "--out", str(tmp_path / "early")], tmp_path)
        assert early.returncode == 2 and message in early.stderr, early.stderr[-2000:]
        assert not (tmp_path / "early").exists()  # refused before any cell ran


@pytest.fixture(scope="module")
def rotation_run(tmp_path_factory: pytest.TempPathFactory, demo_root: Path) -> Path:
    folder = tmp_path_factory.mktemp("rotation")
    args = [*TINY, "--method", "patch_relnet", "--model.backbone=resnet8", "--steps", "3"]
    result = pretrain([*args, "--data", str(demo_root), "--out", str(folder / "run")], folder)
    assert result.returncode == 0, result.stderr[-2000:]
    return folder / "run"


@pytest.mark.slow
@pytest.mark.parametrize("linear_probe", [True, False])
def test_a_rotation_checkpoint_initialises_the_backbone_under_a_two_layer_head(
    tmp_path: Path, demo_root: Path, rotation_run: Path, linear_probe: bool
) -> None:
    """The rotation paper's protocol: the pretext backbone under two fully connected layers, frozen
    ("linear") or trained with them ("tuned")."""
    run = tmp_path / "eval"
    args = [*FAST, "--data", str(demo_root), "--init", str(rotation_run), "--out", str(run), "--arch", "resnet8"]
    args += ["--head", "mlp", "--finetune.head_hidden=16", "--steps", "3"]
    result = finetune([*args, *(["--linear-probe"] if linear_probe else [])], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    tuned = torch.load(run / "seed_0" / "checkpoints" / "step_00000003.pt", weights_only=True)["model"]
    pretext = torch.load(sorted((rotation_run / "checkpoints").glob("*.pt"))[-1], weights_only=True)["model"]
    names = [k for k in tuned if k.startswith("backbone.")]
    assert names and all(name in pretext for name in names)  # the same names under the same prefix
    weights = [n for n in names if not n.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    unchanged = [torch.equal(tuned[name], pretext[name]) for name in weights]
    assert all(unchanged) if linear_probe else not all(unchanged)  # a probe's statistics are recalibrated
    assert tuned["head.0.weight"].shape == (16, 8)  # TINY ResNet-8 (width 0.125): 8 features -> 16 -> 10 classes
    assert tuned["head.3.weight"].shape == (10, 16) and tuned["head.3.weight"].abs().sum() > 0
    saved = results_of(run)
    assert saved["head"] == "mlp" and saved["init_method"] == "patch_relnet"


def test_the_horizon_scales_with_the_labelled_subset_and_a_given_steps_wins() -> None:
    config, _ = parse(["--config", "demo"])  # 10 passes, at least 150 steps, batch 32
    assert resolve_steps(config, 160) == (
        "steps: 150 (finetune.epochs 10 over 160 labelled images at batch 32 = 50 steps; floor finetune.min_steps 150)"
    )
    config, _ = parse(["--config", "demo"])
    assert resolve_steps(config, 1600).startswith("steps: 500 ") and config.train.steps == 500  # the 100 % column
    for given in (["--steps", "20"], ["--steps=20"], ["--train.steps=20"], ["--finetune.epochs=3", "--steps", "20"]):
        config, _ = parse(["--config", "demo", *given])
        assert config.finetune.epochs == 0, given
        assert resolve_steps(config, 1600).startswith("steps: 20 (train.steps as given") and config.train.steps == 20


@pytest.mark.slow
def test_choosing_the_lr_reads_only_the_training_split(tmp_path: Path, demo_root: Path, pretrained_run: Path) -> None:
    """With a held-out validation split the test split is never opened: a data folder without one works.
    By default the validation set is carved from the labelled subset itself; extra_labels holds it out of
    the whole training split."""
    data = tmp_path / "train-only"
    shutil.copytree(demo_root / "train", data / "train")
    run = tmp_path / "holdout"
    scaled = [
        *TINY,
        "--seeds",
        "1",
        "--finetune.eval_batch_size=200",
        "--finetune.epochs=0.15",
        "--finetune.min_steps=2",
    ]
    result = finetune([*scaled, "--data", str(data), "--finetune.holdout=0.1", "--out", str(run)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = results_of(run)
    assert summary["evaluated_on"].startswith("validation (10% of the labelled subset") and summary["test_images"] == 16
    assert summary["labeled_images"] == [144]  # the 160-image subset (10 %) less its 16 validation images
    assert summary["selection"] == {
        "mode": "labelled_subset",
        "holdout": 0.1,
        "training_images": 144,
        "validation_images": 16,
        "labels_read": 160,
        "labels_outside_budget": 0,
    }
    assert "lr selection: validation on 16 of the 160 labelled images" in result.stdout
    # 0.15 passes over the 160 labelled images of batch 8: 3 steps, above the floor of 2
    assert summary["seeds"][0]["steps"] == 3 and "steps: 3 (finetune.epochs 0.15 over 160" in result.stdout
    assert re.search(r"^validation accuracy: \d+\.\d \(1 seed\)$", result.stdout, re.MULTILINE)

    old = tmp_path / "extra-labels"
    flags = ["--finetune.holdout=0.1", "--finetune.selection=extra_labels", "--out", str(old)]
    result = finetune([*FAST, "--data", str(data), *flags], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = results_of(old)
    assert summary["evaluated_on"].startswith("validation (10% of the training split") and summary["test_images"] == 160
    assert summary["labeled_images"] == [144]  # 10% of the 1,440 images left after the 160 held out
    assert summary["selection"]["labels_read"] == 304 and summary["selection"]["labels_outside_budget"] == 160
    assert "160 of them outside the label budget" in result.stdout and "steps: 2 (train.steps as given" in result.stdout

    out = tmp_path / "cmp"
    args = [str(ROOT / "train" / "compare.py"), "--init", str(pretrained_run), "--fractions", "1", "--lrs", "0.01,0.1"]
    args += ["--selection-seeds", "1"]  # the test runs below take 2 seeds, each lr's validation run 1
    compared = run_script([*args, "--out", str(out), *FAST, "--seeds", "2", "--data", str(demo_root)], tmp_path)
    assert compared.returncode == 0, compared.stderr[-3000:]
    cells = json.loads((out / "table.json").read_text())["cells"]
    for row in ("supervised", "pretrained"):
        chosen = cells[row]["100%"]
        assert set(chosen["validation"]) == {"0.01", "0.1"} and chosen["lr"] in (0.01, 0.1)
        best = max(chosen["validation"].values())
        assert chosen["validation"][f"{chosen['lr']:g}"] == best
        for lr in ("0.01", "0.1"):
            selection = results_of(out / f"{row}-label-fraction-1-select-lr-{lr}")
            assert selection["evaluated_on"].startswith("validation") and len(selection["accuracy"]["per_seed"]) == 1
        tested = results_of(out / f"{row}-label-fraction-1")
        assert tested["evaluated_on"] == "test" and len(tested["accuracy"]["per_seed"]) == 2 and chosen["seeds"] == 2
    table = (out / "table.md").read_text()
    assert "| lr, supervised |" in table and "over 2 seeds" in table
    assert "| labels read choosing the lr | 1,600 |" in table and "no label outside the budget was read" in table
    # with two lrs the chosen one is always at an edge of the grid, and the table says so
    assert "(edge) |" in table and "At an edge of the lr grid" in table
