"""One training step, executed eagerly or replayed from a CUDA graph.

The step, for every task: the task's input op (its random draws from `generator`), one model call on all
of its inputs, the loss, backward, (clipping), the optimizer update and the schedule. A step takes a list
of micro-batches: one, or train.grad_accum of them whose gradients add up before the one update.

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
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from pipeline.data import Batch
from train.engine.task import Task

Optimizer = torch.optim.Optimizer
Scheduler = torch.optim.lr_scheduler.LRScheduler
StepResult = tuple[torch.Tensor, torch.Tensor]  # detached (loss, accuracy)
Stage = Callable[[str], AbstractContextManager]  # name -> the context a part of the step runs in
# Only this thread's CUDA calls are barred while the step is captured: the torch loader's pin-memory
# thread keeps allocating pinned host memory (cudaHostAlloc) meanwhile, which the default global mode
# would turn into a failed capture.
CAPTURE_MODE = "thread_local"


def _no_stage(name: str) -> AbstractContextManager:
    return nullcontext()


@dataclass
class StepParts:
    """What a step updates and how: the run's training state as the step sees it."""

    model: torch.nn.Module  # what the step calls: prepared and compiled, or the plain module (a FLOP count)
    task: Task
    optimizer: Optimizer
    scheduler: Scheduler
    accelerator: Accelerator
    grad_clip: float = 0.0  # the gradients' norm is clipped to it; 0: not clipped


def train_step(
    parts: StepParts, batches: list[Batch], generator: torch.Generator, stage: Stage = _no_stage
) -> StepResult:
    """The eager step: one optimizer step over `batches`, micro-batches whose gradients add up (Accelerate's
    `accumulate`: each loss divided by their number, no all-reduce until the last), the update of one batch
    as large as all of them. Returns their mean loss and accuracy. A single batch is a list of one: with
    `gradient_accumulation_steps` 1, `accumulate` syncs at every call and `backward` divides by 1, so
    it computes what a step without them would. `stage(name)` wraps each part (benchmarks.throughput
    times them with it)."""
    model, task, accelerator = parts.model, parts.task, parts.accelerator
    losses, accuracies = [], []
    for batch in batches:
        with accelerator.accumulate(model):
            with stage(task.op_stage):
                inputs = task.inputs(batch, generator)
            with stage("forward"):
                loss, accuracy = task.objective(model, inputs)
            with stage("backward"):
                accelerator.backward(loss)
            with stage("optimizer"):
                update(parts)
        losses.append(loss.detach())
        accuracies.append(accuracy.detach())
    return mean_of(losses), mean_of(accuracies)


def update(parts: StepParts) -> None:
    """Clipping, the optimizer step and the schedule on the micro-batch that completes the step; Accelerate's
    optimizer steps and zeroes on that one only, and gradients add up until then."""
    sync = parts.accelerator.sync_gradients
    if sync and parts.grad_clip > 0:
        parts.accelerator.clip_grad_norm_(parts.model.parameters(), parts.grad_clip)
    parts.optimizer.step()
    if sync:
        parts.scheduler.step()
    parts.optimizer.zero_grad(set_to_none=True)


def mean_of(values: list[torch.Tensor]) -> torch.Tensor:
    """The micro-batches' mean; a single batch's value as it is (no extra kernels in the common step)."""
    return values[0] if len(values) == 1 else torch.stack(values).mean()


class EagerStep:
    """`train_step` with the run's model, optimizer and schedule."""

    def __init__(self, parts: StepParts) -> None:
        self.parts = parts

    def __call__(self, batches: list[Batch], generator: torch.Generator, stage: Stage = _no_stage) -> StepResult:
        return train_step(self.parts, batches, generator, stage)


class GraphedStep:
    """The step with forward, backward, clipping and update replayed from one CUDA graph (see the module
    docstring). Its results are the graph's static outputs: read them before the next step."""

    WARMUP_STEPS = 3  # eager steps on a side stream before the capture (lazy state, cuDNN autotuning)

    def __init__(self, parts: StepParts) -> None:
        self.parts = parts
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_inputs: list[torch.Tensor] = []
        self.outputs: StepResult | None = None

    def update(self) -> StepResult:
        """Forward, backward, clipping and the optimizer step on the static inputs: what is captured."""
        parts = self.parts
        parts.optimizer.zero_grad(set_to_none=True)  # backward then writes fresh gradients, in the graph's pool
        loss, accuracy = parts.task.objective(parts.model, tuple(self.static_inputs))
        parts.accelerator.backward(loss)
        if parts.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(parts.model.parameters(), parts.grad_clip, foreach=True)
        parts.optimizer.step()
        return loss.detach(), accuracy.detach()

    def capture(self, inputs: tuple[torch.Tensor, ...]) -> None:
        self.static_inputs = [tensor.clone() for tensor in inputs]
        tensor_learning_rates(self.parts.optimizer, inputs[0].device)
        saved = TrainingSnapshot(self.parts.model, self.parts.optimizer)
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

    def __call__(self, batches: list[Batch], generator: torch.Generator, stage: Stage = _no_stage) -> StepResult:
        (batch,) = batches  # one batch per step: train.grad_accum > 1 with speed.cuda_graph is refused
        with stage(self.parts.task.op_stage):
            inputs = self.parts.task.inputs(batch, generator)
        if self.graph is None:
            self.capture(inputs)
        with stage("graph"):
            for static, tensor in zip(self.static_inputs, inputs, strict=True):
                static.copy_(tensor)
            self.graph.replay()
            self.parts.scheduler.step()  # fills the tensor learning rate the graph reads
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


def make_step(parts: StepParts, cuda_graph: bool) -> EagerStep | GraphedStep:
    """The step a run executes: graphed (speed.cuda_graph) or eager. Either is called with a list of
    micro-batches (one, unless train.grad_accum > 1), a generator for the input op's draws, and `stage`."""
    return (GraphedStep if cuda_graph else EagerStep)(parts)
