#!/usr/bin/env python
"""End-to-end LaMM evidence: pre-train a small LaMM-S on a joint mixture, then fine-tune on small
acetylacetone sets and compare with training from scratch at the same step budget (issue 7).

    .venv/bin/python bench/pretrain_finetune.py [--config configs/experiments/pretrain_finetune.yaml
                     [--config configs/experiments/pretrain_finetune_controls.yaml]] [--main-only] [--no-publish] [--quiet] [key=value ...]

Overrides address the experiment config (lamm_ds/experiments/pretrain_finetune/config.py), e.g.
``sizes=[50]`` or ``finetune_overrides=[max_steps=200]``. Finished runs are reused (same command),
so an interrupted experiment continues where it stopped. The last line of output is one JSON object
(ratios first: pre-trained / scratch errors, step speed-ups), also written to
bench/results/pretrain_finetune.json with the Markdown tables beside it and the plots in docs/img/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _common import REPO, RESULTS, machine, write_result

sys.path.insert(0, str(REPO))

from lamm_ds.experiments.pretrain_finetune import load_experiment_config, run_experiment  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", default=None,
                   help="experiment YAML (repeatable, merged in order; default "
                        "configs/experiments/pretrain_finetune.yaml)")
    p.add_argument("--main-only", action="store_true", help="the main variant only (no ablations)")
    p.add_argument("--no-publish", action="store_true",
                   help="leave bench/results and docs/img alone (results stay in out_dir)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = load_experiment_config(args.config or [str(REPO / "configs/experiments/pretrain_finetune.yaml")],
                                 args.overrides)
    publish = None if args.no_publish else (RESULTS / "pretrain_finetune.json", REPO / "docs/img")
    res = run_experiment(cfg, include_ablations=not args.main_only, progress=not args.quiet, publish=publish)
    clean = res.get("clean_total_wall_s")
    figures = {**res["headline"], "clean_total_wall_min": None if clean is None else round(clean / 60, 2),
               "this_invocation_wall_min": round(res["total_wall_s"] / 60, 2),
               "runs": len(res["runs"]) + len(res["pretrain"]),
               "machine": machine(threads=cfg.threads_per_process)}  # per run process / rank
    print(Path(cfg.out_dir) / "report.md", file=sys.stderr)
    write_result(figures, None if publish is None else publish[0], indent=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
