"""Evaluation during training: learning-curve points (``eval_every``) in ``eval_curve.jsonl`` and
TensorBoard, and the logging of any evaluation to TensorBoard."""

from __future__ import annotations

import math
from pathlib import Path

from lamm_ds.engine.config import RunConfig
from lamm_ds.engine.evaluate import append_curve_point, evaluate_prepared, prepare_eval_sets


def log_evaluation(writer, evaluation: dict[str, dict], step: int, prefix: str = "eval") -> None:
    """Finite scalar metrics of each evaluated dataset to TensorBoard under <prefix>/<name>/."""
    for name, metrics in evaluation.items():
        for k, v in metrics.items():
            if isinstance(v, float) and math.isfinite(v):
                writer.add_scalar(f"{prefix}/{name}/{k}", v, step)


class EvalCurve:
    """Evaluation every ``cfg.eval_every`` optimiser steps (and before the first): the learning curve.

    The sets are read and turned into graphs once. Each point goes to ``<run_dir>/eval_curve.jsonl``
    and to TensorBoard under ``curve/<set>/<metric>`` (x = optimiser steps done). ``fresh``: a run
    starting at step 0 drops the points of an earlier run in the same directory.
    """

    def __init__(self, cfg: RunConfig, model_cfg, run_dir: Path, writer, fresh: bool) -> None:
        self.path, self.writer = Path(run_dir) / "eval_curve.jsonl", writer
        self.sets = []
        if cfg.eval_every:
            self.sets = prepare_eval_sets(cfg.eval_datasets, model_cfg.cutoff, model_cfg.max_neighbors,
                                          cfg.eval_max_structures, model_cfg.max_neighbors_strict)
            if fresh:
                self.path.unlink(missing_ok=True)

    @staticmethod
    def is_due(cfg: RunConfig, steps_done: int) -> bool:
        return bool(cfg.eval_every) and (steps_done % cfg.eval_every == 0 or steps_done == cfg.max_steps)

    def record(self, model, steps_done: int) -> dict:
        evaluation = evaluate_prepared(model, self.sets)
        append_curve_point(self.path, steps_done, evaluation)
        log_evaluation(self.writer, evaluation, steps_done, prefix="curve")
        self.writer.flush()
        return evaluation
