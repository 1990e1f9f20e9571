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
                               plan_balanced, plan_budget, split_atoms)
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


@pytest.mark.parametrize("strategy", ["fixed", "atoms", "balanced", "budget"])
def test_every_draw_of_the_stream_is_used_exactly_once(mixture, strategy):
    sched = _scheduler(mixture, strategy, ranks=8, batch=16, window=4)
    L = sched.epoch_length
    steps = 4 * (L // (16 * 4) + 2)  # past the end of epoch 0: windows straddle the boundary
    seen = []
    for s in range(steps):
        p = sched.plan(s)
        assert p.counts.min() >= 1, f"step {s}: an empty rank"  # no empty micro-batch, by construction
        if strategy != "budget":
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


@pytest.mark.parametrize("strategy", ["balanced", "budget", "atoms"])
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
    png = tmp_path / "plan.png"
    assert cli(["plan-report", "--ranks", "3", "--steps", "12", "--out", str(png), "--run-dir", str(tmp_path),
                "--json", "data.batch_size=6", "schedule.window_steps=4", *data]) == 0
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


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
