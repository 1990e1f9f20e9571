"""Universal loss (exactness under uneven data-parallel splits, metrics, masks) and denoising labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lamm_ds.denoise import DenoiseConfig, apply_denoising, graph_noise
from lamm_ds.graphs.collate import build_sample, collate
from lamm_ds.loss import (
    DATASET_METRIC_FIELDS,
    LossConfig,
    local_counts,
    per_dataset_metrics,
    summarize_per_dataset,
    universal_loss,
)
from lamm_ds.structure import Structure

DT = torch.float64


class ToyPotential(torch.nn.Module):
    """Per-atom energies from positions, conservative forces, a stress and per-dataset scales."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.species = torch.nn.Parameter(torch.randn(20, generator=g, dtype=DT))
        self.spring = torch.nn.Parameter(torch.tensor(0.7, dtype=DT))
        self.wave = torch.nn.Parameter(torch.randn(3, generator=g, dtype=DT))
        self.register_buffer("e_scale", torch.tensor([1.0, 0.5, 2.0], dtype=DT))
        self.register_buffer("f_scale", torch.tensor([1.5, 0.8, 1.0], dtype=DT))

    def forward(self, batch):
        pos = batch.pos.detach().clone().requires_grad_(True)
        nb = batch.num_graphs
        centre = torch.zeros(nb, 3, dtype=DT).index_add(0, batch.batch, pos)
        centre = centre / batch.natoms.clamp_min(1).to(DT).unsqueeze(-1)
        d2 = (pos - centre[batch.batch]).square().sum(-1)
        e_atom = self.species[batch.z % 20] + self.spring * d2 + torch.sin(pos @ self.wave)
        energy = torch.zeros(nb, dtype=DT).index_add(0, batch.batch, e_atom)
        (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=True)
        msd = torch.zeros(nb, dtype=DT).index_add(0, batch.batch, d2)
        stress = self.spring * msd[:, None, None] * torch.eye(3, dtype=DT) + self.wave.sum() * 0.01
        ds = batch.dataset_id
        return {"energy": energy, "forces": -grad, "stress": stress,
                "energy_scale": self.e_scale[ds], "force_scale": self.f_scale[ds]}


def _structure(rng, n, energy=False, forces=False, stress=False, fixed=None):
    pos = rng.uniform(0.0, 4.0, size=(n, 3))
    return Structure(
        numbers=rng.integers(1, 15, size=n), positions=pos,
        energy=float(rng.normal(-3.0 * n, 1.0)) if energy else None,
        forces=rng.normal(0, 1.0, size=(n, 3)) if forces else None,
        stress=rng.normal(0, 0.1, size=(3, 3)) if stress else None,
        fixed=fixed,
    )


def mixed_batch(seed: int = 0):
    """7 graphs: E+F, E only, F only (one fixed atom), unlabelled, E+F+S, unlabelled (fixed atom), E+F."""
    rng = np.random.default_rng(seed)
    specs = [
        dict(n=3, energy=True, forces=True),
        dict(n=5, energy=True),
        dict(n=4, forces=True, fixed=np.array([0, 1, 0, 0], bool)),
        dict(n=6),
        dict(n=2, energy=True, forces=True, stress=True),
        dict(n=3, fixed=np.array([1, 0, 0], bool)),
        dict(n=7, energy=True, forces=True),
    ]
    samples = [build_sample(_structure(rng, **s), cutoff=3.0, max_neighbors=None,
                            dataset_id=i % 3, sample_id=10 + i, draw_id=100 + i) for i, s in enumerate(specs)]
    batch = collate(samples, dtype=DT)
    return apply_denoising(batch, DenoiseConfig(sigma=0.05, seed=3), epoch=0)


def _grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _full_grad(batch, cfg):
    model = ToyPotential()
    loss, _ = universal_loss(model(batch), batch, cfg)
    loss.backward()
    return loss.detach(), _grads(model)


SPLITS = [
    [[0, 1, 2, 3, 4, 5, 6]],
    [[0, 1], [2, 3, 4, 5, 6]],
    [[3], [6, 0, 5], [1, 2, 4]],
    [[4, 2], [], [0, 1, 3, 5, 6]],  # an empty rank
]


