"""Fine-tuning options: freezing the input side or the first layers, layer-wise LR decay, new
elements started from similar trained ones, the new head copied from the closest pre-trained head,
the E0 choices; unit level (the full run is in tests/faults/test_engine_faults.py)."""

import pytest
import torch

from lamm_ds.engine.config import ConfigError, FinetuneConfig, load_config
from lamm_ds.engine.model_init import freeze, head_to_copy
from lamm_ds.engine.optim import param_groups
from lamm_ds.model.elements import (closest_head, composition_distance, init_new_element_rows, nearest_elements,
                                    table_position)
from lamm_ds.model.equiformer_v2 import EquiformerV2Config, EquiformerV2Potential
from lamm_ds.model.layers import element_tables, num_layers, parameter_depth
from lamm_ds.model.painn import PaiNNConfig
from lamm_ds.model.potential import Potential

Z = {"H": 1, "He": 2, "Al": 13, "Si": 14, "Cr": 24, "Cu": 29, "Nb": 41, "Mo": 42, "Pd": 46, "Ag": 47, "Ce": 58,
     "Lu": 71, "Hf": 72, "W": 74, "Au": 79, "Rn": 86, "Og": 118}


def _painn(**kw):
    torch.manual_seed(0)
    return Potential(PaiNNConfig(hidden=16, layers=3, num_rbf=8, cutoff=4.0, max_z=100, **kw), ["a", "b"])


def _eqv2():
    torch.manual_seed(0)
    cfg = EquiformerV2Config(num_layers=2, sphere_channels=16, attn_hidden_channels=8, ffn_hidden_channels=16,
                             edge_channels=8, forces="direct")
    return EquiformerV2Potential(cfg, ["a"])


class _Dataset:
    def __init__(self, elements):
        self.manifest = {"elements": elements}


@pytest.mark.parametrize("symbol,position", [("H", (1, 1)), ("He", (1, 18)), ("Al", (3, 13)), ("Cu", (4, 11)),
                                             ("Mo", (5, 6)), ("Ce", (6, 3)), ("Lu", (6, 3)), ("Hf", (6, 4)),
                                             ("W", (6, 6)), ("Rn", (6, 18)), ("Og", (7, 18))])
def test_periodic_table_positions(symbol, position):
    assert table_position(Z[symbol]) == position


def test_nearest_elements_prefer_the_same_group():
    assert nearest_elements(Z["Mo"], [Z["Cr"], Z["W"], Z["Nb"], Z["Cu"]]) == [Z["Cr"], Z["W"]]
    assert nearest_elements(Z["Mo"], [Z["Nb"], Z["Cu"]]) == [Z["Nb"]]
    assert nearest_elements(Z["Mo"], [Z["Pd"], Z["Si"], Z["Cu"], Z["Ag"]]) == [Z["Pd"]]
    assert nearest_elements(Z["Mo"], []) == []
    assert composition_distance([Z["Mo"]], [Z["Mo"], Z["Cu"]]) == 0
    with pytest.raises(ValueError, match="1..118"):
        table_position(0)


def test_new_element_rows_are_the_mean_of_their_nearest_trained_elements():
    model = _eqv2()
    tables = element_tables(model)
    # the sphere embedding; source/target tables of the edge-degree embedding, both blocks, the force block
    assert len(tables) == 9
    before = {n: t.weight.detach().clone() for n, t in tables}
    sources = init_new_element_rows(model, [Z["Mo"]], [Z["Cr"], Z["W"], Z["Cu"]])
    assert sources == {Z["Mo"]: [Z["Cr"], Z["W"]]}
    for name, table in tables:
        expected = (before[name][Z["Cr"]] + before[name][Z["W"]]) / 2
        assert torch.allclose(table.weight[Z["Mo"]], expected)
        others = [z for z in range(table.num_embeddings) if z != Z["Mo"]]
        assert torch.equal(table.weight[others], before[name][others])


