"""PaiNN backbone, dataset heads and the multi-dataset Potential: symmetry, derivatives, routing, fitting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule

import lamm_ds.model.painn as painn_mod
from lamm_ds.graphs import build_sample, collate
from lamm_ds.model import (
    DatasetStats,
    PaiNNConfig,
    Potential,
    fit_dataset_stats,
    fit_element_references,
    fit_normalization,
)
from lamm_ds.model.painn import _EdgeMessage, edge_message_reference
from lamm_ds.structure import Structure

MAX_Z = 30
F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(**kw) -> PaiNNConfig:
    base = dict(hidden=16, layers=2, num_rbf=8, cutoff=4.0, max_neighbors=None, max_z=MAX_Z)
    base.update(kw)
    return PaiNNConfig(**base)


def random_stats(seed: int) -> DatasetStats:
    rng = np.random.default_rng(seed)
    return DatasetStats(rng.normal(-3.0, 1.0, MAX_Z + 1), energy_mean=rng.normal(), energy_std=0.5 + rng.random(),
                        force_std=0.5 + rng.random())


def make_model(forces="direct", stress=False, names=("A",), seed=0, **kw) -> Potential:
    torch.manual_seed(seed)
    cfg = tiny_cfg(forces=forces, stress=stress, **kw)
    model = Potential(cfg, list(names), {n: random_stats(k + 10 * seed) for k, n in enumerate(names)})
    # Random head outputs so routing / scaling errors cannot hide behind a near-zero MLP.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.double().eval()


def molecule_structure() -> Structure:
    a = molecule("CH3CH2OH")
    a.rattle(0.05, seed=1)
    return Structure(a.numbers, a.positions)


def periodic_structure(symbol="Cu", a0=3.6, seed=2, alloy=True) -> Structure:
    a = bulk(symbol, "fcc", a=a0, cubic=True)
    a.rattle(0.08, seed=seed)
    numbers = a.numbers.copy()
    if alloy:
        numbers[1] = 13 if symbol != "Al" else 29   # two species, so references matter
    cell = a.cell[:] + np.array([[0.0, 0.1, 0.0], [0.05, 0.0, 0.0], [0.0, 0.0, 0.0]])  # non-orthogonal
    return Structure(numbers, a.positions, cell, [True, True, True])


def batch_of(structures, cfg, dataset_ids=None):
    dataset_ids = dataset_ids or [0] * len(structures)
    samples = [build_sample(s, cfg.cutoff, cfg.max_neighbors, dataset_id=d) for s, d in zip(structures, dataset_ids)]
    return collate(samples, dtype=F64)


def random_rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def transformed(st: Structure, rot=None, shift=None, perm=None, wrap=None) -> Structure:
    pos, cell, numbers = st.positions.copy(), st.cell.copy(), st.numbers.copy()
    if wrap is not None:                 # move atoms by whole lattice vectors (another periodic image)
        pos = pos + wrap @ cell
    if perm is not None:
        pos, numbers = pos[perm], numbers[perm]
    if rot is not None:
        pos, cell = pos @ rot.T, cell @ rot.T
    if shift is not None:
        pos = pos + shift
    return Structure(numbers, pos, cell, st.pbc)


def predict(model, structures, dataset_ids=None):
    out = model(batch_of(structures, model.cfg, dataset_ids))
    return {k: v.detach() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------
# fused edge op


@pytest.mark.parametrize("with_v", [True, False])
def test_edge_message_matches_reference_and_is_twice_differentiable(monkeypatch, with_v):
    monkeypatch.setattr(painn_mod, "_chunk_size", lambda t, w: 5)  # exercise the edge chunking
    g = torch.Generator().manual_seed(0)
    n, e, h, r = 6, 17, 3, 4
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=F64, requires_grad=True)  # noqa: E731
    x, v, rbf, w, unit = mk(n, 3 * h), mk(n, 3, h), mk(e, r), mk(3 * h, r), mk(e, 3)
    i, j = torch.randint(0, n, (e,), generator=g), torch.randint(0, n, (e,), generator=g)
    vv = v if with_v else None
    for a, b in zip(_EdgeMessage.apply(x, vv, rbf, w, unit, i, j), edge_message_reference(x, vv, rbf, w, unit, i, j)):
        torch.testing.assert_close(a, b)
    inputs = (x, v, rbf, w, unit) if with_v else (x, rbf, w, unit)

    def f(*args):
        if not with_v:
            args = (args[0], None, *args[1:])
        return _EdgeMessage.apply(*args, i, j)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_fused_and_plain_backbones_agree():
    st = [periodic_structure(), molecule_structure()]
    m1 = make_model("conservative", stress=True)
    m2 = Potential(tiny_cfg(forces="conservative", stress=True, fused_messages=False), ["A"]).double().eval()
    m2.load_state_dict(m1.state_dict())
    o1, o2 = predict(m1, st), predict(m2, st)
    for k in ("energy", "forces", "stress"):
        torch.testing.assert_close(o1[k], o2[k])


# ---------------------------------------------------------------------------------------------------
# symmetries


@pytest.mark.parametrize("forces", ["direct", "conservative"])
def test_invariance_and_equivariance(forces):
    model = make_model(forces)
    mol, cry = molecule_structure(), periodic_structure()
    ref = predict(model, [mol, cry])
    n_mol = mol.natoms
    rot = random_rotation(3)
    rng = np.random.default_rng(4)
    perm_m, perm_c = rng.permutation(mol.natoms), rng.permutation(cry.natoms)
    wrap = rng.integers(-2, 3, size=(cry.natoms, 3)).astype(float)
    wrap[0] = [1.0, -1.0, 2.0]  # make sure at least one atom moves
    shift = np.array([0.7, -1.3, 2.1])

    def check(out, f_expected):
        torch.testing.assert_close(out["energy"], ref["energy"], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out["forces"], torch.as_tensor(f_expected), rtol=1e-9, atol=1e-10)

    f_ref = ref["forces"].numpy()
    check(predict(model, [transformed(mol, rot=rot), transformed(cry, rot=rot)]), f_ref @ rot.T)
    check(predict(model, [transformed(mol, shift=shift), transformed(cry, shift=shift)]), f_ref)
    out = predict(model, [transformed(mol, perm=perm_m), transformed(cry, perm=perm_c)])
    check(out, np.concatenate([f_ref[:n_mol][perm_m], f_ref[n_mol:][perm_c]]))
    check(predict(model, [mol, transformed(cry, wrap=wrap)]), f_ref)
    assert ref["forces"].abs().max() > 1e-3  # non-trivial forces, so the checks mean something


def test_fp32_rotation_covariance():
    # the production dtype: same symmetry, looser tolerance
    torch.manual_seed(0)
    model = Potential(tiny_cfg(), ["A"]).eval()
    st = molecule_structure()
    rot = random_rotation(7)
    cfg = model.cfg
    b1 = collate([build_sample(st, cfg.cutoff, None)])
    b2 = collate([build_sample(transformed(st, rot=rot), cfg.cutoff, None)])
    o1, o2 = model(b1), model(b2)
    assert o1["energy"].dtype == torch.float32
    torch.testing.assert_close(o2["energy"], o1["energy"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o2["forces"], o1["forces"] @ torch.as_tensor(rot.T, dtype=torch.float32),
                               rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# derivatives


def test_conservative_forces_are_minus_energy_gradient():
    model = make_model("conservative")
    b = batch_of([molecule_structure(), periodic_structure()], model.cfg)
    forces = model(b)["forces"]
    h = 1e-5
    rng = np.random.default_rng(0)
    for atom in rng.choice(b.num_atoms, 6, replace=False):
        for k in range(3):
            p, m = b.pos.clone(), b.pos.clone()
            p[atom, k] += h
            m[atom, k] -= h
            with torch.no_grad():
                ep, em = model(b.replace(pos=p))["energy"].sum(), model(b.replace(pos=m))["energy"].sum()
            fd = -(ep - em) / (2 * h)
            assert abs(float(fd) - float(forces[atom, k])) < 1e-7 * max(1.0, abs(float(fd)))


@pytest.mark.parametrize("symbol,a0", [("Cu", 3.6), ("Al", 4.05)])
def test_stress_is_strain_derivative(symbol, a0):
    model = make_model("conservative", stress=True)
    cry = periodic_structure(symbol, a0, seed=5)
    b = batch_of([cry, molecule_structure()], model.cfg)
    out = model(b)
    stress = out["stress"]
    assert stress.shape == (2, 3, 3)
    assert torch.all(stress[1] == 0)                   # non-periodic graph
    torch.testing.assert_close(stress[0], stress[0].T)  # symmetric strain -> symmetric stress
    volume = abs(np.linalg.det(cry.cell))
    h = 1e-5
    g0 = b.batch == 0
    for a, c in [(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)]:
        energies = []
        for sign in (1, -1):
            eps = torch.zeros(3, 3, dtype=F64)
            eps[a, c] += sign * h / 2
            eps[c, a] += sign * h / 2
            deform = torch.eye(3, dtype=F64) + eps
            pos = torch.where(g0[:, None], b.pos @ deform, b.pos)
            cell = b.cell.clone()
            cell[0] = cell[0] @ deform
            with torch.no_grad():
                energies.append(model(b.replace(pos=pos, cell=cell))["energy"][0])
        fd = (energies[0] - energies[1]) / (2 * h)
        # symmetric perturbation of total size h on (a,c)+(c,a): dE/dh = V σ_ac (σ symmetric)
        expected = volume * stress[0, a, c]
        assert abs(float(fd) - float(expected)) < 1e-7 * max(1.0, abs(float(fd))), (a, c, fd, expected)
    assert stress[0].abs().max() > 1e-4


def test_training_mode_keeps_graph_for_force_loss():
    model = make_model("conservative", stress=True).train()
    b = batch_of([periodic_structure(), molecule_structure()], model.cfg)
    out = model(b)
    assert out["forces"].requires_grad and out["stress"].requires_grad
    loss = (out["forces"] ** 2).sum() + (out["stress"] ** 2).sum()
    loss.backward()
    g = model.backbone.messages[0].filter.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model(b)
    assert not out["forces"].requires_grad and not out["energy"].requires_grad


# ---------------------------------------------------------------------------------------------------
# dataset heads


@pytest.mark.parametrize("forces", ["direct", "conservative"])
def test_mixed_batch_routes_to_its_heads(forces):
    model = make_model(forces, names=("A", "B"))
    structures = [molecule_structure(), periodic_structure(), periodic_structure("Al", 4.05, seed=9)]
    ids = [0, 1, 0]
    b = batch_of(structures, model.cfg, ids)
    out = model(b, return_features=True)
    # explicit formula, graph by graph
    s = out["node_scalar"]
    for g, d in enumerate(ids):
        head = model.heads[model.dataset_names[d]]
        atoms = b.batch == g
        e = head.mlp(s[atoms]).squeeze(-1)
        st = head.stats
        expected = (st.energy_std * e + st.energy_mean + st.references[b.z[atoms]].double()).sum()
        torch.testing.assert_close(out["energy"][g], expected)
        assert float(out["energy_scale"][g]) == pytest.approx(float(st.energy_std))
        assert float(out["force_scale"][g]) == pytest.approx(float(st.force_std))
    # perturbing head B changes only the graph that uses B
    with torch.no_grad():
        for p in model.heads["B"].parameters():
            p.add_(torch.randn_like(p))
    out2 = model(b)
    a_atoms = (b.batch == 0) | (b.batch == 2)
    torch.testing.assert_close(out2["energy"][[0, 2]], out["energy"][[0, 2]].detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(out2["forces"][a_atoms], out["forces"][a_atoms].detach(), rtol=0, atol=1e-12)
    assert abs(float(out2["energy"][1].detach() - out["energy"][1].detach())) > 1e-6
    with pytest.raises(ValueError):
        model(b.replace(dataset_id=torch.tensor([0, 2, 0])))


def test_add_dataset_shares_backbone():
    model = make_model("direct", names=("A",))
    backbone = model.backbone
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    structures = [molecule_structure(), periodic_structure()]
    ref = predict(model, structures)
    idx = model.add_dataset("C", random_stats(42), init_from="A")
    assert idx == 1 and model.dataset_index("C") == 1 and model.dataset_index("A") == 0
    assert model.dataset_names == ["A", "C"] and model.backbone is backbone
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, before[k])
    assert torch.equal(model.heads["C"].mlp[0].weight, model.heads["A"].mlp[0].weight)
    assert model.heads["C"].mlp[0].weight is not model.heads["A"].mlp[0].weight
    assert model.heads["C"].mlp[0].weight.dtype == F64
    sd = model.state_dict()
    assert "heads.C.stats.references" in sd and "heads.C.stats.force_std" in sd
    torch.testing.assert_close(predict(model, structures, [0, 0])["energy"], ref["energy"])
    out = predict(model, structures, [1, 1])
    assert not torch.allclose(out["energy"], ref["energy"])
    # a fresh model with the same head layout loads the state dict (stats included)
    other = Potential(model.cfg, ["A", "C"]).double()
    other.load_state_dict(sd)
    torch.testing.assert_close(other.heads["C"].stats.references, model.heads["C"].stats.references)
    with pytest.raises(ValueError):
        model.add_dataset("A")
    with pytest.raises(KeyError):
        model.dataset_index("nope")


def test_bf16_module_keeps_geometry_and_stats_in_fp32():
    torch.manual_seed(0)
    stats = {"A": random_stats(1)}
    model = Potential(tiny_cfg(stress=True, forces="conservative"), ["A"], stats).eval()
    b = collate([build_sample(s, 4.0, None) for s in (periodic_structure(), molecule_structure())])
    ref = model(b)
    model = model.to(torch.bfloat16)
    assert model.backbone.embedding.weight.dtype == torch.bfloat16
    assert model.heads["A"].stats.references.dtype == torch.float32
    torch.testing.assert_close(model.heads["A"].stats.references,
                               torch.as_tensor(stats["A"].references, dtype=torch.float32))
    out = model(b)
    for k in ("energy", "forces", "stress"):
        assert out[k].dtype == torch.float32
    # bf16 features: only loose agreement is expected (see notes: ~1e-2 relative)
    scale = ref["energy"].abs().max()
    assert (out["energy"] - ref["energy"]).abs().max() < 0.05 * scale


def test_autocast_leaves_distances_in_fp32():
    torch.manual_seed(0)
    model = Potential(tiny_cfg(stress=True, forces="conservative"), ["A"]).eval()
    b = collate([build_sample(periodic_structure(), 4.0, None)])
    assert (b.shifts != 0).any()  # periodic offsets go through einsum, which autocast would lower
    seen = []
    model.backbone.radial.register_forward_hook(lambda mod, args, res: seen.append(args[0].detach()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(b)
    exact = torch.linalg.vector_norm(b.edge_vectors(), dim=-1)
    assert seen[0].dtype == torch.float32
    torch.testing.assert_close(seen[0], exact, rtol=1e-6, atol=1e-6)
    assert out["energy"].dtype == torch.float32 and torch.isfinite(out["stress"]).all()


# ---------------------------------------------------------------------------------------------------
# fitting


def test_fit_element_references_recovers_known_values():
    rng = np.random.default_rng(0)
    true = np.zeros(MAX_Z + 1)
    true[[1, 6, 8, 26]] = [-3.4, -9.1, -4.9, -8.3]
    numbers = [rng.choice([1, 6, 8, 26], size=rng.integers(2, 12)) for _ in range(40)]
    energies = np.array([true[n].sum() for n in numbers])
    refs = fit_element_references(numbers, energies, MAX_Z)
    np.testing.assert_allclose(refs, true, atol=1e-10)
    # structures without energy (NaN) are ignored
    energies_missing = energies.copy()
    energies_missing[::3] = np.nan
    np.testing.assert_allclose(fit_element_references(numbers, energies_missing, MAX_Z), true, atol=1e-10)
    # rank deficient: only H2O multiples -> no failure, energies still reproduced, absent elements 0
    water = [np.array([1, 1, 8] * k) for k in range(1, 5)]
    e_water = np.array([k * (2 * -3.4 - 4.9) for k in range(1, 5)])
    refs = fit_element_references(water, e_water, MAX_Z)
    np.testing.assert_allclose([refs[n].sum() for n in water], e_water, atol=1e-10)
    assert np.all(refs[[0, 6, 26]] == 0)


def test_fit_normalization_and_dataset_stats():
    rng = np.random.default_rng(1)
    refs = np.zeros(MAX_Z + 1)
    refs[[1, 8]] = [-3.0, -5.0]
    numbers = [rng.choice([1, 8], size=rng.integers(3, 9)) for _ in range(50)]
    resid = rng.normal(0.2, 0.05, size=50)
    energies = np.array([refs[n].sum() + r * len(n) for n, r in zip(numbers, resid)])
    forces = [rng.normal(0, 0.7, size=(len(n), 3)) for n in numbers]
    mean, std, fstd = fit_normalization(numbers, energies, forces, refs)
    assert mean == pytest.approx(resid.mean()) and std == pytest.approx(resid.std())
    assert fstd == pytest.approx(np.sqrt(np.mean(np.concatenate(forces) ** 2)))
    assert fit_normalization(numbers) == (0.0, 1.0, 1.0)
    assert fit_normalization(numbers, None, [None] * len(numbers)) == (0.0, 1.0, 1.0)
    assert fit_normalization(numbers, np.full(len(numbers), np.nan), None, refs) == (0.0, 1.0, 1.0)
    structures = [Structure(n, np.zeros((len(n), 3)), energy=e, forces=f) for n, e, f in zip(numbers, energies, forces)]
    structures.append(Structure([1, 8], np.zeros((2, 3))))  # unlabelled structure
    st = fit_dataset_stats(structures, MAX_Z)
    # a constant per-atom offset is collinear with the composition, so the references absorb it
    np.testing.assert_allclose(st.references[[1, 8]], refs[[1, 8]] + resid.mean(), atol=0.03)
    assert abs(st.energy_mean) < 0.01 and 0 < st.energy_std < 0.1 and st.force_std == pytest.approx(fstd)


def test_config_validation():
    with pytest.raises(ValueError):
        PaiNNConfig(forces="magic")
    with pytest.raises(ValueError):
        PaiNNConfig(forces="direct", stress=True)
    cfg = PaiNNConfig(hidden=512, layers=6, cutoff=12.0)
    assert PaiNNConfig.from_dict(cfg.to_dict()) == cfg
