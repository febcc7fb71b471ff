"""The training step (train/engine/step.py): eager, and replayed from a CUDA graph (GPU tests skip without one)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.data import Batch
from train.config import OptimSection, PretrainConfig, load_config
from train.engine.optim import build_optimizer, build_schedule, implementation_flags
from train.engine.step import EagerStep, GraphedStep, StepParts, TrainingSnapshot, make_step
from train.methods import METHODS, stage_class
from train.stages.pretraining import build_model

TINY = {"model.width": 0.125, "selfie.attn_heads": 4, "selfie.attn_intermediate": 32, "selfie.attn_layers": 1}
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_the_snapshot_puts_weights_statistics_optimizer_state_and_rng_back() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    snapshot = TrainingSnapshot(model, optimizer)
    first_draw = torch.rand(1)
    for _ in range(2):
        model(torch.randn(8, 4)).square().mean().backward()
        optimizer.step()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    snapshot.restore()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # num_batches_tracked too
    buffers = [state["momentum_buffer"] for state in optimizer.state.values()]
    assert buffers and all(torch.count_nonzero(b) == 0 for b in buffers)  # a fresh optimizer's state
    assert torch.equal(torch.rand(1), first_draw)  # the RNG as it was


@pytest.mark.parametrize(("implementation", "cuda", "flags"), [
    ("auto", False, {}), ("auto", True, {"fused": True}), ("foreach", False, {"fused": False, "foreach": True}),
    ("fused", True, {"fused": True, "foreach": False}), ("for-loop", True, {"fused": False, "foreach": False}),
])  # fmt: skip
def test_the_optimizer_implementation_flags(implementation: str, cuda: bool, flags: dict) -> None:
    assert implementation_flags(implementation, torch.device("cuda" if cuda else "cpu")) == flags


def test_every_cpu_implementation_takes_the_same_step() -> None:
    results = []
    for implementation in ("auto", "foreach", "for-loop"):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 3)
        optimizer = build_optimizer(model, OptimSection(implementation=implementation))
        model(torch.ones(2, 8)).sum().backward()
        optimizer.step()
        results.append(model.weight.detach().clone())
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-6, atol=1e-7)


def setup(device: str, cuda_graph: bool, method: str = "selfie", precision: str = "no", **overrides):
    """A tiny model of `method` with its step on `device`, from fixed weights (`overrides`: config keys)."""
    config = load_config(stage_class(PretrainConfig), "demo", {**TINY, "method": method, "selfie.attn_dropout": 0.0,
                                                   "model.backbone": "resnet36" if method == "selfie" else "resnet8",
                                                   "speed.precision": precision, **overrides})  # fmt: skip
    torch.manual_seed(0)
    model = build_model(config).to(device)
    optimizer = build_optimizer(model, config.optim, torch.device(device), cuda_graph=cuda_graph)
    scheduler = build_schedule(optimizer, config.optim, 100)
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=precision, cpu=device == "cpu")
    task = METHODS[method](config, torch.device(device))
    return model, make_step(StepParts(model, task, optimizer, scheduler, accelerator, 1.0), cuda_graph), optimizer


def batches(device: str, count: int = 4) -> list[Batch]:
    generator = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=generator) for _ in range(count)]
    return [Batch(x.to(device), torch.zeros(8, dtype=torch.int64, device=device), torch.arange(8)) for x in images]


def test_on_a_cpu_the_step_is_eager() -> None:
    _, step, _ = setup("cpu", cuda_graph=False)
    assert isinstance(step, EagerStep)
    loss, accuracy = step(batches("cpu", 1), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and 0 <= accuracy <= 1 and not loss.requires_grad


def test_one_micro_batch_is_the_plain_step_bit_for_bit() -> None:
    """A batch is a list of one: inside Accelerate's `accumulate` (one accumulation step) the step computes
    what the step without it computes (no loss division, clipping and the update at every call), bit for
    bit, and the schedule advances once."""
    results = []
    for plain in (False, True):
        model, step, optimizer = setup("cpu", cuda_graph=False, method="rotnet")
        parts, generator = step.parts, torch.Generator().manual_seed(0)
        for batch in batches("cpu", 2):
            if not plain:
                loss = step([batch], generator)[0]
                continue
            loss, _ = parts.task.objective(model, parts.task.inputs(batch, generator))
            loss.backward()
            parts.accelerator.clip_grad_norm_(model.parameters(), parts.grad_clip)
            optimizer.step()
            parts.scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        results.append((loss.detach(), {k: v.clone() for k, v in model.state_dict().items()}, parts.scheduler))
    (loss, weights, scheduler), (plain_loss, plain_weights, plain_scheduler) = results
    assert torch.equal(loss, plain_loss) and scheduler.last_epoch == plain_scheduler.last_epoch == 2
    assert all(torch.equal(value, plain_weights[name]) for name, value in weights.items())


def test_the_step_times_the_same_stages_for_one_batch_or_several() -> None:
    """What benchmarks/throughput.py times: the input op, forward, backward and the update, in that order,
    once per micro-batch."""
    from contextlib import contextmanager

    seen: list[str] = []

    @contextmanager
    def stage(name: str):
        seen.append(name)
        yield

    _, step, _ = setup("cpu", cuda_graph=False, method="rotnet")
    once = [step.parts.task.op_stage, "forward", "backward", "optimizer"]
    step(batches("cpu", 1), torch.Generator().manual_seed(0), stage)
    assert seen == once
    seen.clear()
    step(batches("cpu", 2), torch.Generator().manual_seed(0), stage)
    assert seen == once * 2


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(
    ("method", "optimizer_name"), [("selfie", "sgd"), ("patch_relnet", "sgd"), ("selfie", "adamw"), ("selfie", "lars")]
)
def test_a_graphed_step_follows_the_eager_steps(method: str, optimizer_name: str) -> None:
    """Same weights, same batches and masks: the replayed graph's losses and final weights track eager
    steps (cuDNN may pick other algorithms, so closely, not bit for bit); the lr schedule is followed.
    Every optimizer: fused SGD, fused AdamW (capturable when graphed), LARS."""
    runs = {}
    for graphed in (False, True):
        model, step, optimizer = setup("cuda", graphed, method, **{"optim.name": optimizer_name})
        losses = []
        for k, batch in enumerate(batches("cuda")):
            losses.append(float(step([batch], torch.Generator("cuda").manual_seed(k))[0]))
        runs[graphed] = (losses, {n: p.detach().clone() for n, p in model.named_parameters()}, optimizer)
    assert isinstance(runs[True][2].param_groups[0]["lr"], torch.Tensor)
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=2e-3, atol=2e-3)
    for name, value in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], value, rtol=2e-3, atol=2e-3)
    assert float(runs[True][2].param_groups[0]["lr"]) == pytest.approx(runs[False][2].param_groups[0]["lr"])


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("method", ["selfie", "rotnet"])
def test_a_graphed_bf16_step_follows_the_eager_bf16_steps(method: str) -> None:
    """The benchmarks' precision (bf16 autocast, channels-last): the replayed graph's losses stay finite and
    within 2e-2 (relative and absolute) of the eager steps' over four updates. bf16 keeps 8 bits of
    mantissa (a relative step of 2^-8, 0.4 %), and graph and eager may round through other cuDNN kernels
    at every layer, so the fp32 test's 2e-3 would be too tight; a graph that trains on stale inputs or
    skips the update lands far outside 2e-2 by the fourth step."""
    runs = {}
    for graphed in (False, True):
        overrides = {"speed.channels_last": True}
        _, step, _ = setup("cuda", graphed, method, precision="bf16", **overrides)
        runs[graphed] = [
            float(step([b], torch.Generator("cuda").manual_seed(k))[0]) for k, b in enumerate(batches("cuda"))
        ]
    assert all(map(math.isfinite, runs[True])), runs[True]
    torch.testing.assert_close(runs[True], runs[False], rtol=2e-2, atol=2e-2)


@gpu
@pytest.mark.gpu
def test_the_first_replay_computes_the_first_eager_step() -> None:
    """The warm-up before the capture trains on the first batch; its effects are undone."""
    eager_model, eager, _ = setup("cuda", False)
    graph_model, graphed, _ = setup("cuda", True)
    batch = batches("cuda", 1)
    a = eager(batch, torch.Generator("cuda").manual_seed(0))[0]
    b = graphed(batch, torch.Generator("cuda").manual_seed(0))[0]
    assert isinstance(graphed, GraphedStep) and graphed.graph is not None
    torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)


@gpu
@pytest.mark.gpu
def test_dropout_inside_the_graph_draws_fresh_masks_at_every_replay() -> None:
    """Attention dropout captured in the graph: each replay advances the CUDA generator and draws new
    dropout masks (not the capture's, baked in). With the learning rate at zero the weights stay put, so
    the same batch under the same patch masks can differ between replays only through dropout."""
    model, step, optimizer = setup("cuda", True, "selfie", **{"selfie.attn_dropout": 0.5})
    step.parts.scheduler.base_lrs = [0.0] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    batch, losses, states = batches("cuda", 1), [], []
    for _ in range(4):
        losses.append(float(step(batch, torch.Generator("cuda").manual_seed(0))[0]))
        states.append(torch.cuda.get_rng_state())
    assert all(map(math.isfinite, losses)) and len(set(losses)) > 1, losses
    assert all(
        not torch.equal(a, b) for a, b in zip(states, states[1:], strict=False)
    )  # the graph's RNG offset moves on


@gpu
@pytest.mark.gpu
def test_a_graph_is_captured_while_the_torch_loaders_pin_thread_runs(demo_root) -> None:
    """The capture happens while the torch loader's workers and pin-memory thread are live (they allocate
    pinned host memory meanwhile): thread-local capture lets it succeed, and training goes on from it."""
    from itertools import islice

    from pipeline.loader_request import TrainRequest
    from pipeline.loaders import LOADERS

    source = LOADERS["torch"].open(demo_root, "train")
    request = TrainRequest(source=source, image_size=32, augment="pad_crop_flip", batch_size=8, seed=0, device="cuda")
    loader = LOADERS["torch"].train(request)
    _, step, _ = setup("cuda", True)
    losses = [
        float(step([batch], torch.Generator("cuda").manual_seed(k))[0]) for k, batch in enumerate(islice(loader, 6))
    ]
    loader.close()
    assert isinstance(step, GraphedStep) and step.graph is not None and all(map(math.isfinite, losses))


class _StandInGraph:
    """torch.cuda's graph API on a CPU: the captured body runs once, eagerly; a replay does nothing."""

    def __init__(self) -> None:
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step()`")  # the stand-in update never steps
def test_the_capture_is_thread_local_and_restores_the_warm_up(monkeypatch) -> None:
    """Under CPU stand-ins for torch.cuda's streams and graph: the capture is entered in thread-local mode
    (a loader's pin-memory thread may call CUDA meanwhile), the warm-up's updates are undone before it,
    and each step copies its inputs into the static ones and replays once."""
    from contextlib import contextmanager, nullcontext

    entered = []

    @contextmanager
    def graph(cuda_graph, **kwargs):
        entered.append(kwargs)
        yield

    class Stream:
        def wait_stream(self, other) -> None:
            pass

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _StandInGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    model, step, _ = setup("cpu", cuda_graph=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(GraphedStep, "update", lambda self: (torch.tensor(1.0), torch.tensor(0.5)), raising=True)
    step(batches("cpu", 1), torch.Generator().manual_seed(0))
    assert entered == [{"capture_error_mode": "thread_local"}] and step.graph.replays == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    second = batches("cpu", 2)[1]
    step([second], torch.Generator().manual_seed(1))
    assert step.graph.replays == 2 and len(entered) == 1  # captured once
    expected = step.parts.task.inputs(second, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(step.static_inputs, expected, strict=True))


def test_a_graphed_adamw_is_capturable_and_host_lr_sgd_is_refused() -> None:
    from train.config import ConfigError

    model = torch.nn.Linear(4, 2)
    assert build_optimizer(model, OptimSection(name="adamw"), cuda_graph=True).defaults["capturable"] is True
    assert build_optimizer(model, OptimSection(name="adamw")).defaults["capturable"] is False
    for implementation in ("foreach", "for-loop"):
        with pytest.raises(ConfigError, match=f"optim.implementation={implementation} with speed.cuda_graph=true"):
            build_optimizer(model, OptimSection(implementation=implementation), cuda_graph=True)
        build_optimizer(model, OptimSection(implementation=implementation, name="lars"), cuda_graph=True)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--speed.cuda_graph=true", "--speed.precision=fp16"], "speed.cuda_graph=true with speed.precision=fp16"),
        (["--speed.cuda_graph=true", "--optim.implementation=foreach"], "optim.implementation=foreach with speed"),
        (["--speed.cuda_graph=true", "--optim.implementation=for-loop"], "the tensor learning rate on the host"),
        (["--speed.cuda_graph=true", "--speed.compile=true", "--speed.compile_mode=reduce-overhead"], "cannot sit"),
        (["--speed.compile_mode=fast"], "speed.compile_mode 'fast': expected one of default, reduce-overhead"),
        (["--optim.implementation=magic"], "optim.implementation 'magic': expected one of auto, fused, foreach"),
    ]
    + (
        [(["--speed.cuda_graph=true"], "speed.cuda_graph=true needs a CUDA device")]
        if not torch.cuda.is_available()
        else []
    ),
)
def test_step_options_that_cannot_work_are_refused_before_any_folder(
    flags: list[str], message: str, tmp_path, monkeypatch, capsys
) -> None:
    from train.engine.cli import run_cli
    from train.stages import pretraining as pretrain

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(pretrain.main, [*flags, "--out", str(tmp_path / "run")])
    error = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(error) == 1 and message in error[0], error
    assert list(tmp_path.iterdir()) == []


def test_fp16_from_the_launcher_with_a_cuda_graph_is_refused_from_the_config_alone(monkeypatch) -> None:
    """precision auto takes `accelerate launch`'s choice: fp16 there cannot run a graphed step either, and the
    check needs no device (train/config/checks.py)."""
    from train.config import ConfigError
    from train.config.checks import LAUNCHER_PRECISION, check_config

    config = load_config(stage_class(PretrainConfig), "demo", {"speed.cuda_graph": True, "speed.precision": "auto"})
    monkeypatch.setenv(LAUNCHER_PRECISION, "bf16")
    check_config(config)
    monkeypatch.setenv(LAUNCHER_PRECISION, "fp16")
    with pytest.raises(ConfigError, match=f"speed.precision=auto \\({LAUNCHER_PRECISION}=fp16\\)"):
        check_config(config)
