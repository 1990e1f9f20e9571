"""Faults around exported models, ``lamm-ds evaluate``, the ASE calculator and ``convert-fairchem``:
each case ends in a clear error (exit code 2 from the CLI, or a named exception) naming the file,
element or head, never in a silent wrong result or in code run from an untrusted file.
"""

from __future__ import annotations

import json
import logging
import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.io import write
from safetensors import safe_open
from safetensors.torch import save_file

from lamm_ds.calculator import LammCalculator, NonFiniteOutputError, UnseenElementsWarning
from lamm_ds.cli import main as cli_main
from lamm_ds.engine.config import DatasetConfig
from lamm_ds.engine.evaluate import choose_head, evaluate, evaluate_entries, load_structures
from lamm_ds.engine.export import UnseenElementsError, export_model, load_model, unseen_elements
from lamm_ds.model import DatasetStats, PaiNNConfig, Potential

MAX_Z = 30
TRAINED = {"cu": [29], "mol": [1, 6, 8]}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(heads=("cu", "mol"), trained=TRAINED, seed=0) -> Potential:
    torch.manual_seed(seed)
    cfg = PaiNNConfig(hidden=16, layers=1, num_rbf=8, cutoff=4.0, max_neighbors=None, max_z=MAX_Z,
                      forces="conservative")
    model = Potential(cfg, list(heads), {h: DatasetStats.identity(MAX_Z) for h in heads}).eval()
    if trained is not None:
        model.trained_elements = {h: v for h, v in trained.items() if h in heads}
    return model


def cu_atoms(seed=0) -> Atoms:
    a = bulk("Cu", "fcc", a=3.61, cubic=True)
    a.rattle(0.05, seed=seed)
    return a


def labelled(atoms: Atoms) -> Atoms:
    atoms.calc = EMT()
    atoms.get_potential_energy()
    atoms.get_forces()
    return atoms


def write_xyz(path: Path, images) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write(str(path), [labelled(a) for a in images], format="extxyz")
    return path


@pytest.fixture
def model_file(tmp_path) -> Path:
    return export_model(tiny_model(), tmp_path / "two_heads.safetensors")


@pytest.fixture
def cu_xyz(tmp_path) -> Path:
    return write_xyz(tmp_path / "data" / "copper.xyz", [cu_atoms(k) for k in range(3)])


@pytest.fixture
def ethanol_xyz(tmp_path) -> Path:
    images = []
    for k in range(2):
        a = molecule("CH3CH2OH")
        a.rattle(0.02, seed=k)
        images.append(a)
    return write_xyz(tmp_path / "data" / "ethanol.xyz", images)


