import json
import os

import numpy as np
import pytest

from lamm_ds import load_model
from lamm_ds.cli import main as cli_main
from lamm_ds.engine.config import ConfigError, load_config
from lamm_ds.engine.data import open_datasets, plan_step
from lamm_ds.engine.evaluate import evaluate
from lamm_ds.engine.ds_engine import run
from lamm_ds.engine.host_memory import is_glibc
from lamm_ds.engine.model_init import build_model
from lamm_ds.mixture import MixtureStream
from lamm_ds.shards import LmdbDataset

TINY = ["model.hidden=24", "model.layers=2", "model.num_rbf=8", "model.cutoff=4.5", "model.max_neighbors=16"]


def _cfg(demo, *extra):
    over = [*TINY, "data.batch_size=6", "log_every=5", "optim.lr=2e-3", "optim.warmup_steps=5",
            f"data.datasets=[{{name: demo_metals, path: {demo['demo_metals']}}}, "
            f"{{name: demo_energy, path: {demo['demo_energy']}}}, "
            f"{{name: demo_molecules, path: {demo['demo_molecules']}}}]", *extra]
    return load_config([], over)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"model.hiden"):
        load_config([], ["model.hiden=3"])
    with pytest.raises(ConfigError, match=r"optim.lr"):
        load_config([], ["optim.lr=fast"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  batchsize: 3\n")
    with pytest.raises(ConfigError, match=r"batchsize.*bad.yaml|bad.yaml.*batchsize"):
        load_config([bad])
    with pytest.raises(ConfigError, match="forces must be one of"):
        load_config([], ["model.forces=magic"])
    cfg = load_config([], ["data.datasets=[{name: a, path: x}]", "data.datasets.0.path=y"])
    assert cfg.data.datasets[0].path == "y"


def test_demo_config_resolves(demo_data):
    cfg = load_config(["configs/demo.yaml"], [f"data.demo_dir={demo_data['demo_metals'].parent}"])
    assert cfg.data.datasets[0].path == str(demo_data["demo_metals"])
    assert [d.name for d in cfg.data.datasets] == ["demo_metals", "demo_energy", "demo_molecules"]


def test_step_plan_is_a_pure_function_of_step():
    stream = MixtureStream([50, 7, 300], temperature=2.0, seed=3)
    L = len(stream.epoch(0))
    a = plan_step(stream, L, 41, 9)
    b = plan_step(stream, L, 41, 9)
    for x, y in zip(a[1:], b[1:]):
        np.testing.assert_array_equal(x, y)
    # steps tile the stream: consecutive steps continue where the previous ended, across epochs
    all_pos = np.concatenate([plan_step(stream, L, s, 9)[1] for s in range(0, 60)])
    np.testing.assert_array_equal(all_pos, np.arange(60 * 9))


def test_training_lowers_the_error_and_exports(demo_data, tmp_path):
    """The engine in this process (one rank): the model it starts from is build_model's."""
    cfg = _cfg(demo_data, "max_steps=80", "checkpoint.every=0")
    datasets = open_datasets(cfg.data.datasets)
    check = [datasets[0][k] for k in range(0, len(datasets[0]), 3)]
    before = evaluate(build_model(cfg, datasets), check, head="demo_metals")
    summary = run(cfg, tmp_path / "run", progress=False)
    loaded = load_model(summary["model_path"])
    after = evaluate(loaded, check, head="demo_metals")
    assert after["forces_mae"] < 0.7 * before["forces_mae"]
    assert after["energy_mae_per_atom"] < before["energy_mae_per_atom"]
    history = summary["history"]
    assert np.isfinite([h["loss"] for h in history]).all()
    assert any(h.get("dataset/pseudo_force_mae/demo_molecules", 0) > 0 for h in history), \
        "unlabelled molecules were never denoised"
    assert (tmp_path / "run" / "config.yaml").is_file() and list((tmp_path / "run" / "tb").iterdir())
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 79
    assert loaded.dataset_names == ["demo_metals", "demo_energy", "demo_molecules"]
    assert os.environ.get("RANK") is None, "an in-process run must leave no rendezvous variables behind"
    if is_glibc():  # keep_host_memory, on by default
        assert json.loads((tmp_path / "run" / "ranks" / "rank00000.json").read_text())["host_memory"] == "kept"


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_model(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_model(junk)


def test_cli_train_and_evaluate(demo_data, tmp_path, capsys):
    over = [f"data.datasets=[{{name: demo_metals, path: {demo_data['demo_metals']}}}]", *TINY]
    assert cli_main(["train", "--run-dir", str(tmp_path / "r"), "--max-steps", "3", "--quiet", *over]) == 0
    capsys.readouterr()
    assert cli_main(["evaluate", str(tmp_path / "r" / "model.safetensors"), str(demo_data["demo_metals_test"]),
                     "--head", "demo_metals", "--plot-dir", str(tmp_path / "plots"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["demo_metals_test"]
    assert res["structures"] == len(LmdbDataset(demo_data["demo_metals_test"]))
    assert res["forces_mae"] > 0 and (tmp_path / "plots" / "parity_demo_metals_test.png").stat().st_size > 1000


def test_compiled_training_follows_the_eager_losses(demo_data, tmp_path):
    """compile=true (PaiNN, direct forces): same losses as the eager run, step by step, with three
    datasets (three energy heads) mixed differently in every step, and the same exported weights."""
    import torch

    runs = {}
    for flag in ("false", "true"):
        cfg = _cfg(demo_data, "max_steps=4", "log_every=1", "checkpoint.every=0", "model.forces=direct",
                   f"compile={flag}")
        runs[flag] = run(cfg, tmp_path / f"run_{flag}", progress=False)
    eager = [h["loss"] for h in runs["false"]["history"]]
    compiled = [h["loss"] for h in runs["true"]["history"]]
    assert len(eager) == len(compiled) == 4
    np.testing.assert_allclose(compiled, eager, rtol=1e-4)
    a, b = load_model(runs["false"]["model_path"]), load_model(runs["true"]["model_path"])
    assert list(a.state_dict()) == list(b.state_dict())  # no "_orig_mod." prefixes in the export
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x, y, rtol=1e-3, atol=1e-5), name


@pytest.mark.parametrize("extra, message", [
    (["model.forces=conservative"], "cannot train conservative forces"),
    (["model_kind=equiformer_v2"], "supports model_kind=painn only"),
    (["model.forces=direct", "deepspeed_config=ds_configs/zero3_fp32.json"], "not supported with ZeRO stage 3"),
])
def test_compile_refuses_what_it_cannot_train(demo_data, tmp_path, extra, message):
    cfg = _cfg(demo_data, "max_steps=1", "compile=true", *extra)
    with pytest.raises(ValueError, match=message):
        run(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "model.safetensors").exists()
