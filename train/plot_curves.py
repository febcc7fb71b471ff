"""Training curves of a run, redrawn from its log.jsonl (the loop draws them at every checkpoint).

python train/plot_curves.py RUN_DIR        # (re)draw RUN_DIR/curves.png from RUN_DIR/log.jsonl
"""

from __future__ import annotations

import sys
from pathlib import Path

from train.engine.curves import plot_curves


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not (Path(argv[0]) / "log.jsonl").is_file():
        print("usage: python train/plot_curves.py RUN_DIR   (a folder holding log.jsonl)", file=sys.stderr)
        return 2
    run_dir = Path(argv[0])
    plot_curves(run_dir / "log.jsonl", run_dir / "curves.png", run_dir.name)
    print(run_dir / "curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
