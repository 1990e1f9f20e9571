"""Load-balancing scheduler: cost model fit, exactly-once plans, determinism/resume, memory caps,
balance vs the fixed-count and atoms-only baselines, budget mode, and exact gradients under uneven
per-rank batches in a real 2-rank DeepSpeed run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lamm_ds.engine.data import plan_step
from lamm_ds.mixture import MixtureStream
from lamm_ds.scheduler import (Caps, CostModel, ScheduleError, StepScheduler, builtin_cost_model, fit_cost_model,
                               next_fit_starts, plan_balanced, plan_budget, plan_max_atoms, split_atoms)
from lamm_ds.scheduler.cost import nnls
from lamm_ds.scheduler.partition import slot_loads

REPO = Path(__file__).resolve().parents[1]
COST = CostModel(atoms=4e-5, edges=2.5e-6, graphs=1e-5, const=3e-3)


def _skewed_sizes(n: int, seed: int, kind: str):
    """Per-dataset natoms/nedges: 'slabs' (20-230 atoms, ~45 edges/atom), 'mofs' (50-300, ~28/atom),
    'molecules' (5-60 atoms, fully connected up to ~30/atom)."""
    rng = np.random.default_rng(seed)
    if kind == "slabs":
        a = rng.integers(20, 231, n)
        e = a * rng.integers(40, 51, n)
    elif kind == "mofs":
        a = rng.integers(50, 301, n)
        e = a * rng.integers(20, 36, n)
    else:
        a = rng.integers(5, 61, n)
        e = a * np.minimum(a - 1, rng.integers(20, 31, n))
    return a.astype(np.int64), e.astype(np.int64)


@pytest.fixture(scope="module")
def mixture():
    kinds = ["slabs", "mofs", "molecules"]
    sizes = [300, 40, 500]
    arrays = [_skewed_sizes(n, 11 + i, k) for i, (n, k) in enumerate(zip(sizes, kinds))]
    stream = MixtureStream(sizes, temperature=1.5, seed=7)
    return stream, [a for a, _ in arrays], [e for _, e in arrays]


def _scheduler(mixture, strategy, ranks=8, batch=16, window=4, caps=None, **kw):
    stream, natoms, nedges = mixture
    return StepScheduler(stream, batch, ranks, strategy, COST, natoms, nedges, window_steps=window, caps=caps, **kw)


# --------------------------------------------------------------------------------------------------
# cost model


def test_fit_recovers_coefficients_and_reports_quality():
    rng = np.random.default_rng(0)
    F = np.stack([rng.integers(5, 2000, 60), rng.integers(10, 80000, 60), rng.integers(1, 32, 60)], axis=1)
    true = np.array([4e-5, 2.5e-6, 1e-5, 3e-3])
    t = (np.c_[F, np.ones(60)] @ true) * rng.uniform(0.98, 1.02, 60)
    model, fit = fit_cost_model(F, t)
    np.testing.assert_allclose(model.coefficients, true, rtol=0.15, atol=2e-4)
    assert fit.r2 > 0.99 and fit.max_rel_error < 0.05 and fit.n == 60
    assert "R²" in fit.summary()
    # a coefficient that would come out negative is clamped at 0 (non-negative least squares)
    x = nnls(np.c_[np.arange(1.0, 11), np.ones(10)], 5.0 - 0.1 * np.arange(1.0, 11))
    assert (x >= 0).all() and x[0] == 0
    # timings that do not grow with size (noise around an overhead) are refused with a reason
    with pytest.raises(ValueError, match="show no growth with atoms, edges or graphs"):
        fit_cost_model(F, 0.01 * (1 - 0.05 * (F / F.max(axis=0)).mean(axis=1)))


def test_cost_model_roundtrip_and_builtin(tmp_path):
    path = COST.save(tmp_path / "c.json")
    back = CostModel.load(path)
    np.testing.assert_array_equal(back.coefficients, COST.coefficients)
    assert back.batch_cost(100, 4000, 3) == pytest.approx(4e-3 + 1e-2 + 3e-5 + 3e-3)
    painn = builtin_cost_model()
    assert painn.atoms > 0 and painn.edges > 0 and painn.source == "builtin:painn-demo-cpu"
    with pytest.raises(ValueError, match="must be calibrated"):
        builtin_cost_model("equiformer_v2")
    with pytest.raises(ValueError):
        CostModel(atoms=-1.0, edges=1.0)


# --------------------------------------------------------------------------------------------------
# plans


@pytest.mark.parametrize("strategy", ["fixed", "atoms", "balanced", "budget", "max_atoms", "balanced_cp"])
def test_every_draw_of_the_stream_is_used_exactly_once(mixture, strategy):
    cp = strategy == "balanced_cp"
    sched = _scheduler(mixture, "balanced" if cp else strategy, ranks=8, batch=16, window=4, composition_preserving=cp)
    L = sched.epoch_length
    steps = 4 * (L // (16 * 4) + 2)  # past the end of epoch 0: windows straddle the boundary
    seen = []
    for s in range(steps):
        p = sched.plan(s)
        assert p.counts.min() >= 1, f"step {s}: an empty rank"  # no empty micro-batch, by construction
        if strategy not in ("budget", "max_atoms"):
            assert len(p.positions) == 16  # constant global batch
        seen.append(p.positions)
        # (dataset, index) are the stream's draws at those positions
        for e in np.unique(p.positions // L):
            sel = p.positions // L == e
            k, i = mixture[0].epoch(int(e)).take(p.positions[sel] - e * L)
            np.testing.assert_array_equal(p.ks[sel], k)
            np.testing.assert_array_equal(p.idx[sel], i)
    allpos = np.concatenate(seen)
    np.testing.assert_array_equal(np.sort(allpos), np.arange(steps * 16))


def test_fixed_strategy_is_todays_split(mixture):
    stream = mixture[0]
    sched = _scheduler(mixture, "fixed", ranks=3, batch=9)
    for s in (0, 5, 97):
        epoch, positions, ks, idx = plan_step(stream, sched.epoch_length, s, 9)
        p = sched.plan(s)
        assert p.epoch == epoch
        for r in range(3):
            pos, k, i = p.for_rank(r)
            np.testing.assert_array_equal(pos, positions[r::3])
            np.testing.assert_array_equal(k, ks[r::3])
            np.testing.assert_array_equal(i, idx[r::3])


@pytest.mark.parametrize("strategy", ["balanced", "budget", "atoms", "max_atoms"])
def test_plans_are_deterministic_and_resumable(mixture, strategy):
    a = _scheduler(mixture, strategy, window=4)
    sequential = [a.plan(s) for s in range(12)]
    b = _scheduler(mixture, strategy, window=4)  # a "resumed" process: starts mid-window, jumps around
    for s in (6, 11, 0, 7, 6, 3):
        p, q = sequential[s], b.plan(s)
        for f in ("positions", "ks", "idx", "rank", "predicted"):
            np.testing.assert_array_equal(getattr(p, f), getattr(q, f), err_msg=f"step {s}: {f}")
        assert p.epoch == q.epoch


def test_memory_caps_are_respected(mixture):
    stream, natoms, nedges = mixture
    caps = Caps(atoms=700, edges=24000)
    for strategy in ("balanced", "budget"):
        sched = _scheduler(mixture, strategy, ranks=4, batch=16, window=4, caps=caps)
        for s in range(16):
            p = sched.plan(s)
            a = np.bincount(p.rank, p.natoms, 4)
            e = np.bincount(p.rank, p.nedges, 4)
            assert a.max() <= caps.atoms and e.max() <= caps.edges, (strategy, s, a, e)
    # one sample larger than the cap, or a window that cannot fit: a clear error
    with pytest.raises(ScheduleError, match="max_atoms_per_rank"):
        plan_balanced(np.ones(8), np.array([10] * 7 + [500]), np.ones(8, dtype=int), 2, 2, 4, Caps(atoms=100))
    with pytest.raises(ScheduleError, match="memory caps"):
        plan_balanced(np.ones(8), np.full(8, 90), np.ones(8, dtype=int), 2, 2, 4, Caps(atoms=100))


def _makespans(cost, plan_step_arr, plan_rank, steps, ranks):
    L = slot_loads(cost, plan_step_arr, plan_rank, steps, ranks) + COST.const
    return L.max(1).sum(), L.mean(1).sum()


def test_balanced_beats_fixed_and_atoms_only_on_skewed_sizes(mixture):
    """Small micro-batches (2 per rank) from a mixture of slabs, MOFs and molecules: a per-step
    partition cannot beat the largest draw of the step; the windowed scheduler groups large draws."""
    results = {}
    for strategy in ("fixed", "atoms", "balanced"):
        sched = _scheduler(mixture, strategy, ranks=16, batch=32, window=8)
        L = sched.loads(0, 32)
        results[strategy] = L.max(1).sum()
        perfect = L.mean(1).sum()
    assert results["balanced"] < 0.75 * results["atoms"] < results["fixed"]
    assert results["balanced"] < 1.1 * perfect  # near the perfect-balance limit
    # LPT + refinement on the cost model vs LPT on atoms, one step at a time (no look-ahead):
    # molecules have few edges per atom, so atoms alone misjudge them
    rng = np.random.default_rng(3)
    a_sl, e_sl = _skewed_sizes(48, 1, "slabs")
    a_mo, e_mo = _skewed_sizes(48, 2, "molecules")
    atoms, edges = np.concatenate([a_sl, a_mo]), np.concatenate([e_sl, e_mo])
    perm = rng.permutation(96)
    atoms, edges = atoms[perm], edges[perm]
    cost = COST.sample_costs(atoms, edges)
    ours = plan_balanced(cost, atoms, edges, 1, 8, 96)
    lpt_atoms = split_atoms(atoms, 8)
    m_ours = _makespans(cost, ours.step, ours.rank, 1, 8)[0]
    m_atoms = _makespans(cost, np.zeros(96, dtype=int), lpt_atoms, 1, 8)[0]
    assert m_ours < m_atoms


def test_budget_steps_have_roughly_constant_cost(mixture):
    stream, natoms, nedges = mixture
    sched = _scheduler(mixture, "budget", ranks=4, batch=64, window=8)
    totals, counts = [], []
    for s in range(16):
        p = sched.plan(s)
        totals.append(COST.sample_costs(p.natoms, p.nedges).sum())
        counts.append(len(p.positions))
    totals = np.array(totals)
    assert totals.std() / totals.mean() < 0.05  # roughly constant cost per step ...
    assert max(counts) - min(counts) >= 4  # ... with a variable number of samples
    # and within a step the ranks are balanced
    L = sched.loads(0, 16)
    assert (L.max(1) / L.mean(1)).max() < 1.05


def test_budget_and_balanced_are_exact_partitions_of_the_window():
    rng = np.random.default_rng(5)
    cost = rng.lognormal(0, 1, 60)
    atoms = rng.integers(1, 100, 60)
    edges = atoms * 10
    for plan in (plan_balanced(cost, atoms, edges, 3, 4, 20), plan_budget(cost, atoms, edges, 3, 4)):
        slots = plan.step * 4 + plan.rank
        assert sorted(set(slots.tolist())) == list(range(12))  # every (step, rank) slot used
        assert len(slots) == 60
    bal = plan_balanced(cost, atoms, edges, 3, 4, 20)
    assert np.bincount(bal.step).tolist() == [20, 20, 20]


# --------------------------------------------------------------------------------------------------
# max_atoms (greedy atom-budget packing, batches dealt in turn) and composition-preserving balanced


def test_max_atoms_packs_the_stream_greedily_under_the_smallest_sufficient_budget():
    atoms = np.array([4, 4, 1, 1, 1, 1, 9, 2, 2])
    edges = atoms * 10
    # budget 7 needs 5 batches ([4] [4 1 1 1] [1] [9] [2 2]); 8 gives exactly 4: [4 4] [1 1 1 1] [9] [2 2]
    assert next_fit_starts(atoms.tolist(), 7) == [0, 1, 5, 6, 7]
    p = plan_max_atoms(atoms, edges, steps=2, ranks=2)
    assert p.step.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1]  # batches dealt in turn: slot j = (j // 2, j % 2)
    assert p.rank.tolist() == [0, 0, 1, 1, 1, 1, 0, 1, 1]
    # the dealing order is a permutation of the slots: batch b goes to slot order[b]
    q = plan_max_atoms(atoms, edges, steps=2, ranks=2, order=[3, 0, 2, 1])
    assert (q.step * 2 + q.rank).tolist() == [3, 3, 0, 0, 0, 0, 2, 1, 1]
    # a draw above the budget is a micro-batch of its own, never dropped
    big = plan_max_atoms(np.array([1, 1, 50, 1, 1, 1]), np.ones(6), steps=1, ranks=3)
    assert (big.step * 3 + big.rank).tolist() == [0, 0, 1, 2, 2, 2]


def test_max_atoms_cuts_the_heaviest_batch_when_next_fit_skips_the_count():
    # budget 5 gives 4 batches, 10 (the smallest below 4) gives 2 ([5 5] [5 5]): the first is cut
    p = plan_max_atoms(np.array([5, 5, 5, 5]), np.ones(4), steps=1, ranks=3)
    assert p.rank.tolist() == [0, 1, 2, 2]
    with pytest.raises(ScheduleError, match="cannot give"):
        plan_max_atoms(np.ones(5), np.ones(5), steps=2, ranks=3)
    with pytest.raises(ScheduleError, match="max_atoms_per_rank"):
        plan_max_atoms(np.full(8, 10), np.ones(8), steps=2, ranks=2, caps=Caps(atoms=15))
    with pytest.raises(ValueError, match="permutation"):
        plan_max_atoms(np.ones(4), np.ones(4), steps=1, ranks=2, order=[0, 0])


def test_max_atoms_scheduler_properties(mixture):
    """Each window: W draws in k*R non-empty contiguous batches of the stream, every multi-draw batch
    within the window's budget; no rank balancing (the slowest rank is far from the mean)."""
    stream, natoms, nedges = mixture
    k, R, B = 4, 8, 16
    sched = _scheduler(mixture, "max_atoms", ranks=R, batch=B, window=k)
    again = _scheduler(mixture, "max_atoms", ranks=R, batch=B, window=k)
    imbalance = []
    for w in range(3):
        plans = [sched.plan(w * k + j) for j in range(k)]
        pos = np.concatenate([p.positions for p in plans])
        np.testing.assert_array_equal(np.sort(pos), np.arange(w * k * B, (w + 1) * k * B))
        assert sum(len(p.positions) for p in plans) == k * B and len({len(p.positions) for p in plans}) > 1
        batches = []
        for p in plans:
            assert p.counts.min() >= 1
            for r in range(R):
                sel = np.sort(p.positions[p.rank == r])
                assert (np.diff(sel) == 1).all(), "a micro-batch is a contiguous run of the stream"
                batches.append((int(sel[0]), int(p.natoms[p.rank == r].sum()), int(sel.size)))
            L = p.predicted
            imbalance.append(L.max() / L.mean())
        batches.sort()
        budget = max(a for _, a, n in batches if n > 1)
        # greedy: a batch closed because the next draw did not fit
        for (s0, a0, n0), (s1, a1, n1) in zip(batches, batches[1:]):
            first = int(np.concatenate([p.natoms[p.positions == s1] for p in plans])[0])
            assert a0 + first > budget or n1 == 1 or n0 == 1, (s0, a0, first, budget)
        for j in range(k):
            np.testing.assert_array_equal(plans[j].rank, again.plan(w * k + j).rank)
    assert np.mean(imbalance) > 1.3  # slabs/MOFs vs molecules: atom packing alone does not balance cost


