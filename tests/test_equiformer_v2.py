"""EquiformerV2: SO(3) pieces against e3nn, symmetry of energies/forces, derivatives, bf16, presets,
export/load, run-config selection, and numerical parity with fairchem-core 1.x (optional)."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from e3nn import o3

from fairchem_shim import import_fairchem_equiformer_v2
from lamm_ds.graphs import build_sample, collate
from lamm_ds.model.equiformer_v2 import (
    FAIRCHEM_PARAMS,
    PUBLISHED_PARAMS,
    EquiformerV2Config,
    EquiformerV2Potential,
    count_parameters,
)
from lamm_ds.model.heads import DatasetStats
from lamm_ds.model.so3 import S2Grid, SO3Layout, edge_frames, float64_default, grid_silu, wigner_blocks
from lamm_ds.structure import Structure

MAX_Z = 30
F64 = torch.float64
ACAC = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "acac" / "train_300K.xyz"


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(**kw) -> EquiformerV2Config:
    base = dict(num_layers=2, lmax=3, mmax=2, sphere_channels=16, attn_hidden_channels=16, num_heads=2,
                attn_alpha_channels=8, attn_value_channels=4, ffn_hidden_channels=16, edge_channels=16,
                cutoff=4.0, max_neighbors=None, max_z=MAX_Z, alpha_drop=0.1, drop_path_rate=0.1)
    base.update(kw)
    return EquiformerV2Config(**base)


def random_stats(seed: int) -> DatasetStats:
    rng = np.random.default_rng(seed)
    return DatasetStats(rng.normal(-3.0, 1.0, MAX_Z + 1), energy_mean=rng.normal(), energy_std=0.5 + rng.random(),
                        force_std=0.5 + rng.random())


def make_model(names=("A",), seed=0, **kw) -> EquiformerV2Potential:
    torch.manual_seed(seed)
    model = EquiformerV2Potential(tiny_cfg(**kw), list(names), {n: random_stats(k + 10 * seed) for k, n in enumerate(names)})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.double().eval()


def molecule_structure() -> Structure:
    a = molecule("CH3CH2OH")
    a.rattle(0.05, seed=1)
    return Structure(a.numbers, a.positions)


def periodic_structure(seed=2) -> Structure:
    a = bulk("Cu", "fcc", a=3.6, cubic=True)
    a.rattle(0.08, seed=seed)
    numbers = a.numbers.copy()
    numbers[1] = 13
    cell = a.cell[:] + np.array([[0.0, 0.1, 0.0], [0.05, 0.0, 0.0], [0.0, 0.0, 0.0]])
    return Structure(numbers, a.positions, cell, [True, True, True])


def batch_of(structures, cutoff=4.0, dataset_ids=None):
    dataset_ids = dataset_ids or [0] * len(structures)
    return collate([build_sample(s, cutoff, None, dataset_id=d) for s, d in zip(structures, dataset_ids)], dtype=F64)


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------------
# SO(3) pieces


def test_wigner_blocks_match_e3nn():
    R = o3.rand_matrix(5, dtype=F64)
    blocks = wigner_blocks(R, 6)
    with float64_default():
        angles = o3.matrix_to_angles(R)
        for l, d in enumerate(blocks):
            assert d.shape == (5, 2 * l + 1, 2 * l + 1)
            assert torch.allclose(d, o3.wigner_D(l, *angles), atol=1e-12), l


def test_edge_frames_align_edges_with_y():
    vec = torch.randn(50, 3, dtype=F64) * 3
    for roll in ("random", "fixed"):
        R = edge_frames(vec, roll)
        unit = vec / vec.norm(dim=1, keepdim=True)
        assert torch.allclose(torch.einsum("eij,ej->ei", R, unit), torch.tensor([0.0, 1.0, 0.0], dtype=F64).expand(50, 3),
                              atol=1e-12)
        assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3, dtype=F64).expand(50, 3, 3), atol=1e-12)
        assert torch.allclose(torch.linalg.det(R), torch.ones(50, dtype=F64))
    assert torch.equal(edge_frames(vec, "fixed"), edge_frames(vec, "fixed"))
    with pytest.raises(ValueError):
        edge_frames(vec, "spin")


def test_s2_grid_matches_dense_e3nn_transform():
    lmax, res = 4, (10, 12)
    coeffs = [(l, m) for l in range(lmax + 1) for m in range(-l, l + 1)]
    with torch.device("cpu"):
        old = torch.get_default_dtype()
        torch.set_default_dtype(F64)
        try:
            grid = S2Grid(coeffs, lmax, lmax, res)
            to = o3.ToS2Grid(lmax, res, normalization="component")
            fr = o3.FromS2Grid(res, lmax, normalization="component")
        finally:
            torch.set_default_dtype(old)
    x = torch.randn(7, (lmax + 1) ** 2, 3, dtype=F64)
    dense = torch.einsum("mbi,am,zic->abzc", to.shb, to.sha, x)
    assert torch.allclose(grid.to_grid(x), dense, atol=1e-12)
    g = torch.randn(res[1], res[0], 7, 3, dtype=F64)
    dense_back = torch.einsum("am,mbi,abzc->zic", fr.sha, fr.shb, g)
    assert torch.allclose(grid.from_grid(g), dense_back, atol=1e-12)
    # adjoints
    assert torch.allclose((grid.to_grid(x) * g).sum(), (x * grid.to_grid_adjoint(g)).sum())
    y = torch.randn_like(x)
    assert torch.allclose((grid.from_grid(g) * y).sum(), (g * grid.from_grid_adjoint(y)).sum())


def test_grid_silu_gradients_match_autograd_including_double_backward():
    layout = SO3Layout(3, 2)
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        grid = S2Grid(layout.m_order, 3, 2, (8, 9))
    finally:
        torch.set_default_dtype(old)
    x = torch.randn(11, layout.num_reduced, 4, dtype=F64, requires_grad=True)
    w = torch.randn(11, layout.num_reduced, 4, dtype=F64)
    plain = grid.from_grid(torch.nn.functional.silu(grid.to_grid(x)))
    lean = grid_silu(x, grid, chunk=4)
    assert torch.allclose(lean, plain, atol=1e-12)
    g_plain = torch.autograd.grad((plain * w).sum(), x, create_graph=True)[0]
    g_lean = torch.autograd.grad((lean * w).sum(), x, create_graph=True)[0]
    assert torch.allclose(g_lean, g_plain, atol=1e-12)
    gg_plain = torch.autograd.grad(g_plain.pow(2).sum(), x)[0]
    gg_lean = torch.autograd.grad(g_lean.pow(2).sum(), x)[0]
    assert torch.allclose(gg_lean, gg_plain, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# symmetry


def _transformed(structure: Structure, R=None, shift=None, perm=None, image_shift=None, cell_change=None):
    pos = np.array(structure.positions, dtype=float)
    numbers = np.array(structure.numbers)
    cell = None if structure.cell is None else np.array(structure.cell, dtype=float)
    if image_shift is not None:      # move atoms by whole lattice vectors
        pos = pos + image_shift @ cell
    if cell_change is not None:      # an equivalent (unimodular) choice of cell vectors
        cell = cell_change @ cell
    if perm is not None:
        pos, numbers = pos[perm], numbers[perm]
    if R is not None:
        pos = pos @ R.T
        cell = None if cell is None else cell @ R.T
    if shift is not None:
        pos = pos + shift
    return Structure(numbers, pos, cell, structure.pbc)


@pytest.mark.parametrize("kind", ["molecule", "periodic"])
@pytest.mark.parametrize("forces", ["direct", "conservative"])
def test_energy_invariance_and_force_equivariance(kind, forces):
    # The S2 grids make EquiformerV2 equivariant only up to their discretisation error (1e-5 at the
    # published 18x18 grid, see the next test); a 32x32 grid brings it below 1e-7, so symmetry
    # errors of the implementation itself cannot hide. Default random edge roll, as in training.
    model = make_model(forces=forces, grid_resolution=32)
    s = molecule_structure() if kind == "molecule" else periodic_structure()
    ref = model(batch_of([s]))
    e0, f0 = ref["energy"], ref["forces"]
    rng = np.random.default_rng(3)
    R = o3.rand_matrix(dtype=F64).numpy()
    perm = rng.permutation(len(s.numbers))
    cases = {"rotation": dict(R=R), "translation": dict(shift=rng.normal(size=3) * 5), "permutation": dict(perm=perm),
             "all": dict(R=R, shift=np.ones(3), perm=perm)}
    if kind == "periodic":
        cases["periodic image"] = dict(image_shift=rng.integers(-2, 3, size=(len(s.numbers), 3)).astype(float))
        cases["cell choice"] = dict(cell_change=np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 1.0]]))
    for name, tr in cases.items():
        out = model(batch_of([_transformed(s, **tr)]))
        f_expect = f0.clone()
        if "perm" in tr:
            f_expect = f_expect[torch.as_tensor(tr["perm"])]
        if "R" in tr:
            f_expect = f_expect @ torch.as_tensor(tr["R"]).T
        assert rel(out["energy"], e0) < 1e-8, (name, out["energy"], e0)
        assert rel(out["forces"], f_expect) < 1e-6, name
    assert f0.abs().max() > 1e-4  # non-trivial forces


def test_published_grid_equivariance_error_is_small_and_shrinks_with_resolution():
    s = molecule_structure()
    R = o3.rand_matrix(dtype=F64).numpy()
    errors = {}
    for res in (18, 32):
        model = make_model(grid_resolution=res)
        f0 = model(batch_of([s]))["forces"].detach()
        f1 = model(batch_of([_transformed(s, R=R)]))["forces"].detach()
        errors[res] = rel(f1, f0 @ torch.as_tensor(R).T)
    assert errors[18] < 1e-4 and errors[32] < 1e-7 and errors[32] < errors[18] / 10, errors


def test_random_edge_roll_changes_outputs_only_at_grid_precision():
    model = make_model()
    b = batch_of([molecule_structure(), periodic_structure()])
    a, c = model(b), model(b)
    assert rel(a["energy"], c["energy"]) < 1e-7 and rel(a["forces"], c["forces"]) < 1e-6
    fixed = make_model(edge_roll="fixed")
    assert torch.equal(fixed(b)["forces"], fixed(b)["forces"])


def test_conservative_forces_and_stress_are_derivatives():
    model = make_model(forces="conservative", stress=True, edge_roll="fixed")
    s = periodic_structure()
    out = model(batch_of([s]))
    h = 1e-5
    pos = np.array(s.positions)
    for atom, comp in [(0, 0), (2, 1), (3, 2)]:
        e = []
        for sign in (1, -1):
            p = pos.copy()
            p[atom, comp] += sign * h
            e.append(float(model(batch_of([Structure(s.numbers, p, s.cell, s.pbc)]))["energy"]))
        assert out["forces"][atom, comp].item() == pytest.approx(-(e[0] - e[1]) / (2 * h), rel=1e-4, abs=1e-7)
    cell = np.array(s.cell)
    vol = abs(np.linalg.det(cell))
    eps = np.zeros((3, 3))
    eps[0, 1] = eps[1, 0] = 1e-5
    e = []
    for sign in (1, -1):
        d = np.eye(3) + sign * eps
        e.append(float(model(batch_of([Structure(s.numbers, pos @ d, cell @ d, s.pbc)]))["energy"]))
    assert out["stress"][0, 0, 1].item() == pytest.approx((e[0] - e[1]) / (2 * 2e-5) / vol, rel=1e-4, abs=1e-8)


@pytest.mark.parametrize("forces", ["direct", "conservative"])
def test_graphs_without_edges(forces):
    model = make_model(forces=forces)
    atom = Structure(np.array([8]), np.zeros((1, 3)))
    out = model(batch_of([atom, molecule_structure()]))
    assert torch.isfinite(out["energy"]).all() and torch.all(out["forces"][0] == 0)
    alone = model(batch_of([atom]))
    assert alone["energy"].item() == pytest.approx(out["energy"][0].item(), rel=1e-12)


@pytest.mark.parametrize("forces", ["direct", "conservative"])
def test_training_mode_gradients_flow(forces):
    model = make_model(names=("A", "B"), forces=forces).train()   # conservative: double backward
    b = batch_of([molecule_structure(), periodic_structure()], dataset_ids=[0, 1])
    out = model(b)
    (out["energy"].sum() + out["forces"].pow(2).sum()).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_dataset_heads_route_by_dataset_id():
    model = make_model(names=("A", "B"), edge_roll="fixed")
    s1, s2 = molecule_structure(), periodic_structure()
    both = model(batch_of([s1, s2], dataset_ids=[1, 0]))
    alone1 = model(batch_of([s1], dataset_ids=[1]))
    alone2 = model(batch_of([s2], dataset_ids=[0]))
    assert both["energy"][0].item() == pytest.approx(alone1["energy"].item(), rel=1e-10)
    assert both["energy"][1].item() == pytest.approx(alone2["energy"].item(), rel=1e-10)
    assert both["energy_scale"][0] == model.heads["B"].stats.energy_std
    model.heads["B"].offset.energy_offset.fill_(2.5)
    assert model(batch_of([s1], dataset_ids=[1]))["energy"].item() == pytest.approx(alone1["energy"].item() + 2.5)


def test_bf16_forward_backward():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    ref = EquiformerV2Potential(cfg, ["A"], {"A": random_stats(0)}).train()
    low = EquiformerV2Potential(cfg, ["A"], {"A": random_stats(0)})
    low.load_state_dict(ref.state_dict())
    low = low.to(torch.bfloat16).train()          # what DeepSpeed's bf16 mode does
    b = collate([build_sample(s, 4.0, None) for s in (molecule_structure(), periodic_structure())])
    torch.manual_seed(1)
    out = low(b)
    assert out["energy"].dtype == torch.float32 and out["forces"].dtype == torch.float32
    assert low.heads["A"].stats.references.dtype == torch.float32  # references never rounded to bf16
    (out["energy"].sum() + out["forces"].pow(2).sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad.float()).all() for p in low.parameters())
    torch.manual_seed(1)
    with torch.no_grad():
        r = ref(b)
    assert rel(out["energy"].detach(), r["energy"]) < 2e-2
    assert rel(out["forces"].detach(), r["forces"]) < 0.15


# ------------------------------------------------------------------------------------------------
# presets, export, config


@pytest.mark.parametrize("name", ["31M", "83M", "153M"])
def test_presets_match_published_parameter_counts(name):
    with torch.device("meta"):
        model = EquiformerV2Potential(EquiformerV2Config.preset(name), ["oc20"])
    n = count_parameters(model)
    assert n == FAIRCHEM_PARAMS[name]
    assert abs(n - PUBLISHED_PARAMS[name]) / PUBLISHED_PARAMS[name] < 0.02
    cfg = EquiformerV2Config.preset(name)
    assert (cfg.num_layers, cfg.lmax, cfg.mmax) == {"31M": (8, 4, 2), "83M": (12, 6, 2), "153M": (20, 6, 3)}[name]


def test_export_and_load_roundtrip(tmp_path):
    import lamm_ds
    from lamm_ds.engine.export import export_model, read_export_metadata

    model = make_model(names=("A", "B"), edge_roll="fixed")
    model.heads["B"].offset.energy_offset.fill_(-1.25)
    path = export_model(model, tmp_path / "eqv2.safetensors")
    assert read_export_metadata(path)["model_kind"] == "equiformer_v2"
    loaded = lamm_ds.load_model(path).double()
    assert isinstance(loaded, EquiformerV2Potential) and loaded.dataset_names == ["A", "B"]
    b = batch_of([molecule_structure(), periodic_structure()], dataset_ids=[0, 1])
    a, c = model(b), loaded(b)
    assert rel(c["energy"], a["energy"]) < 1e-6 and rel(c["forces"], a["forces"]) < 1e-6


def test_run_config_selects_equiformer_v2():
    from lamm_ds.engine.config import ConfigError, load_config, model_config
    from lamm_ds.engine.export import build_potential

    cfg = load_config([], ["model_kind=equiformer_v2", "equiformer_v2.lmax=2", "equiformer_v2.mmax=1",
                           "equiformer_v2.num_layers=1"])
    mcfg = model_config(cfg)
    assert isinstance(mcfg, EquiformerV2Config) and mcfg.lmax == 2
    model = build_potential(cfg.model_kind, mcfg, ["x"])
    assert isinstance(model, EquiformerV2Potential)
    assert model_config(load_config([], [])) is not None  # default stays PaiNN
    with pytest.raises(ConfigError):
        load_config([], ["model_kind=mace"])
    with pytest.raises(ConfigError):
        load_config([], ["model_kind=equiformer_v2", "equiformer_v2.mmax=5"])


# ------------------------------------------------------------------------------------------------
# fairchem parity (optional dependency)


_import_fairchem = import_fairchem_equiformer_v2  # (Backbone, ScalarHead, VectorHead, GraphData), or skip


FAIRCHEM_TINY = dict(num_layers=2, sphere_channels=16, attn_hidden_channels=16, num_heads=2, attn_alpha_channels=8,
                     attn_value_channels=4, ffn_hidden_channels=16, norm_type="layer_norm_sh", lmax_list=[3],
                     mmax_list=[2], grid_resolution=18, edge_channels=16, use_grid_mlp=True, max_radius=5.0,
                     max_neighbors=100, max_num_elements=90, weight_init="normal", alpha_drop=0.1, drop_path_rate=0.1)


def _parity_structures(demo_data):
    from ase.io import read

    from lamm_ds.engine.evaluate import load_structures

    out = []
    if ACAC.is_file():
        for a in read(str(ACAC), index=":3"):
            out.append(Structure(a.numbers, a.positions))
    else:
        a = molecule("CH3COCH3")
        out.append(Structure(a.numbers, a.positions))
    _, metals = load_structures(demo_data["demo_metals"])
    periodic = [s for s in metals if s.cell is not None][:3]
    assert periodic, "demo metals should be periodic cells"
    return out + periodic


@pytest.mark.parametrize("layout", ["hydra", "monolithic", "monolithic_energy_only"])
def test_fairchem_parity_after_conversion(layout, demo_data, tmp_path):
    """``monolithic_energy_only``: an IS2RE-style checkpoint (``regress_forces: false``, no force
    block): the energies match fairchem's, the forces are the converted model's -dE/dx."""
    energy_only = layout == "monolithic_energy_only"
    layout = "monolithic" if energy_only else layout
    Backbone, ScalarHead, VectorHead, GraphData = _import_fairchem()
    from lamm_ds.cli import main as cli_main
    from lamm_ds.engine.export import load_model

    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)        # fairchem builds its Wigner/grid constants in the default dtype
    try:
        torch.manual_seed(0)
        bb = Backbone(**FAIRCHEM_TINY, **({"use_energy_lin_ref": True, "load_energy_lin_ref": True}
                                           if layout == "monolithic" else {}))
        eh, fh = ScalarHead(bb), VectorHead(bb)
        with torch.no_grad():    # random, non-degenerate weights everywhere (LayerNorms, biases, refs too)
            for p in [*bb.parameters(), *eh.parameters(), *fh.parameters()]:
                p.add_(0.05 * torch.randn_like(p))
        for m in (bb, eh, fh):
            m.eval()
        structures = _parity_structures(demo_data)
        b = collate([build_sample(s, 5.0, None) for s in structures], dtype=F64)
        vec = b.edge_vectors()

        def graph(data, **kwargs):  # our neighbour list, in fairchem's edge convention (source j, target i)
            return GraphData(edge_index=b.edge_index.flip(0), edge_distance=vec.norm(dim=-1), edge_distance_vec=vec,
                             cell_offsets=b.shifts, offset_distances=None, neighbors=None, node_offset=0,
                             batch_full=b.batch, atomic_numbers_full=b.z)

        bb.generate_graph = graph
        data = types.SimpleNamespace(natoms=b.natoms, pos=b.pos, atomic_numbers=b.z, batch=b.batch)
        with torch.no_grad():
            torch.manual_seed(123)   # the random edge-frame roll: same draw on both sides
            emb = bb(data)
            e_raw, f_raw = eh(data, emb)["energy"], fh(data, emb)["forces"]
        e_mean, e_std, f_std = -0.75, 2.5, 1.7
        elementref = torch.zeros(100, dtype=F64)
        elementref[[1, 6, 8, 13, 29]] = torch.tensor([-13.6, -1030.0, -2040.0, -5.3, -3.7], dtype=F64)
        if layout == "hydra":
            state = {**{f"module.backbone.{k}": v for k, v in bb.state_dict().items()},
                     **{f"module.output_heads.energy.{k}": v for k, v in eh.state_dict().items()},
                     **{f"module.output_heads.forces.{k}": v for k, v in fh.state_dict().items()}}
            config = {"model": {"name": "hydra", "backbone": {"model": "equiformer_v2_backbone", **FAIRCHEM_TINY},
                                "heads": {"energy": {"module": "equiformer_v2_energy_head"},
                                          "forces": {"module": "equiformer_v2_force_head"}}}}
            lin = torch.zeros(90, dtype=F64)
        else:   # 2023 checkpoints: monolithic EquiformerV2 keys, model_attributes, linear refs in the model
            state = {**{f"module.{k}": v for k, v in bb.state_dict().items()},
                     **{f"module.{k}": v for k, v in eh.state_dict().items()},
                     **({} if energy_only else {f"module.{k}": v for k, v in fh.state_dict().items()})}
            config = {"model": "equiformer_v2", "model_attributes": {**FAIRCHEM_TINY, "use_energy_lin_ref": True,
                                                                     "load_energy_lin_ref": True,
                                                                     **({"regress_forces": False} if energy_only else {})}}
            lin = bb.energy_lin_ref.detach()
        ckpt = {"state_dict": state, "config": config,
                "normalizers": {"energy": {"mean": torch.tensor(e_mean), "rmsd": torch.tensor(e_std)},
                                "forces": {"mean": torch.tensor(0.0), "rmsd": torch.tensor(f_std)}},
                "elementrefs": {"energy": {"element_references": elementref}}}
        torch.save(ckpt, tmp_path / "eqv2.pt")
    finally:
        torch.set_default_dtype(old)
    assert cli_main(["convert-fairchem", str(tmp_path / "eqv2.pt"), str(tmp_path / "eqv2.safetensors"),
                     "--dataset", "oc20"]) == 0
    model = load_model(tmp_path / "eqv2.safetensors").double()
    assert model.dataset_names == ["oc20"]
    # fairchem's denormalised prediction: E = std * (model energy) + mean + sum elementref[Z]; F = f_std * f
    lin_sum = torch.zeros(b.num_graphs, dtype=F64).index_add(0, b.batch, lin[b.z])
    ref_sum = torch.zeros(b.num_graphs, dtype=F64).index_add(0, b.batch, elementref[b.z])
    # the monolithic (deprecated) class adds its energy_lin_ref inside the model; the hydra heads do not
    e_model = e_raw + lin_sum if layout == "monolithic" else e_raw
    e_fc = e_std * e_model + e_mean + ref_sum
    f_fc = f_std * f_raw
    with torch.no_grad():
        torch.manual_seed(123)
        out = model(b.replace(dataset_id=torch.zeros_like(b.dataset_id)))
    e_rel = ((out["energy"] - e_fc).abs() / e_fc.abs()).max().item()
    if energy_only:
        assert e_rel < 1e-5, e_rel
        assert model.cfg.forces == "conservative"
        # -dE/dx of a translation-invariant energy: each structure's forces sum to zero
        net = torch.zeros(b.num_graphs, 3, dtype=out["forces"].dtype).index_add(0, b.batch, out["forces"])
        assert net.abs().max().item() < 1e-4 * out["forces"].abs().max().item()
        return
    f_rel = rel(out["forces"], f_fc)
    assert e_rel < 1e-5 and f_rel < 1e-5, (e_rel, f_rel)
    # the raw network outputs too (the references dominate the energies above), converted in
    # memory in fp64 (the exported file holds fp32 weights, which alone moves outputs by ~1e-8)
    from lamm_ds.model.convert_fairchem import convert_checkpoint

    with torch.no_grad():
        raw = convert_checkpoint(ckpt, "x", dtype=F64)
        for h in raw.heads.values():
            h.stats = type(h.stats)(DatasetStats.identity(raw.cfg.max_z), raw.cfg.max_z)
            h.offset.energy_offset.zero_()
        torch.manual_seed(123)
        r = raw(b)
    assert ((r["energy"] - e_raw).abs() / e_raw.abs()).max().item() < 1e-5
    assert rel(r["forces"], f_raw) < 1e-5
    assert ((r["forces"] - f_raw).norm(dim=1) / f_raw.norm(dim=1)).max().item() < 1e-5


def test_converter_refuses_unsupported_models():
    from lamm_ds.model.convert_fairchem import ConversionError, convert_checkpoint

    with pytest.raises(ConversionError, match="not EquiformerV2"):
        convert_checkpoint({"state_dict": {}, "config": {"model": "gemnet_oc"}})
    with pytest.raises(ConversionError, match="use_gate_act"):
        convert_checkpoint({"state_dict": {}, "config": {"model": {"name": "equiformer_v2", "use_gate_act": True}}})
    # options that would change the computation are refused, not ignored
    with pytest.raises(ConversionError, match=r"unknown EquiformerV2 option\(s\) use_fancy_thing"):
        convert_checkpoint({"state_dict": {}, "config": {"model": {"name": "equiformer_v2", "use_fancy_thing": 1}}})
    small = {"name": "equiformer_v2", "num_layers": 1, "lmax_list": [2], "mmax_list": [1], "sphere_channels": 8,
             "attn_hidden_channels": 8, "ffn_hidden_channels": 8, "edge_channels": 8}
    from lamm_ds.model.convert_fairchem import config_from_fairchem

    # fairchem's neighbour-cap option is carried into the model config (and so into the model file)
    assert config_from_fairchem({**small, "enforce_max_neighbors_strictly": False}).max_neighbors_strict is False
    assert config_from_fairchem(small).max_neighbors_strict is True  # fairchem's default: strict
    # an energy-only (IS2RE) model has no force block: its conversion differentiates the energy
    assert config_from_fairchem(small).forces == "direct"
    assert config_from_fairchem({**small, "regress_forces": False}).forces == "conservative"
    # a DeNS checkpoint without its force encoder's bias (the constant every node gets) is refused
    dens = {"model": {"name": "hydra", "backbone": {"model": "equiformer_v2_dens_backbone", **small,
                                                    "use_force_encoding": True},
                      "heads": {"energy": {"module": "eqV2_DeNS_scalar_head"},
                                "forces": {"module": "eqV2_DeNS_vector_head"}}}}
    del dens["model"]["backbone"]["name"]
    with pytest.raises(ConversionError, match=r"DeNS checkpoint lacks \['backbone.force_embedding.bias'\]"):
        convert_checkpoint({"state_dict": {}, "config": dens})
    # DeNS's options are known for a DeNS backbone only
    with pytest.raises(ConversionError, match=r"unknown EquiformerV2 option\(s\) use_force_encoding"):
        config_from_fairchem({**small, "use_force_encoding": True})
    with pytest.raises(ConversionError, match="lacks weights"):
        convert_checkpoint({"state_dict": {}, "config": {"model": {"name": "equiformer_v2", "num_layers": 1,
                                                                   "lmax_list": [2], "mmax_list": [1],
                                                                   "sphere_channels": 8, "attn_hidden_channels": 8,
                                                                   "ffn_hidden_channels": 8, "edge_channels": 8}}})


def _raw_frames(ideal: bool) -> list:
    """ase.Atoms as a user brings them: sheared, rattled fcc cells (no distance ties), ideal fcc
    crystals (exact ties in every shell) when ``ideal``, and two molecules."""
    frames = []
    for k, (symbol, a) in enumerate((("Cu", 3.61), ("Al", 4.05))):
        atoms = bulk(symbol, "fcc", a=a, cubic=True) * (2, 1, 1)
        if not ideal:
            atoms.rattle(0.05, seed=k + 1)
            atoms.cell[0, 1] += 0.3
        frames.append(atoms)
    for k, name in enumerate(("CH3COCH3", "C6H6")):
        atoms = molecule(name)
        atoms.rattle(0.02, seed=k)
        frames.append(atoms)
    return frames


@pytest.mark.parametrize("case", ["oc20_strict", "omat24_non_strict", "omat24_non_strict_ideal"])
def test_fairchem_full_prediction_path_on_raw_atoms(case):
    """fairchem's whole prediction path on raw ase.Atoms against the converted model on its own
    graph: fairchem's otf_graph (radius_graph_pbc with a binding cap of 8 at 5 Å; strict as OC20
    checkpoints, non-strict as OMat24's, on ideal crystals with exact ties too), its model, then its
    own Normalizer and LinearReferences from the checkpoint. Hydra layout, fp64 model, fp32 graph."""
    from fairchem_shim import fairchem_batch, fairchem_denormalised, fp64_geometry_on_fairchems_graph

    Backbone, ScalarHead, VectorHead, _ = _import_fairchem()
    from lamm_ds.model.convert_fairchem import convert_checkpoint

    strict = case == "oc20_strict"
    options = {**FAIRCHEM_TINY, "max_neighbors": 8, "enforce_max_neighbors_strictly": strict, "otf_graph": True,
               "use_pbc": True}
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        torch.manual_seed(0)
        bb = Backbone(**options)
        eh, fh = ScalarHead(bb), VectorHead(bb)
        with torch.no_grad():
            for p in [*bb.parameters(), *eh.parameters(), *fh.parameters()]:
                p.add_(0.05 * torch.randn_like(p))
        for m in (bb, eh, fh):
            m.eval()
        fp64_geometry_on_fairchems_graph(bb)
        frames = _raw_frames(ideal=case.endswith("ideal"))
        # fairchem's radius_graph_pbc needs one pbc setting per batch: cells, then molecules
        groups = [[a for a in frames if a.pbc.any()], [a for a in frames if not a.pbc.any()]]
        raw = []
        with torch.no_grad():
            for group in groups:
                data = fairchem_batch(group)
                emb = bb(data)
                raw.append((data, eh(data, emb)["energy"], fh(data, emb)["forces"]))
        elementref = torch.zeros(100, dtype=F64)
        elementref[[1, 6, 8, 13, 29]] = torch.tensor([-13.6, -1030.0, -2040.0, -5.3, -3.7], dtype=F64)
        ckpt = {"state_dict": {**{f"module.backbone.{k}": v for k, v in bb.state_dict().items()},
                               **{f"module.output_heads.energy.{k}": v for k, v in eh.state_dict().items()},
                               **{f"module.output_heads.forces.{k}": v for k, v in fh.state_dict().items()}},
                "config": {"model": {"name": "hydra", "backbone": {"model": "equiformer_v2_backbone", **options},
                                     "heads": {"energy": {"module": "equiformer_v2_energy_head"},
                                               "forces": {"module": "equiformer_v2_force_head"}}}},
                "normalizers": {"energy": {"mean": torch.tensor(-0.75), "rmsd": torch.tensor(2.5)},
                                "forces": {"mean": torch.tensor(0.0), "rmsd": torch.tensor(1.7)}},
                "elementrefs": {"energy": {"element_references": elementref}}}
        expected = [(fairchem_denormalised(ckpt, "energy", e, data), fairchem_denormalised(ckpt, "forces", f, data))
                    for data, e, f in raw]
    finally:
        torch.set_default_dtype(old)
    model = convert_checkpoint(ckpt, "omat", dtype=F64)
    assert model.cfg.max_neighbors_strict is strict
    for group, (e_fc, f_fc) in zip(groups, expected):
        structures = [Structure(a.numbers, a.positions, np.asarray(a.cell[:]), a.pbc) for a in group]
        b = collate([build_sample(s, model.cfg.cutoff, model.cfg.max_neighbors, strict=strict) for s in structures],
                    dtype=F64)
        if case == "omat24_non_strict_ideal" and group[0].pbc.any():
            # the non-strict rule keeps tied shells whole: all 12 nearest neighbours, not the cap's 8
            assert b.edge_index.shape[1] == 12 * b.pos.shape[0]
        with torch.no_grad():
            out = model(b)
        # the two sides draw their random edge-frame rolls for differently ordered edges: agreement
        # is to the grid's equivariance error, not to rounding
        assert ((out["energy"] - e_fc).abs() / e_fc.abs()).max() < 1e-6
        if case == "omat24_non_strict_ideal" and group[0].pbc.any():
            # forces vanish by symmetry; both sides leave ~1e-7 (fairchem's fp32 Wigner constants).
            # Until the grid and norm constants were kept in fp64, an fp64 model left 5e-3 here.
            assert f_fc.abs().max() < 1e-5 and out["forces"].abs().max() < 1e-5
        else:
            assert rel(out["forces"], f_fc) < 1e-5


@pytest.mark.parametrize("strict", [True, False])
def test_neighbour_cap_matches_fairchems_own_graph(strict):
    """Our graph with max_neighbors_strict = fairchem's enforce_max_neighbors_strictly, against
    fairchem-core 1.x's radius_graph_pbc on raw cells: an ideal fcc crystal (exact ties of 12
    neighbours) and a rattled one, cap 8, cutoff 5 Å."""
    _import_fairchem()
    from ase.build import bulk
    from fairchem.core.common.utils import radius_graph_pbc

    from lamm_ds.neighbors import radius_graph

    for rattle in (0.0, 0.05):
        a = bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 1, 1)
        if rattle:
            a.rattle(rattle, seed=1)
        data = types.SimpleNamespace(pos=torch.tensor(a.positions, dtype=torch.float32),  # as fairchem runs it
                                     cell=torch.tensor(np.asarray(a.cell[:]), dtype=torch.float32)[None],
                                     natoms=torch.tensor([len(a)]), pbc=torch.tensor([[True, True, True]]))
        edge_index, offsets, _ = radius_graph_pbc(data, 5.0, 8, enforce_max_neighbors_strictly=strict)
        # fairchem: edge_index[0] = neighbour j, edge_index[1] = centre i, offsets = image of j
        theirs = np.bincount(edge_index[1].numpy(), minlength=len(a))
        ours = radius_graph(a.positions, np.asarray(a.cell[:]), a.pbc, 5.0, 8, strict=strict)
        np.testing.assert_array_equal(np.bincount(ours.i, minlength=len(a)), theirs)
        if not strict or rattle:  # without ties the kept neighbours are the same; with them, strict picks differ
            want = sorted(zip(edge_index[1].tolist(), edge_index[0].tolist(), map(tuple, offsets.long().tolist())))
            got = sorted(zip(ours.i.tolist(), ours.j.tolist(), map(tuple, ours.shifts.tolist())))
            assert got == want


@pytest.mark.parametrize("layout", ["hydra", "monolithic"])
def test_fairchem_ema_weights_align_with_fairchems_own_ema(layout):
    """fairchem's ExponentialMovingAverage over its model's parameters (hydra: backbone, then the
    heads in config order; monolithic: one module): the converter's EMA weights are exactly the
    shadow tensors fairchem would copy into the model for prediction."""
    Backbone, ScalarHead, VectorHead, _ = _import_fairchem()
    from fairchem.core.modules.exponential_moving_average import ExponentialMovingAverage

    from lamm_ds.model.convert_fairchem import convert_checkpoint

    torch.manual_seed(0)
    extra = {"use_energy_lin_ref": True, "load_energy_lin_ref": True} if layout == "monolithic" else {}
    bb = Backbone(**FAIRCHEM_TINY, **extra)
    eh, fh = ScalarHead(bb), VectorHead(bb)
    modules = [bb, eh, fh]
    ema = ExponentialMovingAverage([p for m in modules for p in m.parameters()], 0.999)
    with torch.no_grad():
        for s in ema.shadow_params:
            s.add_(0.05 * torch.randn_like(s))
    if layout == "hydra":
        state = {**{f"module.backbone.{k}": v for k, v in bb.state_dict().items()},
                 **{f"module.output_heads.energy.{k}": v for k, v in eh.state_dict().items()},
                 **{f"module.output_heads.forces.{k}": v for k, v in fh.state_dict().items()}}
        config = {"model": {"name": "hydra", "backbone": {"model": "equiformer_v2_backbone", **FAIRCHEM_TINY},
                            "heads": {"energy": {"module": "equiformer_v2_energy_head"},
                                      "forces": {"module": "equiformer_v2_force_head"}}}}
    else:
        state = {f"module.{k}": v for m in modules for k, v in m.state_dict().items()}
        config = {"model": "equiformer_v2", "model_attributes": {**FAIRCHEM_TINY, **extra}}
    config["optim"] = {"ema_decay": 0.999}
    ckpt = {"state_dict": state, "config": config, "ema": ema.state_dict()}
    converted = convert_checkpoint(ckpt, "x")
    assert converted.weights_source == "ema"
    ema.copy_to([p for m in modules for p in m.parameters()])  # what fairchem's predictor does
    copied = {f"backbone.{k}": v for k, v in bb.state_dict().items()}
    copied.update({f"heads.x.{k}": v for k, v in eh.state_dict().items() if k.startswith("energy_block.")})
    copied.update({f"force_head.{k}": v for k, v in fh.state_dict().items() if k.startswith("force_block.")})
    ours = dict(converted.named_parameters())
    assert ours and set(ours) <= set(copied)
    for name, p in ours.items():
        torch.testing.assert_close(p.detach(), copied[name].to(p.dtype), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("sigma_encoding", [False, True])
def test_fairchem_dens_checkpoint_converts_and_matches_on_clean_input(sigma_encoding, demo_data):
    """A DeNS hydra checkpoint (EqV2DeNSBackbone + DeNS heads): the converted model predicts what
    fairchem's does when nothing is denoised, raw and EMA weights alike; the denoising parts are dropped."""
    _import_fairchem()
    try:
        from fairchem.core.models.base import GraphData
        from fairchem.core.models.equiformer_v2.equiformer_v2_dens import (DeNSScalarHead, DeNSVectorHead,
                                                                          EqV2DeNSBackbone)
    except ImportError as exc:
        pytest.skip(f"fairchem DeNS not importable here: {exc}")
    from lamm_ds.model.convert_fairchem import convert_checkpoint

    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        torch.manual_seed(0)
        kw = {**FAIRCHEM_TINY, "use_noise_schedule_sigma_encoding": sigma_encoding}
        bb = EqV2DeNSBackbone(**kw)
        eh, fh = DeNSScalarHead(bb), DeNSVectorHead(bb)
        with torch.no_grad():    # random weights everywhere, the encoders' biases (our l0_offset) included
            for p in [*bb.parameters(), *eh.parameters(), *fh.parameters()]:
                p.add_(0.05 * torch.randn_like(p))
        for m in (bb, eh, fh):
            m.eval()
        b = collate([build_sample(s, 5.0, None) for s in _parity_structures(demo_data)], dtype=F64)
        vec = b.edge_vectors()
        graph = GraphData(edge_index=b.edge_index.flip(0), edge_distance=vec.norm(dim=-1), edge_distance_vec=vec,
                          cell_offsets=b.shifts, offset_distances=None, neighbors=None, node_offset=0,
                          batch_full=b.batch, atomic_numbers_full=b.z)
        bb.generate_graph = lambda data, **kwargs: graph
        data = types.SimpleNamespace(natoms=b.natoms, pos=b.pos, atomic_numbers=b.z, batch=b.batch)
        with torch.no_grad():
            torch.manual_seed(123)
            emb = bb(data)
            e_raw, f_raw = eh(data, emb)["energy"], fh(data, emb)["forces"]
        state = {**{f"module.backbone.{k}": v for k, v in bb.state_dict().items()},
                 **{f"module.output_heads.energy.{k}": v for k, v in eh.state_dict().items()},
                 **{f"module.output_heads.forces.{k}": v for k, v in fh.state_dict().items()}}
        params = [*bb.parameters(), *eh.parameters(), *fh.parameters()]
        ckpt = {"state_dict": state,
                "config": {"model": {"name": "hydra", "backbone": {"model": "equiformer_v2_dens_backbone", **kw},
                                     "heads": {"energy": {"module": "eqV2_DeNS_scalar_head"},
                                               "forces": {"module": "eqV2_DeNS_vector_head"}}},
                           "optim": {"ema_decay": 0.999}},
                # EMA = the raw weights (so the same outputs are expected), in fairchem's parameter order
                "ema": {"shadow_params": [p.detach().clone() for p in params]}}
    finally:
        torch.set_default_dtype(old)
    assert any(".denoising_pos_block." in k for k in state)
    for weights in ("raw", "ema"):
        model = convert_checkpoint(ckpt, "omat", dtype=F64, weights=weights)
        assert model.weights_source == weights and model.cfg.l0_offset
        bias = bb.force_embedding.bias.detach() + (bb.noise_schedule_sigma_embedding.bias.detach()
                                                   if sigma_encoding else 0)
        assert torch.equal(model.backbone.l0_offset.detach(), bias)
        for h in model.heads.values():
            h.stats = type(h.stats)(DatasetStats.identity(model.cfg.max_z), model.cfg.max_z)
            h.offset.energy_offset.zero_()
        with torch.no_grad():
            torch.manual_seed(123)
            r = model(b)
        assert ((r["energy"] - e_raw).abs() / e_raw.abs()).max().item() < 1e-5
        assert rel(r["forces"], f_raw) < 1e-5
    # without the offset the outputs would differ: the test can fail
    model.backbone.l0_offset.data.zero_()
    with torch.no_grad():
        torch.manual_seed(123)
        assert ((model(b)["energy"] - e_raw).abs() / e_raw.abs()).max().item() > 1e-3


def test_l0_offset_shifts_the_scalar_features_and_survives_export(tmp_path):
    """The DeNS constant (``l0_offset``): off by default and left out of the file's config then;
    when on, a learned per-channel constant on every node's l = 0 features, kept by export."""
    import lamm_ds
    from lamm_ds.engine.export import export_model

    assert "l0_offset" not in tiny_cfg().to_dict()
    model = make_model(l0_offset=True, edge_roll="fixed")
    assert model.cfg.to_dict()["l0_offset"] is True
    b = batch_of([molecule_structure(), periodic_structure()])
    before = model(b)
    with torch.no_grad():
        model.backbone.l0_offset.copy_(0.3 * torch.randn_like(model.backbone.l0_offset))
    after = model(b)
    assert rel(after["energy"], before["energy"]) > 1e-6 and rel(after["forces"], before["forces"]) > 1e-3
    loaded = lamm_ds.load_model(export_model(model, tmp_path / "dens.safetensors")).double()
    assert loaded.cfg.l0_offset and torch.allclose(loaded.backbone.l0_offset.double(),
                                                   model.backbone.l0_offset.double())
    again = loaded(b)
    assert rel(again["energy"], after["energy"]) < 1e-6 and rel(again["forces"], after["forces"]) < 1e-6
