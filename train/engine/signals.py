"""Preemption: SIGTERM (what SLURM and Kubernetes send before the kill), SIGINT (Ctrl-C) or SIGHUP (a
dropped SSH session) asks a run to stop; it finishes the step, writes a checkpoint (before anything else),
says how to resume and exits non-zero. A second signal exits at once."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

import torch
from accelerate import Accelerator

# 128 + the signal, as a shell reports a killed job. SIGHUP is what a dropped SSH session sends: a stop too.
EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130, signal.SIGHUP: 129}


class Stopped(RuntimeError):
    """The run stopped on a signal after writing a checkpoint; `exit_code` is what the process returns."""

    def __init__(self, message: str, exit_code: int, main_process: bool = True) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.main_process = main_process  # the one process that prints the message


class StopRequests:
    """While a run trains: the first SIGTERM, SIGINT or SIGHUP is remembered (`requested`), a second ends the
    process at once. With several processes, ranks agree to stop at a log step (`agreed`), so all of them
    checkpoint the same step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self.previous = {sig: signal.signal(sig, self._handle) for sig in EXIT_CODES}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None:
            os._exit(EXIT_CODES.get(signum, 1))
        self.signal = signum
        if os.environ.get("RANK", "0") == "0":  # a launcher signals every rank: one note, not one per rank
            name = signal.Signals(signum).name
            message = f"\n{name}: finishing this step, then a checkpoint; again to exit at once"
            try:
                print(message, file=sys.stderr, flush=True)
            except OSError:
                pass  # the terminal is gone (SIGHUP): the checkpoint matters, not the note

    def agreed(self, accelerator: Accelerator) -> int | None:
        """The signal to stop on, the same on every rank (a collective with several processes)."""
        if accelerator.num_processes == 1:
            return self.signal
        mine = torch.tensor([self.signal or 0], device=accelerator.device)
        return int(accelerator.reduce(mine, "max").item()) or None


def launcher_command() -> list[str]:
    """The launcher command line up to the script, when a launcher (torchrun, accelerate launch) started this
    process: read from the parent process, so it keeps the launcher's process count and options. Empty
    when there is none (or it cannot be read): the script then ran under plain python."""
    launched = "TORCHELASTIC_RUN_ID" in os.environ or "ACCELERATE_MIXED_PRECISION" in os.environ
    parent = Path(f"/proc/{os.getppid()}")
    try:
        args = (parent / "cmdline").read_bytes().decode().split("\0")[:-1] if launched else []
        script = os.path.realpath(sys.argv[0])
        found = [i for i, arg in enumerate(args) if os.path.realpath(parent / "cwd" / arg) == script]
    except (OSError, UnicodeDecodeError):
        return []
    if not found:
        return []
    prefix = args[: found[0]]
    if len(prefix) > 1 and Path(prefix[1]).name in ("torchrun", "accelerate"):
        prefix = prefix[1:]  # "python .../torchrun ...": the launcher's own entry point runs it
    return prefix


def stopped(signum: int, step: int, folder: Path, main_process: bool = True) -> Stopped:
    """The exception that ends a stopped run, with the command that resumes it: the same launcher and
    process count, this script, its arguments, and --out and --resume."""
    argv = [arg for arg in sys.argv if arg != "--resume"]
    given_out = any(arg == "--out" or arg.startswith(("--out=", "--train.out")) for arg in argv)
    launcher = launcher_command() or [sys.executable]
    command = shlex.join([*launcher, *argv, *([] if given_out else ["--out", str(folder)]), "--resume"])
    name = signal.Signals(signum).name
    message = f"stopped by {name} after step {step}, checkpoint written; resume with: {command}"
    return Stopped(message, EXIT_CODES[signum], main_process)