def test_composition_preserving_steps_keep_the_window_mix(mixture):
    stream, natoms, nedges = mixture
    k, R, B = 8, 16, 32  # 2 draws per rank: the regime where balanced groups similar sizes
    cp = _scheduler(mixture, "balanced", ranks=R, batch=B, window=k, composition_preserving=True)
    layered = _scheduler(mixture, "balanced", ranks=R, batch=B, window=k)
    for sched, keeps_mix in ((cp, True), (layered, False)):
        plans = [sched.plan(j) for j in range(k)]
        window_ks = np.concatenate([p.ks for p in plans])
        share = np.bincount(window_ks, minlength=3) / k  # per step, if every step had the window's mix
        dev = max(np.abs(np.bincount(p.ks, minlength=3) - share).max() for p in plans)
        atoms_per_step = [p.natoms.mean() for p in plans]
        assert all(len(p.positions) == B and p.counts.min() >= 1 for p in plans)
        if keeps_mix:
            assert dev <= 1.0 + 1e-9  # each dataset's share, within one draw
            assert np.std(atoms_per_step) / np.mean(atoms_per_step) < 0.1  # random steps of 32: ~0.15
        else:
            assert dev > 2 and np.std(atoms_per_step) / np.mean(atoms_per_step) > 0.3  # size-sorted steps
    # the price: at 2 draws per rank a step cannot beat its largest draw (as per-step LPT cannot);
    # its ranks are still balanced by cost, better than the fixed split, worse than size grouping
    def time(sched):
        return sched.loads(0, 4 * k).max(1).sum()

    fixed, atoms = (_scheduler(mixture, s, ranks=R, batch=B) for s in ("fixed", "atoms"))
    cp_long = _scheduler(mixture, "balanced", ranks=R, batch=B, window=k, composition_preserving=True)
    layered_long = _scheduler(mixture, "balanced", ranks=R, batch=B, window=k)
    assert time(layered_long) < time(cp_long) < time(fixed)
    assert time(cp_long) < 1.1 * time(atoms)
    with pytest.raises(ValueError, match="balanced' only"):
        _scheduler(mixture, "budget", composition_preserving=True)


