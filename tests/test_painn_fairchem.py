"""fairchem 1.x PaiNN checkpoints: the ``painn_fairchem`` model kind and its converter.

The parity tests build fairchem's own PaiNN (monolithic and hydra) with random weights and fitted
scale factors, run it through its own graph generation (``radius_graph_pbc`` with a binding
neighbour cap, then its edge symmetrisation), and compare with the converted model on lamm-ds's
graph. They skip without fairchem-core 1.x; the CPU tests below them run everywhere.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule

from fairchem_shim import fairchem_batch, fairchem_denormalised, fp64_geometry_on_fairchems_graph, import_fairchem_painn
from lamm_ds.graphs import build_sample, collate
from lamm_ds.model.convert_fairchem import ConversionError, convert_checkpoint
from lamm_ds.model.heads import DatasetStats
from lamm_ds.model.painn_fairchem import FairchemPaiNNConfig, FairchemPaiNNPotential, mirrored_half
from lamm_ds.model.so3 import float64_default
from lamm_ds.structure import Structure

F64 = torch.float64
# small, with a neighbour cap that binds on the cells below (42 neighbours within 5 Å in fcc Cu)
FC_TINY = dict(hidden_channels=16, num_layers=3, num_rbf=8, cutoff=5.0, max_neighbors=8, num_elements=83)
SCALES = (0.75, 1.25, 0.875)  # exact in fp32, as a checkpoint's are
E_MEAN, E_STD, F_STD = -0.75, 2.5, 1.7


def _cells() -> list:
    cells = []
    for k, (symbol, a) in enumerate((("Cu", 3.61), ("Al", 4.05))):
        atoms = bulk(symbol, "fcc", a=a, cubic=True) * (2, 1, 1)
        atoms.rattle(0.05, seed=k + 1)    # no exact distance ties: the strict cap then keeps the same neighbours
        atoms.cell[0, 1] += 0.3           # a sheared cell
        cells.append(atoms)
    return cells


def _molecules() -> list:
    out = []
    for k, name in enumerate(("CH3COCH3", "C6H6")):
        atoms = molecule(name)
        atoms.rattle(0.02, seed=k)
        out.append(atoms)
    return out


def _structure(atoms) -> Structure:
    return Structure(atoms.numbers, atoms.positions, np.asarray(atoms.cell[:]), atoms.pbc)


def _random_weights(*modules, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
            m.eval()


def _fairchem_models(layout: str):
    PaiNN, Backbone, EnergyHead, ForceHead = import_fairchem_painn()
    if layout == "monolithic":
        net = PaiNN(**FC_TINY, use_pbc=True, otf_graph=True)
        parts = [net]
    else:
        net = Backbone(**FC_TINY, use_pbc=True, otf_graph=True)
        parts = [net, EnergyHead(net), ForceHead(net)]
    _random_weights(*parts)
    parts = [m.double() for m in parts]    # built in fp32 like every real checkpoint, evaluated in fp64
    fp64_geometry_on_fairchems_graph(net)
    for k, s in enumerate(SCALES):
        getattr(net, f"upd_out_scalar_scale_{k}").scale_factor.fill_(s)
    return parts


def _fairchem_predict(parts, layout, data):
    """fairchem's raw (normalised) energy and forces."""
    with torch.no_grad():
        if layout == "monolithic":
            out = parts[0](data)
            return out["energy"], out["forces"]
        emb = parts[0](data)
        return parts[1](data, emb)["energy"], parts[2](data, emb)["forces"]


def _checkpoint(parts, layout, ema=None) -> dict:
    config_kw = {**FC_TINY, "use_pbc": True, "otf_graph": True}
    if layout == "monolithic":
        state = {f"module.{k}": v.clone() for k, v in parts[0].state_dict().items()}
        config = {"model": "painn", "model_attributes": config_kw}
    else:
        state = {**{f"module.backbone.{k}": v.clone() for k, v in parts[0].state_dict().items()},
                 **{f"module.output_heads.energy.{k}": v.clone() for k, v in parts[1].state_dict().items()},
                 **{f"module.output_heads.forces.{k}": v.clone() for k, v in parts[2].state_dict().items()}}
        config = {"model": {"name": "hydra", "backbone": {"model": "painn_backbone", **config_kw},
                            "heads": {"energy": {"module": "painn_energy_head"},
                                      "forces": {"module": "painn_force_head"}}}}
    elementref = torch.zeros(100, dtype=F64)
    elementref[[1, 6, 13, 29]] = torch.tensor([-13.6, -1030.0, -5.3, -3.7], dtype=F64)
    ckpt = {"state_dict": state, "config": config,
            "normalizers": {"energy": {"mean": torch.tensor(E_MEAN), "rmsd": torch.tensor(E_STD)},
                            "forces": {"mean": torch.tensor(0.0), "rmsd": torch.tensor(F_STD)}},
            "elementrefs": {"energy": {"element_references": elementref}}}
    if ema is not None:
        ckpt["ema"] = ema.state_dict()
        ckpt["config"]["optim"] = {"ema_decay": 0.999}
    return ckpt


