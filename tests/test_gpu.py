"""GPU-only checks: skipped cleanly on a machine without CUDA."""

from dataclasses import replace

import pytest
import torch

from model.attention_pool import PoolShape
from model.selfie import build_selfie
from pipeline.patches import patchify_and_mask, sample_context_permutation
from train.methods import METHODS
from train.methods.rotation import RotationMethod

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_bf16_channels_last_step_on_gpu_matches_fp32_loss_closely() -> None:
    torch.manual_seed(0)
    model = build_selfie(width=0.25, grid=4, pool=PoolShape(heads=8, intermediate=160, dropout=0.0)).cuda().eval()
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, device="cuda")
    perm = sample_context_permutation(16, 16, torch.Generator("cuda").manual_seed(0))
    fp32 = model(patchify_and_mask(images, perm, 8, 12), perm[:, :12], perm[:, 12:])
    model = model.to(memory_format=torch.channels_last)
    patches = patchify_and_mask(images, perm, 8, 12, dtype=torch.bfloat16, channels_last=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = model(patches, perm[:, :12], perm[:, 12:])
    assert bf16.logits.dtype == torch.float32  # the patch-selection logits stay fp32 under autocast
    torch.testing.assert_close(bf16.loss, fp32.loss, rtol=0.05, atol=0.05)


def test_patchify_on_gpu_equals_cpu() -> None:
    images = torch.randint(0, 256, (5, 3, 224, 224), dtype=torch.uint8)
    perm = sample_context_permutation(5, 49)
    cpu = patchify_and_mask(images, perm, 32, 37)
    gpu = patchify_and_mask(images.cuda(), perm.cuda(), 32, 37)
    assert torch.equal(cpu, gpu.cpu())


@pytest.mark.parametrize("arch", ["resnet50", "resnet36_attn"])
def test_classifier_bf16_channels_last_matches_fp32_on_gpu(arch: str) -> None:
    from model.classifier import build_classifier

    torch.manual_seed(0)
    model = build_classifier(arch, 10, width=0.25, pool=PoolShape(heads=8, intermediate=160, dropout=0.0))
    torch.nn.init.normal_(model.head.weight, std=0.01)
    model = model.cuda().eval()
    images = torch.randn(8, 3, 32, 32, device="cuda")
    fp32 = model(images)
    model = model.to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = model(images.contiguous(memory_format=torch.channels_last)).float()
    torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("backend", ["dali", "ffcv"])
def test_gpu_loaders_deliver_the_cpu_images_on_the_device(tmp_path, backend: str) -> None:
    """DALI's `mixed` decoder (nvJPEG) and FFCV's device copy against the same backend on the CPU.
    Lossless PNG/raw input without augmentation: the decoded pixels must agree exactly."""
    from itertools import islice

    import numpy as np
    from PIL import Image

    from pipeline.beton_writer import ConvertOptions, convert
    from pipeline.loader_request import TrainRequest
    from pipeline.loaders import LOADERS

    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "data" / f"c{c}").mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                tmp_path / "data" / f"c{c}" / f"{i}.png"
            )
    convert(tmp_path / "data", tmp_path / "train.beton", options=ConvertOptions(write_mode="raw", workers=1))
    source = LOADERS[backend].open(tmp_path / ("train.beton" if backend == "ffcv" else "data"), "train")
    request = TrainRequest(source=source, image_size=32, augment="none", batch_size=4, seed=0, workers=1)
    gpu = list(islice(LOADERS[backend].train(replace(request, device=torch.device("cuda"))), 3))
    cpu = list(islice(LOADERS[backend].train(request), 3))
    for on_gpu, on_cpu in zip(gpu, cpu, strict=True):
        assert on_gpu.images.device.type == "cuda" and on_gpu.images.dtype == torch.uint8
        assert on_gpu.images.is_contiguous() and torch.equal(on_gpu.indices.cpu(), on_cpu.indices)
        assert torch.equal(on_gpu.images.cpu(), on_cpu.images)