def test_schedule_config_names_the_known_strategies():
    from lamm_ds.engine.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="max_atoms") as err:
        load_config([], ["schedule.strategy=max_atom"])
    assert all(s in str(err.value) for s in ("fixed", "atoms", "balanced", "budget"))
    assert load_config([], ["schedule.strategy=max_atoms"]).schedule.strategy == "max_atoms"
    with pytest.raises(ConfigError, match="composition_preserving"):
        load_config([], ["schedule.strategy=fixed", "schedule.composition_preserving=true"])
    assert load_config([], ["schedule.strategy=balanced", "schedule.composition_preserving=true"]
                       ).schedule.composition_preserving


def test_engine_trains_with_max_atoms_and_composition_preserving_plans(demo_data, tmp_path):
    """Short in-process runs (one process planning for 4 virtual ranks): the engine takes both new
    plans; a max_atoms step holds a variable number of samples, each window exactly W."""
    from lamm_ds.engine.config import load_config
    from lamm_ds.engine.ds_engine import run

    d = demo_data
    data = (f"data.datasets=[{{name: demo_metals, path: {d['demo_metals']}}}, "
            f"{{name: demo_molecules, path: {d['demo_molecules']}}}]")
    common = [*TINY, data, "data.batch_size=8", "schedule.plan_ranks=4", "schedule.window_steps=2"]
    for name, extra in (("max_atoms", ["schedule.strategy=max_atoms"]),
                        ("cp", ["schedule.strategy=balanced", "schedule.composition_preserving=true"])):
        cfg = load_config([], [*common, *extra, "max_steps=4"])
        run(cfg, tmp_path / name, progress=False)
        recs = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        samples = [round(r["samples_per_s"] * r["step_time_max"]) for r in recs]
        assert len(recs) == 4 and np.isfinite([r["loss"] for r in recs]).all()
        assert samples[0] + samples[1] == samples[2] + samples[3] == 16  # two windows of 2 steps x 8 draws
        if name == "max_atoms":
            assert len(set(samples)) > 1


