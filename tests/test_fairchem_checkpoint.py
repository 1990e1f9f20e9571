"""Normalisers and element references of fairchem checkpoints, read as fairchem's prediction path
reads them: the checkpoint's own first, then numbers written in the training dataset's config
(OC22-style ``transforms.normalizer`` with ``stdev``, 2023 ``normalize_labels``), and a refusal
when only a file or a fit the converter cannot see would give them."""

import logging

import pytest
import torch

from lamm_ds.model.fairchem_checkpoint import (ConversionError, element_references, normalizers,
                                               warn_residual_energies)

OC22_DATASET = {"train": {"format": "oc22_lmdb", "src": "data/oc22/s2ef/train",
                          "transforms": {"normalizer": {"energy": {"mean": 0.0, "stdev": 25.119809935106424},
                                                        "forces": {"mean": 0.0, "stdev": 0.14759646356105804}}},
                          "lin_ref": "configs/oc22/linref/oc22_linfit_coeffs.npz"},
                "val": {"src": "data/oc22/s2ef/val_id"}}


def test_oc22_style_normalisers_come_from_the_config():
    ckpt = {"config": {"dataset": OC22_DATASET}, "normalizers": {}}
    assert normalizers(ckpt) == (0.0, 25.119809935106424, 0.0, 0.14759646356105804)
    # the trainer saves the train split alone, as a list's first entry in older files
    assert normalizers({"config": {"dataset": OC22_DATASET["train"]}}) == normalizers(ckpt)
    assert normalizers({"config": {"dataset": [OC22_DATASET["train"], {}]}}) == normalizers(ckpt)


def test_the_checkpoints_normalisers_override_the_config_per_target():
    ckpt = {"config": {"dataset": OC22_DATASET},
            "normalizers": {"target": {"mean": torch.tensor(-1.5), "std": torch.tensor(3.0)}}}  # legacy names
    assert normalizers(ckpt) == (-1.5, 3.0, 0.0, 0.14759646356105804)


def test_2023_normalize_labels_and_no_normaliser():
    ds = {"normalize_labels": True, "target_mean": -0.7, "target_std": 2.2, "grad_target_mean": 0.0,
          "grad_target_std": 0.9}
    assert normalizers({"config": {"dataset": [ds]}}) == (-0.7, 2.2, 0.0, 0.9)
    assert normalizers({"config": {}}) == (0.0, 1.0, 0.0, 1.0)


@pytest.mark.parametrize("normalizer", [{"file": "/train/normalizers.pt"}, {"fit": {"targets": ["energy"]}},
                                        {"energy": {"file": "/train/energy_norm.pt"}}])
def test_normalisers_only_a_file_or_a_fit_would_give_are_refused(normalizer):
    ckpt = {"config": {"dataset": {"train": {"transforms": {"normalizer": normalizer}}}}}
    with pytest.raises(ConversionError, match="holds no 'energy' normaliser and its config fits it or reads it"):
        normalizers(ckpt)


def test_bad_normaliser_values_are_refused():
    for bad, message in (({"mean": 0.0, "rmsd": torch.tensor(float("nan"))}, "energy normaliser rmsd must be one finite"),
                         ({"mean": 0.0, "rmsd": 0.0}, "energy normaliser rmsd must be > 0"),
                         ({"mean": torch.zeros(3), "rmsd": 1.0}, "energy normaliser mean must be one finite")):
        with pytest.raises(ConversionError, match=message):
            normalizers({"config": {}, "normalizers": {"energy": bad}})


def test_element_references_from_the_checkpoint_or_refused():
    refs = torch.zeros(100)
    refs[[1, 8]] = torch.tensor([-13.6, -2040.0])
    got = element_references({"elementrefs": {"energy": {"element_references": refs}}, "config": {}}, 83)
    assert got.shape == (84,) and got[1] == pytest.approx(-13.6) and got[8] == pytest.approx(-2040.0)
    assert not element_references({"config": {}}, 83).any()
    named = {"config": {"dataset": {"train": {"transforms": {"element_references": {"file": "/train/refs.pt"}}}}}}
    with pytest.raises(ConversionError, match="holds no element references but its config names them"):
        element_references(named, 83)
    refs[90] = 1.0
    with pytest.raises(ConversionError, match=r"beyond the model's elements \(Z > 83\)"):
        element_references({"elementrefs": {"energy": {"element_references": refs}}}, 83)
    refs[90] = 0.0
    refs[3] = float("inf")
    with pytest.raises(ConversionError, match="NaN or inf"):
        element_references({"elementrefs": {"energy": {"element_references": refs}}}, 83)


def test_residual_energies_are_announced(caplog):
    ckpt = {"config": {"dataset": OC22_DATASET}}
    with caplog.at_level(logging.WARNING, logger="lamm_ds"):
        warn_residual_energies(ckpt, adds_linear_reference=True)
        assert "residuals" not in caplog.text
        warn_residual_energies(ckpt, adds_linear_reference=False)
    assert "trained on energies minus the linear reference configs/oc22/linref/oc22_linfit_coeffs.npz" in caplog.text


def test_the_oc22_equiformer_v2_config_converts():
    """The model section of fairchem's configs/oc22/s2ef/equiformer_v2/equiformer_v2_N@18_L@6_M@2_e4_f100_121M.yml."""
    from lamm_ds.model.convert_fairchem import config_from_fairchem, model_section

    oc22 = dict(use_pbc=True, regress_forces=True, otf_graph=True, enforce_max_neighbors_strictly=False,
                max_neighbors=20, max_radius=12.0, max_num_elements=90, num_layers=18, sphere_channels=128,
                attn_hidden_channels=64, num_heads=8, attn_alpha_channels=64, attn_value_channels=16,
                ffn_hidden_channels=128, norm_type="layer_norm_sh", lmax_list=[6], mmax_list=[2],
                grid_resolution=18, num_sphere_samples=128, edge_channels=128, use_atom_edge_embedding=True,
                share_atom_edge_embedding=False, use_m_share_rad=False, distance_function="gaussian",
                num_distance_basis=512, attn_activation="silu", use_s2_act_attn=False, use_attn_renorm=True,
                ffn_activation="silu", use_gate_act=False, use_grid_mlp=True, use_sep_s2_act=True, alpha_drop=0.1,
                drop_path_rate=0.1, proj_drop=0.0, weight_init="uniform", load_energy_lin_ref=True,
                use_energy_lin_ref=True)
    kwargs, heads, monolithic = model_section({"model": {"name": "equiformer_v2", **oc22}})
    assert monolithic and not heads
    cfg = config_from_fairchem(kwargs)
    assert (cfg.num_layers, cfg.lmax, cfg.mmax, cfg.cutoff, cfg.max_neighbors) == (18, 6, 2, 12.0, 20)
    assert cfg.max_neighbors_strict is False and cfg.grid_resolution == 18 and cfg.weight_init == "uniform"
