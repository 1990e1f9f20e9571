"""Results of finished runs: final errors, learning curves, steps to reach the scratch model's final
force error, probes of the pre-trained models, seed statistics (:mod:`.stats`), headline figures and
the Markdown tables (the acac-only form's tables, then the general ones)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np

from lamm_ds.experiments.pretrain_finetune.config import ExperimentConfig, _path
from lamm_ds.experiments.pretrain_finetune.plan import RunSpec
from lamm_ds.experiments.pretrain_finetune.plots import _label
from lamm_ds.experiments.pretrain_finetune.stats import (arm_values, compare, paired_ratio, ranking, same_key,
                                                         scratch_key, stats_markdown, steps_summary)


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


def _targets(cfg: ExperimentConfig) -> list[dict]:
    return [{"name": t.name, "sizes": sorted(t.sizes), "test_sets": t.test_set_names, "curve_sets": t.curve_sets,
             "target_set": t.target_set} for t in cfg.fine_targets]


def _run_entry(spec: RunSpec, status: dict, summary: dict) -> dict:
    entry = {"stage": spec.stage, "variant": spec.variant, "size": spec.size, "seed": spec.seed,
             "pretrain_seed": spec.pretrain_seed, "target": spec.target, "wall_s": status.get("wall_s"),
             "steps": summary["steps"], "world_size": summary["world_size"], "final": summary.get("evaluation", {}),
             "run_dir": str(spec.run_dir)}
    hist = summary.get("history") or []
    if hist:
        entry["first_loss"], entry["last_loss"] = hist[0]["loss"], hist[-1]["loss"]
        entry["last_record"] = {k: v for k, v in hist[-1].items() if k.startswith("dataset/")
                                or k in ("loss", "imbalance", "predicted_imbalance", "busy_imbalance")}
    if spec.stage == "pretrain":
        for key in ("imbalance", "busy_imbalance", "predicted_imbalance"):
            vals = [h[key] for h in hist if h.get(key) is not None]
            entry[f"mean_{key}"] = float(np.mean(vals)) if vals else None
    return entry


def collect(cfg: ExperimentConfig, runs: list[RunSpec], status: dict[str, dict]) -> dict:
    """Final errors, curves, steps-to-reach, timings and seed statistics of every finished run.

    ``pretrain`` is keyed by the run name without ``pretrain_`` (the variant, or ``<variant>_s<seed>``).
    """
    targets = _targets(cfg)
    curve_sets = {t["name"]: t["curve_sets"] for t in targets}
    res: dict = {"named_targets": cfg.named_targets, "targets": targets,
                 "sizes": sorted({n for t in targets for n in t["sizes"]}),
                 "variants": [asdict(v) for v in cfg.variants], "target_set": targets[0]["target_set"],
                 "pretrain": {}, "runs": {}, "status": status}
    for spec in runs:
        if status.get(spec.name, {}).get("state") != "done":
            continue
        entry = _run_entry(spec, status[spec.name], json.loads((spec.run_dir / "summary.json").read_text()))
        if spec.stage == "pretrain":
            entry["probe"] = probe_pretrained(cfg, spec.run_dir)
            res["pretrain"][spec.name.removeprefix("pretrain_")] = entry
        else:
            entry["curve"] = _curve(spec.run_dir, curve_sets[spec.target])
            res["runs"][spec.name] = entry
    res["steps_to_scratch_final"] = _steps_to_scratch(res)
    res["stats"] = compare(res, cfg.main)
    res["ranking"] = ranking(res["stats"], targets)
    res["steps_summary"] = steps_summary(res["runs"])
    return res


def _steps_to_scratch(res: dict) -> dict:
    """Steps each run needs to reach the final force error on its target set of the scratch run with
    the same target, size and fine-tuning seed (stored in the run's entry); returns those of the
    config-seed runs per variant and size (the acac-only form's summary)."""
    target_set = {t["name"]: t["target_set"] for t in res["targets"]}
    scratch = {(r["target"], r["size"], r["seed"]): r for r in res["runs"].values() if r["stage"] == "scratch"}
    reach: dict = {}
    for r in res["runs"].values():
        ts, ref = target_set[r["target"]], scratch.get((r["target"], r["size"], r["seed"]))
        if not ref or ts not in ref.get("curve", {}) or ts not in r.get("curve", {}):
            continue
        target = ref["curve"][ts]["forces_mae"][-1]
        r["steps_to_scratch_final"] = steps_to_reach(r["curve"]["steps"], r["curve"][ts]["forces_mae"], target)
        r["scratch_final_forces_mae"] = target
        if r["seed"] is None and r.get("pretrain_seed") is None:
            reach.setdefault(r["variant"], {})[str(r["size"])] = r["steps_to_scratch_final"]
    return reach


def headline(res: dict, main: str) -> dict:
    """Ratios first (pre-trained / scratch errors; main / each variant with its 95% interval), then
    step speed-ups or steps-to-reach medians, then absolute errors (meV)."""
    ratios, speed, absolute = _legacy_headline(res, main) if not res.get("named_targets") \
        else _target_headline(res, main)
    return {**ratios, **_variant_ratios(res, main), **speed, **absolute}


def _legacy_headline(res: dict, main: str) -> tuple[dict, dict, dict]:
    """The acac-only form's figures: config-seed scratch vs main fine-tune per size and test set."""
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
    return ratios, speed, absolute


def _ratio_items(key: str, r: dict) -> dict:
    ci = None if r["low"] is None else [round(r["low"], 4), round(r["high"], 4)]
    return {key: None if r["ratio"] is None else round(r["ratio"], 4), f"{key}_ci95": ci}


def _target_headline(res: dict, main: str) -> tuple[dict, dict, dict]:
    """Per target and size, on its target set: main / scratch (geometric mean over the seed pairs, 95%
    interval), the median steps to reach scratch's final force error, and the mean errors (meV)."""
    ratios, speed, absolute = {}, {}, {}
    for t in res["targets"]:
        for n in t["sizes"]:
            where = f"{t['name']}_n{n}"
            for metric, key in (("forces_mae", "force_mae"), ("energy_mae_per_atom", "energy_mae")):
                a = arm_values(res["runs"], main, t["name"], n, t["target_set"], metric)
                b = arm_values(res["runs"], "scratch", t["name"], n, t["target_set"], metric)
                if a and b:
                    ratios.update(_ratio_items(f"{key}_ratio_{where}", paired_ratio(a, b, scratch_key)))
                    absolute[f"{key}_{where}_pretrained_meV"] = round(1000 * float(np.mean(list(a.values()))), 3)
                    absolute[f"{key}_{where}_scratch_meV"] = round(1000 * float(np.mean(list(b.values()))), 3)
            s = res["steps_summary"].get(t["name"], {}).get(str(n), {}).get(main)
            if s:
                speed[f"steps_to_scratch_final_median_{where}"] = s["median"]
    return ratios, speed, absolute


def _variant_ratios(res: dict, main: str) -> dict:
    """``main_vs_<variant>_force_mae_ratio_<target>_n<N>``: main / variant force MAE on the target set,
    geometric mean over equal-seed pairs, with its 95% interval (``..._ci95``, None for one pair)."""
    out = {}
    for t in res["targets"]:
        for n in t["sizes"]:
            a = arm_values(res["runs"], main, t["name"], n, t["target_set"], "forces_mae")
            for v in [x["name"] for x in res["variants"] if x["name"] != main]:
                b = arm_values(res["runs"], v, t["name"], n, t["target_set"], "forces_mae")
                r = paired_ratio(a, b, same_key)
                if r["n"]:
                    out.update(_ratio_items(f"{main}_vs_{v}_force_mae_ratio_{t['name']}_n{n}", r))
    return out


def _fmt(x: Optional[float], scale: float = 1000.0, digits: int = 2) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{scale * x:.{digits}f}"


def _legacy_tables(res: dict, main: str) -> list[str]:
    """The acac-only form's tables (config-seed runs by name; the seed controls)."""
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
    return lines


def _all_final_errors(res: dict) -> list[str]:
    """Every fine-tune and scratch run's final errors (the general form's version of that table)."""
    lines = ["### All final errors", "",
             "Energy MAE/RMSE per atom (meV/atom), force-component MAE/RMSE (meV/Å), after the last step; seeds "
             "'—': the config's.", "",
             "| target | N | run | pre-training seed | fine-tuning seed | test set | E MAE | E RMSE | F MAE | F RMSE "
             "| steps to scratch's final F MAE |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    target_set = {t["name"]: t["target_set"] for t in res["targets"]}
    order = {t["name"]: k for k, t in enumerate(res["targets"])}
    arms = ["scratch", *[v["name"] for v in res["variants"]]]
    runs = sorted(res["runs"].values(), key=lambda r: (order.get(r["target"], 0), r["size"], arms.index(r["variant"]),
                                                        str(r.get("pretrain_seed")), str(r.get("seed"))))
    for r in runs:
        s = r.get("steps_to_scratch_final")
        for set_name, m in r["final"].items():
            steps = ("not reached" if s is None else str(s)) if set_name == target_set[r["target"]] else "—"
            seeds = " | ".join("—" if x is None else str(x) for x in (r.get("pretrain_seed"), r.get("seed")))
            lines.append(f"| {r['target']} | {r['size']} | {r['variant']} | {seeds} | {set_name} | "
                         f"{_fmt(m['energy_mae_per_atom'])} | {_fmt(m['energy_rmse_per_atom'])} | "
                         f"{_fmt(m['forces_mae'], digits=1)} | {_fmt(m['forces_rmse'], digits=1)} | {steps} |")
    return lines


def _pretrain_table(res: dict) -> list[str]:
    descriptions = {v["name"]: v.get("description", "") for v in res["variants"]}
    sets = sorted({k for p in res["pretrain"].values() for k in p["final"]})
    lines = ["### Pre-training runs", "",
             "| run | description | steps | ranks | wall (s) | first → last loss | "
             + "".join(f"{k} F MAE (meV/Å) | " for k in sets)
             + "step-time imbalance (max/mean, mean over logged steps) |",
             "|---|---|---|---|---|---|" + "---|" * (len(sets) + 1)]
    for key, p in res["pretrain"].items():
        errors = "".join(f"{_fmt(p['final'].get(k, {}).get('forces_mae'), digits=1)} | " for k in sets)
        imbalance = _fmt(p.get("mean_imbalance"), scale=1.0, digits=3)
        lines.append(f"| {key} | {descriptions.get(p['variant'], '')} | {p['steps']} | {p['world_size']} | "
                     f"{p['wall_s'] or math.nan:.0f} | {p.get('first_loss', math.nan):.3f} → "
                     f"{p.get('last_loss', math.nan):.3f} | {errors}{imbalance} |")
    return lines


def _probe_table(res: dict) -> list[str]:
    probes = sorted({k for p in res["pretrain"].values() for k in p.get("probe", {})})
    if not probes:
        return []
    legacy = not res.get("named_targets")
    sizes = res["sizes"] if legacy else []
    lines = ["### Pre-trained models on the probe sets" + (", and what their fine-tunes reached" if legacy else ""), "",
             "Force MAE (meV/Å) / energy MAE (meV/atom) of each pre-trained model (its own head) on the probe sets"
             + (f"; then the {res['target_set']} force MAE of its fine-tune at each N." if legacy else "."), "",
             "| pre-training | " + " | ".join(probes) + "".join(f" | fine-tune F MAE, N={n}" for n in sizes) + " |",
             "|---|" + "---|" * (len(probes) + len(sizes))]
    for key, p in res["pretrain"].items():
        cells = [f"{_fmt(p['probe'][k]['forces_mae'], digits=1)} / {_fmt(p['probe'][k]['energy_mae_per_atom'])}"
                 if k in p.get("probe", {}) else "—" for k in probes]
        for n in sizes:
            r = res["runs"].get(f"finetune_{key}_n{n}")
            cells.append(_fmt(r["final"][res["target_set"]]["forces_mae"], digits=1) if r else "—")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return lines


def report_markdown(res: dict, main: str) -> str:
    """Tables of the measured results (the reading is written by people, in docs/results.md)."""
    lines = _legacy_tables(res, main) if not res.get("named_targets") else []
    stats = stats_markdown(res, main)
    if stats:
        lines += ([""] if lines else []) + stats
    if res.get("named_targets"):
        lines += ["", *_all_final_errors(res)]
    lines += ["", *_pretrain_table(res)]
    probes = _probe_table(res)
    if probes:
        lines += ["", *probes]
    walls = [r["wall_s"] for r in res["runs"].values() if r.get("wall_s")]
    if walls:
        lines += ["", f"Fine-tune/scratch runs: {len(walls)}, {min(walls):.0f}–{max(walls):.0f} s each "
                      "(one process each, run side by side)."]
    if res.get("clean_total_wall_s"):
        lines.append(f"Whole experiment from a clean start (data, every run, collection): "
                     f"{res['clean_total_wall_s'] / 60:.1f} min wall.")
    return "\n".join(lines).lstrip("\n") + "\n"
