"""How the entry scripts end: a bad flag, value, file or data set is one clear line and exit status 2;
a diverged run is one line and exit status 1."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from pipeline.data import DataError
from train.config import ConfigError
from train.metrics import NonFiniteLoss

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 1


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> None:
    """Run `main` on `argv` (default: the command line)."""
    try:
        main(sys.argv[1:] if argv is None else argv)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except NonFiniteLoss as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_DIVERGED)
