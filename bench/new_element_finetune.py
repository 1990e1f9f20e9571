"""Fine-tuning on an element the pre-training never saw (issue 15): mlearn Mo (PBE, Zuo et al. 2020).

Pre-training (once): LaMM-S on mlearn Si (PBE) and the corpus's periodic GFN1-xTB cells
(``make-corpus --subsets bulk_gfn1``) with every Mo-containing cell removed, so Mo is in no
pre-training set while its periodic-table neighbours (Cr, W, Nb, Tc) are. Then, on a random subset of
``../shared/data/mlearn/Mo/training.xyz``, the same steps, batch size and schedule for each arm and
fine-tuning seed:

* ``scratch``: a fresh model on Mo alone;
* ``finetune_random``: what lamm-ds did before: Mo's embedding rows random, the new head random;
* ``finetune``: the defaults: Mo's rows from its nearest trained elements (``new_elements=similar``),
  the head copied from the closest pre-trained head (``head_init_from=auto``).

Scored on ``mlearn/Mo/test.xyz`` (energy MAE per atom, force MAE). Finished runs are reused. The
last line is one JSON object (ratios first), also in ``bench/results/new_element_finetune.json``.

    .venv/bin/python bench/new_element_finetune.py [--seeds 0 1 2] [--steps 600] [--size 60]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import machine, write_result  # noqa: E402
from bench._runs import PY, SHARED, datasets_override, evaluation, ingest, run  # noqa: E402

MODEL = ["model.hidden=64", "model.layers=3", "model.num_rbf=16", "model.cutoff=5.0", "model.max_neighbors=32",
         "model.forces=conservative", "model.max_z=94"]
COMMON = ["denoise_unlabelled=false", "data.batch_size=8", "log_every=50", "checkpoint.every=0",
          "checkpoint.keep_last=1", "optim.warmup_steps=20"]
ARMS = {
    "scratch": [],
    "finetune_random": ["finetune.new_elements=random", "finetune.head_init_from=null"],
    "finetune": [],
}


def prepare_data(work: Path, corpus: Path, size: int, seed: int) -> dict[str, Path]:
    """The ingested sets: si, bulk without Mo, a random Mo subset, the Mo test set."""
    import ase.io
    import numpy as np

    work.mkdir(parents=True, exist_ok=True)
    nomo = work / "bulk_gfn1_no_mo.xyz"
    if not nomo.is_file():
        frames = [a for p in sorted((corpus / "raw" / "bulk_gfn1").glob("part-*.xyz"))
                  for a in ase.io.read(p, index=":")]
        kept = [a for a in frames if 42 not in a.numbers]
        if len(kept) == len(frames):
            print(f"note: no Mo cell in {corpus} to remove")
        ase.io.write(nomo, kept, format="extxyz")
    subset = work / f"mo_train_{size}.xyz"
    if not subset.is_file():
        frames = ase.io.read(SHARED / "mlearn" / "Mo" / "training.xyz", index=":")
        pick = np.random.default_rng(seed).choice(len(frames), size=size, replace=False)
        ase.io.write(subset, [frames[int(i)] for i in sorted(pick)], format="extxyz")
    return {
        "si": ingest([SHARED / "mlearn" / "Si" / "training.xyz"], "si", work / "si"),
        "bulk": ingest([nomo], "bulk", work / "bulk"),
        "mo": ingest([subset], "mo", work / f"mo_{size}"),
        "mo_test": ingest([SHARED / "mlearn" / "Mo" / "test.xyz"], "mo_test", work / "mo_test"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=600, help="fine-tuning / scratch steps")
    ap.add_argument("--pretrain-steps", type=int, default=2000)
    ap.add_argument("--size", type=int, default=60, help="Mo training structures")
    ap.add_argument("--corpus", default=str(REPO / "data" / "corpus_bulk_small"))
    ap.add_argument("--work", default=str(REPO / "runs" / "new_element"))
    args = ap.parse_args()
    work = Path(args.work)
    data = prepare_data(work / "data", Path(args.corpus), args.size, seed=0)
    eval_mo = datasets_override("eval_datasets", [("mo_test", data["mo_test"], "mo")])

    pre = work / "pretrain"
    if not (pre / "summary.json").is_file():
        run([PY, "launch/pretrain.py", "--config", "configs/demo.yaml", "--run-dir", str(pre), "--quiet",
             "--max-steps", str(args.pretrain_steps), *MODEL, *COMMON, "optim.lr=1e-3", "seed=0", "eval_datasets=[]",
             datasets_override("data.datasets", [("si", data["si"]), ("bulk", data["bulk"])])], work / "pretrain.log")

    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for seed in args.seeds:
        for arm, extra in ARMS.items():
            rd = work / f"{arm}_s{seed}"
            if not (rd / "summary.json").is_file():
                script = "pretrain.py" if arm == "scratch" else "finetune.py"
                init = [] if arm == "scratch" else ["--init", str(pre / "model.safetensors")]
                # one base config for every arm (finetune.py's default, finetune_demo.yaml, names demo heads)
                run([PY, f"launch/{script}", "--config", "configs/demo.yaml", *init, "--run-dir", str(rd), "--quiet",
                     "--max-steps", str(args.steps), *MODEL, *COMMON, "optim.lr=1e-3", f"seed={seed}", eval_mo,
                     *extra, datasets_override("data.datasets", [("mo", data["mo"])])], work / f"{arm}_s{seed}.log")
            results[arm].append(evaluation(rd)["mo_test"])

    def mean(arm: str, key: str) -> float:
        return statistics.fmean(r[key] for r in results[arm])

    def sd(arm: str, key: str) -> float:
        vals = [r[key] for r in results[arm]]
        return statistics.stdev(vals) if len(vals) > 1 else 0.0

    keys = ("forces_mae", "energy_mae_per_atom")
    ratios = {f"{arm}_over_scratch_{k}": mean(arm, k) / mean("scratch", k) for arm in ("finetune", "finetune_random")
              for k in keys}
    per_seed_wins = {f"finetune_le_scratch_{k}": sum(f[k] <= s[k] for f, s in zip(results["finetune"],
                                                                                      results["scratch"]))
                     for k in keys}
    table = {arm: {**{f"{k}_mean": mean(arm, k) for k in keys}, **{f"{k}_sd": sd(arm, k) for k in keys},
                   "per_seed": results[arm]} for arm in ARMS}
    out = {"ratios": ratios, "seeds_won_of": len(args.seeds), **per_seed_wins, "arms": table,
           "setup": {"mo_train_structures": args.size, "steps": args.steps, "pretrain_steps": args.pretrain_steps,
                     "seeds": args.seeds, "model": MODEL, "common": COMMON,
                     "pretrain_sets": ["mlearn Si training (PBE)", "corpus bulk_gfn1 small without Mo (GFN1-xTB)"]},
           "machine": machine()}
    write_result(out, REPO / "bench" / "results" / "new_element_finetune.json")


if __name__ == "__main__":
    main()