@pytest.mark.parametrize("energy_metric", ["mae", "mse"])
@pytest.mark.parametrize("force_metric", ["l2", "mse"])
@pytest.mark.parametrize("split", SPLITS, ids=lambda s: f"{len(s)}parts")
def test_split_gradient_equals_single_process(split, energy_metric, force_metric):
    cfg = LossConfig(stress_weight=0.3, energy_metric=energy_metric, force_metric=force_metric)
    batch = mixed_batch()
    assert batch.is_pseudo.sum() == 2
    full_loss, full_grad = _full_grad(batch, cfg)

    parts = [batch.select(p) for p in split]
    world = len(parts)
    global_counts = torch.stack([local_counts(p) for p in parts]).sum(0)  # the all_reduce(SUM)
    assert torch.equal(global_counts, local_counts(batch))
    model = ToyPotential()
    total = 0.0
    for part in parts:  # each "rank" backpropagates its own loss; DeepSpeed then averages over ranks
        loss, _ = universal_loss(model(part), part, cfg, global_counts=global_counts, world_size=world)
        (loss / world).backward()
        total = total + loss.detach() / world
    torch.testing.assert_close(total, full_loss, rtol=0, atol=1e-10)
    torch.testing.assert_close(_grads(model), full_grad, rtol=1e-6, atol=1e-8)


def test_counts_and_terms_by_hand():
    batch = mixed_batch()
    counts = local_counts(batch)
    # energy graphs 0,1,4,6; force atoms 3 + (4-1) + 2 + 7; pseudo atoms 6 + (3-1); stress graph 4
    assert counts.tolist() == [4.0, 15.0, 8.0, 1.0]
    assert counts.dtype == torch.float64

    model = ToyPotential()
    out = model(batch)
    cfg = LossConfig(energy_weight=1.0, force_weight=10.0, pseudo_force_weight=2.0, stress_weight=0.5)
    loss, m = universal_loss(out, batch, cfg)
    with torch.no_grad():
        he = batch.has_energy
        e = ((out["energy"] - batch.energy) / batch.natoms / out["energy_scale"])[he]
        err = (out["forces"] - batch.forces) / out["force_scale"][batch.batch, None]
        atom_real = (batch.has_forces & ~batch.is_pseudo)[batch.batch] & ~batch.fixed
        atom_pseudo = batch.is_pseudo[batch.batch] & ~batch.fixed
        s = (out["stress"] - batch.stress)[batch.has_stress].abs().mean()
        expect = {
            "energy": e.abs().mean(), "force": err[atom_real].norm(dim=-1).mean(),
            "pseudo": err[atom_pseudo].norm(dim=-1).mean(), "stress": s,
        }
    for k, v in expect.items():
        torch.testing.assert_close(m[f"loss_{k}"], v)
    torch.testing.assert_close(loss.detach(), expect["energy"] + 10 * expect["force"]
                               + 2 * expect["pseudo"] + 0.5 * expect["stress"])
    # metrics are unnormalised physical errors
    e_phys = ((out["energy"] - batch.energy) / batch.natoms)[he].detach()
    torch.testing.assert_close(m["energy_mae_per_atom"], e_phys.abs().mean())
    f_phys = (out["forces"] - batch.forces)[atom_real].detach()
    torch.testing.assert_close(m["force_mae"], f_phys.abs().mean())


