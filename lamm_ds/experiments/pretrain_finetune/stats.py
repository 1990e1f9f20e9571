"""Seed statistics of the finished fine-tunes: paired differences with Student-t intervals, a
ranking of the variants per target, and steps-to-reach summaries; their Markdown tables.

Every final error is keyed by ``(pretrain seed, fine-tuning seed)`` (scratch runs: ``(None, f)``).
A variant is compared with the main one pair by pair on equal keys, and with scratch by pairing its
run ``(s, f)`` with scratch run ``f``. The independent unit is the pre-training seed: the fine-tunes
of one pre-trained model share it, so the differences ``variant - reference`` (positive: the
variant's error is larger) are first averaged over the fine-tuning seeds of each pre-training seed,
and the 95% Student-t interval is taken over the pre-training seeds. With a single pre-training
seed (the older experiment, or a one-seed knob) the interval is over the fine-tuning seeds and says
so: it then leaves pre-training noise out. Against scratch, one scratch run enters the pairs of
every pre-training seed, so that interval is somewhat optimistic. One unit gives no interval.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np

METRICS = ("forces_mae", "energy_mae_per_atom")
LEVEL = 0.95

Key = tuple  # (pretrain seed or None, fine-tuning seed or None)


def t_interval(values: list[float], level: float = LEVEL) -> dict:
    """Mean, sd and the Student-t interval of the mean; n < 2: ``low``/``high`` None, with a note."""
    from scipy.stats import t

    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "low": None, "high": None, "note": "no pairs"}
    mean = float(x.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "sd": None, "low": None, "high": None, "note": "n=1: no interval"}
    sd = float(x.std(ddof=1))
    half = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "low": mean - half, "high": mean + half}


def arm(values: dict[Key, float]) -> dict:
    """Mean ± sd of one arm's runs (sd None for a single run)."""
    x = np.asarray(list(values.values()), dtype=np.float64)
    return {"n": len(x), "mean": float(x.mean()) if len(x) else None,
            "sd": float(x.std(ddof=1)) if len(x) > 1 else None}


def _pairs(a: dict[Key, float], b: dict[Key, float], pair: Callable[[Key], Key]) -> list[tuple[Key, float, float]]:
    return [(k, a[k], b[pair(k)]) for k in sorted(a, key=str) if pair(k) in b]


def _by_pretrain_seed(values: list[tuple[Key, float]]) -> tuple[list[float], str]:
    """The values to take an interval over, and their unit: means per pre-training seed when there
    are several, else the values themselves (over fine-tuning seeds)."""
    groups: dict = {}
    for k, v in values:
        groups.setdefault(k[0], []).append(v)
    if len(groups) > 1:
        return [float(np.mean(g)) for g in groups.values()], "pre-training seeds"
    return [v for _, v in values], "fine-tuning seeds (one pre-training seed)"


def paired_difference(a: dict[Key, float], b: dict[Key, float], pair: Callable[[Key], Key]) -> dict:
    """``a[k] - b[pair(k)]`` over the keys both have, averaged per pre-training seed: :func:`t_interval`
    of those, with ``unit`` and ``pairs`` (runs paired)."""
    pairs = _pairs(a, b, pair)
    values, unit = _by_pretrain_seed([(k, x - y) for k, x, y in pairs])
    return {**t_interval(values), "unit": unit, "pairs": len(pairs)}


def paired_ratio(a: dict[Key, float], b: dict[Key, float], pair: Callable[[Key], Key]) -> dict:
    """Geometric mean of ``a[k] / b[pair(k)]`` (log ratios averaged per pre-training seed), with the
    interval exponentiated from the log scale."""
    pairs = [(k, math.log(x / y)) for k, x, y in _pairs(a, b, pair) if x > 0 and y > 0]
    values, unit = _by_pretrain_seed(pairs)
    logs = t_interval(values)
    exp = (lambda v: None if v is None else math.exp(v))
    return {"n": logs["n"], "ratio": exp(logs["mean"]), "low": exp(logs["low"]), "high": exp(logs["high"]),
            "unit": unit}


def same_key(k: Key) -> Key:
    return k


def scratch_key(k: Key) -> Key:
    return (None, k[1])


def excludes_zero(d: dict) -> Optional[bool]:
    """Whether an interval lies on one side of zero (None: no interval)."""
    if d.get("low") is None:
        return None
    return d["low"] > 0 or d["high"] < 0