def _ours(model, frames):
    b = collate([build_sample(_structure(a), model.cfg.cutoff, model.cfg.max_neighbors,
                              strict=model.cfg.max_neighbors_strict) for a in frames], dtype=F64)
    with torch.no_grad():
        return model(b), b


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("layout", ["monolithic", "hydra"])
def test_fairchem_painn_parity_on_cells_and_molecules(layout, tmp_path):
    """The converted model predicts what fairchem's PaiNN predicts, denormalised, through the
    exported file and the CLI, on sheared periodic cells where the neighbour cap binds and on molecules."""
    from lamm_ds.cli import main as cli_main
    from lamm_ds.engine.export import load_model

    parts = _fairchem_models(layout)
    ckpt = _checkpoint(parts, layout)
    with float64_default():
        torch.save(ckpt, tmp_path / "painn.pt")
        expected = {}
        for periodic, frames in ((True, _cells()), (False, _molecules())):
            data = fairchem_batch(frames)
            e_raw, f_raw = _fairchem_predict(parts, layout, data)
            # fairchem's own denormalisation: its Normalizer, then its LinearReferences
            e_fc = fairchem_denormalised(ckpt, "energy", e_raw, data)
            f_fc = fairchem_denormalised(ckpt, "forces", f_raw, data)
            expected[periodic] = (frames, e_fc, f_fc, e_raw, f_raw)
    assert cli_main(["convert-fairchem", str(tmp_path / "painn.pt"), str(tmp_path / "painn.safetensors"),
                     "--dataset", "oc20"]) == 0
    model = load_model(tmp_path / "painn.safetensors").double()
    assert model.model_kind == "painn_fairchem" and model.dataset_names == ["oc20"]
    raw = convert_checkpoint(ckpt, "x", dtype=F64)
    for h in raw.heads.values():   # the network's own outputs too (the references dominate the energies)
        h.stats = type(h.stats)(DatasetStats.identity(raw.cfg.max_z), raw.cfg.max_z)
        h.offset.energy_offset.zero_()
    for periodic, (frames, e_fc, f_fc, e_raw, f_raw) in expected.items():
        out, _ = _ours(model, frames)
        assert ((out["energy"] - e_fc).abs() / e_fc.abs()).max() < 1e-6, periodic
        assert _rel(out["forces"], f_fc) < 1e-5, periodic
        r, _ = _ours(raw, frames)
        # converted in memory in fp64: agreement to rounding (measured ~1e-15)
        assert ((r["energy"] - e_raw).abs() / e_raw.abs()).max() < 1e-10, (periodic, r["energy"], e_raw)
        assert ((r["forces"] - f_raw).norm(dim=1) / f_raw.norm(dim=1)).max() < 1e-10, periodic


def test_fairchem_painn_parity_fails_without_the_edge_mirroring_or_the_scales():
    """The parity above can fail: without fairchem's one-direction-then-mirror edges (where the cap
    binds) or without the fitted scale factors, the predictions differ."""
    import lamm_ds.model.painn_fairchem as pf

    parts = _fairchem_models("monolithic")
    ckpt = _checkpoint(parts, "monolithic")
    with float64_default():
        frames = _cells()
        e_raw, f_raw = _fairchem_predict(parts, "monolithic", fairchem_batch(frames))
    model = convert_checkpoint(ckpt, "x", dtype=F64)
    out, _ = _ours(model, frames)
    assert _rel(out["forces"], F_STD * f_raw) < 1e-5
    original = pf.mirrored_half
    try:
        pf.mirrored_half = lambda edge_index, shifts, vectors: (edge_index, vectors)
        assert _rel(_ours(model, frames)[0]["forces"], F_STD * f_raw) > 1e-3
    finally:
        pf.mirrored_half = original
    model.backbone.scales.scale.fill_(1.0)
    assert _rel(_ours(model, frames)[0]["forces"], F_STD * f_raw) > 1e-3


