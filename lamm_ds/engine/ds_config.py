"""The DeepSpeed JSON config of a run (``deepspeed_config``): read, checked, and completed with
lamm-ds's batch bookkeeping and gradient clipping; and what the chosen ZeRO stage cannot do."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from lamm_ds.engine.config import ConfigError, RunConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_path(path: str) -> Path:
    """A path as given if it exists (or is absolute), else relative to the repository root."""
    p = Path(path)
    return p if p.is_absolute() or p.exists() else REPO_ROOT / p


def deepspeed_config(cfg: RunConfig, world: int) -> dict:
    """The JSON config with lamm-ds's batch bookkeeping and clipping filled in.

    Per-rank batches vary in size (a step's draws are split over ranks, later by cost), so the
    nominal ``train_micro_batch_size_per_gpu`` is ceil(batch_size / world): DeepSpeed only uses it
    for its sample counters. Exact gradients come from the loss's global normalisation instead.
    """
    path = resolve_path(cfg.deepspeed_config)
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"DeepSpeed config not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON: {exc}") from exc
    if "optimizer" in ds or "scheduler" in ds:
        raise ValueError(f"{path}: remove 'optimizer'/'scheduler'; lamm-ds passes AdamW and its LR schedule "
                         "from the run config (optim.*)")
    if (ds.get("fp16") or {}).get("enabled") and not torch.cuda.is_available():
        raise ValueError(f"{path}: fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16); use bf16 or fp32")
    micro = math.ceil(cfg.data.batch_size / world)
    ds.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=1,
              train_batch_size=micro * world, gradient_clipping=float(cfg.optim.grad_clip))
    return ds


def check_zero_stage(cfg: RunConfig, ds_config: dict, model_cfg) -> None:
    """Refuse what ZeRO stage 3 cannot do: the double backward of conservative forces, and
    evaluation during training (rank 0 would need whole parameters)."""
    stage = (ds_config.get("zero_optimization") or {}).get("stage", 0)
    if stage == 3 and getattr(model_cfg, "forces", "direct") == "conservative":
        raise ValueError(f"{cfg.deepspeed_config}: ZeRO stage 3 cannot train conservative forces (DeepSpeed "
                         "fails on the double backward through partitioned parameters); use ZeRO 0-2, or "
                         "model forces=direct")
    if cfg.eval_every and stage == 3:
        raise ValueError(f"eval_every={cfg.eval_every}: evaluation during training needs whole parameters on "
                         f"rank 0, which ZeRO stage 3 ({cfg.deepspeed_config}) partitions; use ZeRO 0-2 or "
                         "eval_every=0 (the final evaluation still runs)")


def check_compile(cfg: RunConfig, ds_config: dict, model_cfg) -> None:
    """Refuse ``compile: true`` where torch.compile cannot train: double backward (conservative
    forces; AOT autograd does not differentiate its own backward), ZeRO stage 3 (parameters are
    gathered by hooks per submodule), and EquiformerV2 (not supported yet)."""
    if not cfg.compile:
        return
    if cfg.model_kind != "painn":
        raise ValueError(f"compile=true supports model_kind=painn only, got {cfg.model_kind!r}; set compile=false")
    if getattr(model_cfg, "forces", "direct") == "conservative":
        raise ValueError("compile=true cannot train conservative forces (torch.compile does not support the double "
                         "backward they need); set compile=false, or model forces=direct")
    stage = (ds_config.get("zero_optimization") or {}).get("stage", 0)
    if stage == 3:
        raise ValueError(f"compile=true is not supported with ZeRO stage 3 ({cfg.deepspeed_config}); use ZeRO 0-2 "
                         "or compile=false")


def check_ema(cfg: RunConfig, ds_config: dict) -> None:
    """Refuse ``optim.ema_decay`` under ZeRO stage 3: each rank holds only a shard of every weight,
    so there is no whole weight to average without gathering the model every step."""
    stage = (ds_config.get("zero_optimization") or {}).get("stage", 0)
    if cfg.optim.ema_decay and stage == 3:
        raise ConfigError(f"optim.ema_decay={cfg.optim.ema_decay}: the moving average of the weights needs whole "
                          f"weights on every rank, which ZeRO stage 3 ({cfg.deepspeed_config}) partitions; use "
                          "ZeRO 0-2 or optim.ema_decay=0")
