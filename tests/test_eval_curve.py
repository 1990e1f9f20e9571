"""Evaluation during training (learning curves): prepared sets, eval_curve.jsonl, one and two ranks."""

import json

import numpy as np
import pytest

from lamm_ds.engine.config import ConfigError, DatasetConfig, load_config
from lamm_ds.engine.evaluate import evaluate, load_structures, prepare_eval_sets, read_curve
from lamm_ds.engine.ds_engine import run
from lamm_ds.engine.model_init import build_model
from lamm_ds.engine.data import open_datasets

TINY = ["model.hidden=16", "model.layers=2", "model.num_rbf=8", "model.cutoff=4.0", "model.max_neighbors=12",
        "data.batch_size=6", "log_every=1", "optim.lr=2e-3", "optim.warmup_steps=2", "data.stats_samples=50"]


def _cfg(demo, *extra):
    return load_config(["configs/demo.yaml"], [*TINY, f"data.demo_dir={demo['demo_metals'].parent}", *extra])


def test_prepared_sets_give_the_same_errors_and_a_fixed_even_subset(demo_data):
    cfg = _cfg(demo_data)
    model = build_model(cfg, open_datasets(cfg.data.datasets))
    entry = DatasetConfig(name="demo_metals_test", path=str(demo_data["demo_metals_test"]), head="demo_metals")
    full, = prepare_eval_sets([entry], model.cfg.cutoff, model.cfg.max_neighbors)
    _, structures = load_structures(entry.path)
    direct = evaluate(model, structures, head="demo_metals")
    prepared = full.evaluate(model, batch_size=16)
    for k in ("energy_mae", "energy_rmse_per_atom", "forces_mae", "forces_rmse"):
        assert prepared[k] == pytest.approx(direct[k], rel=1e-6), k
    sub, = prepare_eval_sets([entry], model.cfg.cutoff, model.cfg.max_neighbors, max_structures=5)
    n = len(structures)
    expected = np.unique(np.linspace(0, n - 1, 5).round().astype(int))
    assert [s.positions.tolist() for s in sub.structures] == [structures[int(k)].positions.tolist() for k in expected]
    assert sub.evaluate(model)["structures"] == 5
    other = load_config(["configs/demo.yaml"], [*TINY, "model.cutoff=3.0",
                                                f"data.demo_dir={demo_data['demo_metals'].parent}"])
    with pytest.raises(ValueError, match="prepared at cutoff 4.0"):
        sub.evaluate(build_model(other, open_datasets(other.data.datasets)))


def test_eval_every_needs_eval_sets_and_sane_values():
    with pytest.raises(ConfigError, match="eval_every=5 needs eval_datasets"):
        load_config([], ["eval_every=5"])
    with pytest.raises(ConfigError, match="must be >= 0"):
        load_config([], ["eval_max_structures=-1"])


def test_single_process_curve_ends_at_the_final_evaluation(demo_data, tmp_path):
    cfg = _cfg(demo_data, "max_steps=5", "eval_every=2")
    res = run(cfg, tmp_path / "run", progress=False)  # the engine in this process: one rank
    points = read_curve(tmp_path / "run" / "eval_curve.jsonl")
    assert [p["step"] for p in points] == [0, 2, 4, 5]
    last = points[-1]["demo_metals_test"]
    final = res["evaluation"]["demo_metals_test"]
    for k in ("energy_mae_per_atom", "forces_mae", "forces_rmse"):
        assert last[k] == pytest.approx(final[k], rel=1e-5), k
    # the model changes between points: the curve is not a constant
    assert points[0]["demo_metals_test"]["forces_mae"] != last["forces_mae"]
    tags = _tb_tags(tmp_path / "run" / "tb")
    assert "curve/demo_metals_test/forces_mae" in tags


def _tb_tags(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def test_deepspeed_engine_records_the_curve_on_two_ranks(demo_data, tmp_path):
    from test_deepspeed import _run

    run_dir = tmp_path / "ds"
    _run(["--max-steps", "4"], run_dir, demo_data, "eval_every=2", "eval_max_structures=6",
         "checkpoint.every=0", launcher="torchrun")
    points = read_curve(run_dir / "eval_curve.jsonl")
    assert [p["step"] for p in points] == [0, 2, 4]
    assert all(p["demo_metals_test"]["structures"] == 6 for p in points)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert "curve/demo_metals_test/forces_mae" in _tb_tags(run_dir / "tb")


def test_eval_every_is_refused_clearly_at_zero3(demo_data, tmp_path):
    from test_deepspeed import _run

    proc = _run(["--max-steps", "2"], tmp_path / "z3", demo_data, "eval_every=1", "model.forces=direct",
                "deepspeed_config=ds_configs/zero3_fp32.json", check=False)
    assert proc.returncode != 0
    assert "ZeRO stage 3" in proc.stderr and "eval_every=1" in proc.stderr
