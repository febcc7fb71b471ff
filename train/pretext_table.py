"""Every pretext method on the same data and backbone, in the layout of Patch RotNet's Table 1.

Launch:
    python train/pretext_table.py                # demo data, config pretext_demo (<1 h on 2 CPUs, ~3 min on one GPU)
    python train/pretext_table.py --methods rotnet,patch_relnet --seeds 5 --out runs/t1
    python train/pretext_table.py --config my_stl10.yaml --data ~/data/stl10 --pretrain "--steps 60000" \
        --finetune "--label-fraction 0.1" --linear "--steps 25000" --tuned "--steps 5000"   # paper: 100 / 20 epochs
    accelerate launch --multi_gpu --num_processes 8 train/pretext_table.py --config my_stl10.yaml --data ...

For each method of --methods it pretrains with train/pretrain.py (OUT/pretrain-<method>), then fine-tunes
with train/finetune.py twice per seed: "linear" (--linear-probe: the backbone frozen, only the head
trains) and "tuned" (the whole network). The head is the config's `finetune.head` (the rotation paper's
protocol, and pretext_demo's: mlp, two fully connected layers). Two baselines run the same evaluations:
"Random weight" (--init none, linear and tuned) and "Supervised" (--init none, tuned, for
--supervised-steps, default as many steps as the pretraining had).
All runs share the seeds, so every cell is trained on the same labelled subsets.

--pretrain "ARGS" and --finetune "ARGS" pass flags to one stage only, --linear "ARGS" and --tuned "ARGS"
to one evaluation column only (the paper trains the linear head for 100 epochs, the whole network for 20);
--config, --data and --loader go to every run. Each run folder is reused: a finished run is read back,
an interrupted one resumed, so rerunning the same command after a crash finishes the table. Writes
OUT/table.md (rows: methods and baselines; columns: linear, tuned, and the pretext task's final training
accuracy) and OUT/table.json.
"""

from __future__ import annotations

from accelerate import PartialState

from train.engine.cli import run_cli
from train.experiments import pretext_grid


def main(argv: list[str] | None = None) -> dict:
    return pretext_grid.run(pretext_grid.parse(argv))


if __name__ == "__main__":
    run_cli(main)
    PartialState().destroy_process_group()
