"""``lamm-ds predict`` (predictions written beside the reference labels) and the per-config_type
errors of ``lamm-ds evaluate``."""

import math

import numpy as np
import pytest
import torch
from ase.io import read, write

from lamm_ds.cli import main as cli_main
from lamm_ds.engine.evaluate import evaluate, load_structures
from lamm_ds.engine.export import export_model, load_model
from faults.test_model_faults import cu_atoms, labelled, run_cli, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def typed_xyz(tmp_path):
    """Five Cu cells of two config_types; one without forces, one without any label."""
    images = []
    for k in range(5):
        a = labelled(cu_atoms(k))
        a.info["config_type"] = "bulk" if k < 3 else "rattled"
        images.append(a)
    path = tmp_path / "typed.xyz"
    write(path, images, format="extxyz")
    return path


def test_evaluate_splits_errors_by_config_type(typed_xyz):
    model = tiny_model(heads=("cu",))
    _, structures = load_structures(typed_xyz)
    res = evaluate(model, structures, head="cu", return_predictions=True)
    preds = res.pop("predictions")
    by = res["by_config_type"]
    assert sorted(by) == ["bulk", "rattled"] and [by[k]["structures"] for k in ("bulk", "rattled")] == [3, 2]
    err = preds["energy_pred"] - preds["energy_true"]
    per_atom = err / preds["natoms"]
    assert by["bulk"]["energy_mae_per_atom"] == pytest.approx(np.mean(np.abs(per_atom[:3])), rel=1e-12)
    assert by["rattled"]["energy_rmse_per_atom"] == pytest.approx(np.sqrt(np.mean(per_atom[3:] ** 2)), rel=1e-12)
    n_bulk = sum(structures[k].natoms for k in range(3)) * 3
    f_err = preds["forces_pred"] - preds["forces_true"]
    assert by["bulk"]["forces_mae"] == pytest.approx(np.mean(np.abs(f_err[:n_bulk])), rel=1e-12)
    assert by["rattled"]["forces_mae"] == pytest.approx(np.mean(np.abs(f_err[n_bulk:])), rel=1e-12)
    assert res["energy_mae"] == pytest.approx(np.mean(np.abs(err)), rel=1e-12)  # the total stays the total


def test_evaluate_cli_prints_the_config_type_table(tmp_path, typed_xyz, capsys):
    model_file = export_model(tiny_model(heads=("cu",)), tmp_path / "m.safetensors")
    rc, out, _ = run_cli(["evaluate", model_file, typed_xyz], capsys)
    assert rc == 0
    assert "config_type" in out and "bulk" in out and "rattled" in out


def test_predict_writes_predictions_beside_references(tmp_path, typed_xyz, capsys):
    model = tiny_model(heads=("cu",))
    model_file = export_model(model, tmp_path / "m.safetensors")
    unlabelled = tmp_path / "bare.xyz"
    write(unlabelled, [cu_atoms(9)], format="extxyz")
    out = tmp_path / "preds.extxyz"
    rc, stdout, _ = run_cli(["predict", model_file, typed_xyz, unlabelled, "--out", out], capsys)
    assert rc == 0 and "wrote 6 structures" in stdout
    frames = read(out, ":")
    src = read(typed_xyz, ":")
    assert len(frames) == 6
    loaded = load_model(model_file)
    _, structures = load_structures(typed_xyz)
    ref = evaluate(loaded, structures, head="cu", return_predictions=True)["predictions"]
    for k, (f, s) in enumerate(zip(frames[:5], src)):
        assert f.info["config_type"] == s.info["config_type"] and f.info["head"] == "cu"
        assert f.info["REF_energy"] == pytest.approx(s.get_potential_energy(), abs=1e-9)
        np.testing.assert_allclose(f.arrays["REF_forces"], s.get_forces(), atol=1e-9)
        np.testing.assert_allclose(f.info["REF_stress"], s.get_stress(), atol=1e-12)  # Voigt, ASE order
        assert f.info["lamm_energy"] == pytest.approx(ref["energy_pred"][k], rel=1e-9, abs=1e-9)
        np.testing.assert_allclose(f.positions, s.positions, atol=1e-9)
    offsets = np.cumsum([0] + [len(f) for f in frames[:5]]) * 3
    np.testing.assert_allclose(np.concatenate([f.arrays["lamm_forces"].reshape(-1) for f in frames[:5]]),
                               ref["forces_pred"][:offsets[-1]], rtol=0, atol=1e-8)  # extxyz's 8 decimals
    bare = frames[5]
    assert "REF_energy" not in bare.info and "REF_forces" not in bare.arrays
    assert math.isfinite(bare.info["lamm_energy"]) and bare.arrays["lamm_forces"].shape == (len(bare), 3)
    # an existing output is kept unless --force
    rc, _, err = run_cli(["predict", model_file, typed_xyz, "--out", out], capsys)
    assert rc == 2 and "already exists; pass --force" in err and len(read(out, ":")) == 6


def test_predict_refuses_non_finite_predictions_and_leaves_nothing(tmp_path, typed_xyz, capsys):
    model = tiny_model(heads=("cu",))
    with torch.no_grad():
        next(p for p in model.parameters() if p.dim() > 1).fill_(float("nan"))
    model_file = export_model(model, tmp_path / "nan.safetensors")
    out = tmp_path / "preds.extxyz"
    rc, _, err = run_cli(["predict", model_file, typed_xyz, "--out", out], capsys)
    assert rc == 2 and "non-finite" in err and "structure 0" in err
    assert not out.exists() and not list(tmp_path.glob(".preds.extxyz.*"))
    rc, _, err = run_cli(["evaluate", model_file, typed_xyz], capsys)
    assert rc == 2 and "non-finite" in err


def test_predict_writes_the_stress_of_stress_models(tmp_path, typed_xyz):
    from lamm_ds.calculator import LammCalculator
    from lamm_ds.engine.predict import predict_to_extxyz
    from lamm_ds.model import DatasetStats, PaiNNConfig, Potential

    torch.manual_seed(0)
    cfg = PaiNNConfig(hidden=16, layers=1, num_rbf=8, cutoff=4.0, max_neighbors=None, max_z=30,
                      forces="conservative", stress=True)
    model = Potential(cfg, ["cu"], {"cu": DatasetStats.identity(30)}).eval()
    model.trained_elements = {"cu": [29]}
    out = tmp_path / "p.extxyz"
    predict_to_extxyz(model, [typed_xyz], out)
    frames = read(out, ":")
    atoms = read(typed_xyz, "0")
    atoms.calc = LammCalculator(model, head="cu")
    np.testing.assert_allclose(frames[0].info["lamm_stress"], atoms.get_stress(), rtol=1e-6, atol=1e-9)
