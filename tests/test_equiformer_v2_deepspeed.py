"""EquiformerV2 through the DeepSpeed engine: 2-rank ZeRO-3 (direct forces) matches a one-process
ZeRO-0 run, bf16 ZeRO-3 trains, and the published 31M preset trains a few steps on the demo mixture."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# A reduced EquiformerV2; dropout, drop-path and the random edge roll off so runs are comparable.
TINY_EQV2 = ["model_kind=equiformer_v2", "equiformer_v2.num_layers=2", "equiformer_v2.lmax=2", "equiformer_v2.mmax=1",
             "equiformer_v2.sphere_channels=16", "equiformer_v2.attn_hidden_channels=16", "equiformer_v2.num_heads=2",
             "equiformer_v2.attn_alpha_channels=8", "equiformer_v2.attn_value_channels=4",
             "equiformer_v2.ffn_hidden_channels=16", "equiformer_v2.edge_channels=16", "equiformer_v2.cutoff=4.0",
             "equiformer_v2.max_neighbors=12", "equiformer_v2.alpha_drop=0.0", "equiformer_v2.drop_path_rate=0.0",
             "equiformer_v2.edge_roll=fixed", "equiformer_v2.grid_resolution=8"]
COMMON = ["data.batch_size=6", "log_every=1", "optim.lr=2e-3", "optim.warmup_steps=2", "data.stats_samples=50",
          "faults.collective_timeout_s=120", "checkpoint.every=0"]
# The published 31M OC20 configuration (EquiformerV2Config.preset("31M")) as run-config overrides.
PRESET_31M = ["model_kind=equiformer_v2", "equiformer_v2.num_layers=8", "equiformer_v2.lmax=4", "equiformer_v2.mmax=2",
              "equiformer_v2.sphere_channels=128", "equiformer_v2.attn_hidden_channels=64",
              "equiformer_v2.num_heads=8", "equiformer_v2.attn_alpha_channels=64",
              "equiformer_v2.attn_value_channels=16", "equiformer_v2.ffn_hidden_channels=128",
              "equiformer_v2.edge_channels=128", "equiformer_v2.grid_resolution=18", "equiformer_v2.cutoff=12.0",
              "equiformer_v2.max_neighbors=20", "equiformer_v2.max_z=89", "equiformer_v2.alpha_drop=0.1",
              "equiformer_v2.drop_path_rate=0.1", "equiformer_v2.norm_type=layer_norm_sh",
              "equiformer_v2.use_grid_mlp=true", "equiformer_v2.weight_init=uniform"]


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore::FutureWarning")
    return env


def _run(run_dir, demo, *over, ranks=1, steps=4, timeout=420):
    script = str(REPO / "launch" / "pretrain.py")
    tail = ["--run-dir", str(run_dir), "--quiet", "--max-steps", str(steps), f"data.demo_dir={demo['demo_metals'].parent}",
            *over]
    if ranks == 1:
        cmd = [sys.executable, script, *tail]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), script, *tail]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_zero3_two_ranks_matches_one_process_zero0(demo_data, tmp_path):
    ref = _run(tmp_path / "z0", demo_data, *TINY_EQV2, *COMMON, "deepspeed_config=ds_configs/zero0_fp32.json")
    z3 = _run(tmp_path / "z3", demo_data, *TINY_EQV2, *COMMON, "deepspeed_config=ds_configs/zero3_fp32.json", ranks=2)
    assert [r["loss"] for r in z3] == pytest.approx([r["loss"] for r in ref], rel=2e-5)
    assert all(math.isfinite(r["grad_norm"]) for r in z3)
    import lamm_ds
    from lamm_ds.model.equiformer_v2 import EquiformerV2Potential

    model = lamm_ds.load_model(tmp_path / "z3" / "model.safetensors")
    assert isinstance(model, EquiformerV2Potential)
    assert model.dataset_names == ["demo_metals", "demo_energy", "demo_molecules"]


def test_zero3_bf16_two_ranks_trains(demo_data, tmp_path):
    hist = _run(tmp_path / "bf16", demo_data, *TINY_EQV2, *COMMON, "deepspeed_config=ds_configs/zero3_bf16.json",
                ranks=2, steps=3)
    assert len(hist) == 3 and all(math.isfinite(r["loss"]) for r in hist)


def test_31m_preset_trains_a_few_steps_on_the_demo_mixture(demo_data, tmp_path):
    hist = _run(tmp_path / "31m", demo_data, *PRESET_31M, "data.batch_size=2", "log_every=1", "optim.lr=2e-4",
                "optim.warmup_steps=1", "data.stats_samples=20", "checkpoint.every=0",
                "deepspeed_config=ds_configs/zero0_fp32.json", steps=3, timeout=600)
    assert len(hist) == 3 and all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in hist)
    import lamm_ds
    from lamm_ds.model.equiformer_v2 import FAIRCHEM_PARAMS, count_parameters

    model = lamm_ds.load_model(tmp_path / "31m" / "model.safetensors")
    extra_heads = sum(count_parameters(model.heads[n]) for n in model.dataset_names[1:])
    assert count_parameters(model) - extra_heads == FAIRCHEM_PARAMS["31M"]   # one energy head: 31,058,690


def test_finetuning_equiformer_v2_with_every_recipe(demo_data, tmp_path):
    """The fine-tuning recipes on the EquiformerV2 backbone, end to end: replay of a pre-training set
    (weighted) into its own head, layer-wise LR decay, the first block frozen, EMA exported."""
    import lamm_ds
    from lamm_ds.model.layers import parameter_depth

    pre = tmp_path / "pre"
    _run(pre, demo_data, *TINY_EQV2, *COMMON)
    run = tmp_path / "ft"
    cmd = [sys.executable, str(REPO / "launch" / "finetune.py"), "--run-dir", str(run), "--quiet", "--max-steps", "4",
           "--init", str(pre / "model.safetensors"), "--replay", f"{demo_data['demo_metals']}:10",
           f"data.demo_dir={demo_data['demo_metals'].parent}", *COMMON, "denoise_unlabelled=false", "eval_datasets=[]",
           "optim.weight_decay=0", f"data.datasets=[{{name: demo_downstream, path: {demo_data['demo_downstream']}}}]",
           "finetune.replay_share=0.5", "finetune.replay_weight=0.5", "finetune.layer_lr_decay=0.8",
           "finetune.freeze_layers=1", "optim.ema_decay=0.9"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-4000:]
    before = lamm_ds.load_model(pre / "model.safetensors")
    after = lamm_ds.load_model(run / "model.safetensors")
    assert after.dataset_names == [*before.dataset_names, "demo_downstream"]
    b, a = before.state_dict(), after.state_dict()
    changed = {k for k in b if not torch.equal(b[k], a[k])}
    depth = {k: parameter_depth(after, k) for k, _ in after.named_parameters()}
    assert any(k.startswith("heads.demo_metals.") for k in changed)  # replayed: trained in its own head
    assert not any(k.startswith("heads.demo_energy.") for k in changed)  # not replayed
    # the first block stayed frozen: only the rows of elements new to the backbone (set from their
    # periodic-table neighbours before training) differ in its per-element tables
    new = sorted(set(after.trained_elements["demo_downstream"]) - set().union(*map(set, before.trained_elements.values())))
    assert new  # the demo's downstream set has elements the pre-training never saw
    for k in (k for k in changed if depth.get(k) == 1):
        assert (a[k] != b[k]).any(1).nonzero().flatten().tolist() == new, k
    assert any(depth.get(k) == 2 for k in changed) and any(depth.get(k) == 0 for k in changed)