# --------------------------------------------------------------------------------------------------
# from the collected runs


def arm_values(runs: dict, variant: str, target: str, size: int, set_name: str, metric: str) -> dict[Key, float]:
    """Final errors of one arm, keyed by (pretrain seed, fine-tuning seed)."""
    out = {}
    for r in runs.values():
        if r["variant"] == variant and r.get("target") == target and r["size"] == size \
                and set_name in r.get("final", {}):
            out[(r.get("pretrain_seed"), r.get("seed"))] = r["final"][set_name][metric]
    return out


def compare(res: dict, main: str) -> dict:
    """``{target: {size: {test set: {metric: {arms, vs_scratch, vs_main}}}}}`` (sizes as strings)."""
    variants = ["scratch", *(v["name"] for v in res["variants"])]
    out: dict = {}
    for t in res["targets"]:
        for n in t["sizes"]:
            for set_name in t["test_sets"]:
                for metric in METRICS:
                    arms = {v: arm_values(res["runs"], v, t["name"], n, set_name, metric) for v in variants}
                    arms = {v: a for v, a in arms.items() if a}
                    if arms:
                        cell = out.setdefault(t["name"], {}).setdefault(str(n), {}).setdefault(set_name, {})
                        cell[metric] = compare_arms(arms, main)
    return out


def compare_arms(arms: dict[str, dict[Key, float]], main: str) -> dict:
    """Each arm's mean ± sd, and its paired differences to scratch and to the main variant."""
    scratch, ref = arms.get("scratch"), arms.get(main)
    return {"arms": {v: arm(a) for v, a in arms.items()},
            "vs_scratch": {v: paired_difference(a, scratch, scratch_key)
                           for v, a in arms.items() if v != "scratch" and scratch},
            "vs_main": {v: paired_difference(a, ref, same_key) for v, a in arms.items()
                        if v not in ("scratch", main) and ref}}


def ranking(stats: dict, targets: list[dict]) -> dict:
    """Per target and size: the arms by mean force MAE on the target set, lowest first, each saying
    whether its difference to the main variant and to scratch excludes zero."""
    out: dict = {}
    for t in targets:
        for size, by_set in stats.get(t["name"], {}).items():
            entry = by_set.get(t["target_set"], {}).get("forces_mae")
            if not entry:
                continue
            rows = [{"variant": v, "mean": a["mean"], "n": a["n"],
                     "vs_main_excludes_zero": excludes_zero(entry["vs_main"].get(v, {})),
                     "vs_scratch_excludes_zero": excludes_zero(entry["vs_scratch"].get(v, {}))}
                    for v, a in entry["arms"].items()]
            out.setdefault(t["name"], {})[size] = {"set": t["target_set"],
                                                   "order": sorted(rows, key=lambda r: r["mean"])}
    return out


def steps_summary(runs: dict) -> dict:
    """Per target, size and variant: median and range of the steps each fine-tune needs to reach its
    scratch pair's final force error, a pair that never gets there counting as infinitely many."""
    groups: dict = {}
    for r in runs.values():
        if r["variant"] != "scratch" and "steps_to_scratch_final" in r:
            s = r["steps_to_scratch_final"]
            groups.setdefault((r.get("target"), r["size"], r["variant"]), []).append(math.inf if s is None else s)
    out: dict = {}
    for (target, size, variant), xs in sorted(groups.items(), key=str):
        out.setdefault(target, {}).setdefault(str(size), {})[variant] = {
            "n": len(xs), "reached": sum(math.isfinite(x) for x in xs), "median": _steps(float(np.median(xs))),
            "min": _steps(min(xs)), "max": _steps(max(xs))}
    return out


def _steps(v: float) -> Optional[float]:
    """A step count for JSON: None for never, an int where whole (a median may fall between two)."""
    if not math.isfinite(v):
        return None
    return int(v) if float(v).is_integer() else float(v)


# --------------------------------------------------------------------------------------------------
# Markdown


def _meV(x: Optional[float], digits: int) -> str:
    return "—" if x is None else f"{1000 * x:.{digits}f}"