# --------------------------------------------------------------------------------------------------
# CLI and a real 2-rank run


TINY = ["model.hidden=16", "model.layers=2", "model.num_rbf=8", "model.cutoff=4.0", "model.max_neighbors=12",
        "data.batch_size=6", "log_every=1", "optim.lr=2e-3", "optim.warmup_steps=2", "data.stats_samples=50",
        "faults.collective_timeout_s=60", "checkpoint.every=0"]


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    return env


def test_calibrate_and_plan_report_cli(demo_data, tmp_path, monkeypatch):
    """The CLI plumbing, with the stopwatch replaced by a known cost law, so that the test checks
    that calibrate fits what it timed (a real stopwatch on a loaded 2-core machine is noise)."""
    from lamm_ds.cli import main as cli
    from lamm_ds.engine import schedule

    timed = []

    def fake_timer(model, batch, loss_cfg):
        timed.append(batch.num_edges)
        out = model(batch)  # the batch must still run through the real model and loss
        assert torch.isfinite(out["energy"]).all()
        return 2e-4 * batch.num_atoms + 1e-3 * batch.num_graphs + 5e-3

    monkeypatch.setattr(schedule, "time_micro_batch", fake_timer)
    data = [f"data.demo_dir={demo_data['demo_metals'].parent}"]
    assert cli(["calibrate", "--run-dir", str(tmp_path), "--batches", "8", "--repeats", "2", "--max-graphs", "12",
                "--quiet", *TINY, *data]) == 0
    assert len(timed) == 3 + 2 * 8  # warm-up, then every micro-batch once per repeat
    saved = json.loads((tmp_path / "cost_model.json").read_text())
    coef = saved["coefficients"]
    assert coef["atoms"] == pytest.approx(2e-4, rel=1e-6) and coef["edges"] == pytest.approx(0, abs=1e-12)
    assert coef["graphs"] == pytest.approx(1e-3, rel=1e-4) and coef["const"] == pytest.approx(5e-3, rel=1e-4)
    meta = saved["meta"]
    assert len(meta["micro_batches"]) == 8 and meta["fit"]["max_rel_error"] < 1e-6
    assert meta["edge_basis"][0]["cutoff"] == 6.0 and meta["hardware"]["device"] == "cpu"
    assert meta["hardware"]["cpu"] and meta["hardware"]["cpus"] >= 1  # the machine the fit holds for
    png = tmp_path / "plan.png"
    assert cli(["plan-report", "--ranks", "3", "--steps", "12", "--out", str(png), "--run-dir", str(tmp_path),
                "--json", "data.batch_size=6", "schedule.window_steps=4", *data]) == 0
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_calibrate_caps_micro_batch_atoms(demo_data, monkeypatch):
    """calibrate --max-atoms (default schedule.max_atoms_per_rank) never times a micro-batch above the
    cap, except a single structure larger than the cap on its own."""
    from lamm_ds.engine import schedule
    from lamm_ds.engine.config import load_config

    timed = []

    def fake_timer(model, batch, loss_cfg):
        timed.append((batch.num_atoms, batch.num_graphs))
        return 2e-4 * batch.num_atoms + 1e-3 * batch.num_graphs + 5e-3

    monkeypatch.setattr(schedule, "time_micro_batch", fake_timer)
    cfg = load_config([REPO / "configs" / "demo.yaml"], [*TINY, f"data.demo_dir={demo_data['demo_metals'].parent}",
                                                          "schedule.max_atoms_per_rank=60"])
    _, report = schedule.calibrate(cfg, batches=12, repeats=1, max_graphs=12, seed=3, progress=False)
    assert all(atoms <= 60 or graphs == 1 for atoms, graphs in timed)
    assert max(r["graphs"] for r in report["micro_batches"]) > 1
    _, uncapped = schedule.calibrate(cfg, batches=12, repeats=1, max_graphs=12, seed=3, progress=False,
                                     max_atoms=10**6)
    assert max(r["atoms"] for r in uncapped["micro_batches"]) > 60  # the cap did cut something
    with pytest.raises(ValueError, match="max_atoms"):
        schedule.calibrate(cfg, batches=12, repeats=1, max_atoms=0, progress=False)


