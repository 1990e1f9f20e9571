"""The end of a run: full-precision weights on rank 0 (fp32 master copies under bf16/fp16,
gathered from the shards under ZeRO), exported with the elements each head was trained on,
evaluated on the configured sets, summarised in ``summary.json``. With a moving average of the
weights (``optim.ema_decay``) ``model.safetensors`` holds the average and ``model_raw.safetensors``
the last weights; the evaluation is the average's."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch.distributed as dist

from lamm_ds.engine.checkpoint import fp32_state_dict
from lamm_ds.engine.config import RunConfig
from lamm_ds.engine.curve import log_evaluation
from lamm_ds.engine.ema import WeightEMA
from lamm_ds.engine.evaluate import evaluate_entries
from lamm_ds.engine.export import export_model
from lamm_ds.engine.guards import merge_trained_elements

log = logging.getLogger("lamm_ds")


def finish_run(engine, model, datasets, cfg: RunConfig, run_dir: Path, tag: str | None, rank: int, world: int,
               start_step: int, skipped: int, history: list[dict], writer, ema: WeightEMA | None = None) -> dict:
    """Export, evaluate and summarise (the summary is returned on every rank)."""
    state = fp32_state_dict(engine, run_dir / "checkpoints", tag, rank)
    summary = {"steps": cfg.max_steps, "start_step": start_step, "skipped_steps": skipped,
               "world_size": world, "weights": "ema" if ema is not None else "raw", "history": history}
    if rank == 0:
        trained = merge_trained_elements(getattr(model, "trained_elements", None), datasets)
        extra = {"steps": cfg.max_steps, "world_size": world}

        def export(weights: dict, name: str, which: dict):
            out = type(model)(model.cfg, model.dataset_names)
            out.load_state_dict(weights)
            out.trained_elements = trained
            return out, export_model(out, run_dir / name, {**extra, **which})

        if ema is not None:  # the raw weights first: model.safetensors is always the last file written
            summary["raw_model_path"] = str(export(state, "model_raw.safetensors", {"weights": "raw"})[1])
            summary["ema"] = ema.describe()
            final, path = export(ema.apply_to(state), "model.safetensors",
                                 {"weights": "ema", "ema_decay": ema.decay, "ema_updates": ema.updates})
        else:
            (run_dir / "model_raw.safetensors").unlink(missing_ok=True)  # an earlier EMA export's: now stale
            final, path = export(state, "model.safetensors", {"weights": "raw"})
        summary["model_path"] = str(path)
        evaluation = evaluate_entries(final, cfg.eval_datasets)
        log_evaluation(writer, evaluation, cfg.max_steps)
        summary["evaluation"] = evaluation
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("finished %d steps on %d rank(s): model %s (%s weights); TensorBoard: tensorboard --logdir %s",
                 cfg.max_steps, world, summary["model_path"], summary["weights"], run_dir / "tb")
        for name, m in evaluation.items():
            log.info("  %s: energy MAE %.1f meV/atom, force MAE %.1f meV/Å", name,
                     m["energy_mae_per_atom"] * 1000, m["forces_mae"] * 1000)
    dist.barrier()
    return summary
