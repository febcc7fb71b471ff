"""How the entry scripts end: a bad flag, value, file or data set, or an operating-system error (no space,
a read-only file system, a name too long: named in words with its path) is one clear line and exit status 2;
a diverged run, or a checkpoint that could not be written, is one line and exit status 1."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from pipeline.data import DataError
from pipeline.errors import os_error_line
from train.config import ConfigError
from train.engine.checkpoint import CheckpointWriteError
from train.engine.metrics import NonFiniteLoss
from train.engine.signals import Stopped

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 1


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> None:
    """Run `main` on `argv` (default: the command line)."""
    try:
        main(sys.argv[1:] if argv is None else argv)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except OSError as error:  # a full or read-only disk, a name too long, a refused link: named in words
        print(f"error: {os_error_line(error)}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except (NonFiniteLoss, CheckpointWriteError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_DIVERGED)
    except Stopped as error:
        if error.main_process:  # the same line from every rank would only repeat it
            try:
                print(str(error), file=sys.stderr)
            except OSError:
                pass  # the terminal is gone (SIGHUP): the exit status still says it
        sys.exit(error.exit_code)
    except RuntimeError as error:
        if not is_collective_failure(error):
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(
            f"error: a collective with the other processes failed or waited past distributed.collective_timeout "
            f"(a peer stopped answering?): {first[:300]}; the newest checkpoint is intact, --resume continues",
            file=sys.stderr,
        )
        sys.exit(EXIT_DIVERGED)


# What gloo says when a peer is gone or silent (DDP's backward raises it as a plain RuntimeError; NCCL
# raises DistBackendError, a DistError). Other RuntimeErrors stay tracebacks.
COLLECTIVE_FAILURES = ("timed out", "timeout", "connection closed by peer", "connection reset by peer")


def is_collective_failure(error: RuntimeError) -> bool:
    if isinstance(error, torch.distributed.DistError):
        return True
    message = str(error).lower()
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    return initialized and any(failure in message for failure in COLLECTIVE_FAILURES)
