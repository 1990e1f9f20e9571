"""Learning-curve figures: error against fine-tuning steps per target (rows: its curve sets, columns:
its sizes), each arm as the mean over its seeds with a min–max band."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np


def _label(variant: str, cfg_variants: list[dict]) -> str:
    for v in cfg_variants:
        if v["name"] == variant and v.get("description"):
            return f"{variant}: {v['description']}"
    return variant


def arm_curves(runs: dict, variant: str, target: str, size: int, set_name: str, metric: str):
    """(steps, runs x points array) of one arm's curves, cut to the shortest; None if it has none."""
    curves = [(r["curve"]["steps"], r["curve"][set_name][metric]) for r in runs.values()
              if r["variant"] == variant and r.get("target") == target and r["size"] == size
              and set_name in r.get("curve", {})]
    if not curves:
        return None
    length = min(len(s) for s, _ in curves)
    return np.asarray(curves[0][0][:length]), np.asarray([y[:length] for _, y in curves], dtype=np.float64)


def plot_curves(res: dict, out_dir: Path, main: str) -> list[Path]:
    """Force and energy MAE of scratch vs the main pre-trained model, and the force MAE of every
    pre-training variant, per target (``..._<target>.png`` with ``targets``, else one set of files)."""
    variants = [v["name"] for v in res["variants"]]
    paths = []
    for t in res["targets"]:
        suffix = f"_{t['name']}" if res.get("named_targets") else ""
        figures = [("forces_mae", "force MAE (meV/Å)", "learning_curves_forces", ["scratch", main]),
                   ("energy_mae_per_atom", "energy MAE (meV/atom)", "learning_curves_energy", ["scratch", main])]
        if len(variants) > 1:
            figures.append(("forces_mae", "force MAE (meV/Å)", "ablation_curves_forces", ["scratch", *variants]))
        for metric, label, stem, names in figures:
            p = _curve_figure(res, t, out_dir / f"{stem}{suffix}.png", metric, label, names)
            if p is not None:
                paths.append(p)
    return paths


def _curve_figure(res: dict, target: dict, path: Path, metric: str, label: str, names: list[str]) -> Optional[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes, sets = target["sizes"], target["curve_sets"]
    if not any(arm_curves(res["runs"], v, target["name"], n, s, metric) for v in names for n in sizes for s in sets):
        return None
    main = names[1] if len(names) > 1 else None
    fig, axes = plt.subplots(len(sets), len(sizes), figsize=(4.2 * len(sizes), 3.4 * len(sets)), squeeze=False,
                             sharey="row")
    seeded = False
    for row, set_name in enumerate(sets):
        for col, n in enumerate(sizes):
            ax = axes[row][col]
            for k, name in enumerate(names):
                got = arm_curves(res["runs"], name, target["name"], n, set_name, metric)
                if got is None:
                    continue
                steps, ys = got
                ys = 1000 * ys
                color = "black" if name == "scratch" else f"C{k - 1}"
                bold = name in ("scratch", main)
                ax.plot(steps, ys.mean(axis=0), color=color, lw=2 if bold else 1.2, ls="-" if bold else "--",
                        label="scratch" if name == "scratch" else f"pre-trained ({_label(name, res['variants'])})")
                if len(ys) > 1:
                    seeded = True
                    ax.fill_between(steps, ys.min(axis=0), ys.max(axis=0), color=color, alpha=0.15, lw=0)
                if name == "scratch" and metric == "forces_mae":
                    ax.axhline(ys[:, -1].mean(), color="black", lw=0.8, ls=":")
            ax.set_yscale("log")
            ax.set_title(f"{set_name}, {n} training structures", fontsize=9)
            ax.set_xlabel("fine-tuning steps")
            if col == 0:
                ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if seeded:
        labels = [*labels, "lines: mean over the seeds; bands: min–max"]
        handles = [*handles, plt.Rectangle((0, 0), 1, 1, color="0.6", alpha=0.3)]
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8, frameon=False)
    rows = (len(labels) + 2) // 3
    fig.tight_layout(rect=(0, 0.03 + 0.035 * rows, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
