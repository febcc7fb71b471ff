"""One training step, executed eagerly or replayed from a CUDA graph.

The step, for every task: the task's input op (its random draws from `generator`), one model call on all
of its inputs, the loss, backward, (clipping), the optimizer update and the schedule.

`GraphedStep` captures everything after the input op (forward, backward, clipping, optimizer) once into a
CUDA graph and replays it: one launch per step instead of one per op. The input op stays eager: it draws
the step's masks or views with the step's reseeded generator (so a resumed run redraws them) and its
output is copied into the graph's static input buffers. The warm-up before the capture runs real updates
on a side stream, so the weights, the optimizer state, batch-norm statistics and the RNG are put back
afterwards: the first replayed step computes what the first eager step would have.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from accelerate import Accelerator

from pipeline.data import Batch
from train.methods.base import Task

Optimizer = torch.optim.Optimizer
Scheduler = torch.optim.lr_scheduler.LRScheduler
StepResult = tuple[torch.Tensor, torch.Tensor]  # detached (loss, accuracy)
# Only this thread's CUDA calls are barred while the step is captured: the torch loader's pin-memory
# thread keeps allocating pinned host memory (cudaHostAlloc) meanwhile, which the default global mode
# would turn into a failed capture.
CAPTURE_MODE = "thread_local"


def _no_stage(name: str) -> AbstractContextManager:
    return nullcontext()


def train_step(
    model: torch.nn.Module,
    batch: Batch,
    task: Task,
    generator: torch.Generator,
    optimizer: Optimizer,
    scheduler: Scheduler,
    accelerator: Accelerator,
    grad_clip: float = 0.0,
    stage: Callable[[str], AbstractContextManager] = _no_stage,
) -> StepResult:
    """The eager step. `stage(name)` wraps each part (benchmarks.throughput times them with it)."""
    with stage(task.op_stage):
        inputs = task.inputs(batch, generator)
    with stage("forward"):
        loss, accuracy = task.objective(model, inputs)
    with stage("backward"):
        accelerator.backward(loss)
    with stage("optimizer"):
        if grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach(), accuracy.detach()


def accumulated_step(
    model: torch.nn.Module,
    batches: list[Batch],
    task: Task,
    generator: torch.Generator,
    optimizer: Optimizer,
    scheduler: Scheduler,
    accelerator: Accelerator,
    grad_clip: float = 0.0,
) -> StepResult:
    """One optimizer step over several micro-batches (Accelerate's `accumulate`: each loss divided by their
    number, gradients summed, no all-reduce until the last): the update of one batch as large as all of
    them. Returns the micro-batches' mean loss and accuracy."""
    losses, accuracies = [], []
    for batch in batches:
        with accelerator.accumulate(model):
            loss, accuracy = task.objective(model, task.inputs(batch, generator))
            accelerator.backward(loss)
            if accelerator.sync_gradients and grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()  # Accelerate's optimizer steps (and zeroes) on the last micro-batch only
            if accelerator.sync_gradients:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        accuracies.append(accuracy.detach())
    return torch.stack(losses).mean(), torch.stack(accuracies).mean()


class EagerStep:
    """`train_step` with the run's model, optimizer and schedule; `accumulated_step` for a list of
    micro-batches (train.grad_accum > 1)."""

    def __init__(self, model, task, optimizer, scheduler, accelerator, grad_clip: float) -> None:
        self.parts = (model, task, optimizer, scheduler, accelerator, grad_clip)

    def __call__(self, batch: Batch | list[Batch], generator: torch.Generator, stage=_no_stage) -> StepResult:
        model, task, optimizer, scheduler, accelerator, grad_clip = self.parts
        if isinstance(batch, list):
            return accumulated_step(model, batch, task, generator, optimizer, scheduler, accelerator, grad_clip)
        return train_step(model, batch, task, generator, optimizer, scheduler, accelerator, grad_clip, stage)