@pytest.mark.parametrize("layout", ["monolithic", "hydra"])
def test_fairchem_painn_ema_weights_are_fairchems_own(layout):
    """The converter's EMA weights are exactly what fairchem's ExponentialMovingAverage copies into
    the model for prediction; the (non-trainable) scale factors are not part of it."""
    import_fairchem_painn()
    from fairchem.core.modules.exponential_moving_average import ExponentialMovingAverage

    parts = _fairchem_models(layout)
    with float64_default():
        params = [p for m in parts for p in m.parameters()]
        ema = ExponentialMovingAverage(params, 0.999)
        with torch.no_grad():
            for s in ema.shadow_params:
                s.add_(0.05 * torch.randn_like(s))
        ckpt = _checkpoint(parts, layout, ema=ema)
        frames = _cells()
        ema.copy_to(params)
        e_raw, f_raw = _fairchem_predict(parts, layout, fairchem_batch(frames))
    model = convert_checkpoint(ckpt, "x", dtype=F64)
    assert model.weights_source == "ema"
    out, _ = _ours(model, frames)
    assert _rel(out["forces"], F_STD * f_raw) < 1e-5
    raw = convert_checkpoint(ckpt, "x", dtype=F64, weights="raw")
    assert raw.weights_source == "raw" and _rel(_ours(raw, frames)[0]["forces"], F_STD * f_raw) > 1e-3


def test_scale_factors_from_the_checkpoint_or_a_scale_file(tmp_path):
    """fairchem's rules for the scale factors: the state_dict's, a checkpoint scale_dict overriding
    them; unfitted factors with a scale_file named in the config need that file."""
    parts = _fairchem_models("hydra")
    ckpt = _checkpoint(parts, "hydra")
    fitted = convert_checkpoint(ckpt, "x")
    torch.testing.assert_close(fitted.backbone.scales.scale, torch.tensor(SCALES, dtype=torch.float32))
    assert fitted.scale_source == "state_dict"
    unfitted = {**ckpt, "state_dict": {k: (torch.zeros_like(v) if k.endswith("scale_factor") else v)
                                       for k, v in ckpt["state_dict"].items()}}
    assert torch.equal(convert_checkpoint(unfitted, "x").backbone.scales.scale, torch.ones(3))  # unfitted = identity
    named = {**unfitted, "config": json.loads(json.dumps(unfitted["config"]))}
    named["config"]["model"]["backbone"]["scale_file"] = "configs/s2ef/all/painn/painn_nb6_scaling_factors.pt"
    with pytest.raises(ConversionError, match="scale factors are unfitted but its config names scale_file"):
        convert_checkpoint(named, "x")
    scale_json = tmp_path / "scales.json"
    scale_json.write_text(json.dumps({"comment": "painn", **{f"upd_out_scalar_scale_{k}": s
                                                             for k, s in enumerate(SCALES)}}))
    from_file = convert_checkpoint(named, "x", scale_file=scale_json)
    torch.testing.assert_close(from_file.backbone.scales.scale, fitted.backbone.scales.scale)
    overridden = {**unfitted, "scale_dict": {f"backbone.upd_out_scalar_scale_{k}": s for k, s in enumerate(SCALES)}}
    result = convert_checkpoint(overridden, "x")
    torch.testing.assert_close(result.backbone.scales.scale, fitted.backbone.scales.scale)
    assert result.scale_source == "the checkpoint's scale_dict"
    scale_json.write_text(json.dumps({"upd_out_scalar_scale_7": 1.0}))
    with pytest.raises(ConversionError, match="scale factor 'upd_out_scalar_scale_7' is not one of PaiNN's"):
        convert_checkpoint(named, "x", scale_file=scale_json)


# -- without fairchem ----------------------------------------------------------------------------


