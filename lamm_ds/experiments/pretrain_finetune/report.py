"""Results of finished runs: final errors, learning curves, steps to reach the scratch model's final
force error, probes of the pre-trained models, headline figures, plots and the Markdown tables."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np

from lamm_ds.experiments.pretrain_finetune.config import ExperimentConfig, _path
from lamm_ds.experiments.pretrain_finetune.plan import RunSpec


def _curve(run_dir: Path, sets: list[str]) -> dict:
    from lamm_ds.engine.evaluate import read_curve

    path = run_dir / "eval_curve.jsonl"
    if not path.is_file():
        return {}
    points = read_curve(path)
    curve = {"steps": [p["step"] for p in points]}
    for name in sets:
        if all(name in p for p in points):
            curve[name] = {k: [p[name][k] for p in points] for k in ("forces_mae", "energy_mae_per_atom")}
    return curve


def probe_pretrained(cfg: ExperimentConfig, run_dir: Path) -> dict:
    """Errors of a pre-trained model on ``cfg.probe_sets`` (cached in ``probe.json`` beside the model)."""
    from lamm_ds.engine.evaluate import evaluate, load_structures
    from lamm_ds.engine.export import load_model

    model_file = run_dir / "model.safetensors"
    cache = run_dir / "probe.json"
    stamp = {"model_mtime_ns": model_file.stat().st_mtime_ns, "sets": cfg.probe_sets}
    if cache.is_file():
        old = json.loads(cache.read_text())
        if old.get("stamp") == stamp:
            return old["results"]
    model = load_model(model_file)
    results = {}
    for probe in cfg.probe_sets:
        path = probe["path"]
        path = _path(cfg.data_dir) / path[len("@data/"):] if path.startswith("@data/") else _path(cfg.shared_data) / path
        if probe["head"] not in model.dataset_names:
            continue  # e.g. a variant pre-trained without that dataset
        _, structures = load_structures(path)
        results[probe["name"]] = evaluate(model, structures, head=probe["head"], batch_size=32)
    cache.write_text(json.dumps({"stamp": stamp, "results": results}))
    return results


def steps_to_reach(steps: list[int], values: list[float], target: float) -> Optional[int]:
    """First evaluated step whose value is at or below ``target`` (None: never reached)."""
    for s, v in zip(steps, values):
        if v <= target:
            return int(s)
    return None


def collect(cfg: ExperimentConfig, runs: list[RunSpec], status: dict[str, dict]) -> dict:
    """Final errors, curves, steps-to-reach and timings of every finished run."""
    sets = cfg.curve_sets
    res: dict = {"sizes": sorted(cfg.sizes), "variants": [asdict(v) for v in cfg.variants],
                 "target_set": cfg.target_set, "pretrain": {}, "runs": {}, "status": status}
    for spec in runs:
        if status.get(spec.name, {}).get("state") != "done":
            continue
        summary = json.loads((spec.run_dir / "summary.json").read_text())
        entry = {"stage": spec.stage, "variant": spec.variant, "size": spec.size, "seed": spec.seed,
                 "wall_s": status[spec.name].get("wall_s"), "steps": summary["steps"],
                 "world_size": summary["world_size"], "final": summary.get("evaluation", {}),
                 "run_dir": str(spec.run_dir)}
        hist = summary.get("history") or []
        if hist:
            entry["first_loss"], entry["last_loss"] = hist[0]["loss"], hist[-1]["loss"]
            entry["last_record"] = {k: v for k, v in hist[-1].items() if k.startswith("dataset/")
                                    or k in ("loss", "imbalance", "predicted_imbalance", "busy_imbalance")}
        if spec.stage == "pretrain":
            entry["probe"] = probe_pretrained(cfg, spec.run_dir)
            for key in ("imbalance", "busy_imbalance", "predicted_imbalance"):
                vals = [h[key] for h in hist if h.get(key) is not None]
                entry[f"mean_{key}"] = float(np.mean(vals)) if vals else None
            res["pretrain"][spec.variant] = entry
        else:
            entry["curve"] = _curve(spec.run_dir, sets)
            res["runs"][spec.name] = entry
    # Steps each run needs to reach the scratch model's final force error (same size, same curve set).
    reach: dict = {}
    for name, r in res["runs"].items():
        suffix = "" if r["seed"] is None else f"_seed{r['seed']}"
        scratch = res["runs"].get(f"scratch_n{r['size']}{suffix}")  # same size and seed
        if not scratch or cfg.target_set not in scratch.get("curve", {}) or cfg.target_set not in r.get("curve", {}):
            continue
        target = scratch["curve"][cfg.target_set]["forces_mae"][-1]
        s = steps_to_reach(r["curve"]["steps"], r["curve"][cfg.target_set]["forces_mae"], target)
        r["steps_to_scratch_final"] = s
        r["scratch_final_forces_mae"] = target
        if r["seed"] is None:
            reach.setdefault(r["variant"], {})[str(r["size"])] = s
    res["steps_to_scratch_final"] = reach
    return res


def headline(res: dict, main: str) -> dict:
    """Ratios first (pre-trained / scratch errors on the full test sets; step speed-ups), then the rest."""
    ratios, speed, absolute = {}, {}, {}
    for n in res["sizes"]:
        scratch, pre = res["runs"].get(f"scratch_n{n}"), res["runs"].get(f"finetune_{main}_n{n}")
        if not scratch or not pre:
            continue
        for set_name in scratch["final"]:
            short = set_name.replace("acac_test_MD_", "")
            for metric, key in (("forces_mae", "force_mae"), ("energy_mae_per_atom", "energy_mae")):
                a, b = pre["final"][set_name][metric], scratch["final"][set_name][metric]
                ratios[f"{key}_ratio_{short}_n{n}"] = round(a / b, 4) if b else None
                absolute[f"{key}_{short}_n{n}_pretrained_meV"] = round(1000 * a, 3)
                absolute[f"{key}_{short}_n{n}_scratch_meV"] = round(1000 * b, 3)
        s = pre.get("steps_to_scratch_final")
        total = scratch["steps"]
        # s == 0: the pre-trained model starts below scratch's final error (no finite speed-up)
        speed[f"steps_speedup_n{n}"] = round(total / s, 3) if s else None
        absolute[f"steps_to_scratch_final_n{n}"] = s
    return {**ratios, **speed, **absolute}


def _label(variant: str, cfg_variants: list[dict]) -> str:
    for v in cfg_variants:
        if v["name"] == variant and v.get("description"):
            return f"{variant}: {v['description']}"
    return variant


def plot_curves(res: dict, out_dir: Path, main: str) -> list[Path]:
    """Learning curves against fine-tuning steps: force and energy MAE of scratch vs the main
    pre-trained model (extra seeds as thin lines), and the force MAE of every pre-training variant."""
    seeds = sorted({r["seed"] for r in res["runs"].values() if r.get("seed") is not None})
    variants = [v["name"] for v in res["variants"]]
    figures = [("forces_mae", "force MAE (meV/Å)", "learning_curves_forces.png", ["scratch", main], seeds),
               ("energy_mae_per_atom", "energy MAE (meV/atom)", "learning_curves_energy.png", ["scratch", main], seeds)]
    if len(variants) > 1:
        figures.append(("forces_mae", "force MAE (meV/Å)", "ablation_curves_forces.png", ["scratch", *variants], []))
    return [p for p in (_curve_figure(res, out_dir / f, m, label, names, s) for m, label, f, names, s in figures)
            if p is not None]


def _curve_figure(res: dict, path: Path, metric: str, label: str, names: list[str], seeds: list[int]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = res["sizes"]
    sets = next((list(k for k in r["curve"] if k != "steps") for r in res["runs"].values() if r.get("curve")), [])
    if not sets:
        return None
    main = names[1] if len(names) > 1 else None
    fig, axes = plt.subplots(len(sets), len(sizes), figsize=(4.2 * len(sizes), 3.4 * len(sets)), squeeze=False,
                             sharey="row")
    for row, set_name in enumerate(sets):
        for col, n in enumerate(sizes):
            ax = axes[row][col]
            for k, name in enumerate(names):
                base = f"scratch_n{n}" if name == "scratch" else f"finetune_{name}_n{n}"
                color = "black" if name == "scratch" else f"C{k - 1}"
                for seed in [None, *seeds]:
                    r = res["runs"].get(base if seed is None else f"{base}_seed{seed}")
                    if not r or set_name not in r.get("curve", {}):
                        continue
                    y = 1000 * np.asarray(r["curve"][set_name][metric])
                    if seed is not None:  # seed controls: thin, unlabelled
                        ax.plot(r["curve"]["steps"], y, color=color, lw=0.7, alpha=0.5)
                        continue
                    ax.plot(r["curve"]["steps"], y, color=color, lw=2 if name in ("scratch", main) else 1.2,
                            ls="-" if name in ("scratch", main) else "--",
                            label="scratch" if name == "scratch" else f"pre-trained ({_label(name, res['variants'])})")
                    if name == "scratch" and metric == "forces_mae":
                        ax.axhline(y[-1], color="black", lw=0.8, ls=":")
            ax.set_yscale("log")
            ax.set_title(f"{set_name}, {n} training structures", fontsize=9)
            ax.set_xlabel("fine-tuning steps")
            if col == 0:
                ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if seeds:
        labels = [*labels, f"thin lines: fine-tuning seeds {', '.join(map(str, seeds))}"]
        handles = [*handles, plt.Line2D([], [], color="0.4", lw=0.7)]
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8, frameon=False)
    rows = (len(labels) + 2) // 3
    fig.tight_layout(rect=(0, 0.03 + 0.035 * rows, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(x: Optional[float], scale: float = 1000.0, digits: int = 2) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{scale * x:.{digits}f}"


def report_markdown(res: dict, main: str) -> str:
    """Tables of the measured results (the reading is written by people, in docs/results.md)."""
    sets = []
    for r in res["runs"].values():
        sets = list(r["final"])
        if sets:
            break
    short = {k: k.replace("acac_test_MD_", "") for k in sets}
    runs = res["runs"]

    def run(variant: str, n: int, seed=None):
        base = f"scratch_n{n}" if variant == "scratch" else f"finetune_{variant}_n{n}"
        return runs.get(base if seed is None else f"{base}_seed{seed}")

    def reach(r) -> str:
        s = r.get("steps_to_scratch_final")
        return "not reached" if s is None else str(s)

    def who(v: str) -> str:
        return "scratch" if v == "scratch" else f"pre-trained: {v}"

    def error_cells(r) -> list[str]:
        return [_fmt(r["final"][k]["forces_mae"], digits=1) for k in sets] + \
               [_fmt(r["final"][k]["energy_mae_per_atom"]) for k in sets]

    lines = [f"### Pre-trained ({main}) vs scratch", "",
             "Force-component MAE (meV/Å) and energy MAE (meV/atom) on the full test sets after the last "
             "step; *steps* = first evaluated step (every `eval_every`) at which the run's force MAE on "
             f"{res['target_set']} is at or below the scratch run's final one (scratch: where it first gets there).",
             "", "| N | " + " | ".join(f"F MAE {short[k]}: scratch → pre-trained (ratio)" for k in sets) + " | " +
             " | ".join(f"E MAE {short[k]}: scratch → pre-trained (ratio)" for k in sets) +
             " | steps: scratch / pre-trained | speed-up |",
             "|---|" + "---|" * (2 * len(sets) + 2)]
    for n in res["sizes"]:
        a, b = run("scratch", n), run(main, n)
        if not a or not b:
            continue
        cells = []
        for metric, digits in (("forces_mae", 1), ("energy_mae_per_atom", 2)):
            for k in sets:
                x, y = a["final"][k][metric], b["final"][k][metric]
                cells.append(f"{_fmt(x, digits=digits)} → {_fmt(y, digits=digits)} ({y / x:.2f})")
        sa, sb = a.get("steps_to_scratch_final"), b.get("steps_to_scratch_final")
        speed = "—" if not sb or not sa else f"{sa / sb:.2f}×"
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {reach(a)} / {reach(b)} | {speed} |")
    variants = [v["name"] for v in res["variants"]]
    if len(variants) > 1:
        lines += ["", "### Ablations (pre-training variants, same fine-tuning)", "",
                  "| N | pre-training | " + " | ".join(f"F MAE {short[k]}" for k in sets) + " | " +
                  " | ".join(f"E MAE {short[k]}" for k in sets) + f" | steps to scratch's final |",
                  "|---|---|" + "---|" * (2 * len(sets) + 1)]
        for n in res["sizes"]:
            if not any(run(w, n) for w in variants[1:]):
                continue
            for v in ["scratch", *variants]:
                r = run(v, n)
                if not r:
                    continue
                cells = error_cells(r)
                label = "none (scratch)" if v == "scratch" else f"{v}: {_label(v, res['variants']).split(': ', 1)[-1]}"
                lines.append(f"| {n} | {label} | " + " | ".join(cells) + f" | {reach(r)} |")
    seeded = sorted({(r["size"], r["seed"]) for r in runs.values() if r.get("seed") is not None})
    if seeded:
        lines += ["", "### Seed controls (fine-tuning seed: data order; scratch: also the initial weights)", "",
                  "| N | run | seed | " + " | ".join(f"F MAE {short[k]}" for k in sets) + " | " +
                  " | ".join(f"E MAE {short[k]}" for k in sets) + " |", "|---|---|---|" + "---|" * (2 * len(sets))]
        for n in sorted({n for n, _ in seeded}):
            for v in ("scratch", main):
                for seed in [None, *sorted(s for m, s in seeded if m == n)]:
                    r = run(v, n, seed)
                    if r:
                        lines.append(f"| {n} | {who(v)} | {'config' if seed is None else seed} | "
                                     + " | ".join(error_cells(r)) + " |")
        lines += ["", "Over the seeds (config seed and the extra ones): mean (min–max); *steps* against the "
                      "scratch run of the same seed.", "",
                  "| N | run | seeds | " + " | ".join(f"F MAE {short[k]}" for k in sets) + " | " +
                  " | ".join(f"E MAE {short[k]}" for k in sets) + " | steps to scratch's final |",
                  "|---|---|---|" + "---|" * (2 * len(sets) + 1)]
        for n in sorted({n for n, _ in seeded}):
            for v in ("scratch", main):
                group = [r for r in (run(v, n, seed) for seed in [None, *sorted(x for m, x in seeded if m == n)]) if r]
                cells = []
                for metric, digits in (("forces_mae", 1), ("energy_mae_per_atom", 2)):
                    for k in sets:
                        xs = [r["final"][k][metric] for r in group]
                        cells.append(f"{_fmt(float(np.mean(xs)), digits=digits)} ({_fmt(min(xs), digits=digits)}–"
                                     f"{_fmt(max(xs), digits=digits)})")
                steps = ", ".join(reach(r) for r in group)
                lines.append(f"| {n} | {who(v)} | {len(group)} | "
                             + " | ".join(cells) + f" | {steps} |")
    lines += ["", "### All final errors", "",
              "Energy MAE/RMSE per atom (meV/atom), force-component MAE/RMSE (meV/Å), after the last step.", "",
              "| N | run | test set | E MAE | E RMSE | F MAE | F RMSE | steps to scratch's final F MAE |",
              "|---|---|---|---|---|---|---|---|"]
    for n in res["sizes"]:
        for v in ["scratch", *variants]:
            r = run(v, n)
            if not r:
                continue
            for set_name, m in r["final"].items():
                lines.append(f"| {n} | {who(v)} | {set_name} | "
                             f"{_fmt(m['energy_mae_per_atom'])} | {_fmt(m['energy_rmse_per_atom'])} | "
                             f"{_fmt(m['forces_mae'], digits=1)} | {_fmt(m['forces_rmse'], digits=1)} | "
                             f"{reach(r) if set_name == res['target_set'] else '—'} |")
    lines += ["", "### Pre-training runs", "",
              "| variant | description | steps | ranks | wall (s) | first → last loss | demo_metals_test F MAE (meV/Å) "
              "| step-time imbalance (max/mean, mean over logged steps) |",
              "|---|---|---|---|---|---|---|---|"]
    for v in res["variants"]:
        p = res["pretrain"].get(v["name"])
        if not p:
            continue
        metals = p["final"].get("demo_metals_test", {}).get("forces_mae")
        lines.append(f"| {v['name']} | {v.get('description', '')} | {p['steps']} | {p['world_size']} | "
                     f"{p['wall_s']:.0f} | {p.get('first_loss', math.nan):.3f} → {p.get('last_loss', math.nan):.3f} | "
                     f"{_fmt(metals, digits=1)} | {_fmt(p.get('mean_imbalance'), scale=1.0, digits=3)} |")
    probes = sorted({k for p in res["pretrain"].values() for k in p.get("probe", {})})
    if probes:
        lines += ["", "### Pre-trained models on the probe sets, and what their fine-tunes reached", "",
                  "Force MAE (meV/Å) / energy MAE (meV/atom) of each pre-trained model (its own head) on "
                  f"the probe sets; then the {res['target_set']} force MAE of its fine-tune at each N.", "",
                  "| variant | " + " | ".join(probes) + " | " + " | ".join(f"fine-tune F MAE, N={n}" for n in res["sizes"])
                  + " |", "|---|" + "---|" * (len(probes) + len(res["sizes"]))]
        for v in res["variants"]:
            p = res["pretrain"].get(v["name"])
            if not p:
                continue
            cells = [f"{_fmt(p['probe'][k]['forces_mae'], digits=1)} / {_fmt(p['probe'][k]['energy_mae_per_atom'])}"
                     if k in p.get("probe", {}) else "—" for k in probes]
            for n in res["sizes"]:
                r = run(v["name"], n)
                cells.append(_fmt(r["final"][res["target_set"]]["forces_mae"], digits=1) if r else "—")
            lines.append(f"| {v['name']} | " + " | ".join(cells) + " |")
    walls = [r["wall_s"] for r in runs.values() if r.get("wall_s")]
    if walls:
        lines += ["", f"Fine-tune/scratch runs: {len(walls)}, {min(walls):.0f}–{max(walls):.0f} s each "
                      "(one process each, run side by side)."]
    if res.get("clean_total_wall_s"):
        lines.append(f"Whole experiment from a clean start (data, every run, collection): "
                     f"{res['clean_total_wall_s'] / 60:.1f} min wall.")
    return "\n".join(lines) + "\n"