class GraphedStep:
    """The step with forward, backward, clipping and update replayed from one CUDA graph (see the module
    docstring). Its results are the graph's static outputs: read them before the next step."""

    WARMUP_STEPS = 3  # eager steps on a side stream before the capture (lazy state, cuDNN autotuning)

    def __init__(self, model, task, optimizer, scheduler, accelerator, grad_clip: float) -> None:
        self.model, self.task, self.optimizer, self.scheduler = model, task, optimizer, scheduler
        self.accelerator, self.grad_clip = accelerator, grad_clip
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_inputs: list[torch.Tensor] = []
        self.outputs: StepResult | None = None

    def update(self) -> StepResult:
        """Forward, backward, clipping and the optimizer step on the static inputs: what is captured."""
        self.optimizer.zero_grad(set_to_none=True)  # backward then writes fresh gradients, in the graph's pool
        loss, accuracy = self.task.objective(self.model, tuple(self.static_inputs))
        self.accelerator.backward(loss)
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, foreach=True)
        self.optimizer.step()
        return loss.detach(), accuracy.detach()

    def capture(self, inputs: tuple[torch.Tensor, ...]) -> None:
        self.static_inputs = [tensor.clone() for tensor in inputs]
        tensor_learning_rates(self.optimizer, inputs[0].device)
        saved = TrainingSnapshot(self.model, self.optimizer)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP_STEPS):
                self.update()
        torch.cuda.current_stream().wait_stream(side)
        saved.restore()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode=CAPTURE_MODE):
            self.outputs = self.update()

    def __call__(self, batch: Batch, generator: torch.Generator, stage=_no_stage) -> StepResult:
        with stage(self.task.op_stage):
            inputs = self.task.inputs(batch, generator)
        if self.graph is None:
            self.capture(inputs)
        with stage("graph"):
            for static, tensor in zip(self.static_inputs, inputs, strict=True):
                static.copy_(tensor)
            self.graph.replay()
            self.scheduler.step()  # fills the tensor learning rate the graph reads
        return self.outputs


def tensor_learning_rates(optimizer: Optimizer, device: torch.device) -> None:
    """Each parameter group's learning rate as a one-element tensor on `device`: the graph reads it, and
    the schedule's `step` fills it in place (a float would be baked into the graph)."""
    for group in optimizer.param_groups:
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), device=device)


class TrainingSnapshot:
    """Weights, buffers (batch-norm statistics), optimizer state and the RNG at one moment, to return to
    after the warm-up steps a capture needs. Optimizer state the warm-up created is zeroed, which is the
    state a fresh optimizer acts as (a zero momentum buffer, a zero step count)."""

    def __init__(self, model: torch.nn.Module, optimizer: Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.tensors = {name: t.detach().clone() for name, t in model.state_dict().items()}
        self.state = {
            id(param): {key: value.clone() for key, value in state.items() if isinstance(value, torch.Tensor)}
            for param, state in optimizer.state.items()
        }
        self.rng = torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None

    def restore(self) -> None:
        with torch.no_grad():
            for name, tensor in self.model.state_dict().items():
                tensor.copy_(self.tensors[name])
            for param, state in self.optimizer.state.items():
                saved = self.state.get(id(param), {})
                for key, value in state.items():
                    if not isinstance(value, torch.Tensor):
                        continue
                    if key in saved:
                        value.copy_(saved[key])
                    else:
                        value.zero_()
        torch.set_rng_state(self.rng[0])
        if self.rng[1] is not None:
            torch.cuda.set_rng_state(self.rng[1])


def make_step(model, task, optimizer, scheduler, accelerator, grad_clip: float, cuda_graph: bool):
    """The step a run executes: graphed (train.cuda_graph) or eager."""
    kind = GraphedStep if cuda_graph else EagerStep
    return kind(model, task, optimizer, scheduler, accelerator, grad_clip)