def _mean_sd(a: dict, digits: int) -> str:
    if a.get("mean") is None:
        return "—"
    return _meV(a["mean"], digits) + ("" if a.get("sd") is None else f" ± {_meV(a['sd'], digits)}") + f" ({a['n']})"


def _diff(d: Optional[dict], digits: int) -> str:
    if not d or d.get("mean") is None:
        return "—"
    if d["low"] is None:
        return f"{1000 * d['mean']:+.{digits}f} (n={d['n']}, no interval)"
    star = " *" if excludes_zero(d) else ""
    unit = "" if d.get("unit", "").startswith("pre-training") else ", FT seeds"
    return f"{1000 * d['mean']:+.{digits}f} [{1000 * d['low']:+.{digits}f}, {1000 * d['high']:+.{digits}f}] " \
           f"(n={d['n']}{unit}){star}"


def comparison_tables(res: dict, main: str) -> list[str]:
    """One table per target, size and test set: each arm's mean ± sd and its paired differences."""
    lines = ["### Over the seeds: paired differences (95% Student-t intervals)", "",
             "Final errors on the full test sets, mean ± sd (runs) per arm; Δ = arm − reference over paired "
             "runs (vs main: same pre-training and fine-tuning seed; vs scratch: same fine-tuning seed), averaged "
             "over the fine-tuning seeds of each pre-training seed, mean [95% interval] (n pre-training seeds; "
             "'FT seeds': one pre-training seed, the interval is over fine-tuning seeds only); * the interval "
             "excludes zero. F: force MAE (meV/Å), E: energy MAE (meV/atom)."]
    for target, by_size in res.get("stats", {}).items():
        for size, by_set in by_size.items():
            for set_name, m in by_set.items():
                f, e = m.get("forces_mae"), m.get("energy_mae_per_atom")
                lines += ["", f"**{target}, N={size}, {set_name}**", "",
                          "| arm | F | ΔF vs scratch | ΔF vs main | E | ΔE vs scratch | ΔE vs main |",
                          "|---|---|---|---|---|---|---|"]
                for v in f["arms"]:
                    lines.append(f"| {v} | {_mean_sd(f['arms'][v], 1)} | {_diff(f['vs_scratch'].get(v), 1)} | "
                                 f"{_diff(f['vs_main'].get(v), 1)} | {_mean_sd(e['arms'][v], 2)} | "
                                 f"{_diff(e['vs_scratch'].get(v), 2)} | {_diff(e['vs_main'].get(v), 2)} |")
    return lines


def ranking_table(res: dict) -> list[str]:
    def mark(x: Optional[bool]) -> str:
        return "—" if x is None else ("yes" if x else "no")

    lines = ["### Ranking per target (mean force MAE on the target set, lowest first)", "",
             "| target | N | set | rank | arm | F MAE (meV/Å) | runs | Δ vs main excludes 0 "
             "| Δ vs scratch excludes 0 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for target, by_size in res.get("ranking", {}).items():
        for size, r in by_size.items():
            for k, row in enumerate(r["order"], 1):
                lines.append(f"| {target} | {size} | {r['set']} | {k} | {row['variant']} | {_meV(row['mean'], 1)} | "
                             f"{row['n']} | {mark(row['vs_main_excludes_zero'])} | "
                             f"{mark(row['vs_scratch_excludes_zero'])} |")
    return lines


def steps_table(res: dict) -> list[str]:
    def s(x) -> str:
        return "not reached" if x is None else str(x)

    lines = ["### Steps to reach the scratch pair's final force error", "",
             "Per fine-tune, the first evaluated step at which its force MAE on the target set is at or below the "
             "final one of the scratch run with the same fine-tuning seed; median and range over the runs (a run "
             "that never gets there counts as infinitely many steps).", "",
             "| target | N | arm | median | range | reached |", "|---|---|---|---|---|---|"]
    for target, by_size in res.get("steps_summary", {}).items():
        for size, by_v in by_size.items():
            for v, x in by_v.items():
                span = "—" if x["min"] is None else f"{s(x['min'])}–{s(x['max'])}"
                lines.append(f"| {target} | {size} | {v} | {s(x['median'])} | {span} | {x['reached']}/{x['n']} |")
    return lines


def stats_markdown(res: dict, main: str) -> list[str]:
    if not res.get("stats"):
        return []
    return [*comparison_tables(res, main), "", *ranking_table(res), "", *steps_table(res)]