@pytest.mark.parametrize("energy_metric", ["mae", "mse"])
@pytest.mark.parametrize("force_metric", ["l2", "mse"])
def test_graph_weights_scale_each_graphs_errors(energy_metric, force_metric):
    """A dataset's loss_weight multiplies its graphs' errors in every term; the denominators still count
    every labelled graph/atom (weights of 1 give the plain loss, and the split stays exact)."""
    batch = mixed_batch()
    cfg = LossConfig(stress_weight=0.3, pseudo_force_weight=2.0, energy_metric=energy_metric,
                     force_metric=force_metric)
    out = ToyPotential()(batch)
    plain, _ = universal_loss(out, batch, cfg)
    ones, _ = universal_loss(out, batch, cfg, graph_weight=torch.ones(batch.num_graphs))
    torch.testing.assert_close(ones, plain, rtol=1e-12, atol=0)
    w = torch.tensor([0.5, 1.0, 3.0])[batch.dataset_id].to(DT)  # by dataset: graphs 0..6 are datasets i % 3
    loss, m = universal_loss(out, batch, cfg, graph_weight=w)
    with torch.no_grad():
        he, hs = batch.has_energy, batch.has_stress
        e = ((out["energy"] - batch.energy) / batch.natoms / out["energy_scale"])
        e = e.abs() if energy_metric == "mae" else e.square()
        err = (out["forces"] - batch.forces) / out["force_scale"][batch.batch, None]
        f = err.norm(dim=-1) if force_metric == "l2" else err.square().mean(-1)
        real = (batch.has_forces & ~batch.is_pseudo)[batch.batch] & ~batch.fixed
        pseudo = batch.is_pseudo[batch.batch] & ~batch.fixed
        s = (out["stress"] - batch.stress).reshape(-1, 9)
        s = (s.abs() if energy_metric == "mae" else s.square()).mean(-1)
        wa = w[batch.batch]
        expect = {"energy": (w * e)[he].sum() / he.sum(), "force": (wa * f)[real].sum() / real.sum(),
                  "pseudo": (wa * f)[pseudo].sum() / pseudo.sum(), "stress": (w * s)[hs].sum() / hs.sum()}
    for k, v in expect.items():
        torch.testing.assert_close(m[f"loss_{k}"], v)
    torch.testing.assert_close(loss.detach(), expect["energy"] + 10 * expect["force"] + 2 * expect["pseudo"]
                               + 0.3 * expect["stress"])
    assert not torch.allclose(loss, plain)
    # split over "ranks": the weighted losses still add up to the single-process one
    parts = [[3], [6, 0, 5], [1, 2, 4]]
    counts = local_counts(batch)
    total = sum(universal_loss(ToyPotential()(batch.select(p)), batch.select(p), cfg, global_counts=counts,
                               world_size=3, graph_weight=w[p])[0].detach() / 3 for p in parts)
    torch.testing.assert_close(total, loss.detach(), rtol=0, atol=1e-10)


def test_metric_choices():
    batch = mixed_batch()
    out = {k: v.detach() for k, v in ToyPotential()(batch).items()}
    out["energy_scale"] = torch.ones(batch.num_graphs, dtype=DT)
    out["force_scale"] = torch.ones(batch.num_graphs, dtype=DT)
    he = batch.has_energy
    e = ((out["energy"] - batch.energy) / batch.natoms)[he]
    atoms = (batch.has_forces & ~batch.is_pseudo)[batch.batch] & ~batch.fixed
    d = (out["forces"] - batch.forces)[atoms]
    _, m = universal_loss(out, batch, LossConfig(energy_metric="mae", force_metric="l2"))
    torch.testing.assert_close(m["loss_energy"], e.abs().mean())
    torch.testing.assert_close(m["loss_force"], d.norm(dim=-1).mean())
    _, m = universal_loss(out, batch, LossConfig(energy_metric="mse", force_metric="mse"))
    torch.testing.assert_close(m["loss_energy"], e.square().mean())
    torch.testing.assert_close(m["loss_force"], d.square().mean())  # mean over atoms and components
    with pytest.raises(ValueError):
        LossConfig(energy_metric="rmse")
    with pytest.raises(ValueError):
        LossConfig(force_metric="mae")


def test_missing_scales_default_to_one():
    batch = mixed_batch()
    out = {k: v.detach() for k, v in ToyPotential()(batch).items()}
    ones = {**out, "energy_scale": torch.ones(7, dtype=DT), "force_scale": torch.ones(7, dtype=DT)}
    bare = {k: v for k, v in out.items() if not k.endswith("_scale")}
    l1, _ = universal_loss(ones, batch, LossConfig())
    l2, _ = universal_loss(bare, batch, LossConfig())
    torch.testing.assert_close(l1, l2)


