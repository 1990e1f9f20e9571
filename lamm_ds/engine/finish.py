"""The end of a run: full-precision weights on rank 0 (fp32 master copies under bf16/fp16,
gathered from the shards under ZeRO), exported with the elements each head was trained on,
evaluated on the configured sets, summarised in ``summary.json``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch.distributed as dist

from lamm_ds.engine.checkpoint import fp32_state_dict
from lamm_ds.engine.config import RunConfig
from lamm_ds.engine.curve import log_evaluation
from lamm_ds.engine.evaluate import evaluate_entries
from lamm_ds.engine.export import export_model
from lamm_ds.engine.guards import merge_trained_elements

log = logging.getLogger("lamm_ds")


def finish_run(engine, model, datasets, cfg: RunConfig, run_dir: Path, tag: str | None, rank: int, world: int,
               start_step: int, skipped: int, history: list[dict], writer) -> dict:
    """Export, evaluate and summarise (the summary is returned on every rank)."""
    state = fp32_state_dict(engine, run_dir / "checkpoints", tag, rank)
    summary = {"steps": cfg.max_steps, "start_step": start_step, "skipped_steps": skipped,
               "world_size": world, "history": history}
    if rank == 0:
        export = type(model)(model.cfg, model.dataset_names)
        export.load_state_dict(state)
        export.trained_elements = merge_trained_elements(getattr(model, "trained_elements", None), datasets)
        summary["model_path"] = str(export_model(export, run_dir / "model.safetensors",
                                                 {"steps": cfg.max_steps, "world_size": world}))
        evaluation = evaluate_entries(export, cfg.eval_datasets)
        log_evaluation(writer, evaluation, cfg.max_steps)
        summary["evaluation"] = evaluation
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("finished %d steps on %d rank(s): model %s; TensorBoard: tensorboard --logdir %s",
                 cfg.max_steps, world, summary["model_path"], run_dir / "tb")
        for name, m in evaluation.items():
            log.info("  %s: energy MAE %.1f meV/atom, force MAE %.1f meV/Å", name,
                     m["energy_mae_per_atom"] * 1000, m["forces_mae"] * 1000)
    dist.barrier()
    return summary
