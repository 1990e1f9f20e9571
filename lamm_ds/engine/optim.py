"""The optimiser: AdamW with per-group learning rates (heads, backbone or its depths under
layer-wise decay) and the warm-up + cosine
(or constant) schedule, as a factor of ``optim.lr`` per step."""

from __future__ import annotations

import math

import torch

from lamm_ds.engine.config import RunConfig
from lamm_ds.model.layers import num_layers, parameter_depth
from lamm_ds.model.potential import Potential


def lr_factor(step: int, cfg: RunConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` at ``max_steps`` (or constant)."""
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    span = max(1, cfg.max_steps - o.warmup_steps)
    t = min(1.0, (step - o.warmup_steps) / span)
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def param_groups(model: Potential, cfg: RunConfig) -> list[dict]:
    """Energy heads at ``optim.lr``; everything else at ``lr * backbone_lr_ratio``, times
    ``layer_lr_decay ** (L + 1 - depth)`` with layer-wise decay (one group per depth, input side
    slowest; the force head and final norm sit at the top, depth L + 1)."""
    ft = cfg.finetune
    top = num_layers(model) + 1
    heads = [p for n, p in model.named_parameters() if n.startswith("heads.") and p.requires_grad]
    groups = [{"params": heads, "lr": cfg.optim.lr, "name": "heads"}]
    by_depth: dict[int, list] = {}
    for n, p in model.named_parameters():
        if not n.startswith("heads.") and p.requires_grad:
            depth = parameter_depth(model, n) if ft.layer_lr_decay != 1.0 else top
            by_depth.setdefault(depth, []).append(p)
    for depth in sorted(by_depth, reverse=True):
        lr = cfg.optim.lr * ft.backbone_lr_ratio * ft.layer_lr_decay ** (top - depth)
        name = "backbone" if ft.layer_lr_decay == 1.0 else f"backbone_depth{depth}"
        groups.append({"params": by_depth[depth], "lr": lr, "name": name})
    return groups


def build_optimizer(model: Potential, cfg: RunConfig):
    """(AdamW over :func:`param_groups`, its LambdaLR schedule)."""
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    return optimizer, scheduler
