import json
import re
from functools import partial
from pathlib import Path

import pytest
import yaml

from tests.conftest import HANG_GUARD_S, ROOT, run_concurrently, run_script

COMMON = "--batch-size 8 --data.workers=0 --speed.cpu_threads=1 --model.width=0.25"
PRETRAIN = f"{COMMON} --steps 2 --selfie.attn_layers=1 --selfie.attn_heads=4 --selfie.attn_intermediate=32"
FINETUNE = f"{COMMON} --steps 2 --finetune.head_hidden=16 --finetune.eval_batch_size=200"


def table(args: list[str], cwd: Path):
    return run_script([str(ROOT / "train" / "pretext_table.py"), *args], cwd, timeout=2 * HANG_GUARD_S)


@pytest.mark.slow
def test_one_command_fills_the_table_and_a_rerun_reuses_every_run(tmp_path: Path, demo_root: Path) -> None:
    out = tmp_path / "table"
    args = ["--methods", "selfie,patch_relnet", "--data", str(demo_root), "--seeds", "2", "--supervised-steps", "3"]
    args += ["--pretrain", PRETRAIN, "--finetune", FINETUNE, "--linear", "--steps 3", "--out", str(out)]
    result = table(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((out / "table.json").read_text())["rows"]
    assert list(rows) == ["Supervised", "Random weight", "Selfie", "Patch RelNet 0.4"]
    assert set(rows["Supervised"]) == {"tuned"} and rows["Supervised"]["tuned"]["seeds"] == 2
    for name in ["Random weight", "Selfie", "Patch RelNet 0.4"]:
        for column in ("linear", "tuned"):
            assert rows[name][column]["seeds"] == 2 and 0 <= rows[name][column]["mean"] <= 100
    assert rows["Patch RelNet 0.4"]["chance_acc"] == 0.25 and 0 <= rows["Patch RelNet 0.4"]["pretext_acc"] <= 1
    assert rows["Selfie"]["pretext_acc"] is not None
    markdown = (out / "table.md").read_text()
    assert "| method | linear | tuned | pretext accuracy |" in markdown
    cell = r"\d+\.\d ± \d+\.\d"
    assert re.search(rf"\| Patch RelNet 0\.4 \| {cell} \| {cell} \| \d+\.\d \(chance 25\.0\) \|", markdown)
    steps = {
        f.name: yaml.safe_load((f / "config.yaml").read_text())["train"]["steps"] for f in out.iterdir() if f.is_dir()
    }
    # --linear reaches the linear column only, --supervised-steps the supervised row only
    assert {name: n for name, n in steps.items() if n != 2} == {
        "supervised-tuned": 3,
        "random-linear": 3,
        "selfie-linear": 3,
        "patch_relnet-linear": 3,
    }
    logs = {p: p.read_text() for p in out.rglob("log.jsonl")}
    assert len(logs) == 2 + 2 * (1 + 2 + 2 * 2)  # 2 pretrainings; per seed: supervised, random x2, methods x2

    rerun = table(args, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert {p: p.read_text() for p in out.rglob("log.jsonl")} == logs  # nothing trained again
    assert (out / "table.md").read_text() == markdown


def test_bad_input_is_refused_before_any_run(tmp_path: Path) -> None:
    cases = [
        (["--methods", "jigsaw"], "--methods jigsaw: expected some of selfie, rotnet, patch_rotnet, patch_relnet"),
        (["--pretrain", "--out elsewhere"], "--out: set by pretext_table.py for each run"),
        (["--pretrain", "--patch-ratio 1.5"], "patch"),
        (["--pretrain", "--model.backbone=resnet32"], "model.backbone=resnet32 (pretraining) cannot initialise"),
        (["--finetune", "--model.width=0.5"], "model.width: 1.0 for pretraining but 0.5 for fine-tuning"),
        (["--pretrain", "--speed.precision=bf16"], "speed.precision: bf16 for pretraining but no for fine-tuning"),
        (["--methods", "rotnet", "--finetune", "--arch resnet36_attn"], "model.backbone=resnet8 (pretraining)"),
    ]
    runs = [partial(table, [*args, "--out", str(tmp_path / "table")], tmp_path) for args, _ in cases]
    for (args, message), result in zip(cases, run_concurrently(runs), strict=True):
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr[-2000:])
    assert not (tmp_path / "table").exists()
