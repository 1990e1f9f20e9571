"""The models of the load-balancing benchmarks, as run-config files + overrides.

* ``painn``     LaMM-S (configs/balance_lamm_s.yaml: the PaiNN of configs/experiments/lamm_mini/pretrain.yaml);
* ``eqv2-31m``  EquiformerV2 with the published 31M OC20 preset (``EquiformerV2Config.preset("31M")``:
                8 layers, lmax 4, mmax 2, 128 channels, cutoff 12 Å / 20 neighbours, direct forces),
                with the same loss and denoising.

    python bench/_models.py overrides eqv2-31m    # the overrides, one line (for shell scripts)
"""

from __future__ import annotations

import sys

from _common import REPO

sys.path.insert(0, str(REPO))

CONFIG = REPO / "configs" / "balance_lamm_s.yaml"
MODELS = ("painn", "eqv2-31m")


def _yaml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return "null" if v is None else str(v)


def preset_overrides(preset: str) -> list[str]:
    """Run-config overrides that select EquiformerV2 with ``preset``'s hyperparameters."""
    from lamm_ds.model.equiformer_v2 import EquiformerV2Config

    base, cfg = EquiformerV2Config(), EquiformerV2Config.preset(preset)
    changed = {k: getattr(cfg, k) for k in cfg.to_dict() if getattr(cfg, k) != getattr(base, k)}
    return ["model_kind=equiformer_v2", *(f"equiformer_v2.{k}={_yaml_value(v)}" for k, v in changed.items())]


def model_overrides(model: str) -> list[str]:
    if model == "painn":
        return []
    if model == "eqv2-31m":
        return preset_overrides("31M")
    raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "overrides":
        sys.exit("usage: python bench/_models.py overrides {" + ",".join(MODELS) + "}")
    print(" ".join(model_overrides(sys.argv[2])))