def test_unlabelled_graph_contributes_nothing():
    batch = mixed_batch()
    cfg = LossConfig(stress_weight=1.0)
    model = ToyPotential()
    out = model(batch)
    # a graph whose labels are all masked off: garbage (even NaN) labels must not matter
    masked = batch.replace(
        has_energy=batch.has_energy.clone().index_fill_(0, torch.tensor([1]), False),
        energy=batch.energy.clone().index_fill_(0, torch.tensor([1]), float("nan")),
    )
    ref = batch.select([0, 2, 3, 4, 5, 6])
    loss_masked, _ = universal_loss(out, masked, cfg)
    loss_ref, _ = universal_loss(model(ref), ref, cfg)
    torch.testing.assert_close(loss_masked, loss_ref)
    loss_masked.backward()
    assert torch.isfinite(_grads(model)).all()
    # changing a fixed atom's force label or an unlabelled graph's label changes nothing
    forces = masked.forces.clone()
    forces[masked.fixed] = 1e6
    loss2, _ = universal_loss(out, masked.replace(forces=forces), cfg)
    torch.testing.assert_close(loss2, loss_masked)


def test_empty_terms_and_empty_batch_are_nan_free():
    batch = mixed_batch()
    model = ToyPotential()
    cfg = LossConfig(stress_weight=1.0)
    only_energy = batch.select([1])  # energy-only graph: force, pseudo, stress terms are empty
    loss, m = universal_loss(model(only_energy), only_energy, cfg)
    for term in ("force", "pseudo", "stress"):
        assert m[f"loss_{term}"].item() == 0.0
    assert m["force_mae"].item() == 0.0 and m["pseudo_force_mae"].item() == 0.0
    assert torch.isfinite(loss)

    empty = batch.select([])
    out = model(empty)
    loss, m = universal_loss(out, empty, cfg, global_counts=local_counts(batch), world_size=2)
    assert loss.item() == 0.0 and loss.requires_grad
    assert all(torch.isfinite(v).all() and v.item() == 0.0 for v in m.values())
    loss.backward()  # an idle rank must still be able to take part in backward
    assert all(p.grad is None or torch.all(p.grad == 0) for p in model.parameters())
    sums = per_dataset_metrics(out, empty, ["a", "b", "c"])
    assert sums.shape == (3, len(DATASET_METRIC_FIELDS)) and torch.all(sums == 0)
    assert summarize_per_dataset(sums, ["a", "b", "c"]) == {"graphs/a": 0.0, "graphs/b": 0.0, "graphs/c": 0.0}


def test_stress_required_only_when_weighted():
    batch = mixed_batch()
    out = {k: v for k, v in ToyPotential()(batch).items() if k != "stress"}
    loss, m = universal_loss(out, batch, LossConfig(stress_weight=0.0))
    assert m["loss_stress"].item() == 0.0
    with pytest.raises(KeyError):
        universal_loss(out, batch, LossConfig(stress_weight=1.0))


def test_per_dataset_metrics_reduce_across_splits():
    batch = mixed_batch()
    names = ["a", "b", "c"]
    model = ToyPotential()
    whole = per_dataset_metrics(model(batch), batch, names)
    parts = [batch.select(p) for p in SPLITS[2]]
    reduced = sum(per_dataset_metrics(model(p), p, names) for p in parts)
    torch.testing.assert_close(reduced, whole)
    col = {f: i for i, f in enumerate(DATASET_METRIC_FIELDS)}
    assert whole[:, col["graphs"]].tolist() == [3.0, 2.0, 2.0]
    assert whole[:, col["energy_count"]].sum().item() == 4.0
    assert whole[:, col["force_count"]].sum().item() == 3 * 15
    summary = summarize_per_dataset(whole, names)
    out = model(batch)
    sel = (batch.dataset_id == 0) & batch.has_energy
    e = ((out["energy"] - batch.energy) / batch.natoms)[sel].detach()
    assert summary["energy_mae_per_atom/a"] == pytest.approx(e.abs().mean().item())
    # dataset "c" = graphs 2 (forces, one fixed atom) and 5 (pseudo)
    assert "force_mae/c" in summary and "pseudo_force_mae/c" in summary
    _, m = universal_loss(out, batch, LossConfig())
    f_total = whole[:, col["force_abs_sum"]].sum() / whole[:, col["force_count"]].sum()
    torch.testing.assert_close(f_total, m["force_mae"])


