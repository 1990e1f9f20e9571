"""Where each parameter sits in the network's depth, for fine-tuning: freezing the first layers
and layer-wise learning-rate decay (JMP's recipe) need one numbering for both backbones.

Depth 0 is the input side (element embeddings, the edge-degree embedding, radial tables), depth
``i + 1`` is message-passing layer ``i`` (PaiNN: message and update block ``i``; EquiformerV2:
block ``i``), and depth ``L + 1`` is the output side (the final norm, energy heads, force and
denoising heads).
"""

from __future__ import annotations

import re

from torch import nn

_LAYER = re.compile(r"^backbone\.(?:messages|updates|blocks)\.(\d+)\.")
_OUTPUT_SIDE_OF_BACKBONE = ("backbone.norm.",)


def num_layers(model: nn.Module) -> int:
    """Message-passing layers of the model's backbone."""
    cfg = model.cfg
    return int(cfg.num_layers if hasattr(cfg, "num_layers") else cfg.layers)


def parameter_depth(model: nn.Module, name: str) -> int:
    """The depth of parameter ``name`` (a ``named_parameters`` name of a potential)."""
    top = num_layers(model) + 1
    if not name.startswith("backbone.") or name.startswith(_OUTPUT_SIDE_OF_BACKBONE):
        return top
    layer = _LAYER.match(name)
    return int(layer.group(1)) + 1 if layer else 0


def element_tables(model: nn.Module) -> list[tuple[str, nn.Embedding]]:
    """Every per-element lookup table (an ``nn.Embedding`` with one row per atomic number 0..max_z)."""
    rows = model.cfg.max_z + 1
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Embedding) and m.num_embeddings == rows]
