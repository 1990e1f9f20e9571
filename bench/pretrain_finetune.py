#!/usr/bin/env python
"""End-to-end LaMM evidence: pre-train a small LaMM-S (per variant and seed), then fine-tune on small
sets of each target and compare with training from scratch at the same step budget (issue 7).

    .venv/bin/python bench/pretrain_finetune.py [--config configs/experiments/pretrain_finetune.yaml
                     [--config configs/experiments/pretrain_finetune_controls.yaml]] [--main-only] [--no-publish] [--quiet] [key=value ...]
    .venv/bin/python bench/pretrain_finetune.py --config configs/experiments/lamm_mini.yaml [--plan]

Overrides address the experiment config (lamm_ds/experiments/pretrain_finetune/config.py), e.g.
``sizes=[50]``, ``finetune_overrides=[max_steps=200]`` or ``only_variants=[main,labelled_only]``.
``--plan`` lists the runs (name, stage, processes, what each waits on) and their count, and neither
makes data nor runs anything. Finished runs are reused (same command), so an interrupted experiment
continues where it stopped. The last line of output is one JSON object (ratios first: pre-trained /
scratch errors, main / each variant with 95% intervals, then steps), also written to
bench/results/<name>.json (``name`` in the config) with the Markdown tables beside it and the plots
in docs/img/<name>_*.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _common import REPO, RESULTS, machine, write_result

sys.path.insert(0, str(REPO))

from lamm_ds.experiments.pretrain_finetune import load_experiment_config, run_experiment  # noqa: E402
from lamm_ds.experiments.pretrain_finetune.config import _main_only  # noqa: E402
from lamm_ds.experiments.pretrain_finetune.plan import plan_counts, plan_runs, planned_data  # noqa: E402


def show_plan(cfg) -> int:
    """Print the planned runs, then one JSON line with their counts."""
    runs = plan_runs(cfg, planned_data(cfg))
    for r in runs:
        print(f"{r.name:<48} {r.stage:<8} {r.slots} proc  after: {', '.join(r.depends) or '-'}")
    print(json.dumps(plan_counts(runs)))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", default=None,
                   help="experiment YAML (repeatable, merged in order; default "
                        "configs/experiments/pretrain_finetune.yaml)")
    p.add_argument("--main-only", action="store_true", help="the main variant only (no ablations)")
    p.add_argument("--no-publish", action="store_true",
                   help="leave bench/results and docs/img alone (results stay in out_dir)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--plan", action="store_true", help="list the planned runs and their count; run nothing")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = load_experiment_config(args.config or [str(REPO / "configs/experiments/pretrain_finetune.yaml")],
                                 args.overrides)
    if args.plan:
        return show_plan(_main_only(cfg) if args.main_only else cfg)
    publish = None if args.no_publish else (RESULTS / f"{cfg.name}.json", REPO / "docs/img")
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
