"""The DeepSpeed engine through its real entry points: python, torchrun, the deepspeed launcher
(single node and per-node multi-node), exact resume after SIGKILL, ZeRO stages, bf16, faults."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from run_helpers import BIN, REPO, TINY, complete_checkpoint
from run_helpers import child_env as _env
from run_helpers import free_port as _port


def _data_overrides(demo):
    return [f"data.demo_dir={demo['demo_metals'].parent}"]


def _run(args, run_dir, demo, *over, launcher="python", timeout=300, check=True):
    base = [*TINY, *_data_overrides(demo), *over]
    script = str(REPO / "launch" / "pretrain.py")
    tail = ["--run-dir", str(run_dir), "--quiet", *args, *base]
    if launcher == "python":
        cmd = [sys.executable, script, *tail]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, *tail]
    elif launcher == "deepspeed":
        cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(_port()), script, *tail]
    else:
        raise ValueError(launcher)
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{launcher} run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir):
    return load_file(str(Path(run_dir) / "model.safetensors"))


@pytest.fixture(scope="module")
def reference_run(demo_data, tmp_path_factory):
    """Plain `python launch/pretrain.py`, one process, 8 steps, checkpoint every 2 steps."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    _run(["--max-steps", "8"], run_dir, demo_data, "checkpoint.every=2", "checkpoint.keep_last=2")
    return run_dir