def run_cli(argv, capsys) -> tuple[int, str, str]:
    rc = cli_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def header_size(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


# -- model file integrity ------------------------------------------------------------------------

def test_flipped_tensor_byte_fails_the_checksum(model_file, cu_xyz, capsys):
    n = header_size(model_file)
    size = model_file.stat().st_size
    flip_byte(model_file, 8 + n + (size - 8 - n) // 2)      # a byte in the middle of the tensor data
    with pytest.raises(ValueError, match=r"two_heads\.safetensors: checksum mismatch: the file is corrupt"):
        load_model(model_file)
    rc, _, err = run_cli(["evaluate", model_file, cu_xyz, "--head", "cu"], capsys)
    assert rc == 2 and "checksum mismatch" in err and str(model_file) in err and "Traceback" not in err


def test_flipped_metadata_byte_fails_the_checksum(tmp_path):
    path = export_model(tiny_model(), tmp_path / "meta.safetensors", extra={"note": "abcdef"})
    data = path.read_bytes()
    assert data.count(b"abcdef") == 1
    path.write_bytes(data.replace(b"abcdef", b"abcdeg"))   # same length: still a valid safetensors file
    with safe_open(str(path), framework="pt") as f:
        assert "abcdeg" in f.metadata()["extra"]
    with pytest.raises(ValueError, match=r"meta\.safetensors: checksum mismatch.*metadata changed since export"):
        load_model(path)
    with pytest.raises(ValueError, match="checksum mismatch"):
        LammCalculator(path, device="cpu")


def test_removed_checksum_in_a_v2_file_is_refused(tmp_path):
    path = export_model(tiny_model(), tmp_path / "nosum.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        state = {k: f.get_tensor(k) for k in f.keys()}
    del meta["checksum"]
    save_file(state, str(path), metadata=meta)
    with pytest.raises(ValueError, match=r"nosum\.safetensors: checksum mismatch"):
        load_model(path)


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "text", "pickle"])
def test_unreadable_model_file_is_a_clear_error(kind, model_file, cu_xyz, tmp_path, capsys):
    bad = tmp_path / f"bad_{kind}.safetensors"
    if kind == "truncated":
        data = model_file.read_bytes()
        bad.write_bytes(data[: len(data) - 100])
    elif kind == "garbage":
        bad.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "empty":
        bad.write_bytes(b"")
    elif kind == "text":
        bad.write_text("this is not a model\n" * 20)
    else:
        torch.save({"state_dict": {}}, bad)
    with pytest.raises(ValueError, match=f"bad_{kind}.safetensors"):
        load_model(bad)
    rc, _, err = run_cli(["evaluate", bad, cu_xyz, "--head", "cu"], capsys)
    assert rc == 2 and f"bad_{kind}.safetensors" in err and "Traceback" not in err


def test_version_1_file_loads_with_a_warning(tmp_path, caplog):
    model = tiny_model(trained=None)
    new = export_model(model, tmp_path / "v2.safetensors")
    with safe_open(str(new), framework="pt") as f:
        meta = dict(f.metadata())
        state = {k: f.get_tensor(k) for k in f.keys()}
    del meta["checksum"]
    meta["version"] = "1"
    old = tmp_path / "v1.safetensors"
    save_file(state, str(old), metadata=meta)
    with caplog.at_level(logging.WARNING, logger="lamm_ds"):
        loaded = load_model(old)
    assert any("v1.safetensors" in r.getMessage() and "cannot be verified" in r.getMessage() for r in caplog.records)
    assert loaded.dataset_names == ["cu", "mol"] and loaded.trained_elements is None
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lamm_ds"):
        load_model(new)                                       # a verified v2 file: no warning
    assert not caplog.records


# -- element coverage ----------------------------------------------------------------------------

def test_trained_elements_roundtrip_and_unseen_elements_api(tmp_path):
    path = export_model(tiny_model(trained={"cu": [29, 29], "mol": [8, 1, 6]}), tmp_path / "te.safetensors")
    loaded = load_model(path)
    assert loaded.trained_elements == {"cu": [29], "mol": [1, 6, 8]}
    assert unseen_elements(loaded, "cu", [29, 1, 8, 1]) == [1, 8]
    assert unseen_elements(loaded, "mol", np.array([1, 6, 8])) == []
    unknown = load_model(export_model(tiny_model(trained=None), tmp_path / "none.safetensors"))
    assert unknown.trained_elements is None and unseen_elements(unknown, "cu", [1, 92]) == []


def test_add_dataset_keeps_trained_elements(tmp_path):
    model = tiny_model()
    model.add_dataset("new", init_from="cu")
    assert model.trained_elements == TRAINED and model.dataset_names == ["cu", "mol", "new"]
    assert unseen_elements(model, "new", [1, 29]) == []     # no entry yet: coverage unknown
    loaded = load_model(export_model(model, tmp_path / "ft.safetensors"))
    assert loaded.trained_elements == TRAINED


def test_unseen_elements_in_evaluate_cli(model_file, ethanol_xyz, capsys):
    rc, out, err = run_cli(["evaluate", model_file, ethanol_xyz, "--head", "cu"], capsys)
    assert rc == 2 and not out
    assert str(ethanol_xyz) in err and "'cu'" in err
    for z in ("H (Z=1)", "C (Z=6)", "O (Z=8)"):
        assert z in err
    assert "'mol'" in err and "--allow-unseen-elements" in err


def test_unseen_elements_evaluate_cli_override(model_file, ethanol_xyz, capsys):
    rc, out, _ = run_cli(["evaluate", model_file, ethanol_xyz, "--head", "cu", "--allow-unseen-elements",
                          "--json"], capsys)
    assert rc == 0
    res = json.loads(out)["ethanol"]
    assert res["unseen_elements"] == [1, 6, 8] and res["head"] == "cu"


def test_unseen_elements_checked_over_the_whole_input(model_file, tmp_path, capsys):
    mixed = write_xyz(tmp_path / "mixed.xyz", [cu_atoms(0), molecule("H2O")])  # offender in the 2nd structure
    rc, _, err = run_cli(["evaluate", model_file, mixed, "--head", "cu"], capsys)
    assert rc == 2 and "mixed.xyz" in err and "H (Z=1), O (Z=8)" in err and "Cu (Z=29)" not in err


def test_unseen_elements_in_evaluate_function(ethanol_xyz, caplog):
    model = tiny_model()
    _, structures = load_structures(ethanol_xyz)
    with pytest.raises(UnseenElementsError, match=r"ethanol\.xyz: .*H \(Z=1\), C \(Z=6\), O \(Z=8\).*'cu'.*'mol'"
                                                  r".*allow_unseen_elements=True"):
        evaluate(model, structures, head="cu", source=str(ethanol_xyz))
    assert issubclass(UnseenElementsError, ValueError)
    with caplog.at_level(logging.WARNING, logger="lamm_ds"):
        res = evaluate(model, structures, head="cu", allow_unseen_elements=True)
    assert res["unseen_elements"] == [1, 6, 8] and np.isfinite(res["forces_mae"])
    assert any("not trained on" in r.getMessage() for r in caplog.records)
    assert "unseen_elements" not in evaluate(model, structures, head="mol")


def test_unseen_elements_in_calculator_and_override():
    model = tiny_model()
    water = molecule("H2O")
    water.calc = LammCalculator(model, head="cu", device="cpu")
    with pytest.raises(UnseenElementsError,
                       match=r"H \(Z=1\), O \(Z=8\).*head 'cu'.*'mol'.*allow_unseen_elements=True"):
        water.get_potential_energy()
    water.calc = LammCalculator(model, head="cu", device="cpu", allow_unseen_elements=True)
    with pytest.warns(UnseenElementsWarning, match="H"):
        assert np.isfinite(water.get_potential_energy())
    water.calc = LammCalculator(model, head="mol", device="cpu")
    assert np.isfinite(water.get_potential_energy())       # the head trained on H and O


# -- head choice in evaluate ---------------------------------------------------------------------

def test_multi_head_model_without_head_is_an_error(model_file, cu_xyz, capsys):
    rc, out, err = run_cli(["evaluate", model_file, cu_xyz], capsys)
    assert rc == 2 and not out
    assert str(cu_xyz) in err and "cu, mol" in err and "--head" in err


def test_file_stem_does_not_pick_the_head(model_file, tmp_path, capsys):
    named = write_xyz(tmp_path / "mol.xyz", [cu_atoms(1)])    # a Cu file named like the 'mol' head
    rc, _, err = run_cli(["evaluate", model_file, named], capsys)
    assert rc == 2 and "mol.xyz" in err and "--head" in err


def test_single_head_model_needs_no_head(tmp_path, cu_xyz, capsys):
    path = export_model(tiny_model(heads=("only",), trained=None), tmp_path / "one.safetensors")
    rc, out, _ = run_cli(["evaluate", path, cu_xyz, "--json"], capsys)
    assert rc == 0 and json.loads(out)["copper"]["head"] == "only"


def test_dataset_dir_named_like_a_head_uses_it(model_file, ethanol_xyz, tmp_path, capsys):
    ds = tmp_path / "ethanol_ds"
    assert cli_main(["ingest", str(ethanol_xyz), "--name", "mol", "--out", str(ds), "--cutoff", "4.0",
                     "--quiet"]) == 0
    capsys.readouterr()
    rc, out, _ = run_cli(["evaluate", model_file, ds, "--json"], capsys)
    assert rc == 0
    res = json.loads(out)["mol"]
    assert res["head"] == "mol" and res["structures"] == 2


def test_unknown_head_lists_the_heads(model_file, cu_xyz, capsys):
    rc, _, err = run_cli(["evaluate", model_file, cu_xyz, "--head", "nope"], capsys)
    assert rc == 2 and "unknown head 'nope'" in err and "cu, mol" in err


def test_training_time_head_choice(cu_xyz):
    model = tiny_model()
    assert choose_head(model, "cu") == "cu"
    assert choose_head(model, "anything", "mol") == "mol"
    by_name = evaluate_entries(model, [DatasetConfig(name="cu", path=str(cu_xyz))])
    by_key = evaluate_entries(model, [DatasetConfig(name="cu_test", path=str(cu_xyz), head="cu")])
    assert by_name["cu"]["forces_mae"] == pytest.approx(by_key["cu_test"]["forces_mae"])
    with pytest.raises(ValueError, match=r"eval dataset 'cu_test'.*cu, mol.*head:"):
        evaluate_entries(model, [DatasetConfig(name="cu_test", path=str(cu_xyz))])


# -- evaluate outputs ----------------------------------------------------------------------------

def test_duplicate_stems_give_two_results_and_two_plots(model_file, tmp_path, capsys):
    si = write_xyz(tmp_path / "mlearn" / "Si" / "test.xyz", [cu_atoms(2)])
    mo = write_xyz(tmp_path / "mlearn" / "Mo" / "test.xyz", [cu_atoms(3), cu_atoms(4)])
    plots = tmp_path / "plots"
    rc, out, _ = run_cli(["evaluate", model_file, si, mo, "--head", "cu", "--plot-dir", plots, "--json"], capsys)
    assert rc == 0
    res = json.loads(out)
    assert sorted(res) == ["Mo/test", "Si/test"]
    assert res["Si/test"]["structures"] == 1 and res["Mo/test"]["structures"] == 2
    assert res["Si/test"]["source"] == str(si)
    assert sorted(p.name for p in plots.iterdir()) == ["parity_Mo_test.png", "parity_Si_test.png"]


def test_no_plots_in_the_working_directory_by_default(model_file, cu_xyz, tmp_path, monkeypatch, capsys):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    rc, out, _ = run_cli(["evaluate", model_file, cu_xyz, "--head", "cu", "--json"], capsys)
    assert rc == 0 and "parity_plot" not in json.loads(out)["copper"]
    assert list(cwd.iterdir()) == [] and not list(cu_xyz.parent.glob("*.png"))


# -- convert-fairchem: no code from the file -----------------------------------------------------

def _write_marker(path):
    """Stands in for an attacker's payload: harmless, but visible."""
    Path(path).write_text("the checkpoint ran code")
    return {}


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (_write_marker, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_malicious_legacy_pickle_is_refused(protocol, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    ckpt = tmp_path / "evil_legacy.pt"
    ckpt.write_bytes(pickle.dumps({"state_dict": {}, "config": Payload(marker)}, protocol=protocol))
    rc, _, err = run_cli(["convert-fairchem", ckpt, tmp_path / "out.safetensors"], capsys)
    assert rc == 2 and not marker.exists()
    assert str(ckpt) in err and "--trust-pickle" in err and "refusing" in err
    assert not (tmp_path / "out.safetensors").exists()


def test_malicious_torch_save_checkpoint_is_refused(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    ckpt = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "config": {"x": Payload(marker)}}, ckpt)
    rc, _, err = run_cli(["convert-fairchem", ckpt, tmp_path / "out.safetensors"], capsys)
    assert rc == 2 and not marker.exists()
    assert str(ckpt) in err and "_write_marker" in err and "--trust-pickle" in err
    # the payload is live: --trust-pickle does run it (then fails: no model section in the config)
    rc, _, err = run_cli(["convert-fairchem", ckpt, tmp_path / "out.safetensors", "--trust-pickle"], capsys)
    assert marker.exists() and rc == 2 and str(ckpt) in err


@pytest.mark.parametrize("kind", ["text", "empty", "random"])
def test_non_checkpoint_files_are_clear_errors(kind, tmp_path, capsys):
    path = tmp_path / f"{kind}.pt"
    if kind == "text":
        path.write_text("model: equiformer_v2\nstate_dict: none\n")
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(np.random.default_rng(1).bytes(2048))
    rc, out, err = run_cli(["convert-fairchem", path, tmp_path / "out.safetensors"], capsys)
    assert rc == 2 and not out and str(path) in err and "Traceback" not in err


def test_checkpoint_without_model_config_names_the_file(tmp_path, capsys):
    path = tmp_path / "plain.pt"
    torch.save({"state_dict": {"w": torch.zeros(3)}, "config": {"model": "gemnet_oc"}}, path)
    rc, _, err = run_cli(["convert-fairchem", path, tmp_path / "out.safetensors"], capsys)
    assert rc == 2 and str(path) in err and "'gemnet_oc' is not EquiformerV2 or PaiNN" in err
    # a PaiNN config over tensors that are not PaiNN's: the stray tensor is named
    torch.save({"state_dict": {"w": torch.zeros(3)}, "config": {"model": "painn"}}, path)
    rc, _, err = run_cli(["convert-fairchem", path, tmp_path / "out.safetensors"], capsys)
    assert rc == 2 and str(path) in err and "checkpoint tensor 'w' has no counterpart" in err
    assert not (tmp_path / "out.safetensors").exists()
    torch.save([1, 2, 3], path)
    rc, _, err = run_cli(["convert-fairchem", path, tmp_path / "out.safetensors"], capsys)
    assert rc == 2 and str(path) in err and "not a fairchem checkpoint" in err


def _tiny_fairchem_eqv2():
    """(fairchem model_attributes, the equivalent lamm-ds config) of a tiny EquiformerV2."""
    from lamm_ds.model.equiformer_v2 import EquiformerV2Config

    attrs = dict(num_layers=1, lmax_list=[2], mmax_list=[1], sphere_channels=8, attn_hidden_channels=8, num_heads=2,
                 attn_alpha_channels=4, attn_value_channels=4, ffn_hidden_channels=8, edge_channels=8,
                 grid_resolution=18, norm_type="layer_norm_sh", use_grid_mlp=True, max_radius=4.0,
                 max_neighbors=20, max_num_elements=90, alpha_drop=0.0, drop_path_rate=0.0)
    cfg = EquiformerV2Config(num_layers=1, lmax=2, mmax=1, sphere_channels=8, attn_hidden_channels=8, num_heads=2,
                             attn_alpha_channels=4, attn_value_channels=4, ffn_hidden_channels=8, edge_channels=8,
                             grid_resolution=18, cutoff=4.0, max_neighbors=20, max_z=89, alpha_drop=0.0,
                             drop_path_rate=0.0, forces="direct", edge_roll="fixed")
    return attrs, cfg


def test_clean_fairchem_checkpoint_converts_with_weights_only(tmp_path, capsys):
    from lamm_ds.graphs import build_sample, collate
    from lamm_ds.model.equiformer_v2 import EquiformerV2Potential
    from lamm_ds.structure import Structure

    attrs, cfg = _tiny_fairchem_eqv2()
    torch.manual_seed(0)
    ref = EquiformerV2Potential(cfg, ["A"], {"A": DatasetStats(np.zeros(90), 0.0, 2.0, 1.5)}).eval()
    ref.heads["A"].offset.energy_offset.fill_(0.5)
    state = {}
    for key, value in ref.state_dict().items():  # lamm-ds keys -> a monolithic fairchem checkpoint's
        if key.startswith("backbone."):
            state["module." + key[len("backbone."):]] = value
        elif key.startswith("heads.A.energy_block."):
            state["module." + key[len("heads.A."):]] = value
        elif key.startswith("force_head."):
            state["module." + key[len("force_head."):]] = value
    ckpt = {"epoch": 3, "step": 1200, "state_dict": state,
            "config": {"model": "equiformer_v2", "model_attributes": attrs,
                       "optim": {"lr_initial": np.float64(4e-4), "batch_size": np.int64(8), "betas": (0.9, 0.999)}},
            "normalizers": {"energy": {"mean": torch.tensor(0.5), "rmsd": torch.tensor(2.0)},
                            "forces": {"mean": torch.tensor(0.0), "rmsd": torch.tensor(1.5)}},
            "val_metrics": {"forces_mae": {"metric": np.float64(0.03), "total": 1.5, "numel": 50}},
            "best_val_metric": np.float64(0.03), "primary_metric": "forces_mae", "amp": None, "ema": None,
            "optimizer": {"state": {}, "param_groups": [{"lr": 4e-4, "params": [0, 1]}]}}
    path = tmp_path / "fairchem_style.pt"
    torch.save(ckpt, path)
    rc, _, err = run_cli(["convert-fairchem", path, tmp_path / "eqv2.safetensors", "--dataset", "oc20"], capsys)
    assert rc == 0, err
    model = load_model(tmp_path / "eqv2.safetensors")
    assert model.dataset_names == ["oc20"] and model.trained_elements is None
    a = molecule("CH3CH2OH")
    batch = collate([build_sample(Structure(a.numbers, a.positions), 4.0, 20)])
    with torch.no_grad():
        want, got = ref(batch), model(batch)
    assert torch.allclose(got["energy"], want["energy"], rtol=1e-5, atol=1e-5)
    assert torch.allclose(got["forces"], want["forces"], rtol=1e-4, atol=1e-5)


# -- calculator: geometry and output checks ------------------------------------------------------

def test_coincident_atoms_in_the_calculator():
    atoms = cu_atoms()
    atoms.positions[2] = atoms.positions[1]
    atoms.calc = LammCalculator(tiny_model(trained=None), head="cu", device="cpu")
    with pytest.raises(ValueError, match=r"atoms [12] and [12] are 0 Å apart"):
        atoms.get_potential_energy()
    assert "energy" not in atoms.calc.results
    near = molecule("H2O")
    near.positions[1] = near.positions[0] + [0.05, 0.0, 0.0]
    near.calc = LammCalculator(tiny_model(trained=None), head="cu", device="cpu")
    with pytest.raises(ValueError, match=r"atoms [01] and [01] are 0\.05 Å apart"):
        near.get_forces()


def test_atom_on_its_own_periodic_image_is_refused():
    atoms = Atoms("Cu", positions=[[0, 0, 0]], cell=[0.05, 3.0, 3.0], pbc=True)
    atoms.calc = LammCalculator(tiny_model(trained=None), head="cu", device="cpu")
    with pytest.raises(ValueError, match=r"atoms 0 and 0 \(periodic image shift .*\) are 0\.05 Å apart"):
        atoms.get_potential_energy()


def test_non_finite_model_output_is_an_error():
    model = tiny_model(trained=None)
    with torch.no_grad():
        model.heads["cu"].mlp[2].bias.fill_(float("nan"))
    atoms = cu_atoms()
    atoms.calc = LammCalculator(model, head="cu", device="cpu")
    with pytest.raises(NonFiniteOutputError, match="non-finite"):
        atoms.get_potential_energy()
    assert "energy" not in atoms.calc.results
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        atoms.calc = LammCalculator(model, head="mol", device="cpu")   # the other head is fine
        assert np.isfinite(atoms.get_potential_energy())


def test_calculator_needs_a_head_on_a_multi_head_model():
    from lamm_ds.calculator import LammCalculator

    with pytest.raises(ValueError, match=r"2 energy heads \(cu, mol\); choose one with head="):
        LammCalculator(tiny_model(trained=None), device="cpu")


def test_evaluate_refuses_a_file_whose_labels_it_cannot_see(model_file, tmp_path, capsys):
    """Labels under other keys (MACE-style REF_*) would score as NaN with exit 0."""
    images = []
    for k in range(2):
        a = labelled(cu_atoms(k))
        a.info["REF_energy"] = a.get_potential_energy()
        a.arrays["REF_forces"] = a.get_forces()
        a.calc = None
        images.append(a)
    path = tmp_path / "ref.xyz"
    write(str(path), images, format="extxyz")
    rc, out, err = run_cli(["evaluate", model_file, path, "--head", "cu"], capsys)
    assert rc == 2 and not out
    assert f"{path}: no structure has an energy, forces or stress label" in err
    assert "--energy-key REF_energy --forces-key REF_forces" in err and "evaluate the dataset directory" in err


def test_convert_fairchem_takes_the_ema_weights_as_fairchem_predicts(tmp_path, capsys):
    """A checkpoint with an EMA copy and an ema_decay: fairchem predicts with the EMA weights, so
    the conversion does by default; --weights raw takes the raw ones; misaligned EMA tensors and a
    missing EMA copy with --weights ema are errors."""
    from lamm_ds.graphs import build_sample, collate
    from lamm_ds.model.convert_fairchem import ConversionError, convert_checkpoint
    from lamm_ds.model.equiformer_v2 import EquiformerV2Potential
    from lamm_ds.structure import Structure

    attrs, cfg = _tiny_fairchem_eqv2()
    stats = {"A": DatasetStats(np.zeros(90), 0.0, 1.0, 1.0)}
    torch.manual_seed(0)
    raw = EquiformerV2Potential(cfg, ["A"], stats).eval()
    ema = EquiformerV2Potential(cfg, ["A"], stats).eval()
    with torch.no_grad():  # the EMA copy: the raw weights, moved
        for p, q in zip(raw.parameters(), ema.parameters()):
            q.copy_(p + 0.05 * torch.randn_like(p))

    def fairchem_key(key):  # lamm-ds key -> a monolithic fairchem checkpoint's (as in the test above)
        for ours in ("backbone.", "heads.A.energy_block.", "force_head."):
            if key.startswith(ours):
                return "module." + key[len("heads.A."):] if ours.startswith("heads") else "module." + key[len(ours):]
        return None

    params = {n for n, _ in raw.named_parameters()}
    state = {fairchem_key(k): v for k, v in raw.state_dict().items() if fairchem_key(k)}
    # fairchem's EMA order is its parameters() order: the parameters among the state_dict keys
    trainable = [k for k in raw.state_dict() if k in params and fairchem_key(k)]
    shadows = [dict(ema.named_parameters())[k].detach().clone() for k in trainable]
    ckpt = {"state_dict": state, "config": {"model": "equiformer_v2", "model_attributes": attrs,
                                            "optim": {"ema_decay": 0.999}},
            "ema": {"decay": 0.999, "num_updates": 10, "shadow_params": shadows, "collected_params": []}}
    a = molecule("CH3CH2OH")
    batch = collate([build_sample(Structure(a.numbers, a.positions), 4.0, 20)])
    with torch.no_grad():
        want_ema, want_raw = ema(batch)["energy"], raw(batch)["energy"]
        got_auto = convert_checkpoint(ckpt, "A")(batch)["energy"]
        got_raw = convert_checkpoint(ckpt, "A", weights="raw")(batch)["energy"]
        no_decay = convert_checkpoint({**ckpt, "config": {**ckpt["config"], "optim": {}}}, "A")(batch)["energy"]
    assert torch.allclose(got_auto, want_ema, rtol=1e-5) and not torch.allclose(want_ema, want_raw, rtol=1e-3)
    assert torch.allclose(got_raw, want_raw, rtol=1e-5) and torch.allclose(no_decay, want_raw, rtol=1e-5)
    path = tmp_path / "with_ema.pt"
    torch.save(ckpt, path)
    rc, out, err = run_cli(["convert-fairchem", path, tmp_path / "m.safetensors", "--dataset", "A"], capsys)
    assert rc == 0, err
    assert "ema weights" in out
    with pytest.raises(ConversionError, match="cannot align the checkpoint's .* EMA tensors.*--weights raw"):
        convert_checkpoint({**ckpt, "ema": {**ckpt["ema"], "shadow_params": shadows[1:]}}, "A")
    with pytest.raises(ConversionError, match="holds no EMA weights"):
        convert_checkpoint({**ckpt, "ema": None}, "A", weights="ema")