@pytest.mark.parametrize("backend", ["dali", "ffcv"])
def test_gpu_loaders_decode_jpeg_crop_and_evaluate(tmp_path, backend: str) -> None:
    """JPEG through DALI's nvJPEG (`mixed`) or FFCV + device copy: close to the CPU decode, every augment
    runs on the device, and evaluation on the device counts every image once."""
    from itertools import islice

    import numpy as np
    from PIL import Image

    from pipeline.beton_writer import ConvertOptions, convert
    from pipeline.loader_request import EvalRequest, TrainRequest
    from pipeline.loaders import LOADERS

    ramp = np.linspace(0, 255, 96)
    for split in ("train", "val"):
        for c in range(2):
            (tmp_path / "data" / split / f"c{c}").mkdir(parents=True)
            for i in range(6):
                image = (ramp[:, None, None] * 0.5 + ramp[None, :72, None] * 0.5) * np.ones(3) * (0.6 + 0.05 * i)
                Image.fromarray(image.astype(np.uint8)).save(
                    tmp_path / "data" / split / f"c{c}" / f"{i}.jpg", quality=90
                )
    for split, name in (("train", "train"), ("test", "val")):
        convert(tmp_path / "data", tmp_path / f"{name}.beton", split, ConvertOptions(write_mode="jpg", workers=1))
    where = tmp_path if backend == "ffcv" else tmp_path / "data"
    train, test = LOADERS[backend].open(where, "train"), LOADERS[backend].open(where, "test")
    on = dict(workers=1, device=torch.device("cuda"))
    plain = TrainRequest(source=train, image_size=64, augment="none", batch_size=4, seed=0, workers=1)
    gpu = list(islice(LOADERS[backend].train(replace(plain, **on)), 2))
    cpu = list(islice(LOADERS[backend].train(plain), 2))
    for a, b in zip(gpu, cpu, strict=True):
        assert a.images.device.type == "cuda" and torch.equal(a.indices.cpu(), b.indices)
        difference = (a.images.cpu().float() - b.images.float()).abs()
        assert difference.mean() < 2 and difference.max() < 40  # decoders may round the IDCT differently
    for augment in ("random_resized_crop", "pad_crop_flip"):
        batch = next(iter(LOADERS[backend].train(replace(plain, augment=augment, **on))))
        assert batch.images.shape == (4, 3, 64, 64) and batch.images.device.type == "cuda"
    evaluation = EvalRequest(source=test, image_size=64, batch_size=5, **on)
    seen = [i for b in LOADERS[backend].evaluate(evaluation) for i in b.indices.tolist()]
    assert sorted(seen) == list(range(12))