# ----------------------------------------------------------------------------------- denoising


def raw_batch(specs, dtype=DT):
    """specs: (dataset_id, sample_id, draw_id, natoms, labelled, fixed-or-None) per graph."""
    samples = []
    for ds, sid, did, n, labelled, fixed in specs:
        rng = np.random.default_rng(1000 * ds + sid)  # a structure is determined by its ids
        st = _structure(rng, n, energy=labelled, forces=labelled, fixed=fixed)
        samples.append(build_sample(st, 3.0, None, dataset_id=ds, sample_id=sid, draw_id=did))
    return collate(samples, dtype=dtype)


def _disp(before, after, g):
    lo = int((torch.cumsum(before.natoms, 0) - before.natoms)[g])
    n = int(before.natoms[g])
    return (after.pos - before.pos)[lo:lo + n], after.forces[lo:lo + n]


def test_pseudo_forces_centred_and_scaled():
    specs = [(0, i, i, 3 + i, False, None) for i in range(5)]
    batch = raw_batch(specs)
    cfg = DenoiseConfig(sigma=0.1, force_scale=2.0, seed=1)
    new = apply_denoising(batch, cfg, epoch=4)
    old = apply_denoising(batch, DenoiseConfig(sigma=0.1, force_scale=2.0, seed=1, mean_subtraction=False), epoch=4)
    assert new.is_pseudo.all() and new.has_forces.all() and not new.has_energy.any() and not new.has_stress.any()
    for g in range(5):
        d, f = _disp(batch, new, g)
        assert f.sum(0).abs().max() < 1e-10
        torch.testing.assert_close(f, -2.0 / 0.1 * d, rtol=1e-9, atol=1e-9)  # label = applied displacement
        d_old, f_old = _disp(batch, old, g)
        assert f_old.sum(0).abs().max() > 1e-3
        # same raw noise, only centring differs
        torch.testing.assert_close(d, d_old - d_old.mean(0), rtol=0, atol=1e-12)
    # noise has std sigma per component
    many = raw_batch([(1, i, 0, 40, False, None) for i in range(50)])
    d = (apply_denoising(many, DenoiseConfig(sigma=0.1, mean_subtraction=False), 0).pos - many.pos)
    assert abs(d.std().item() - 0.1) < 0.005


def test_fixed_atoms_stay_fixed():
    fixed = np.array([1, 0, 0, 1, 0], bool)
    batch = raw_batch([(0, 1, 0, 5, False, fixed), (0, 2, 1, 4, False, np.array([0, 0, 0, 1], bool))])
    for ms in (True, False):
        out = apply_denoising(batch, DenoiseConfig(mean_subtraction=ms), epoch=0)
        assert torch.equal(out.pos[batch.fixed], batch.pos[batch.fixed])
        assert torch.all(out.forces[batch.fixed] == 0)
        assert torch.all((out.pos - batch.pos)[~batch.fixed].abs() > 0)
    out = apply_denoising(batch, DenoiseConfig(), epoch=0)
    for g in range(2):
        assert _disp(batch, out, g)[1].sum(0).abs().max() < 1e-10
    # loss excludes fixed atoms: counts only the free ones
    assert local_counts(out)[2].item() == 3 + 3