def _tiny(**kw) -> FairchemPaiNNPotential:
    torch.manual_seed(0)
    cfg = FairchemPaiNNConfig(hidden=16, layers=2, num_rbf=8, cutoff=5.0, max_neighbors=8, **kw)
    stats = DatasetStats(np.linspace(-3.0, 0.0, cfg.max_z + 1), energy_mean=0.1, energy_std=1.3, force_std=0.8)
    model = FairchemPaiNNPotential(cfg, ["a"], {"a": stats}).double()
    with torch.no_grad():
        model.backbone.scales.scale.copy_(torch.tensor([0.8, 1.2]))
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _fairchem_state(model: FairchemPaiNNPotential) -> dict:
    """Our weights under fairchem's monolithic key names (the converter's inverse)."""
    state = {}
    for key, value in model.state_dict().items():
        if key == "backbone.embedding.weight":
            state["atom_emb.embeddings.weight"] = value[1:]
        elif key.startswith("backbone.messages."):
            state["message_layers." + key[len("backbone.messages."):]] = value
        elif key.startswith("backbone.updates."):
            state["update_layers." + key[len("backbone.updates."):]] = value
        elif key.startswith("heads.a.mlp."):
            state["out_energy." + key[len("heads.a.mlp."):]] = value
        elif key.startswith("force_head."):
            state["out_forces." + key[len("force_head."):]] = value
    for k, s in enumerate(model.backbone.scales.scale):
        state[f"upd_out_scalar_scale_{k}.scale_factor"] = s.clone()
    state["radial_basis.rbf.offset"] = torch.linspace(0, 1, model.cfg.num_rbf)
    return state


def _mono_ckpt(model) -> dict:
    cfg = model.cfg
    return {"state_dict": {f"module.{k}": v for k, v in _fairchem_state(model).items()},
            "config": {"model": "painn", "model_attributes": {
                "hidden_channels": cfg.hidden, "num_layers": cfg.layers, "num_rbf": cfg.num_rbf, "cutoff": cfg.cutoff,
                "max_neighbors": cfg.max_neighbors, "num_elements": cfg.max_z, "use_pbc": True}}}


def test_mirrored_half_keeps_one_direction_of_each_pair_and_mirrors_it():
    # 0 <- 1, 1 <- 0, 2 <- 0 (the reverse 0 <- 2 was cut by a cap), and atom 1's own images +x and -x
    edge_index = torch.tensor([[0, 1, 2, 1, 1], [1, 0, 0, 1, 1]])
    shifts = torch.tensor([[0, 0, 0], [0, 0, 0], [0, 0, 0], [1, 0, 0], [-1, 0, 0]], dtype=F64)
    vectors = torch.arange(15, dtype=F64).reshape(5, 3)
    both, vec = mirrored_half(edge_index, shifts, vectors)
    kept = {(int(i), int(j)): v.tolist() for (i, j), v in zip(both.T, vec)}
    assert both.shape[1] == 6   # kept: 1 <- 0, 2 <- 0, 1 <- 1 (-x); mirrored: 0 <- 1, 0 <- 2, 1 <- 1 (+x)
    assert kept[(0, 2)] == [-6.0, -7.0, -8.0] and kept[(2, 0)] == [6.0, 7.0, 8.0]
    assert sorted(map(tuple, both.T.tolist())) == [(0, 1), (0, 2), (1, 0), (1, 1), (1, 1), (2, 0)]


def test_converter_maps_every_fairchem_key(tmp_path):
    """A monolithic checkpoint holding our own weights under fairchem's names converts back to the
    same predictions (the key map and the embedding row shift, without fairchem installed)."""
    model = _tiny()
    ckpt = _mono_ckpt(model)
    ckpt["normalizers"] = {"energy": {"mean": torch.tensor(0.0), "rmsd": torch.tensor(1.3)},
                           "forces": {"mean": torch.tensor(0.0), "rmsd": torch.tensor(0.8)}}
    back = convert_checkpoint(ckpt, "a", dtype=F64)
    with torch.no_grad():
        back.heads["a"].stats.references.copy_(model.heads["a"].stats.references)
        back.heads["a"].stats.energy_mean.copy_(model.heads["a"].stats.energy_mean)
    frames = _cells()[:1] + _molecules()[:1]
    ours, _ = _ours(model, frames)
    theirs, _ = _ours(back, frames)
    torch.testing.assert_close(theirs["energy"], ours["energy"])
    torch.testing.assert_close(theirs["forces"], ours["forces"])