def test_calibrate_cli_refuses_a_bad_atom_cap(demo_data, tmp_path, capsys):
    from lamm_ds.cli import main as cli

    out = tmp_path / "cost.json"
    assert cli(["calibrate", "--out", str(out), "--max-atoms", "0", "--batches", "8", "--quiet", *TINY,
                f"data.demo_dir={demo_data['demo_metals'].parent}"]) == 2
    assert "max_atoms must be >= 1, got 0" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing written, not even a temp file


def test_two_ranks_balanced_match_one_process_of_the_same_global_batch(demo_data, tmp_path):
    """Uneven per-rank batches (balanced plan for 2 ranks) on 2 processes vs. the same plan run by
    one process (schedule.plan_ranks=2 concatenates both slots): the universal loss's global
    normalisation makes every step's loss and gradient equal. The learning rate is 0 so that all
    6 steps compare gradients at the same weights (with Adam, float round-off in near-zero gradients
    would otherwise be amplified into different weights after the first step)."""
    script = str(REPO / "launch" / "pretrain.py")
    common = ["--max-steps", "6", "--quiet", *TINY, f"data.demo_dir={demo_data['demo_metals'].parent}",
              "schedule.strategy=balanced", "schedule.window_steps=3", "optim.lr=0.0"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          script, "--run-dir", str(tmp_path / "two"), *common],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-4000:]
    one = subprocess.run([sys.executable, script, "--run-dir", str(tmp_path / "one"), *common, "schedule.plan_ranks=2"],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-4000:]
    recs = {k: [json.loads(x) for x in (tmp_path / k / "metrics.jsonl").read_text().splitlines()] for k in ("one", "two")}
    assert len(recs["one"]) == len(recs["two"]) == 6
    # the per-rank batches really were uneven (different predicted cost on the two ranks)
    assert sum(r["rank0/predicted_s"] != r["rank1/predicted_s"] for r in recs["two"]) >= 3
    for a, b in zip(recs["one"], recs["two"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["samples_per_s"] * a["step_time_max"] == pytest.approx(b["samples_per_s"] * b["step_time_max"])
        for key in ("predicted_imbalance", "busy_imbalance", "allreduce_wait_frac", "rank1/busy_s"):
            assert key in b
    assert len({round(r["loss"], 4) for r in recs["two"]}) == 6  # six different batches
    assert json.loads((tmp_path / "two" / "cost_model.json").read_text())["coefficients"]["edges"] > 0
