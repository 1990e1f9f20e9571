"""Pieces of the load-balancing benchmarks (bench/balance_replay.py, bench/balance_tta.py,
bench/_mixture.py): the supercell labels of the heavy-tailed mixture are exact, the all-reduce
model, curve interpolation, fit statistics, dataset subsets and model overrides."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import _mixture  # noqa: E402
import _models  # noqa: E402
import balance_replay  # noqa: E402
import balance_tta  # noqa: E402


def test_tiled_supercells_carry_exact_labels():
    """A periodic repeat of a cell: EMT of the supercell equals the tiled labels of the cell."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    cell = bulk("Cu", "fcc", a=3.6, cubic=True) * (1, 1, 2)
    cell.rattle(0.05, seed=3)
    cell.calc = EMT()
    cell.get_potential_energy()
    from ase.calculators.singlepoint import SinglePointCalculator

    labelled = cell.copy()
    labelled.calc = SinglePointCalculator(labelled, energy=cell.get_potential_energy(), forces=cell.get_forces())
    (big,) = _mixture.tile_frames([labelled], seed=0)
    assert len(big) > len(cell) and len(big) % len(cell) == 0
    assert len(big) <= _mixture.SUPERCELL_ATOMS[1]
    ref = big.copy()
    ref.calc = EMT()
    assert big.get_potential_energy() == pytest.approx(ref.get_potential_energy(), rel=1e-9, abs=1e-9)
    np.testing.assert_allclose(big.get_forces(), ref.get_forces(), atol=1e-9)


def test_supercell_repeats_grow_the_shortest_side_within_the_target():
    cell = np.diag([3.0, 6.0, 12.0])
    reps = _mixture.supercell_repeats(cell, 10, target=85)
    assert 10 * np.prod(reps) <= 85
    assert reps == (4, 2, 1)  # lengths 12, 12, 12: compact
    assert _mixture.supercell_repeats(cell, 200, target=100) == (1, 1, 1)  # never shrinks


def test_copy_subset_keeps_records_and_counts(tmp_path, demo_data):
    from lamm_ds.shards import LmdbDataset

    src = LmdbDataset(demo_data["demo_metals"])
    keep = [3, 0, 7]
    out = _mixture.copy_subset(src, keep, tmp_path / "sub")
    sub = LmdbDataset(out)
    assert len(sub) == 3 and sub.manifest["graph"] == src.manifest["graph"]
    np.testing.assert_array_equal(sub.natoms, np.asarray(src.natoms)[keep])
    np.testing.assert_array_equal(sub.nedges, np.asarray(src.nedges)[keep])
    for j, i in enumerate(keep):
        assert sub.raw(j) == src.raw(i)
    sub.verify()


def test_ring_allreduce_model():
    G = 4e6  # bytes
    assert balance_replay.allreduce_seconds(G, 1, 25.0, 10.0) == 0.0
    t = balance_replay.allreduce_seconds(G, 64, 25.0, 10.0)
    assert t == pytest.approx(2 * 63 / 64 * G / 25e9 + 2 * 63 * 10e-6)
    assert balance_replay.allreduce_seconds(G, 256, 25.0, 10.0) > t


def test_fit_quality_and_strategy_labels():
    q = balance_replay.fit_quality([1.0, 2.0, 4.0], [1.0, 2.0, 5.0])
    assert q["worst_rel_err"] == pytest.approx(0.2) and q["n"] == 3 and q["r2"] < 1
    assert balance_replay.fit_quality([1, 2], [1, 2])["r2"] == pytest.approx(1.0)
    assert balance_replay.scheduler_args("balanced_cp") == ("balanced", True)
    assert balance_replay.scheduler_args("max_atoms") == ("max_atoms", False)
    assert balance_tta.schedule_overrides("balanced_cp") == ["schedule.strategy=balanced",
                                                             "schedule.composition_preserving=true"]


def test_summary_keeps_every_rank_only_when_asked():
    t = np.array([[[1.0, 1.2], [3.0, 2.9]]])  # 1 step, 2 ranks, 2 repeats
    r = {"t": t, "pred": np.array([[1.1, 3.3]]), "samples": np.array([5.0]), "atoms": np.array([40.0]),
         "edges": np.array([300.0]), "rank_atoms": np.array([[10.0, 30.0]]), "rank_edges": np.array([[100.0, 200.0]]),
         "rank_graphs": np.array([[4.0, 1.0]]), "rank_model_edges": np.array([[80.0, 150.0]])}
    plain = balance_replay.summarize({"fixed": r}, "min", 0.0, 0.0)["fixed"]
    assert "ranks" not in plain and plain["imbalance_measured"] == pytest.approx(2.9 / 1.95)
    kept = balance_replay.summarize({"fixed": r}, "min", 0.0, 0.0, keep_ranks=True)["fixed"]["ranks"]
    assert kept == {"measured_s": [[1.0, 2.9]], "predicted_s": [[1.1, 3.3]], "atoms": [[10, 30]],
                    "edges": [[100, 200]], "graphs": [[4, 1]], "model_edges": [[80, 150]]}
    json.dumps(kept)  # plain lists, for the result JSON