def test_noise_is_keyed_not_streamed():
    cfg = DenoiseConfig(seed=7)
    a = raw_batch([(0, 5, 10, 4, False, None), (1, 5, 11, 3, False, None), (2, 9, 12, 6, False, None)])
    b = raw_batch([(3, 1, 0, 5, False, None), (2, 9, 12, 6, False, None), (0, 5, 10, 4, False, None)])
    da, db = apply_denoising(a, cfg, epoch=2), apply_denoising(b, cfg, epoch=2)
    torch.testing.assert_close(_disp(a, da, 0)[0], _disp(b, db, 2)[0], rtol=0, atol=0)
    torch.testing.assert_close(_disp(a, da, 2)[1], _disp(b, db, 1)[1], rtol=0, atol=0)
    # reproducible call to call (a resumed run sees the same noise)
    torch.testing.assert_close(apply_denoising(a, cfg, epoch=2).pos, da.pos, rtol=0, atol=0)
    base = graph_noise(cfg, 2, 0, 5, 10, 4)
    for other in (graph_noise(cfg, 3, 0, 5, 10, 4), graph_noise(cfg, 2, 0, 5, 11, 4),
                  graph_noise(cfg, 2, 1, 5, 10, 4), graph_noise(cfg, 2, 0, 6, 10, 4),
                  graph_noise(DenoiseConfig(seed=8), 2, 0, 5, 10, 4)):
        assert np.abs(base - other).max() > 1e-3
    # different epoch -> different positions for the same graph
    assert not torch.equal(apply_denoising(a, cfg, epoch=3).pos, da.pos)
    # the same sample drawn twice in one batch at different stream positions gets different noise
    c = raw_batch([(0, 5, 10, 4, False, None), (0, 5, 99, 4, False, None)])
    dc = apply_denoising(c, cfg, epoch=2)
    assert (_disp(c, dc, 0)[0] - _disp(c, dc, 1)[0]).abs().max() > 1e-3


def test_labelled_probability():
    specs = [(0, i, i, 3, i % 2 == 0, None) for i in range(40)]
    batch = raw_batch(specs)
    labelled = batch.has_energy.clone()
    out = apply_denoising(batch, DenoiseConfig(labelled_probability=0.0), epoch=0)
    ids = labelled[batch.batch]
    assert torch.equal(out.pos[ids], batch.pos[ids]) and torch.equal(out.forces[ids], batch.forces[ids])
    assert torch.equal(out.is_pseudo, ~labelled) and torch.equal(out.has_energy, labelled)

    all_ = apply_denoising(batch, DenoiseConfig(labelled_probability=1.0), epoch=0)
    assert all_.is_pseudo.all() and not all_.has_energy.any()

    half = DenoiseConfig(labelled_probability=0.5, seed=2)
    h1, h2 = apply_denoising(batch, half, epoch=0), apply_denoising(batch, half, epoch=1)
    picked = h1.is_pseudo & labelled
    assert 0 < picked.sum() < labelled.sum()
    assert torch.equal(apply_denoising(batch, half, epoch=0).is_pseudo, h1.is_pseudo)
    assert not torch.equal(h2.is_pseudo, h1.is_pseudo)
    # the coin does not depend on batch composition: reversed batch picks the same samples
    rev = batch.select(list(range(39, -1, -1)))
    assert torch.equal(apply_denoising(rev, half, epoch=0).is_pseudo.flip(0), h1.is_pseudo)
    # untouched labelled graphs keep their labels exactly
    keep = (labelled & ~picked)[batch.batch]
    assert torch.equal(h1.forces[keep], batch.forces[keep])


def test_float32_batch():
    batch = raw_batch([(0, 1, 0, 5, False, None)], dtype=torch.float32)
    out = apply_denoising(batch, DenoiseConfig(), epoch=0)
    assert out.pos.dtype == torch.float32 and out.forces.dtype == torch.float32
    assert out.forces.sum(0).abs().max() < 1e-5


def test_bf16_outputs_are_compared_in_float32():
    batch = mixed_batch()
    out = {k: v.detach() for k, v in ToyPotential()(batch).items()}
    l64, _ = universal_loss(out, batch, LossConfig())
    b16 = {k: v.to(torch.bfloat16) for k, v in out.items()}
    l16, _ = universal_loss(b16, batch.to(dtype=torch.float32), LossConfig())
    assert l16.dtype == torch.float32
    assert abs(l16.item() - l64.item()) < 0.02 * abs(l64.item())
