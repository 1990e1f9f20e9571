"""Fine-tuning recipes on real DFT molecules (issue 15): replay, layer-wise LR decay, EMA.

Pre-training (once): LaMM-S on 400 frames of ``3bpa/train_300K.xyz`` (its last 100 frames held out).
Fine-tuning on 50 frames of ``acac/train_300K.xyz``, for each arm and seed the same steps and
schedule:

* ``plain``: the defaults (new head copied from the closest pre-trained head, backbone at optim.lr);
* ``replay``: ``--replay 3bpa:100`` (random), 20% of the draws, into the 3bpa head;
* ``replay_fps``: the same, the 100 chosen by farthest-point sampling in the pre-trained features;
* ``replay_share_0.1``: random replay with 10% of the draws;
* ``replay_share_0.05``: 5% of the draws (the default share);
* ``replay_share_0.025``: 2.5% of the draws;
* ``replay_w0.5``: 10% of the draws, their loss weighted 0.5 (``finetune.replay_weight``);
* ``replay_share_0.2_w0.25``: 20% of the draws weighted 0.25;
* ``replay_added_0.1`` / ``replay_added_0.2``: 10% / 20% of the draws with the batch grown to 9 / 10, so
  a step still sees 8 acac structures on average: replay on top of the target, at 12-25% more compute;
* ``lr_decay``, ``lr_decay_0.9``: ``finetune.layer_lr_decay=0.7`` / ``0.9``;
* ``ema``, ``ema_0.95``: ``optim.ema_decay=0.99`` / ``0.95`` (the exported and evaluated model is the EMA copy);
* ``replay_share_0.05_ema_0.95``: the default replay with EMA 0.95 (to set against ``ema_0.95``).

Scored on acac ``test_MD_300K.xyz`` (the target, acac head) and on the 100 held-out 3BPA frames
through the 3bpa head (does fine-tuning wreck what pre-training learnt?). Finished runs are reused.
The last line is one JSON object (ratios to ``plain`` first), also in
``bench/results/finetune_recipes.json``.

    .venv/bin/python bench/finetune_recipes.py [--seeds 0 1 2 3 4] [--steps 400]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import machine, write_result  # noqa: E402
from bench._runs import PY, SHARED, datasets_override, evaluation, ingest, mean_sd, run  # noqa: E402

MODEL = ["model.hidden=64", "model.layers=3", "model.num_rbf=16", "model.cutoff=5.0", "model.max_neighbors=32",
         "model.forces=conservative"]
COMMON = ["denoise_unlabelled=false", "data.batch_size=8", "log_every=50", "checkpoint.every=0",
          "checkpoint.keep_last=1", "optim.warmup_steps=20", "optim.lr=1e-3"]


def arms(data: dict[str, Path]) -> dict[str, list[str]]:
    return {
        "plain": [],
        "replay": ["--replay", f"{data['3bpa']}:100", "finetune.replay_share=0.2"],
        "replay_fps": ["--replay", f"{data['3bpa']}:100", "finetune.replay_share=0.2", "finetune.replay_selection=fps"],
        "replay_share_0.1": ["--replay", f"{data['3bpa']}:100", "finetune.replay_share=0.1"],
        "replay_share_0.05": ["--replay", f"{data['3bpa']}:100", "finetune.replay_share=0.05"],
        "replay_share_0.025": ["--replay", f"{data['3bpa']}:100", "finetune.replay_share=0.025"],
        "replay_w0.5": ["--replay", f"{data['3bpa']}:100", "finetune.replay_share=0.1", "finetune.replay_weight=0.5"],
        "replay_share_0.2_w0.25": ["--replay", f"{data['3bpa']}:100", "finetune.replay_share=0.2",
                                   "finetune.replay_weight=0.25"],
        "replay_added_0.1": ["--replay", f"{data['3bpa']}:100", "finetune.replay_share=0.1", "data.batch_size=9"],
        "replay_added_0.2": ["--replay", f"{data['3bpa']}:100", "finetune.replay_share=0.2", "data.batch_size=10"],
        "lr_decay": ["finetune.layer_lr_decay=0.7"],
        "lr_decay_0.9": ["finetune.layer_lr_decay=0.9"],
        "ema": ["optim.ema_decay=0.99"],
        "ema_0.95": ["optim.ema_decay=0.95"],
        "replay_share_0.05_ema_0.95": ["--replay", f"{data['3bpa']}:100", "finetune.replay_share=0.05",
                                       "optim.ema_decay=0.95"],
    }


def prepare_data(work: Path, size: int) -> dict[str, Path]:
    import ase.io
    import numpy as np

    work.mkdir(parents=True, exist_ok=True)
    frames = ase.io.read(SHARED / "3bpa" / "train_300K.xyz", index=":")
    if not (work / "3bpa_train.xyz").is_file():
        ase.io.write(work / "3bpa_train.xyz", frames[:400], format="extxyz")
        ase.io.write(work / "3bpa_holdout.xyz", frames[400:], format="extxyz")
    subset = work / f"acac_{size}.xyz"
    if not subset.is_file():
        acac = ase.io.read(SHARED / "acac" / "train_300K.xyz", index=":")
        pick = np.random.default_rng(0).choice(len(acac), size=size, replace=False)
        ase.io.write(subset, [acac[int(i)] for i in sorted(pick)], format="extxyz")
    return {
        "3bpa": ingest([work / "3bpa_train.xyz"], "3bpa", work / "3bpa"),
        "3bpa_holdout": ingest([work / "3bpa_holdout.xyz"], "3bpa_holdout", work / "3bpa_holdout"),
        "acac": ingest([subset], "acac", work / f"acac_{size}"),
        "acac_test": ingest([SHARED / "acac" / "test_MD_300K.xyz"], "acac_test", work / "acac_test"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--pretrain-steps", type=int, default=1500)
    ap.add_argument("--size", type=int, default=50, help="acac training structures")
    ap.add_argument("--work", default=str(REPO / "runs" / "finetune_recipes"))
    args = ap.parse_args()
    work = Path(args.work)
    data = prepare_data(work / "data", args.size)
    evals = datasets_override("eval_datasets", [("acac_test", data["acac_test"], "acac"),
                                                ("3bpa_holdout", data["3bpa_holdout"], "3bpa")])
    pre = work / "pretrain"
    if not (pre / "summary.json").is_file():
        run([PY, "launch/pretrain.py", "--config", "configs/demo.yaml", "--run-dir", str(pre), "--quiet",
             "--max-steps", str(args.pretrain_steps), *MODEL, *COMMON, "seed=0",
             datasets_override("eval_datasets", [("3bpa_holdout", data["3bpa_holdout"], "3bpa")]),
             datasets_override("data.datasets", [("3bpa", data["3bpa"])])], work / "pretrain.log")
    before = evaluation(pre)["3bpa_holdout"]

    results: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for arm, extra in arms(data).items():
            rd = work / f"{arm}_s{seed}"
            if not (rd / "summary.json").is_file():
                run([PY, "launch/finetune.py", "--config", "configs/demo.yaml",
                     "--init", str(pre / "model.safetensors"), "--run-dir", str(rd), "--quiet",
                     "--max-steps", str(args.steps), *MODEL, *COMMON, f"seed={seed}", evals, *extra,
                     datasets_override("data.datasets", [("acac", data["acac"])])],
                     work / f"{arm}_s{seed}.log")
            results.setdefault(arm, []).append(evaluation(rd))

    table = {}
    for arm, per_seed in results.items():
        row = {}
        for s in ("acac_test", "3bpa_holdout"):
            for k in ("forces_mae", "energy_mae_per_atom"):
                row[f"{s}_{k}_mean"], row[f"{s}_{k}_sd"] = mean_sd([r[s][k] for r in per_seed])
        table[arm] = {**row, "per_seed": per_seed}
    ratios = {f"{arm}_over_plain_{key}": table[arm][f"{key}_mean"] / table["plain"][f"{key}_mean"]
              for arm in table if arm != "plain"
              for key in ("acac_test_forces_mae", "acac_test_energy_mae_per_atom", "3bpa_holdout_forces_mae",
                          "3bpa_holdout_energy_mae_per_atom")}
    out = {"ratios": ratios, "arms": table, "pretrained_3bpa_holdout": before,
           "setup": {"acac_train_structures": args.size, "steps": args.steps, "pretrain_steps": args.pretrain_steps,
                     "seeds": args.seeds, "model": MODEL, "common": COMMON, "arms": arms(data)},
           "machine": machine()}
    write_result(out, REPO / "bench" / "results" / "finetune_recipes.json")


if __name__ == "__main__":
    main()
