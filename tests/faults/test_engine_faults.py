"""Faults of the training engine (launch/pretrain.py, launch/finetune.py): each case asserts the exit
code, a message naming the file / key / rank / structure, and what is (not) left in the run directory."""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from run_helpers import BIN, REPO, TINY
from run_helpers import child_env as _env
from run_helpers import alive as _alive
from run_helpers import free_port as _port
from run_helpers import wait_for as _wait_for


def _launch(script, run_dir, demo, *args, timeout=300):
    cmd = [sys.executable, str(REPO / "launch" / script), "--run-dir", str(run_dir), "--quiet", *TINY,
           f"data.demo_dir={demo['demo_metals'].parent}", *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _pretrain(run_dir, demo, *args, **kw):
    return _launch("pretrain.py", run_dir, demo, *args, **kw)


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def done_run(demo_data, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 (direct forces, the demo config)."""
    run_dir = tmp_path_factory.mktemp("engine_faults") / "run"
    _ok(_pretrain(run_dir, demo_data, "--max-steps", "4", "checkpoint.every=2"))
    return run_dir


def _copy(run_dir, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(run_dir, dst)
    return dst


# -- resume with another config --------------------------------------------------------------------


def test_resume_with_a_changed_config_is_refused_and_config_kept(done_run, demo_data, tmp_path):
    run_dir = _copy(done_run, tmp_path)
    before = (run_dir / "config.yaml").read_text()
    proc = _pretrain(run_dir, demo_data, "--max-steps", "4", "--resume", "checkpoint.every=2", "optim.lr=1e-3")
    assert proc.returncode == 2
    assert "the config differs" in proc.stderr and "optim.lr: 0.002 -> 0.001" in proc.stderr
    assert "--allow-config-change" in proc.stderr
    assert (run_dir / "config.yaml").read_text() == before
    assert not (run_dir / "config_changes.jsonl").exists()


def test_resume_with_allow_config_change_logs_it_and_keeps_the_original(done_run, demo_data, tmp_path):
    run_dir = _copy(done_run, tmp_path)
    before = (run_dir / "config.yaml").read_text()
    _ok(_pretrain(run_dir, demo_data, "--max-steps", "6", "--resume", "--allow-config-change", "checkpoint.every=2"))
    assert (run_dir / "config.yaml").read_text() == before
    record = json.loads((run_dir / "config_changes.jsonl").read_text().splitlines()[-1])
    assert record["resumed_at_step"] == 4
    assert {"key": "max_steps", "was": 4, "now": 6} in record["changes"]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 6


def test_resume_may_change_operational_keys(done_run, demo_data, tmp_path):
    run_dir = _copy(done_run, tmp_path)
    proc = _ok(_pretrain(run_dir, demo_data, "--max-steps", "4", "--resume", "checkpoint.every=1", "log_every=3",
                         "faults.collective_timeout_s=90"))
    assert "changed config" not in proc.stderr


def test_allow_config_change_without_resume_is_an_error(demo_data, tmp_path):
    proc = _pretrain(tmp_path / "r", demo_data, "--max-steps", "2", "--allow-config-change")
    assert proc.returncode != 0 and "only apply with --resume" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_lamm_ds_train_takes_the_same_resume_flags(demo_data, tmp_path, capsys):
    from lamm_ds.cli import main

    with pytest.raises(SystemExit, match="only apply with --resume"):
        main(["train", "--config", str(REPO / "configs" / "demo.yaml"), "--run-dir", str(tmp_path / "t"),
              "--trust-pickle", "max_steps=2"])
    assert not (tmp_path / "t").exists()


def test_fresh_start_in_a_directory_with_checkpoints_is_refused(done_run, demo_data, tmp_path):
    run_dir = _copy(done_run, tmp_path)
    before = _sha256(run_dir / "model.safetensors")
    proc = _pretrain(run_dir, demo_data, "--max-steps", "4", "checkpoint.every=2")
    assert proc.returncode == 2 and "already holds checkpoints; pass --resume" in proc.stderr
    assert _sha256(run_dir / "model.safetensors") == before


def test_resume_without_a_checkpoint_names_the_pointer(demo_data, tmp_path):
    proc = _pretrain(tmp_path / "empty", demo_data, "--max-steps", "2", "--resume")
    assert proc.returncode == 2 and "checkpoints/latest: no checkpoint to resume from" in proc.stderr


def test_resume_with_a_dangling_pointer_names_it(done_run, demo_data, tmp_path):
    run_dir = _copy(done_run, tmp_path)
    (run_dir / "checkpoints" / "latest").write_text("step00000099")
    proc = _pretrain(run_dir, demo_data, "--max-steps", "4", "--resume", "checkpoint.every=2")
    assert proc.returncode == 2 and "step00000099: checkpoint directory missing" in proc.stderr


def test_resume_with_an_unsealed_checkpoint_names_it(done_run, demo_data, tmp_path):
    run_dir = _copy(done_run, tmp_path)
    (run_dir / "checkpoints" / "step00000004" / "lamm_complete.json").unlink()
    proc = _pretrain(run_dir, demo_data, "--max-steps", "4", "--resume", "checkpoint.every=2")
    assert proc.returncode == 2 and "lamm_complete.json: missing; checkpoint step00000004 was never completed" \
        in proc.stderr


# -- no code from checkpoint files -----------------------------------------------------------------


class _Payload:
    """Unpickling this object touches a marker file: stands for arbitrary code in a checkpoint."""

    def __init__(self, marker):
        self.marker = Path(marker)

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _plant(run_dir, marker):
    """Replace the latest checkpoint's model states with a payload and re-seal it, as an attacker
    who can write the run directory would."""
    import torch

    tag_dir = run_dir / "checkpoints" / "step00000004"
    victim = tag_dir / "mp_rank_00_model_states.pt"
    torch.save({"module": _Payload(marker)}, victim, _use_new_zipfile_serialization=False)
    seal = json.loads((tag_dir / "lamm_complete.json").read_text())
    seal["files"][victim.name] = {"size": victim.stat().st_size, "sha256": _sha256(victim)}
    (tag_dir / "lamm_complete.json").write_text(json.dumps(seal))


def test_resume_never_runs_code_from_a_checkpoint(done_run, demo_data, tmp_path):
    run_dir = _copy(done_run, tmp_path)
    marker = tmp_path / "PWNED"
    _plant(run_dir, marker)
    proc = _pretrain(run_dir, demo_data, "--max-steps", "4", "--resume", "checkpoint.every=2")
    assert proc.returncode == 2
    assert "mp_rank_00_model_states.pt: holds Python objects outside the safe list" in proc.stderr
    assert "(it needs " in proc.stderr and "getattr" in proc.stderr  # the global the payload asked for is named
    assert "--trust-pickle" in proc.stderr
    assert not marker.exists(), "a checkpoint ran code on resume"


def test_trust_pickle_is_what_lets_a_checkpoint_unpickle_objects(done_run, demo_data, tmp_path):
    run_dir = _copy(done_run, tmp_path)
    marker = tmp_path / "PWNED"
    _plant(run_dir, marker)
    proc = _pretrain(run_dir, demo_data, "--max-steps", "4", "--resume", "--trust-pickle", "checkpoint.every=2")
    assert marker.exists()  # the flag does what it says: full unpickling
    assert proc.returncode != 0  # and the planted file is no DeepSpeed checkpoint


@pytest.mark.slow
def test_weights_only_loader_reads_every_zero_stage(demo_data, tmp_path):
    """Real DeepSpeed checkpoints (ZeRO 1-3, bf16 and fp32) resume under the weights-only unpickler."""
    for config in ("zero1_bf16", "zero2_fp32", "zero3_fp32"):
        run_dir = tmp_path / config
        _ok(_pretrain(run_dir, demo_data, "--max-steps", "2", f"deepspeed_config=ds_configs/{config}.json"))
        _ok(_pretrain(run_dir, demo_data, "--max-steps", "3", "--resume", "--allow-config-change",
                      f"deepspeed_config=ds_configs/{config}.json"))
        assert json.loads((run_dir / "summary.json").read_text())["start_step"] == 2


# -- one job per run directory ---------------------------------------------------------------------


def test_a_run_directory_in_use_is_refused_naming_its_holder(done_run, demo_data, tmp_path):
    from lamm_ds.engine.rundir import RunDirLock

    run_dir = _copy(done_run, tmp_path)
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    lock = RunDirLock(run_dir)
    lock.acquire()  # this test process stands for a live job
    try:
        proc = _pretrain(run_dir, demo_data, "--max-steps", "6", "--resume", "--allow-config-change")
    finally:
        lock.release()
    assert proc.returncode == 2
    assert "is in use by another job" in proc.stderr and f"pid {os.getpid()}" in proc.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


def test_a_stale_lock_file_does_not_block_a_resume(done_run, demo_data, tmp_path):
    run_dir = _copy(done_run, tmp_path)
    (run_dir / "run.lock").write_text("pid 999999 on elsewhere since yesterday: launch/pretrain.py\n")
    _ok(_pretrain(run_dir, demo_data, "--max-steps", "4", "--resume", "checkpoint.every=2"))


def test_launcher_watch_recognises_launchers():
    from lamm_ds.engine.launcher_watch import is_launcher

    assert is_launcher(["/usr/bin/python3", "-u", "-m", "deepspeed.launcher.launch", "--world_info=x"])
    assert is_launcher(["/venv/bin/python3", "/venv/bin/deepspeed", "--num_gpus", "2", "train.py"])
    assert is_launcher(["/venv/bin/python", "-m", "torch.distributed.run", "--nproc_per_node", "2", "x.py"])
    assert is_launcher(["/venv/bin/python", "/venv/bin/torchrun", "x.py"])
    assert not is_launcher(["/bin/bash"])
    assert not is_launcher(["/venv/bin/python", "-m", "pytest", "tests/test_deepspeed.py"])
    assert not is_launcher(["/venv/bin/python", "launch/pretrain.py", "--run-dir", "runs/deepspeed"])


@pytest.mark.slow
def test_ranks_stop_when_the_deepspeed_launcher_is_killed(demo_data, tmp_path):
    run_dir = tmp_path / "orphans"
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(_port()), str(REPO / "launch" / "pretrain.py"),
           "--run-dir", str(run_dir), "--quiet", "--max-steps", "100000", *TINY,
           f"data.demo_dir={demo_data['demo_metals'].parent}", "checkpoint.every=0"]
    launcher = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        metrics = run_dir / "metrics.jsonl"
        assert _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, 240)
        pids = [int((run_dir / "pids" / f"rank{r:05d}.pid").read_text().split()[0]) for r in (0, 1)]
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        assert _wait_for(lambda: not any(_alive(p) for p in pids), 30), "ranks ran on after their launcher died"
        # and the run directory is free again: a resume-less restart is refused only for lack of checkpoints
        assert not (run_dir / "model.safetensors").exists()
    finally:
        os.killpg(launcher.pid, signal.SIGKILL) if _alive(launcher.pid) else None
        for line in (run_dir / "pids").glob("*.pid") if (run_dir / "pids").is_dir() else []:
            pid = int(line.read_text().split()[0])
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


# -- data that cannot train, numbers that go bad ---------------------------------------------------


def test_an_unlabelled_dataset_without_denoising_is_refused(demo_data, tmp_path):
    path = demo_data["demo_molecules"]
    proc = _pretrain(tmp_path / "r", demo_data, "--max-steps", "2", "denoise_unlabelled=false",
                     f"data.datasets=[{{name: demo_molecules, path: {path}}}]", "eval_datasets=[]")
    assert proc.returncode == 2
    assert "dataset 'demo_molecules'" in proc.stderr and "can contribute nothing to the loss" in proc.stderr
    assert "denoise_unlabelled=true" in proc.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_an_energy_only_dataset_with_zero_energy_weight_is_refused(demo_data, tmp_path):
    path = demo_data["demo_energy"]
    proc = _pretrain(tmp_path / "r", demo_data, "--max-steps", "2", "loss.energy_weight=0",
                     f"data.datasets=[{{name: demo_energy, path: {path}}}]", "eval_datasets=[]")
    assert proc.returncode == 2 and "dataset 'demo_energy'" in proc.stderr and "energy_weight is 0" in proc.stderr


def test_single_process_train_refuses_it_too(demo_data, tmp_path, capsys):
    from lamm_ds.cli import main

    path = demo_data["demo_molecules"]
    code = main(["train", "--config", str(REPO / "configs" / "demo.yaml"), "--run-dir", str(tmp_path / "t"), "--quiet",
                 *TINY, "denoise_unlabelled=false", f"data.datasets=[{{name: demo_molecules, path: {path}}}]",
                 "eval_datasets=[]", "max_steps=2"])
    assert code == 2 and "can contribute nothing to the loss" in capsys.readouterr().err


def test_non_finite_steps_abort_naming_the_structures(demo_data, tmp_path):
    proc = _pretrain(tmp_path / "nan", demo_data, "--max-steps", "6", "faults.inject_nan_steps=[1,2]",
                     "faults.nan_abort_after=2")
    assert proc.returncode == 2
    assert "2 consecutive steps with a non-finite loss (last: step 2, rank(s) [0]" in proc.stderr
    assert "non-finite loss over demo_" in proc.stderr and ": structure " in proc.stderr
    assert not (tmp_path / "nan" / "model.safetensors").exists()


def test_nonfinite_structures_names_the_bad_graph():
    import torch

    from lamm_ds.engine.guards import nonfinite_structures
    from lamm_ds.graphs import build_sample, collate
    from lamm_ds.structure import Structure

    structures = [Structure([1, 1], [[0, 0, 0], [0, 0, 0.8]]), Structure([8], [[0, 0, 0]])]
    batch = collate([build_sample(s, 3.0, None, dataset_id=0) for s in structures])
    batch = batch.replace(sample_id=torch.tensor([5, 7]))
    out = {"energy": torch.tensor([1.0, float("nan")]), "forces": torch.zeros(3, 3)}
    assert nonfinite_structures(out, batch, ["mols"], []) == "non-finite predictions for mols[7]"
    out["forces"][0, 1] = float("inf")
    assert nonfinite_structures(out, batch, ["mols"], []) == "non-finite predictions for mols[5], mols[7]"


# -- config and command-line mistakes --------------------------------------------------------------


def test_a_misspelt_override_is_named_as_an_override(demo_data, tmp_path):
    proc = _pretrain(tmp_path / "r", demo_data, "--max-steps", "2", "optim.lrr=1e-3")
    assert proc.returncode == 2
    assert "in the command-line override 'optim.lrr=1e-3'" in proc.stderr and "Did you mean: 'lr'" in proc.stderr
    assert "configs/demo.yaml" not in proc.stderr.split("override")[0].splitlines()[-1]


def test_a_misspelt_yaml_key_is_named_with_its_file(tmp_path):
    from lamm_ds.engine.config import ConfigError, load_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lrr: 1.0\n")
    with pytest.raises(ConfigError, match=r"in .*bad.yaml.*Key 'lrr'.*\[key: optim.lrr\]"):
        load_config([REPO / "configs" / "demo.yaml", bad], ["optim.lr=1e-3"])


def test_a_badly_typed_override_names_key_and_override():
    from lamm_ds.engine.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"override 'optim.lr=fast'.*\[key: optim.lr\]"):
        load_config([], ["optim.lr=fast"])


def test_an_invalid_value_is_named():
    from lamm_ds.engine.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="optim.schedule must be 'cosine' or 'constant', got 'linear'"):
        load_config([], ["optim.schedule=linear"])
    with pytest.raises(ConfigError, match="finetune.forces must be null, 'direct' or 'conservative'"):
        load_config([], ["finetune.forces=sideways"])


def test_a_missing_config_file_is_named(demo_data, tmp_path):
    proc = _pretrain(tmp_path / "r", demo_data, "--config", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and f"config file not found: {tmp_path / 'nope.yaml'}" in proc.stderr


def test_a_missing_deepspeed_config_is_named(demo_data, tmp_path):
    proc = _pretrain(tmp_path / "r", demo_data, "--max-steps", "2", "deepspeed_config=ds_configs/nope.json")
    assert proc.returncode == 2 and "DeepSpeed config not found" in proc.stderr and "nope.json" in proc.stderr


def test_a_deepspeed_config_with_its_own_optimizer_is_refused(tmp_path):
    from lamm_ds.engine.config import load_config
    from lamm_ds.engine.ds_engine import deepspeed_config

    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"optimizer": {"type": "Adam"}, "zero_optimization": {"stage": 1}}))
    with pytest.raises(ValueError, match="remove 'optimizer'"):
        deepspeed_config(load_config([], [f"deepspeed_config={bad}"]), 2)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="ds.json: invalid JSON"):
        deepspeed_config(load_config([], [f"deepspeed_config={bad}"]), 2)


def test_plan_report_uses_the_configured_ranks_or_asks(demo_data, tmp_path, capsys):
    from lamm_ds.cli import main

    png = tmp_path / "plan.png"
    data = f"data.demo_dir={demo_data['demo_metals'].parent}"
    assert main(["plan-report", "--steps", "4", "--out", str(png), "--json", data]) == 2
    assert "pass --ranks N" in capsys.readouterr().err and not png.exists()
    assert main(["plan-report", "--steps", "4", "--out", str(png), "--json", data, "schedule.plan_ranks=4"]) == 0
    assert json.loads(capsys.readouterr().out)["ranks"] == 4 and png.is_file()


# -- fine-tuning -----------------------------------------------------------------------------------


def _finetune(run_dir, init, demo, *args):
    return _launch("finetune.py", run_dir, demo, "--init", str(init), "--max-steps", "2", "data.batch_size=4",
                   "denoise_unlabelled=false", "eval_datasets=[]",
                   f"data.datasets=[{{name: demo_downstream, path: {demo['demo_downstream']}}}]", *args)


def test_finetuning_a_direct_force_model_says_so(done_run, demo_data, tmp_path):
    proc = _ok(_finetune(tmp_path / "ft", done_run / "model.safetensors", demo_data))
    assert "keeps its direct force head (model.forces=direct)" in proc.stderr
    assert "finetune.forces=conservative" in proc.stderr
    quiet = _ok(_finetune(tmp_path / "ft2", done_run / "model.safetensors", demo_data, "finetune.forces=direct"))
    assert "keeps its direct force head" not in quiet.stderr


def test_finetune_forces_conservative_switches_the_head(done_run, demo_data, tmp_path):
    import lamm_ds

    proc = _ok(_finetune(tmp_path / "ft", done_run / "model.safetensors", demo_data, "finetune.forces=conservative"))
    assert "switched" in proc.stderr and "from direct to conservative forces" in proc.stderr
    before = lamm_ds.load_model(done_run / "model.safetensors")
    after = lamm_ds.load_model(tmp_path / "ft" / "model.safetensors")
    assert before.cfg.forces == "direct" and after.cfg.forces == "conservative"
    assert not any(k.startswith("force_head.") for k in after.state_dict())


def test_exported_models_record_their_elements(done_run, demo_data):
    import lamm_ds
    from lamm_ds.shards import LmdbDataset

    model = lamm_ds.load_model(done_run / "model.safetensors")
    for name in model.dataset_names:
        assert model.trained_elements[name] == LmdbDataset(demo_data[name]).manifest["elements"]


def test_finetuning_on_elements_the_model_never_saw_is_reported(done_run, demo_data, tmp_path):
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from lamm_ds.ingest import IngestOptions, ingest

    frames = []
    for k in range(8):
        atoms = bulk("Au", "fcc", a=4.08, cubic=True)  # the demo data hold no gold
        atoms.rattle(0.05, seed=k)
        atoms.calc = EMT()
        atoms.get_forces()
        frames.append(atoms)
    import ase.io

    ase.io.write(tmp_path / "au.xyz", frames)
    ingest([str(tmp_path / "au.xyz")], tmp_path / "au", IngestOptions(name="au", progress=False))
    proc = _ok(_launch("finetune.py", tmp_path / "ft", demo_data, "--init", str(done_run / "model.safetensors"),
                       "--max-steps", "2", "data.batch_size=4", "denoise_unlabelled=false", "eval_datasets=[]",
                       "finetune.forces=direct", f"data.datasets=[{{name: au, path: {tmp_path / 'au'}}}]"))
    assert "element(s) the pre-trained model never saw: Au (Z=79)" in proc.stderr
    assert "embedding rows of Au (Z=79) initialised as the mean of" in proc.stderr
    import lamm_ds

    assert lamm_ds.load_model(tmp_path / "ft" / "model.safetensors").trained_elements["au"] == [79]


def test_an_eval_set_without_a_head_is_refused_before_training(demo_data, tmp_path):
    path = demo_data["demo_metals_test"]
    proc = _pretrain(tmp_path / "r", demo_data, "--max-steps", "2",
                     f"eval_datasets=[{{name: metals_holdout, path: {path}}}]")
    assert proc.returncode == 2
    assert "eval_datasets: cannot tell which energy head to use for eval dataset 'metals_holdout'" in proc.stderr
    assert "set head: in its eval_datasets entry" in proc.stderr
    assert not (tmp_path / "r" / "checkpoints").exists() and not (tmp_path / "r" / "model.safetensors").exists()


def test_an_eval_set_without_labels_is_refused_before_training(demo_data, tmp_path):
    path = demo_data["demo_molecules"]  # unlabelled
    proc = _pretrain(tmp_path / "r", demo_data, "--max-steps", "2",
                     f"eval_datasets=[{{name: mols, path: {path}, head: demo_molecules}}]")
    assert proc.returncode == 2
    assert "eval_datasets:" in proc.stderr and "has no energy or force labels: nothing to score" in proc.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_resume_accepts_fields_added_since_the_run_started():
    """A run started by an older lamm-ds has no value stored for a field added later: the field's
    default (which keeps the old behaviour) is no change; any other value is one."""
    from lamm_ds.engine.config import RunConfig, to_yaml
    from lamm_ds.engine.rundir import config_changes

    import yaml

    defaults = yaml.safe_load(to_yaml(RunConfig()))
    stored = yaml.safe_load(to_yaml(RunConfig()))
    del stored["equiformer_v2"]["max_neighbors_strict"]  # as written before the field existed
    current = yaml.safe_load(to_yaml(RunConfig()))
    assert config_changes(stored, current, defaults=defaults) == []
    assert config_changes(stored, current) == [("equiformer_v2.max_neighbors_strict", "<absent>", True)]
    current["equiformer_v2"]["max_neighbors_strict"] = False
    assert config_changes(stored, current, defaults=defaults) == [
        ("equiformer_v2.max_neighbors_strict", "<absent>", False)]


def test_resume_accepts_record_fields_added_since_the_run_started():
    """The same for fields of list records (data.datasets entries gained references /
    reference_energies): missing ones are their defaults; a real change is still one."""
    from lamm_ds.engine.config import DatasetConfig, RunConfig, record_list_defaults, to_yaml
    from lamm_ds.engine.rundir import config_changes

    import yaml

    cfg = RunConfig()
    cfg.data.datasets = [DatasetConfig(name="a", path="data/a")]
    current = yaml.safe_load(to_yaml(cfg))
    stored = yaml.safe_load(to_yaml(cfg))
    for entry in stored["data"]["datasets"]:
        del entry["references"], entry["reference_energies"]
    defaults = yaml.safe_load(to_yaml(RunConfig()))
    assert config_changes(stored, current, defaults=defaults, item_defaults=record_list_defaults()) == []
    assert config_changes(stored, current, defaults=defaults)  # without the record defaults: a change
    current["data"]["datasets"][0]["references"] = "zero"
    assert config_changes(stored, current, defaults=defaults, item_defaults=record_list_defaults())