def test_single_process_run_leaves_everything(reference_run):
    r = reference_run
    for name in ("config.yaml", "deepspeed_config.json", "environment.json", "metrics.jsonl", "summary.json",
                 "model.safetensors"):
        assert (r / name).is_file(), name
    assert any((r / "tb").iterdir())
    env = json.loads((r / "environment.json").read_text())
    assert env["world_size"] == 1 and env["versions"]["deepspeed"]
    ds = json.loads((r / "deepspeed_config.json").read_text())
    assert ds["train_micro_batch_size_per_gpu"] == 6 and ds["train_batch_size"] == 6
    ckpts = sorted(p.name for p in (r / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step00000006", "step00000008"]  # keep_last=2 pruned the older ones
    assert (r / "checkpoints" / "latest").read_text() == "step00000008"
    rec = json.loads((r / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("loss", "lr", "grad_norm", "samples_per_s", "atoms_per_s", "edges_per_s", "imbalance",
                "memory_mb", "rank0/step_time", "loss_scale"):
        assert key in rec, key
    import lamm_ds

    model = lamm_ds.load_model(r / "model.safetensors")
    assert model.dataset_names == ["demo_metals", "demo_energy", "demo_molecules"]


def test_two_ranks_torchrun_match_one_process(reference_run, demo_data, tmp_path):
    _run(["--max-steps", "8"], tmp_path / "tr", demo_data, "checkpoint.every=0", launcher="torchrun")
    assert _losses(tmp_path / "tr") == pytest.approx(_losses(reference_run), rel=2e-5)
    env = json.loads((tmp_path / "tr" / "environment.json").read_text())
    assert env["world_size"] == 2


def test_deepspeed_launcher_and_per_node_multinode_match(demo_data, tmp_path):
    _run(["--max-steps", "4"], tmp_path / "single", demo_data, launcher="deepspeed")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    port = str(_port())
    script = str(REPO / "launch" / "pretrain.py")
    procs = []
    for node in (1, 0):
        cmd = [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
               "--master_addr", "127.0.0.1", "--master_port", port, script, "--run-dir", str(tmp_path / "multi"),
               "--quiet", "--max-steps", "4", *TINY, *_data_overrides(demo_data)]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[-1][-3000:]
    assert "WORLD INFO DICT: {'127.0.0.1': [0], '127.0.0.2': [0]}" in outs[1]
    assert _losses(tmp_path / "multi") == pytest.approx(_losses(tmp_path / "single"), rel=1e-6)
    pids = sorted(p.name for p in (tmp_path / "multi" / "pids").iterdir())
    assert pids == ["rank00000.pid", "rank00001.pid"]


def test_exact_resume_after_sigkill(reference_run, demo_data, tmp_path):
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, str(REPO / "launch" / "pretrain.py"), "--run-dir", str(run_dir), "--quiet",
           "--max-steps", "8", *TINY, *_data_overrides(demo_data), "checkpoint.every=2", "checkpoint.keep_last=2"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not complete_checkpoint(run_dir):  # kill at the first complete one
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "model.safetensors").exists(), "the run finished before it could be killed"
    latest = (run_dir / "checkpoints" / "latest").read_text()
    assert (run_dir / "checkpoints" / latest / "lamm_complete.json").is_file()
    _run(["--max-steps", "8", "--resume"], run_dir, demo_data, "checkpoint.every=2", "checkpoint.keep_last=2")
    ref, got = _weights(reference_run), _weights(run_dir)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), f"{k} differs after resume"
    assert _losses(run_dir) == _losses(reference_run)


def test_resume_refuses_corrupt_or_missing_checkpoints(reference_run, demo_data, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(reference_run, run_dir)
    victim = run_dir / "checkpoints" / "step00000008" / "mp_rank_00_model_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    proc = _run(["--max-steps", "10", "--resume"], run_dir, demo_data, check=False)
    assert proc.returncode != 0 and "mp_rank_00_model_states.pt: corrupt" in proc.stderr
    proc = _run(["--max-steps", "10", "--resume"], tmp_path / "empty", demo_data, check=False)
    assert proc.returncode != 0 and "no checkpoint to resume from" in proc.stderr
    proc = _run(["--max-steps", "10"], run_dir, demo_data, check=False)
    assert proc.returncode != 0 and "pass --resume" in proc.stderr


def test_zero_stages_give_the_same_training(demo_data, tmp_path):
    """Guards against wrong ZeRO gradients (e.g. DeepSpeed issue #7718): stages 1-3 on 2 ranks must
    reproduce stage 0's losses, which depend on every previous update."""
    runs = {}
    for stage in (0, 1, 2, 3):
        run_dir = tmp_path / f"z{stage}"
        _run(["--max-steps", "4"], run_dir, demo_data, f"deepspeed_config=ds_configs/zero{stage}_fp32.json",
             launcher="torchrun")
        runs[stage] = _losses(run_dir)
        w = _weights(run_dir)
        assert all(v.dtype in (torch.float32, torch.int64) for v in w.values())
    for stage in (1, 2, 3):
        assert runs[stage] == pytest.approx(runs[0], rel=1e-4), f"stage {stage}"


def test_bf16_tracks_fp32(demo_data, tmp_path):
    steps = "25"
    _run(["--max-steps", steps], tmp_path / "fp32", demo_data, "deepspeed_config=ds_configs/zero0_fp32.json")
    _run(["--max-steps", steps], tmp_path / "bf16", demo_data, "deepspeed_config=ds_configs/zero2_bf16.json")
    fp32, bf16 = _losses(tmp_path / "fp32"), _losses(tmp_path / "bf16")
    assert len(fp32) == len(bf16) == int(steps)
    rel = [abs(b - a) / abs(a) for a, b in zip(fp32, bf16)]
    assert max(rel) < 0.05 and sum(rel) / len(rel) < 0.02  # same batches, step by step
    assert any(r > 0 for r in rel), "bf16 run is bit-identical to fp32: mixed precision was not active"
    w32, w16 = _weights(tmp_path / "fp32"), _weights(tmp_path / "bf16")
    assert all(v.dtype != torch.bfloat16 for v in w16.values())  # exported from the fp32 master weights
    k = "backbone.embedding.weight"
    assert torch.allclose(w16[k], w32[k], atol=2e-2) and not torch.equal(w16[k], w32[k])


def test_nan_steps_are_skipped_then_abort(demo_data, tmp_path):
    _run(["--max-steps", "5"], tmp_path / "skip", demo_data, "faults.inject_nan_steps=[2]")
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["skipped_steps"] == 1
    proc = _run(["--max-steps", "8"], tmp_path / "abort", demo_data, "faults.inject_nan_steps=[2,3,4]",
                "faults.nan_abort_after=3", check=False)
    assert proc.returncode != 0
    assert "3 consecutive steps with a non-finite loss" in proc.stderr
    assert "non-finite loss on rank(s) [0]" in proc.stderr


def test_dead_rank_makes_the_others_exit(demo_data, tmp_path):
    run_dir = tmp_path / "dead"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "launch" / "pretrain.py"), "--run-dir", str(run_dir), "--quiet", "--max-steps", "100000",
           *TINY, *_data_overrides(demo_data), "checkpoint.every=0", "faults.collective_timeout_s=30"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    pid = int((run_dir / "pids" / "rank00001.pid").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    start = time.time()
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the surviving rank hung after its peer died")
    assert proc.returncode != 0 and time.time() - start < 120


def test_finetune_adds_a_head(reference_run, demo_data, tmp_path):
    cmd = [sys.executable, str(REPO / "launch" / "finetune.py"), "--init", str(reference_run / "model.safetensors"),
           "--run-dir", str(tmp_path / "ft"), "--quiet", "--max-steps", "4", *_data_overrides(demo_data),
           "data.batch_size=4", "data.stats_samples=50", "finetune.freeze_backbone=true"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import lamm_ds

    before = lamm_ds.load_model(reference_run / "model.safetensors")
    after = lamm_ds.load_model(tmp_path / "ft" / "model.safetensors")
    assert after.dataset_names == before.dataset_names + ["demo_downstream"]
    b, a = before.state_dict(), after.state_dict()
    emb = "backbone.embedding.weight"
    assert all(torch.equal(b[k], a[k]) for k in b if k.startswith("backbone.") and k != emb)  # frozen
    # Pd and Au are in demo_downstream only: their rows start from their group's trained elements
    # (Pd: Ni and Pt; Au: Ag, one period up), the others stay
    others = [z for z in range(b[emb].shape[0]) if z not in (46, 79)]
    assert torch.equal(a[emb][others], b[emb][others]) and torch.equal(a[emb][79], b[emb][47])
    assert torch.allclose(a[emb][46], (b[emb][28] + b[emb][78]) / 2)
    assert not torch.equal(b["heads.demo_metals.mlp.0.weight"], a["heads.demo_downstream.mlp.0.weight"])
    summary = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert summary["evaluation"]["demo_downstream_test"]["forces_mae"] > 0


def test_fp16_on_cpu_is_a_clear_error():
    from lamm_ds.engine.config import load_config
    from lamm_ds.engine.ds_engine import deepspeed_config

    cfg = load_config([], ["deepspeed_config=ds_configs/zero2_fp16.json"])
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: fp16 is allowed")
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        deepspeed_config(cfg, 2)


def test_zero3_with_conservative_forces_is_refused(demo_data, tmp_path):
    proc = _run(["--max-steps", "2"], tmp_path / "z3c", demo_data, "model.forces=conservative",
                "deepspeed_config=ds_configs/zero3_fp32.json", check=False)
    assert proc.returncode != 0 and "ZeRO stage 3 cannot train conservative forces" in proc.stderr