def test_rotation_views_on_gpu_equal_cpu() -> None:
    """Turns and pastes are exact on either device; only the antialiased resize may round differently."""
    from pipeline.rotation_views import ViewFormat, paste, quarter_turns, rotation_views

    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    gpu = rotation_views(images.cuda(), 8, 0.4, ViewFormat(mean, std), torch.Generator("cuda").manual_seed(0))
    cpu = rotation_views(images, 8, 0.4, ViewFormat(mean, std))
    torch.testing.assert_close(gpu.views[: 4 * 6].cpu(), cpu.views[: 4 * 6], rtol=0, atol=1e-6)
    assert torch.equal(gpu.labels.cpu(), cpu.labels)
    turned = quarter_turns(torch.rand(6, 3, 13, 13))
    background = torch.rand(4, 6, 3, 32, 32)
    positions = gpu.positions.cpu()
    on_gpu, on_cpu = background.cuda(), background.clone()
    paste(on_gpu, turned.cuda(), gpu.positions)
    paste(on_cpu, turned, positions)
    assert torch.equal(on_gpu.cpu(), on_cpu)
    resized = torch.nn.functional.interpolate(
        cpu.views[:6], size=(13, 13), mode="bilinear", antialias=True, align_corners=False
    )
    expected = cpu.views[:6].repeat(4, 1, 1, 1, 1)
    paste(expected, quarter_turns(resized), positions)
    expected = expected.flatten(0, 1)
    torch.testing.assert_close(gpu.views[4 * 6 :].cpu(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", [name for name, cls in METHODS.items() if issubclass(cls, RotationMethod)])
def test_rotation_bf16_channels_last_step_on_gpu_matches_fp32_loss_closely(method: str) -> None:
    from model.view_classifier import build_view_classifier
    from pipeline.rotation_views import ViewFormat, rotation_views

    torch.manual_seed(0)
    spec = METHODS[method]
    model = build_view_classifier(spec.num_classes, spec.relation, "resnet32").cuda().eval()
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, device="cuda")
    views = spec.num_views
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    fp32_views = rotation_views(images, views, 0.4, ViewFormat(mean, std), torch.Generator("cuda").manual_seed(0))
    fp32 = model(fp32_views.views, fp32_views.labels)
    model = model.to(memory_format=torch.channels_last)
    bf16_views = rotation_views(
        images, views, 0.4, ViewFormat(mean, std, torch.bfloat16, True), torch.Generator("cuda").manual_seed(0)
    )
    assert torch.equal(bf16_views.positions, fp32_views.positions)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = model(bf16_views.views, bf16_views.labels)
    assert bf16.logits.dtype == torch.float32
    torch.testing.assert_close(bf16.loss, fp32.loss, rtol=0.05, atol=0.05)
    bf16.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_device_prefetch_copies_one_batch_ahead_on_a_side_stream() -> None:
    from pipeline.data import Batch, device_prefetch

    host = [
        Batch(torch.randint(0, 256, (64, 3, 224, 224), dtype=torch.uint8).pin_memory(), torch.arange(64).pin_memory(),
              torch.arange(64).pin_memory())
        for _ in range(4)
    ]  # fmt: skip
    seen = []
    for batch in device_prefetch(iter(host), torch.device("cuda")):
        assert batch.images.is_cuda and batch.labels.is_cuda
        seen.append((batch.images.float().sum() * 2).cpu())  # consumed on the default stream
    expected = [(b.images.float().sum() * 2) for b in host]
    assert all(torch.equal(a, b) for a, b in zip(seen, expected, strict=True))


def test_the_triton_op_passes_its_run_time_check_in_bf16_channels_last() -> None:
    from train.config import PretrainConfig, load_config
    from train.methods import stage_class
    from train.methods.selfie import choose_patch_op

    overrides = {"speed.precision": "bf16", "speed.channels_last": True, "selfie.patch_op": "triton"}
    config = load_config(stage_class(PretrainConfig), "demo", overrides)
    assert choose_patch_op(config, torch.device("cuda"), 12)[0] == "triton"


@pytest.mark.slow  # five training processes: the GPU check runs them in a step of their own
def test_pretraining_with_a_cuda_graph_and_compile_resumes_at_the_right_step(tmp_path) -> None:
    """A graphed run, and a compiled + graphed one, killed between checkpoints resume at their step and end
    close to the uninterrupted graphed run (kernels round differently, so closely, not bit for bit)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import with_root_on_path

    script = Path(__file__).resolve().parent.parent / "train" / "pretrain.py"
    common = ["--model.width=0.25", "--steps", "6", "--checkpoint.every=3", "--checkpoint.keep=5"]
    common += ["--speed.precision=bf16", "--speed.channels_last=true", "--batch-size", "32", "--log.every=1"]
    common += ["--speed.cuda_graph=true"]

    def train(out: Path, *extra: str) -> list[float]:
        env = {**os.environ, "PYTHONPATH": with_root_on_path(os.environ.get("PYTHONPATH"))}
        command = [sys.executable, str(script), *common, *extra, "--out", str(out)]
        result = subprocess.run(command, capture_output=True, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if "loss" in r]

    straight = train(tmp_path / "straight")
    for name, extra in (("graphed", ()), ("compiled", ("--speed.compile=true",))):
        train(tmp_path / name, *extra)
        (tmp_path / name / "checkpoints" / "step_00000006.pt").unlink()
        losses = train(tmp_path / name, *extra, "--resume")
        assert len(losses) == 6  # steps 1-6 once each: 4-6 dropped and written again
        torch.testing.assert_close(losses, straight, rtol=0.02, atol=0.02)