def test_export_load_roundtrip_and_symmetries(tmp_path):
    import lamm_ds
    from lamm_ds.engine.export import export_model

    model = _tiny()
    frames = _cells()[:1]
    ref, _ = _ours(model, frames)
    export_model(model, tmp_path / "m.safetensors")
    loaded = lamm_ds.load_model(tmp_path / "m.safetensors").double()
    assert loaded.model_kind == "painn_fairchem" and loaded.cfg == model.cfg
    got, _ = _ours(loaded, frames)
    torch.testing.assert_close(got["energy"], ref["energy"])
    torch.testing.assert_close(got["forces"], ref["forces"])
    # a rotation rotates the forces and keeps the energy; a permutation permutes them
    atoms = frames[0].copy()
    R = torch.linalg.qr(torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(3)))[0].numpy()
    atoms.positions = atoms.positions @ R.T
    atoms.cell = np.asarray(atoms.cell[:]) @ R.T
    rot, _ = _ours(model, [atoms])
    torch.testing.assert_close(rot["energy"], ref["energy"])
    torch.testing.assert_close(rot["forces"], ref["forces"] @ torch.tensor(R.T))
    # fairchem keeps the direction j < i of a capped pair, so with a binding cap its PaiNN (and this
    # one) depends on the atom order; without a binding cap a permutation permutes the forces
    uncapped = FairchemPaiNNPotential(dataclasses.replace(model.cfg, max_neighbors=None), ["a"]).double()
    uncapped.load_state_dict(model.state_dict())
    ref, _ = _ours(uncapped.eval(), frames)
    perm = np.random.default_rng(0).permutation(len(atoms))
    out, _ = _ours(uncapped, [frames[0][perm]])
    torch.testing.assert_close(out["energy"], ref["energy"])
    torch.testing.assert_close(out["forces"], ref["forces"][perm])
    capped, _ = _ours(model, [frames[0][perm]])
    assert not torch.allclose(capped["energy"], _ours(model, frames)[0]["energy"])


def test_conservative_variant_gives_the_energy_gradient():
    model = _tiny(forces="conservative", stress=True)
    frames = _cells()[:1]
    out, b = _ours(model, frames)
    pos = b.pos.clone().requires_grad_(True)
    energy = model(b.replace(pos=pos))["energy"].sum()
    (grad,) = torch.autograd.grad(energy, pos)
    torch.testing.assert_close(out["forces"], -grad)
    assert out["stress"].shape == (1, 3, 3)


@pytest.mark.parametrize("change,message", [
    ({"rbf": {"name": "spherical_bessel"}}, "radial basis"),
    ({"envelope": {"name": "exponential"}}, "envelope"),
    ({"direct_forces": False}, "sum of the final node embeddings"),
    ({"use_fancy_thing": 1}, r"unknown PaiNN option\(s\) use_fancy_thing"),
])
def test_unsupported_painn_checkpoints_are_refused(change, message):
    ckpt = _mono_ckpt(_tiny())
    ckpt["config"]["model_attributes"].update(change)
    with pytest.raises(ConversionError, match=message):
        convert_checkpoint(ckpt, "a")


def test_damaged_painn_checkpoints_are_refused():
    ckpt = _mono_ckpt(_tiny())
    state = ckpt["state_dict"]
    broken = {**ckpt, "state_dict": {k: v for k, v in state.items() if "update_layers.1.vec_proj" not in k}}
    with pytest.raises(ConversionError, match=r"lacks weights for \['backbone.updates.1.vec_proj.weight'\]"):
        convert_checkpoint(broken, "a")
    extra = {**ckpt, "state_dict": {**state, "module.out_stress.weight": torch.zeros(3)}}
    with pytest.raises(ConversionError, match="'out_stress.weight' has no counterpart"):
        convert_checkpoint(extra, "a")
    wrong = {**ckpt, "state_dict": {**state, "module.out_energy.0.weight": torch.zeros(5, 16)}}
    with pytest.raises(ConversionError, match=r"heads.a.mlp.0.weight: shape \(5, 16\)"):
        convert_checkpoint(wrong, "a")
    centres = {**ckpt, "state_dict": {**state, "module.radial_basis.rbf.offset": torch.linspace(0, 2, 8)}}
    with pytest.raises(ConversionError, match="Gaussian centres differ"):
        convert_checkpoint(centres, "a")
    ema = {**ckpt, "ema": {"shadow_params": [torch.zeros(2)]}, "config": {**ckpt["config"], "optim": {"ema_decay": 0.9}}}
    with pytest.raises(ConversionError, match="cannot align the checkpoint's 1 EMA tensors"):
        convert_checkpoint(ema, "a")
    with pytest.raises(ConversionError, match="--scale-file applies to PaiNN checkpoints only"):
        convert_checkpoint({"state_dict": {}, "config": {"model": "equiformer_v2"}}, "a", scale_file="s.json")


def test_energy_only_painn_converts_with_conservative_forces(caplog):
    model = _tiny(forces="conservative")
    ckpt = _mono_ckpt(model)
    ckpt["config"]["model_attributes"]["regress_forces"] = False
    back = convert_checkpoint(ckpt, "a")
    assert back.cfg.forces == "conservative" and back.force_head is None
    assert "predicts no forces" in caplog.text


