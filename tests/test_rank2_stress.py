"""EquiformerV2's direct rank-2 stress head (lamm_ds.model.rank2_stress): its basis against e3nn,
symmetry, rotation / permutation / lattice behaviour, molecules, config and export round trip, the
calculator, converter refusals, and parity with fairchem-core 1.x's Rank2SymmetricTensorHead
(optional) for raw and EMA weights with non-trivial normalisers."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from ase.build import bulk
from e3nn import o3
from fairchem_shim import import_fairchem
from test_equiformer_v2 import (
    FAIRCHEM_TINY,
    _transformed,
    batch_of,
    make_model,
    molecule_structure,
    periodic_structure,
    rel,
)

from lamm_ds.graphs import build_sample, collate
from lamm_ds.model.equiformer_v2 import EquiformerV2Config
from lamm_ds.model.rank2_stress import rank2_basis
from lamm_ds.model.so3 import float64_default
from lamm_ds.structure import Structure

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def stress_model(**kw):
    # a 32x32 grid puts the backbone's own equivariance error below 1e-7 (see test_equiformer_v2)
    return make_model(stress_head=True, edge_roll="fixed", grid_resolution=32, **kw)


def salt_structure() -> Structure:
    """Triclinic (sheared) rock salt: a stress with sizeable off-diagonal parts."""
    a = bulk("NaCl", "rocksalt", a=5.0)
    a.rattle(0.1, seed=4)
    cell = a.cell[:] @ np.array([[1.0, 0.08, 0.0], [0.0, 1.0, 0.05], [0.03, 0.0, 1.0]])
    a.set_cell(cell, scale_atoms=True)
    return Structure(a.numbers, a.positions, a.cell[:], [True, True, True])


def _rotate(stress: torch.Tensor, R: np.ndarray) -> torch.Tensor:
    R = torch.as_tensor(R, dtype=stress.dtype)
    return R @ stress @ R.T


# ------------------------------------------------------------------------------------------------
# the head alone (no fairchem needed)


def test_basis_is_orthonormal_and_matches_e3nn_degree_2():
    b = rank2_basis()
    gram = torch.einsum("kij,lij->kl", b, b)
    assert torch.allclose(gram, torch.eye(6, dtype=F64), atol=1e-15)
    assert torch.allclose(b, b.transpose(1, 2)) and torch.allclose(b[1:].diagonal(dim1=1, dim2=2).sum(-1),
                                                                    torch.zeros(5, dtype=F64), atol=1e-15)
    u = torch.nn.functional.normalize(torch.randn(20, 3, dtype=F64), dim=1)
    quad = torch.einsum("ei,kij,ej->ek", u, b[1:], u)
    y2 = o3.spherical_harmonics(2, u, normalize=True, normalization="component")
    # one positive constant for every m: the same basis, order and signs as e3nn's l = 2
    assert torch.allclose(y2, quad * (15 / 2) ** 0.5, atol=1e-12)


def test_stress_is_symmetric_zero_for_molecules_and_independent_of_batch_mates():
    model = stress_model()
    p, s, m = periodic_structure(), salt_structure(), molecule_structure()
    out = model(batch_of([p, m, s]))
    st = out["stress"]
    assert st.shape == (3, 3, 3) and st.dtype == F64
    assert torch.equal(st, st.transpose(1, 2))
    assert torch.equal(st[1], torch.zeros(3, 3, dtype=F64))          # molecule: no cell, no stress
    off = st[2][~torch.eye(3, dtype=torch.bool)]
    assert off.abs().min() > 1e-4 * st[2].abs().max()               # a full tensor, not a diagonal one
    alone = model(batch_of([s]))["stress"][0]
    assert rel(st[2], alone) < 1e-12
    # a degenerate "periodic" cell gets no stress either
    flat = Structure(s.numbers, s.positions, np.diag([5.0, 5.0, 0.0]), [True, True, False])
    assert torch.equal(model(batch_of([flat]))["stress"][0], torch.zeros(3, 3, dtype=F64))


def test_isotropic_part_is_invariant_and_an_equivariant_l2_map_rotates_as_a_rank2_tensor():
    """The trace is rotation invariant for any MLP. The l = 2 part rotates as R S R^T when its MLP
    is linear without bias; the published head (bias + SiLU on each l = 2 component) is not."""
    s = salt_structure()
    torch.manual_seed(7)
    R = o3.rand_matrix(dtype=F64).numpy()
    default = stress_model()
    with torch.no_grad():
        s0, s1 = (default(batch_of([x]))["stress"][0] for x in (s, _transformed(s, R=R)))
    assert abs(float(s1.trace() - s0.trace())) < 1e-7 * float(s0.abs().max())
    broken = rel(s1, _rotate(s0, R))
    linear = stress_model(stress_head_mlp_layers=1)
    with torch.no_grad():
        linear.stress_head.aniso_mlp[-1].bias.zero_()
        t0, t1 = (linear(batch_of([x]))["stress"][0] for x in (s, _transformed(s, R=R)))
    exact = rel(t1, _rotate(t0, R))
    aniso = t0 - t0.trace() / 3 * torch.eye(3, dtype=F64)
    assert aniso.abs().max() > 0.1 * t0.abs().max()                 # the l = 2 part is not negligible
    assert exact < 1e-6, exact
    assert broken > 100 * exact, (broken, exact)                    # documented: fairchem's MLP is not equivariant


def test_stress_is_invariant_to_permutation_translation_lattice_images_and_cell_choice():
    model = stress_model()
    s = salt_structure()
    ref = model(batch_of([s]))["stress"][0]
    rng = np.random.default_rng(5)
    n = len(s.numbers)
    cases = {"permutation": dict(perm=rng.permutation(n)), "translation": dict(shift=rng.normal(size=3) * 4),
             "lattice image": dict(image_shift=rng.integers(-2, 3, size=(n, 3)).astype(float)),
             "cell choice": dict(cell_change=np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 1.0]]))}
    for name, tr in cases.items():
        assert rel(model(batch_of([_transformed(s, **tr)]))["stress"][0], ref) < 1e-10, name


def test_head_leaves_energy_and_forces_alone_and_is_left_out_of_the_config_when_off():
    with_head = stress_model()
    without = make_model(edge_roll="fixed", grid_resolution=32)
    missing, unexpected = without.load_state_dict(with_head.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("stress_head.") for k in unexpected)
    b = batch_of([salt_structure(), molecule_structure()])
    a, c = with_head(b), without(b)
    assert torch.equal(a["energy"], c["energy"]) and torch.equal(a["forces"], c["forces"])
    assert "stress" not in c and without.stress_head is None
    d = EquiformerV2Config().to_dict()
    assert not any(k.startswith("stress_head") for k in d)           # files readable by older lamm-ds
    assert EquiformerV2Config.from_dict(d).stress_head is False
    on = EquiformerV2Config(stress_head=True, stress_head_mlp_layers=3).to_dict()
    assert on["stress_head"] is True and on["stress_head_mlp_layers"] == 3
    with pytest.raises(ValueError, match="choose one"):
        EquiformerV2Config(forces="conservative", stress=True, stress_head=True)
    with pytest.raises(ValueError, match="stress_head_mlp_layers >= 1"):
        EquiformerV2Config(stress_head=True, stress_head_mlp_layers=0)


def test_training_gradients_reach_the_head():
    model = stress_model().train()
    out = model(batch_of([salt_structure(), periodic_structure()]))
    out["stress"].pow(2).sum().backward()
    grads = [p.grad for p in model.stress_head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.stress_head.iso_mlp[0].weight.grad.abs().sum() > 0


def test_export_and_load_roundtrip_keeps_options_normalisers_and_predictions(tmp_path):
    import lamm_ds
    from lamm_ds.engine.export import export_model, read_export_metadata

    model = stress_model(stress_head_source_target=False, stress_head_edge_mlp=True, stress_head_extensive=True,
                         stress_head_avg_num_nodes=6.5).float()
    with torch.no_grad():
        model.stress_head.norm.iso_mean.fill_(0.25)
        model.stress_head.norm.aniso_std.fill_(1.75)
    path = export_model(model, tmp_path / "stress.safetensors")
    assert '"stress_head": true' in read_export_metadata(path)["model_config"]
    loaded = lamm_ds.load_model(path)
    assert loaded.cfg == model.cfg and loaded.stress_head.norm.aniso_std.item() == 1.75
    b = collate([build_sample(s, 4.0, None) for s in (salt_structure(), molecule_structure())])
    a, c = model(b), loaded(b)
    for key in ("energy", "forces", "stress"):
        assert torch.equal(a[key], c[key]), key


def test_calculator_returns_the_direct_stress_in_voigt_form():
    import warnings

    from ase import Atoms
    from ase.calculators.calculator import PropertyNotImplementedError
    from ase.stress import full_3x3_to_voigt_6_stress

    from lamm_ds.calculator import LammCalculator

    model = stress_model()
    s = salt_structure()
    atoms = Atoms(numbers=s.numbers, positions=s.positions, cell=s.cell, pbc=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # direct forces: the non-conservative warning
        calc = LammCalculator(model, dtype="float64")
    atoms.calc = calc
    want = model(batch_of([s]))["stress"][0].detach().numpy()
    np.testing.assert_allclose(atoms.get_stress(), full_3x3_to_voigt_6_stress(want), rtol=1e-10, atol=1e-14)
    mol = molecule_structure()
    atoms = Atoms(numbers=mol.numbers, positions=mol.positions)
    atoms.calc = calc
    with pytest.raises(PropertyNotImplementedError, match="periodic cell"):
        atoms.get_stress()


# ------------------------------------------------------------------------------------------------
# converter refusals (no fairchem needed)


_SMALL = {"model": "equiformer_v2_backbone", "num_layers": 1, "lmax_list": [2], "mmax_list": [1],
          "sphere_channels": 8, "attn_hidden_channels": 8, "ffn_hidden_channels": 8, "edge_channels": 8}


def _hydra(stress_spec: dict, config: dict | None = None, **extra) -> dict:
    heads = {"energy": {"module": "equiformer_v2_energy_head"}, "forces": {"module": "equiformer_v2_force_head"},
             "stress": stress_spec}
    model = {"name": "hydra", "backbone": dict(_SMALL), "heads": heads}
    return {"state_dict": {}, "config": {"model": model, **(config or {})}, **extra}


def test_converter_refuses_unsupported_rank2_heads_and_normalisers():
    from lamm_ds.model.convert_fairchem import ConversionError, convert_checkpoint

    with pytest.raises(ConversionError, match="decompose=False"):
        convert_checkpoint(_hydra({"module": "rank2_symmetric_head"}))
    with pytest.raises(ConversionError, match=r"rank-2 head 'stress': unknown option\(s\) fancy"):
        convert_checkpoint(_hydra({"module": "rank2_symmetric_head", "decompose": True, "fancy": 1}))
    with pytest.raises(ConversionError, match="num_mlp_layers=0"):
        convert_checkpoint(_hydra({"module": "dens_rank2_symmetric_head", "decompose": True, "num_mlp_layers": 0}))
    ok = {"module": "rank2_symmetric_head", "decompose": True, "use_source_target_embedding": True}
    norms = {"stress_isotropic": {"mean": torch.tensor(0.1), "rmsd": torch.tensor(2.0)},
             "stress_anisotropic": {"mean": torch.tensor(0.01, dtype=F64), "rmsd": torch.tensor(1.0)}}
    with pytest.raises(ConversionError, match="stress_anisotropic normaliser mean 0.01"):
        convert_checkpoint(_hydra(ok, normalizers=norms))
    norms["stress_anisotropic"]["mean"] = torch.zeros(5)
    with pytest.raises(ConversionError, match="stress_anisotropic normaliser mean must be one finite number"):
        convert_checkpoint(_hydra(ok, normalizers=norms))
    fitted = {"dataset": {"train": {"transforms": {"normalizer": {"file": "/nowhere/normalizers.pt"}}}}}
    with pytest.raises(ConversionError, match="no 'energy' normaliser"):   # the first one it needs
        convert_checkpoint(_hydra(ok, config=fitted))
    held = {k: {"mean": torch.tensor(0.0), "rmsd": torch.tensor(1.0)} for k in ("energy", "forces")}
    with pytest.raises(ConversionError, match="no 'stress_isotropic' normaliser"):
        convert_checkpoint(_hydra(ok, config=fitted, normalizers=held))
    wrong = {"outputs": {"stress": {"decomposition": {"stress_isotropic": {"irrep_dim": 0},
                                                      "stress_deviator": {"irrep_dim": 2}}}}}
    with pytest.raises(ConversionError, match="outputs.stress.decomposition"):
        convert_checkpoint(_hydra(ok, config=wrong))
    # a supported head with everything in place gets as far as the weights
    with pytest.raises(ConversionError, match="lacks weights for"):
        convert_checkpoint(_hydra(ok))


# ------------------------------------------------------------------------------------------------
# parity with fairchem-core 1.x (optional dependency)


_PARITY_HEADS = {
    # the OMat24 configuration (eqV2_31M_omat_mp_salex.pt): decompose + source/target embedding
    "omat24": ("rank2_symmetric_head", dict(decompose=True, use_source_target_embedding=True)),
    # every other branch: target-only edges, MLPs on edges, sum pooling / avg_num_nodes, 3 layers (DeNS class)
    "dens-variant": ("dens_rank2_symmetric_head", dict(decompose=True, use_source_target_embedding=False,
                                                       edge_level_mlp=True, extensive=True, avg_num_nodes=6.5,
                                                       num_mlp_layers=3)),
}


@pytest.mark.parametrize("variant", sorted(_PARITY_HEADS))
def test_fairchem_rank2_head_parity_raw_and_ema(variant, tmp_path):
    import_fairchem()
    try:
        from fairchem.core.common.utils import cg_change_mat
        from fairchem.core.models.base import GraphData
        from fairchem.core.models.equiformer_v2.equiformer_v2 import EquiformerV2Backbone
        from fairchem.core.models.equiformer_v2.equiformer_v2_dens import DeNSRank2Head
        from fairchem.core.models.equiformer_v2.heads import EqV2ScalarHead, EqV2VectorHead
        from fairchem.core.models.equiformer_v2.heads.rank2 import Rank2SymmetricTensorHead
    except ImportError as exc:
        pytest.skip(f"fairchem's rank-2 head not importable here: {exc}")
    from lamm_ds.engine.export import export_model, load_model
    from lamm_ds.model.convert_fairchem import convert_checkpoint

    module, opts = _PARITY_HEADS[variant]
    kw = {**FAIRCHEM_TINY, "lmax_list": [2], "mmax_list": [1]}
    structures = [periodic_structure(), salt_structure(), molecule_structure()]
    b = collate([build_sample(s, 5.0, None) for s in structures], dtype=F64)
    vec = b.edge_vectors()

    def graph(data, **kwargs):  # our neighbour list in fairchem's edge convention (source j, target i);
        # a new one per call: fairchem's backbone overwrites graph.edge_distance with its expansion
        return GraphData(edge_index=b.edge_index.flip(0), edge_distance=vec.norm(dim=-1), edge_distance_vec=vec,
                         cell_offsets=b.shifts, offset_distances=None, neighbors=None, node_offset=0,
                         batch_full=b.batch, atomic_numbers_full=b.z)

    data = types.SimpleNamespace(natoms=b.natoms, pos=b.pos, atomic_numbers=b.z, batch=b.batch)
    iso_mean, iso_std, aniso_std = -0.02, 0.05, 0.03
    e_mean, e_std, f_std = -0.75, 2.5, 1.7

    with float64_default():
        torch.manual_seed(0)
        bb = EquiformerV2Backbone(**kw)
        eh, fh = EqV2ScalarHead(bb), EqV2VectorHead(bb)
        sh = (DeNSRank2Head if module.startswith("dens") else Rank2SymmetricTensorHead)(bb, **opts)
        modules = [bb, eh, fh, sh]
        params = [p for m in modules for p in m.parameters()]
        with torch.no_grad():  # random, non-degenerate weights everywhere (LayerNorms and biases too)
            for p in params:
                p.add_(0.05 * torch.randn_like(p))
        for m in modules:
            m.eval()
        bb.generate_graph = graph

        def fairchem_outputs():
            with torch.no_grad():
                torch.manual_seed(123)   # the random edge-frame roll: same draw on both sides
                emb = bb(data)
                e, f, t = eh(data, emb)["energy"], fh(data, emb)["forces"], sh(data, emb)
            # what fairchem's trainer does: denormalise each part, then rebuild the 3x3 tensor
            irreps = torch.zeros(b.num_graphs, 9, dtype=F64)
            irreps[:, :1] = t["stress_isotropic"].view(-1, 1) * iso_std + iso_mean
            irreps[:, 4:] = t["stress_anisotropic"].view(-1, 5) * aniso_std + 0.0
            stress = torch.einsum("ba,cb->ca", cg_change_mat(2).to(F64), irreps).view(-1, 3, 3)
            return e_std * e + e_mean, f_std * f, stress

        raw_out = fairchem_outputs()
        state = {**{f"module.backbone.{k}": v.clone() for k, v in bb.state_dict().items()},
                 **{f"module.output_heads.energy.{k}": v.clone() for k, v in eh.state_dict().items()},
                 **{f"module.output_heads.forces.{k}": v.clone() for k, v in fh.state_dict().items()},
                 **{f"module.output_heads.stress.{k}": v.clone() for k, v in sh.state_dict().items()}}
        # EMA: other weights, in fairchem's parameter order (backbone, then the heads in config order)
        shadow = [(p + 0.02 * torch.randn_like(p)).detach() for p in params]
        with torch.no_grad():
            for p, s in zip(params, shadow):
                p.copy_(s)
        ema_out = fairchem_outputs()

    ckpt = {"state_dict": state,
            "config": {"model": {"name": "hydra", "backbone": {"model": "equiformer_v2_backbone", **kw},
                                 "heads": {"energy": {"module": "equiformer_v2_energy_head"},
                                           "forces": {"module": "equiformer_v2_force_head"},
                                           "stress": {"module": module, "output_name": "stress", **opts}}},
                       "optim": {"ema_decay": 0.999},
                       "outputs": {"stress": {"level": "system", "property": "stress", "decomposition": {
                           "stress_isotropic": {"irrep_dim": 0}, "stress_anisotropic": {"irrep_dim": 2}}}}},
            "normalizers": {"energy": {"mean": torch.tensor(e_mean), "rmsd": torch.tensor(e_std)},
                            "forces": {"mean": torch.tensor(0.0), "rmsd": torch.tensor(f_std)},
                            "stress_isotropic": {"mean": torch.tensor(iso_mean), "rmsd": torch.tensor(iso_std)},
                            "stress_anisotropic": {"mean": torch.tensor(0.0), "rmsd": torch.tensor(aniso_std)}},
            "ema": {"shadow_params": shadow}}
    periodic = torch.tensor([bool(np.any(s.pbc)) for s in structures])
    for weights, (e_fc, f_fc, s_fc) in (("raw", raw_out), ("ema", ema_out)):
        model = convert_checkpoint(ckpt, "omat", dtype=F64, weights=weights)
        assert model.weights_source == weights and model.cfg.stress_head
        with torch.no_grad():
            torch.manual_seed(123)
            out = model(b)
        assert ((out["energy"] - e_fc).abs() / e_fc.abs()).max().item() < 1e-5, weights
        assert rel(out["forces"], f_fc) < 1e-5, weights
        s_rel = rel(out["stress"][periodic], s_fc[periodic])
        assert s_rel < 1e-5, (weights, s_rel)
        for g in torch.nonzero(periodic).reshape(-1).tolist():
            assert rel(out["stress"][g], s_fc[g]) < 1e-5, (weights, g)
        assert torch.equal(out["stress"][~periodic], torch.zeros_like(out["stress"][~periodic]))
    # the comparison sees the anisotropic part: without it the stress is far off (the test can fail)
    with torch.no_grad():
        model.stress_head.norm.aniso_std.zero_()
        torch.manual_seed(123)
        assert rel(model(b)["stress"][periodic], s_fc[periodic]) > 1e-3
    # the exported file (fp32) predicts the same, up to fp32 rounding
    model = convert_checkpoint(ckpt, "omat", weights="raw")
    loaded = load_model(export_model(model, tmp_path / "omat.safetensors")).double()
    with torch.no_grad():
        torch.manual_seed(123)
        out = loaded(b)
    assert rel(out["stress"][periodic], raw_out[2][periodic]) < 1e-5
    assert loaded.stress_head.norm.iso_mean.item() == pytest.approx(iso_mean)


def test_a_model_with_the_stress_head_counts_as_predicting_stress():
    """The training guard's view: stress labels reach the loss through the direct head as through
    the strain derivative; a model with neither does not use them."""
    from lamm_ds.engine.guards import predicts_stress
    from lamm_ds.model.equiformer_v2 import EquiformerV2Config
    from lamm_ds.model.painn import PaiNNConfig

    assert predicts_stress(EquiformerV2Config(num_layers=1, stress_head=True))
    assert predicts_stress(PaiNNConfig(forces="conservative", stress=True))
    assert not predicts_stress(EquiformerV2Config(num_layers=1))
    assert not predicts_stress(PaiNNConfig())
