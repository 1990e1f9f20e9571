"""The optional separate denoising head (PaiNNConfig.denoise_head): outputs, symmetry, loss routing,
gradient participation, export/load, fine-tuning and a short engine run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule

from lamm_ds.denoise import DenoiseConfig, apply_denoising
from lamm_ds.engine.export import export_model, load_model, read_export_metadata
from lamm_ds.engine.model_init import finetune_force_mode
from lamm_ds.graphs import build_sample, collate
from lamm_ds.loss import LossConfig, universal_loss
from lamm_ds.model import DatasetStats, PaiNNConfig, Potential
from lamm_ds.structure import Structure

MAX_Z = 30
F64 = torch.float64
FORCE_MODES = ["direct", "conservative"]

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(**kw) -> PaiNNConfig:
    return PaiNNConfig(**{**dict(hidden=16, layers=2, num_rbf=8, cutoff=4.0, max_neighbors=None, max_z=MAX_Z), **kw})


def make_model(forces="direct", denoise_head=True, seed=0) -> Potential:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    stats = {n: DatasetStats(rng.normal(-3.0, 1.0, MAX_Z + 1), rng.normal(), 0.5 + rng.random(), 0.5 + rng.random())
             for n in ("A", "B")}
    model = Potential(tiny_cfg(forces=forces, denoise_head=denoise_head), ["A", "B"], stats)
    with torch.no_grad():  # random outputs, so a routing error cannot hide behind a near-zero head
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.double()


def structures(labels=True):
    """A molecule, a periodic cell (both fully labelled) and two unlabelled molecules."""
    rng = np.random.default_rng(0)
    out = []
    for k, name in enumerate(["CH3CH2OH", None, "H2O", "CH4"]):
        if name is None:
            a = bulk("Cu", "fcc", a=3.6, cubic=True)
            a.rattle(0.05, seed=2)
            cell, pbc = a.cell[:], [True] * 3
        else:
            a = molecule(name)
            a.rattle(0.05, seed=k)
            cell, pbc = np.zeros((3, 3)), [False] * 3
        labelled = labels and k < 2
        out.append(Structure(a.numbers, a.positions, cell, pbc,
                             energy=float(rng.normal(-3 * len(a))) if labelled else None,
                             forces=rng.normal(size=(len(a), 3)) if labelled else None))
    return out


def batch_of(sts, rot=None):
    if rot is not None:
        sts = [Structure(s.numbers, s.positions @ rot.T, s.cell @ rot.T, s.pbc,
                         energy=s.energy, forces=s.forces) for s in sts]
    samples = [build_sample(s, 4.0, None, dataset_id=k % 2, sample_id=k, draw_id=k) for k, s in enumerate(sts)]
    return collate(samples, dtype=F64)


def denoised_batch(sts=None):
    batch = apply_denoising(batch_of(sts or structures()), DenoiseConfig(sigma=0.05, seed=1), epoch=0)
    assert batch.is_pseudo.tolist() == [False, False, True, True]
    return batch


def random_rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def head_params(model):
    return {n: p for n, p in model.named_parameters() if n.startswith("denoise_head.")}


def shared_weights(forces):
    """(head-off model, head-on model) with the same weights everywhere but the denoising head."""
    off, on = make_model(forces, denoise_head=False), make_model(forces, seed=1)
    missing, unexpected = on.load_state_dict(off.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("denoise_head.") for k in missing)
    return off, on


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("forces", FORCE_MODES)
def test_head_off_keeps_outputs_and_keys(forces):
    off = make_model(forces, denoise_head=False)
    assert off.denoise_head is None and "denoise_head" not in off.cfg.to_dict()
    assert not any(k.startswith("denoise_head") for k in off.state_dict())
    out = off.eval()(batch_of(structures()))
    assert sorted(out) == ["energy", "energy_scale", "force_scale", "forces"]


@pytest.mark.parametrize("forces", FORCE_MODES)
def test_head_leaves_real_predictions_alone(forces):
    off, on = shared_weights(forces)
    batch = batch_of(structures())
    a, b = off.eval()(batch), on.eval()(batch)
    assert set(b) - set(a) == {"pseudo_forces"}
    assert b["pseudo_forces"].shape == (batch.num_atoms, 3) and b["pseudo_forces"].dtype == F64
    with torch.no_grad():
        assert not on(batch)["pseudo_forces"].requires_grad
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-12)
    assert set(on.state_dict()) - set(off.state_dict()) == {f"denoise_head.{k}" for k in on.denoise_head.state_dict()}


@pytest.mark.parametrize("forces", FORCE_MODES)
def test_pseudo_forces_rotate_with_the_structure(forces):
    model = make_model(forces).eval()
    rot = random_rotation(5)
    p0 = model(batch_of(structures()))["pseudo_forces"]
    p1 = model(batch_of(structures(), rot))["pseudo_forces"]
    assert p0.abs().max() > 1e-3
    torch.testing.assert_close(p1, p0 @ torch.as_tensor(rot.T), rtol=1e-9, atol=1e-9)


def _loss_grads(model, batch, **weights):
    model.train().zero_grad()
    loss, metrics = universal_loss(model(batch), batch, LossConfig(**weights))
    loss.backward()
    # a 0-weight term is left out of the loss, so parameters only it reaches have no gradient
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}, metrics


@pytest.mark.parametrize("forces", FORCE_MODES)
def test_pseudo_term_uses_the_head(forces):
    off, on = shared_weights(forces)
    batch = denoised_batch()
    only_pseudo = dict(energy_weight=0.0, force_weight=0.0, pseudo_force_weight=1.0)
    g_on, m_on = _loss_grads(on, batch, **only_pseudo)
    g_off, _ = _loss_grads(off, batch, **only_pseudo)
    assert all(g_on[n].abs().sum() > 0 for n in head_params(on))
    if forces == "direct":  # the real force head no longer sees the pseudo labels
        assert all(g_on[n].abs().sum() == 0 for n in g_on if n.startswith("force_head."))
        assert all(g_off[n].abs().sum() > 0 for n in g_off if n.startswith("force_head."))
    # the term and its metric compare the head's output, unnormalised, with the labels
    with torch.no_grad():
        out = on.eval()(batch)
        sel = batch.is_pseudo[batch.batch] & ~batch.fixed
        err = out["pseudo_forces"][sel] - batch.forces[sel]
    torch.testing.assert_close(m_on["loss_pseudo"], err.norm(dim=-1).mean())
    torch.testing.assert_close(m_on["pseudo_force_mae"], err.abs().mean())

    # real labels only: the head gets exact zeros, everything else the head-off model's gradient
    real = dict(energy_weight=1.0, force_weight=10.0, pseudo_force_weight=0.0)
    g_on, m_on = _loss_grads(on, batch, **real)
    g_off, m_off = _loss_grads(off, batch, **real)
    for n, g in g_on.items():
        if n.startswith("denoise_head."):
            assert torch.count_nonzero(g) == 0
        else:
            torch.testing.assert_close(g, g_off[n], rtol=1e-10, atol=1e-12)
    for k in ("loss", "loss_energy", "loss_force", "force_mae"):
        torch.testing.assert_close(m_on[k], m_off[k], rtol=1e-12, atol=1e-12)


def test_head_takes_part_without_pseudo_graphs():
    """No pseudo-labelled graph on this rank: every parameter still gets a (zero) gradient, so
    ZeRO/DDP ranks reduce the same set of gradients."""
    model = make_model("conservative")
    batch = batch_of(structures()[:2])
    assert not batch.is_pseudo.any()
    for weight in (1.0, 0.0):
        grads, metrics = _loss_grads(model, batch, pseudo_force_weight=weight)
        assert all(p.grad is not None for p in model.parameters())
        assert all(torch.count_nonzero(grads[n]) == 0 for n in head_params(model))
        assert metrics["loss_pseudo"] == 0 and metrics["pseudo_force_mae"] == 0


@pytest.mark.parametrize("forces", FORCE_MODES)
def test_export_round_trip_keeps_the_head(forces, tmp_path):
    model = make_model(forces).eval()
    path = export_model(model, tmp_path / "m.safetensors")
    assert json.loads(read_export_metadata(path)["model_config"])["denoise_head"] is True
    loaded = load_model(path)
    assert loaded.cfg.denoise_head and loaded.denoise_head is not None
    batch = batch_of(structures())
    a, b = model(batch), loaded(batch)
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k].double(), a[k], rtol=1e-5, atol=1e-6)  # the export is fp32


def test_old_config_without_the_key_loads(tmp_path):
    old = tiny_cfg().to_dict()
    assert "denoise_head" not in old  # what exports written before the option looked like
    assert PaiNNConfig.from_dict(old).denoise_head is False
    model = make_model(denoise_head=False).eval()
    path = export_model(model, tmp_path / "old.safetensors")
    assert "denoise_head" not in json.loads(read_export_metadata(path)["model_config"])
    loaded = load_model(path)
    assert loaded.denoise_head is None and "pseudo_forces" not in loaded(batch_of(structures()))


def test_force_mode_switch_at_finetune_keeps_the_head():
    model = make_model("direct").float()
    switched = finetune_force_mode(model, "conservative", "test", rank=1)
    assert switched.cfg.denoise_head and switched.force_head is None
    for n, p in head_params(switched).items():
        torch.testing.assert_close(p, model.state_dict()[n])


def test_evaluation_and_calculator_ignore_the_head():
    import warnings

    from lamm_ds.calculator import LammCalculator
    from lamm_ds.engine.evaluate import evaluate

    off, on = shared_weights("conservative")
    sts = structures()[:2]
    a, b = evaluate(off, sts, head="A"), evaluate(on, sts, head="A")
    assert a.keys() == b.keys() and all(np.isclose(a[k], b[k], rtol=1e-10) for k in a)
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model in (off, on):
            atoms = molecule("CH3CH2OH")
            atoms.calc = LammCalculator(model, head="A", device="cpu", dtype=F64)
            atoms.get_forces()
            results.append(atoms.calc.results)
    assert results[0].keys() == results[1].keys() == {"energy", "free_energy", "forces"}
    for k in results[0]:
        np.testing.assert_allclose(results[1][k], results[0][k], rtol=1e-10, atol=1e-12)


def test_equiformer_v2_has_no_denoise_head_option():
    from lamm_ds.model.equiformer_v2 import EquiformerV2Config

    with pytest.raises(ValueError, match="denoise_head"):
        EquiformerV2Config.from_dict({"denoise_head": True})


def test_pretrain_and_finetune_runs_with_the_head(demo_data, tmp_path):
    """3 engine steps with unlabelled molecules, then a fine-tune without any: the head is kept,
    takes part in every step (zero gradients), and so comes out of the fine-tune unchanged."""
    from lamm_ds.engine.config import load_config
    from lamm_ds.engine.ds_engine import run

    tiny = ["model.hidden=16", "model.layers=2", "model.num_rbf=8", "model.cutoff=4.0", "model.max_neighbors=12",
            "data.batch_size=6", "log_every=1", "optim.lr=2e-3", "optim.warmup_steps=1", "data.stats_samples=50",
            "checkpoint.every=0", "max_steps=3"]
    datasets = (f"data.datasets=[{{name: demo_metals, path: {demo_data['demo_metals']}}}, "
                f"{{name: demo_molecules, path: {demo_data['demo_molecules']}}}]")
    summary = run(load_config([], [*tiny, datasets, "model.denoise_head=true"]), tmp_path / "pre", progress=False)
    assert np.isfinite([h["loss"] for h in summary["history"]]).all()
    assert any(h.get("dataset/pseudo_force_mae/demo_molecules", 0) > 0 for h in summary["history"])
    pre = load_model(summary["model_path"])
    assert pre.cfg.denoise_head

    metals = f"data.datasets=[{{name: demo_metals, path: {demo_data['demo_metals']}}}]"
    summary = run(load_config([], [*tiny, metals, f"finetune.init={summary['model_path']}", "finetune.forces=direct"]),
                  tmp_path / "ft", progress=False)
    ft = load_model(summary["model_path"])
    assert ft.cfg.denoise_head
    for n, p in head_params(pre).items():
        torch.testing.assert_close(head_params(ft)[n], p, rtol=0, atol=0)
    assert any((ft.state_dict()[k] != v).any() for k, v in pre.state_dict().items() if k.startswith("backbone."))