def test_a_converted_painn_fine_tunes(demo_data, tmp_path):
    """convert-fairchem, then launch/finetune.py --init on the converted file: a new head for the
    demo downstream set, the backbone (scale factors included) carried into the fine-tuned model."""
    import subprocess
    import sys

    import lamm_ds
    from run_helpers import REPO, TINY, child_env

    model = _tiny()
    ckpt = _mono_ckpt(model)
    torch.save(ckpt, tmp_path / "painn.pt")
    from lamm_ds.cli import main as cli_main

    assert cli_main(["convert-fairchem", str(tmp_path / "painn.pt"), str(tmp_path / "painn.safetensors"),
                     "--dataset", "oc20"]) == 0
    run_dir = tmp_path / "ft"
    cmd = [sys.executable, str(REPO / "launch" / "finetune.py"), "--run-dir", str(run_dir), "--quiet", *TINY,
           f"data.demo_dir={demo_data['demo_metals'].parent}", "--init", str(tmp_path / "painn.safetensors"),
           "--max-steps", "2", "data.batch_size=4", "denoise_unlabelled=false", "eval_datasets=[]",
           "finetune.forces=direct", "finetune.head_init_from=oc20",
           f"data.datasets=[{{name: demo_downstream, path: {demo_data['demo_downstream']}}}]"]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    tuned = lamm_ds.load_model(run_dir / "model.safetensors")
    assert tuned.model_kind == "painn_fairchem" and tuned.dataset_names == ["oc20", "demo_downstream"]
    torch.testing.assert_close(tuned.backbone.scales.scale, model.backbone.scales.scale.float())
    moved = tuned.backbone.messages[0].x_proj[0].weight.detach().double() - model.backbone.messages[0].x_proj[0].weight
    assert moved.abs().max() > 0   # it trained


def test_normalisers_written_in_the_config_reach_the_converted_model():
    """OC22-style: no normalisers stored in the checkpoint, the numbers in the training dataset's
    transforms (``stdev``); the converted head carries them."""
    model = _tiny()
    ckpt = _mono_ckpt(model)
    ckpt["normalizers"] = {}
    ckpt["config"]["dataset"] = {"train": {"transforms": {"normalizer": {"energy": {"mean": -0.5, "stdev": 25.0},
                                                                         "forces": {"mean": 0.0, "stdev": 0.15}}}}}
    back = convert_checkpoint(ckpt, "a")
    assert float(back.heads["a"].stats.energy_std) == pytest.approx(25.0)
    assert float(back.heads["a"].stats.force_std) == pytest.approx(0.15)
    assert float(back.heads["a"].offset.energy_offset) == pytest.approx(-0.5)
    ckpt["config"]["dataset"]["train"]["transforms"]["normalizer"] = {"file": "/train/norms.pt"}
    with pytest.raises(ConversionError, match="holds no 'energy' normaliser"):
        convert_checkpoint(ckpt, "a")


def test_a_bad_scale_file_is_named_and_nothing_is_written(tmp_path, capsys):
    """convert-fairchem --scale-file: a missing, unreadable or wrong-shaped file exits 2 naming it,
    and no model file is left behind."""
    from lamm_ds.cli import main as cli_main

    model = _tiny()
    ckpt = _mono_ckpt(model)
    ckpt["state_dict"] = {k: (torch.zeros_like(v) if k.endswith("scale_factor") else v)
                          for k, v in ckpt["state_dict"].items()}
    ckpt["config"]["model_attributes"]["scale_file"] = "painn_scaling_factors.json"
    torch.save(ckpt, tmp_path / "painn.pt")
    out = tmp_path / "painn.safetensors"
    bad_json = tmp_path / "broken.json"
    bad_json.write_text("{not json")
    listed = tmp_path / "list.json"
    listed.write_text("[1.0, 2.0]")
    cases = [(None, "config names scale_file 'painn_scaling_factors.json'"),
             (tmp_path / "missing.json", f"scale file {tmp_path / 'missing.json'}: no such file"),
             (bad_json, f"scale file {bad_json}: not a readable JSON"),
             (listed, f"scale file {listed}: holds a list, not a dict of scale factors")]
    for scale_file, message in cases:
        argv = ["convert-fairchem", str(tmp_path / "painn.pt"), str(out)]
        if scale_file is not None:
            argv += ["--scale-file", str(scale_file)]
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and str(tmp_path / "painn.pt") in err, err
        assert not out.exists() and list(tmp_path.glob("painn.safetensors*")) == []