def test_step_sample_is_one_uniform_step_per_stratum():
    assert balance_replay.step_sample(8, 32, 0, 0) == list(range(8, 40))
    assert balance_replay.step_sample(0, 4, 4, 0) == [0, 1, 2, 3]
    picks = balance_replay.step_sample(0, 32, 4, 1)
    assert len(picks) == 4 and [p // 8 for p in picks] == [0, 1, 2, 3]
    assert picks == balance_replay.step_sample(0, 32, 4, 1)  # seeded
    counts = np.zeros(32)
    for seed in range(2000):
        counts[balance_replay.step_sample(0, 32, 4, seed)] += 1
    assert counts.min() > 0.6 * counts.mean() and counts.max() < 1.4 * counts.mean()  # every step alike
    with pytest.raises(ValueError, match="must divide"):
        balance_replay.step_sample(0, 30, 4, 0)


def test_samples_to_reach_interpolates_between_evaluations():
    s = np.array([0.0, 100.0, 200.0, 300.0])
    v = np.array([1.0, 0.6, 0.4, 0.3])
    assert balance_tta.samples_to_reach(s, v, 0.5) == pytest.approx(150.0)
    assert balance_tta.samples_to_reach(s, v, 0.3) == pytest.approx(300.0)
    assert balance_tta.samples_to_reach(s, v, 0.2) is None
    assert balance_tta.samples_to_reach(s, v, 2.0) == 0.0


def test_eqv2_preset_overrides_build_the_preset():
    from lamm_ds.engine.config import load_config
    from lamm_ds.model.equiformer_v2 import EquiformerV2Config

    cfg = load_config([], _models.model_overrides("eqv2-31m"))
    assert cfg.model_kind == "equiformer_v2" and cfg.equiformer_v2 == EquiformerV2Config.preset("31M")
    assert _models.model_overrides("painn") == []
    with pytest.raises(ValueError, match="known: painn, eqv2-31m"):
        _models.model_overrides("painn-xl")
    with pytest.raises(ValueError, match="unknown mixture"):
        _mixture.resolve_name("oc20")


def test_time_to_accuracy_from_stored_curves_and_new_step_times(tmp_path, capsys):
    """--reanalyse: a finished result's curves with another replay's step times, no training."""
    samples = np.array([0.0, 100.0, 200.0, 300.0])
    curves = {"fixed": {"force_mae": [1.0, 0.8, 0.6, 0.5], "energy_mae_per_atom": [1.0, 0.9, 0.8, 0.7]},
              "balanced": {"force_mae": [1.0, 0.7, 0.5, 0.4], "energy_mae_per_atom": [1.0, 1.0, 0.9, 0.8]},
              "balanced_cp": {"force_mae": [1.0, 0.8, 0.6, 0.51], "energy_mae_per_atom": [1.0, 0.9, 0.8, 0.7]}}
    steps = {"fixed": 0.3, "balanced": 0.1, "balanced_cp": 0.25}
    res = balance_tta.time_to_accuracy(curves, samples, 10, steps)
    # fixed: 30 steps x 0.3 s = 9 s; balanced reaches 0.5 at 200 samples = 20 steps x 0.1 s = 2 s
    assert res["balanced_vs_fixed_time_to_accuracy"] == pytest.approx(4.5)
    assert res["balanced_vs_fixed_throughput"] == pytest.approx(3.0)
    assert res["balanced_vs_fixed_samples_to_target_ratio"] == pytest.approx(200 / 300, abs=1e-4)
    assert res["balanced_cp_vs_fixed_time_to_accuracy"] is None  # never reaches 0.5
    assert res["balanced_cp_vs_fixed_final_force_mae_ratio"] == pytest.approx(1.02)
    old = {"setup": {"plan_ranks": 5, "per_rank": 2}, "curves": curves, "samples": samples.tolist(),
           "balanced_vs_fixed_time_to_accuracy": 99.0, "runs": {"kept": 1}}
    replay = {"models": {"painn": {"configs": {"r5_m2": {"strategies": {
        s: {"step_s_mean": t} for s, t in steps.items()}}}}}, "machine": {"cpu": "x"}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "replay.json").write_text(json.dumps(replay))
    new = balance_tta.reanalyse(tmp_path / "old.json", tmp_path / "replay.json", tmp_path / "new.json")
    assert new["balanced_vs_fixed_time_to_accuracy"] == pytest.approx(4.5) and new["runs"] == {"kept": 1}
    assert json.loads((tmp_path / "new.json").read_text())["reanalysed"]["replay_machine"] == {"cpu": "x"}
    # bad paths or files are usage errors naming them, not tracebacks
    for argv, text in ((["--reanalyse", str(tmp_path / "none.json"), "--replay", str(tmp_path / "replay.json")],
                        "none.json: no such file"),
                       (["--reanalyse", str(tmp_path / "replay.json"), "--replay", str(tmp_path / "replay.json")],
                        "not a finished time-to-accuracy result")):
        with pytest.raises(SystemExit) as exit_info:
            balance_tta.main(argv + ["--out", str(tmp_path / "x.json")])
        assert exit_info.value.code == 2
        assert text in capsys.readouterr().err
