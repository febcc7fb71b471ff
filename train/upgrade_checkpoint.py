"""Convert checkpoints of format 1 (pickled RNG states) to format 2 in place, so that they load with
torch.load(weights_only=True). It UNPICKLES them, which runs any code a hostile file holds: use it only on
checkpoints of a source you trust.

    python -m train.upgrade_checkpoint runs/old-run                # every checkpoint of a run folder
    python -m train.upgrade_checkpoint runs/old-run/checkpoints/step_00001000.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

from train.engine.checkpoint import CHECKPOINT_FORMAT, checkpoint_files, upgrade
from train.engine.cli import run_cli


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.upgrade_checkpoint", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="checkpoint files, or run folders (all their checkpoints)")
    for target in parser.parse_args(argv).paths:
        for path in checkpoint_files(target):
            upgrade(path)
            print(f"upgraded {path} to format {CHECKPOINT_FORMAT}")


if __name__ == "__main__":
    run_cli(main)