def test_the_auto_head_is_the_one_closest_in_composition():
    trained = {"molecules": [1, 6, 7, 8], "metals": [Z["Cu"], Z["Pd"], Z["Ag"]], "silicon": [Z["Si"]]}
    assert closest_head([Z["Mo"]], trained) == "metals"
    assert closest_head([1, 6, 8], trained) == "molecules"
    assert closest_head([Z["Al"]], trained) == "silicon"
    model = _painn()
    model.trained_elements = {"a": [1, 8], "b": [Z["Cu"]]}
    assert head_to_copy(model, "auto", _Dataset([Z["Ag"]])) == "b"
    assert head_to_copy(model, "a", _Dataset([Z["Ag"]])) == "a"
    assert head_to_copy(model, None, _Dataset([Z["Ag"]])) is None
    with pytest.raises(ConfigError, match="head_init_from='c' is not a head"):
        head_to_copy(model, "c", _Dataset([Z["Ag"]]))
    model.trained_elements = None  # coverage unknown: with two heads there is nothing to choose by
    assert head_to_copy(model, "auto", _Dataset([Z["Ag"]])) is None


def test_parameter_depths_of_both_backbones():
    painn = _painn(forces="direct")
    assert num_layers(painn) == 3
    assert parameter_depth(painn, "backbone.embedding.weight") == 0
    assert parameter_depth(painn, "backbone.messages.0.filter.weight") == 1
    assert parameter_depth(painn, "backbone.updates.2.uv.weight") == 3
    assert parameter_depth(painn, "heads.a.mlp.0.weight") == 4
    assert parameter_depth(painn, "force_head.block1.vec.weight") == 4
    eqv2 = _eqv2()
    depths = {n: parameter_depth(eqv2, n) for n, _ in eqv2.named_parameters()}
    assert depths["backbone.sphere_embedding.weight"] == 0
    assert {d for n, d in depths.items() if n.startswith("backbone.edge_degree_embedding.")} == {0}
    assert {d for n, d in depths.items() if n.startswith("backbone.blocks.1.")} == {2}
    assert {d for n, d in depths.items() if n.startswith(("backbone.norm.", "force_head.", "heads."))} == {3}


def test_freezing_the_input_side_and_the_first_layers():
    model = _painn(forces="direct")
    freeze(model, FinetuneConfig(freeze_embeddings=True, freeze_layers=2))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "backbone.embedding.weight" in frozen
    assert any(n.startswith("backbone.messages.1.") for n in frozen)
    assert not any(n.startswith(("backbone.messages.2.", "backbone.updates.2.", "heads.", "force_head."))
                   for n in frozen)
    model = _painn()
    freeze(model, FinetuneConfig(freeze_layers=1))
    assert model.backbone.embedding.weight.requires_grad
    assert not model.backbone.messages[0].filter.weight.requires_grad
    with pytest.raises(ConfigError, match="freeze_layers=4, but the model has 3 layers"):
        freeze(_painn(), FinetuneConfig(freeze_layers=4))


def test_layer_wise_lr_decay_slows_the_input_side():
    model = _painn(forces="direct")
    cfg = load_config([], ["optim.lr=1.0", "finetune.backbone_lr_ratio=0.5", "finetune.layer_lr_decay=0.5"])
    groups = param_groups(model, cfg)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs == {"heads": 1.0, "backbone_depth4": 0.5, "backbone_depth3": 0.25, "backbone_depth2": 0.125,
                   "backbone_depth1": 0.0625, "backbone_depth0": 0.03125}
    owner = {id(p): g["name"] for g in groups for p in g["params"]}
    assert owner[id(model.backbone.embedding.weight)] == "backbone_depth0"
    assert owner[id(model.force_head.block1.vec.weight)] == "backbone_depth4"
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    plain = param_groups(model, load_config([], ["optim.lr=1.0", "finetune.backbone_lr_ratio=0.5"]))
    assert [(g["name"], g["lr"]) for g in plain] == [("heads", 1.0), ("backbone", 0.5)]


@pytest.mark.parametrize("override,message", [("finetune.layer_lr_decay=0", "layer_lr_decay must be in"),
                                              ("finetune.layer_lr_decay=1.5", "layer_lr_decay must be in"),
                                              ("finetune.freeze_layers=-1", "freeze_layers must be >= 0"),
                                              ("finetune.new_elements=zero", "new_elements must be")])
def test_bad_finetune_values_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([], [override])
