"""The end-to-end experiment driver (bench/pretrain_finetune.py): subsets, plan, runner, results."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lamm_ds.engine.config import ConfigError
from lamm_ds.experiments.pretrain_finetune import (ExperimentConfig, ExperimentError, RunSpec, acac_subsets,
                                                   execute, load_experiment_config, steps_to_reach)

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = ["model.hidden=16", "model.layers=2", "model.num_rbf=8", "data.stats_samples=50"]


def test_subsets_are_nested_seeded_and_bounded():
    a = acac_subsets(500, [50, 100, 500], seed=0)
    assert set(a[50]) < set(a[100]) < set(a[500]) == set(range(500))
    assert a == acac_subsets(500, [500, 50, 100], seed=0)
    assert a[50] != acac_subsets(500, [50], seed=1)[50]
    with pytest.raises(ExperimentError, match="asked for 600"):
        acac_subsets(500, [600], seed=0)


def test_steps_to_reach_takes_the_first_point_at_or_below():
    steps, values = [0, 50, 100, 150], [1.0, 0.5, 0.3, 0.4]
    assert steps_to_reach(steps, values, 0.5) == 50
    assert steps_to_reach(steps, values, 2.0) == 0
    assert steps_to_reach(steps, values, 0.1) is None


def test_experiment_config_is_validated():
    cfg = load_experiment_config([str(REPO / "configs/experiments/pretrain_finetune.yaml")])
    assert cfg.main == "main" and [v.name for v in cfg.variants] == ["main", "no_mean_sub", "no_unlabelled", "T1"]
    assert cfg.test_set_names == ["acac_test_MD_300K", "acac_test_MD_600K"]
    with pytest.raises(ConfigError, match="ablation_sizes"):
        load_experiment_config([], ["sizes=[50]", "ablation_sizes=[100]"])
    with pytest.raises(ConfigError, match="unique"):
        load_experiment_config([], ["variants=[{name: a}, {name: a}]"])
    with pytest.raises(ConfigError, match="reserved"):
        load_experiment_config([], ["variants=[{name: scratch}]"])
    with pytest.raises(ConfigError, match="target_set"):
        load_experiment_config([], ["target_set=nope"])
    with pytest.raises(ConfigError, match="siezs"):
        load_experiment_config([], ["siezs=[1]"])


def test_plan_orders_runs_and_builds_their_commands(tmp_path):
    from lamm_ds.experiments.pretrain_finetune import ExperimentData, plan_runs

    cfg = load_experiment_config([str(REPO / "configs/experiments/pretrain_finetune.yaml")],
                                 [f"out_dir={tmp_path}/out", "ablation_sizes=[50]", "extra_seeds=[7]",
                                  "seed_sizes=[100]"])
    data = ExperimentData(tmp_path / "demo", tmp_path / "bpa", {n: tmp_path / f"acac{n}" for n in cfg.sizes},
                          tmp_path / "subsets.json")
    runs = plan_runs(cfg, data)
    names = [r.name for r in runs]
    assert names[0] == "pretrain_main" and names.index("finetune_main_n500") < names.index("pretrain_T1")
    assert set(names) == {"pretrain_main", "pretrain_no_mean_sub", "pretrain_no_unlabelled", "pretrain_T1",
                          "scratch_n50", "scratch_n100", "scratch_n500", "finetune_main_n50", "finetune_main_n100",
                          "finetune_main_n500", "finetune_no_mean_sub_n50", "finetune_no_unlabelled_n50",
                          "finetune_T1_n50", "scratch_n100_seed7", "finetune_main_n100_seed7"}
    by = {r.name: r for r in runs}
    assert by["pretrain_main"].slots == 2 and by["scratch_n50"].slots == 1
    pre = " ".join(by["pretrain_no_unlabelled"].argv)
    assert "demo_molecules" not in pre and str(tmp_path / "bpa") in pre
    assert "demo_molecules" in " ".join(by["pretrain_main"].argv)
    assert by["pretrain_T1"].argv[-1] == "data.temperature=1.0"
    assert by["pretrain_no_mean_sub"].argv[-1] == "denoise.mean_subtraction=false"
    ft = by["finetune_T1_n50"]
    assert ft.depends == ["pretrain_T1"] and ft.argv[ft.argv.index("--init") + 1].endswith("pretrain_T1/model.safetensors")
    assert f"data.datasets.0.path={tmp_path / 'acac50'}" in ft.argv
    assert "--init" not in by["scratch_n50"].argv and by["scratch_n50"].depends == []
    seeded = by["finetune_main_n100_seed7"]
    assert seeded.seed == 7 and seeded.argv[-1] == "seed=7"
    assert seeded.argv[seeded.argv.index("--run-dir") + 1] == str(tmp_path / "out" / "finetune_main_n100_seed7")
    # every override comes after the last option (the launch scripts' argument rule)
    for r in runs:
        first_override = next(k for k, a in enumerate(r.argv) if "=" in a and not a.startswith("-"))
        assert not any(a.startswith("--") for a in r.argv[first_override:]), r.name
    with pytest.raises(ConfigError, match="seed_sizes"):
        load_experiment_config([], ["extra_seeds=[3]"])


def _spec(tmp_path, name, code, depends=()):
    run_dir = tmp_path / name
    return RunSpec(name, "scratch", "scratch", 1, run_dir, ["-c", code], 1, list(depends))


def test_runner_reports_failures_skips_dependants_and_reuses_finished_runs(tmp_path):
    ok = "import json, pathlib; pathlib.Path('{d}', 'summary.json').write_text(json.dumps({{'steps': 1}}))"
    good = _spec(tmp_path, "good", ok.format(d=tmp_path / "good"))
    bad = _spec(tmp_path, "bad", "import sys; print('boom: no such dataset'); sys.exit(3)")
    after_bad = _spec(tmp_path, "after_bad", ok.format(d=tmp_path / "after_bad"), depends=["bad"])
    after_good = _spec(tmp_path, "after_good", ok.format(d=tmp_path / "after_good"), depends=["good"])
    cfg = ExperimentConfig(parallel=2)
    status = execute([good, bad, after_bad, after_good], cfg, progress=False)
    assert status["good"]["state"] == "done" and status["after_good"]["state"] == "done"
    assert status["bad"]["state"] == "failed" and status["bad"]["rc"] == 3
    assert any("boom: no such dataset" in line for line in status["bad"]["tail"])
    assert status["after_bad"]["state"] == "skipped"
    # a second call keeps finished runs (same command) and retries the failed one from a clean directory
    (tmp_path / "bad" / "leftover").write_text("x")
    status = execute([good, bad], cfg, progress=False)
    assert status["good"]["reused"] is True
    assert status["bad"]["state"] == "failed" and not (tmp_path / "bad" / "leftover").exists()
    # another command for the same run directory is not taken for a finished run
    changed = _spec(tmp_path, "good", ok.format(d=tmp_path / "good") + "; print(1)")
    assert execute([changed], cfg, progress=False)["good"]["reused"] is False


def test_end_to_end_at_toy_scale(shared_data, demo_data, tmp_path):
    """The whole pipeline at toy scale through the bench script: DeepSpeed pre-training on 2 ranks
    (balanced scheduler, denoising), fine-tune and scratch runs side by side, curves, report, reuse."""
    out, data = tmp_path / "out", tmp_path / "data"
    args = [f"out_dir={out}", f"data_dir={data}", f"demo_dir={demo_data['demo_metals'].parent}",
            f"shared_data={shared_data}", "sizes=[4,8]", "ablation_sizes=[4]", "extra_seeds=[5]", "seed_sizes=[4]",
            "variants=[{name: main, description: toy}, {name: no_unlabelled, drop_datasets: [demo_molecules]}]",
            f"pretrain_overrides=[max_steps=3,checkpoint.every=0,{','.join(TINY_MODEL)}]",
            f"finetune_overrides=[max_steps=4,eval_every=2,eval_max_structures=6,data.batch_size=4,"
            f"{','.join(TINY_MODEL)}]"]
    cmd = [sys.executable, str(REPO / "bench/pretrain_finetune.py"), "--no-publish", "--quiet", *args]
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(figures)[0] == "force_mae_ratio_300K_n4" and figures["runs"] == 9
    res = json.loads((out / "results.json").read_text())
    assert set(res["runs"]) == {"scratch_n4", "scratch_n8", "finetune_main_n4", "finetune_main_n8",
                                "finetune_no_unlabelled_n4", "scratch_n4_seed5", "finetune_main_n4_seed5"}
    assert res["runs"]["scratch_n4_seed5"]["seed"] == 5
    assert "seed: 5" in (out / "finetune_main_n4_seed5" / "config.yaml").read_text()
    assert set(res["pretrain"]) == {"main", "no_unlabelled"}
    # nested subsets, ingested as given
    subsets = json.loads((data / "subsets.json").read_text())["subsets"]
    assert set(subsets["4"]) < set(subsets["8"])
    from lamm_ds.shards import LmdbDataset
    import ase.io

    frames = ase.io.read(shared_data / "acac/train_300K.xyz", ":")
    ds = LmdbDataset(data / "acac_n8")
    assert len(ds) == 8
    for k, idx in enumerate(subsets["8"]):
        np.testing.assert_allclose(ds[k].positions, frames[idx].positions)
    # pre-training really mixed the label kinds on 2 ranks; the ablation left the molecules out
    pre = res["pretrain"]["main"]
    assert pre["world_size"] == 2
    cfg_main = (out / "pretrain_main" / "config.yaml").read_text()
    assert "demo_molecules" in cfg_main and "strategy: balanced" in cfg_main and "3bpa" in cfg_main
    assert "demo_molecules" not in (out / "pretrain_no_unlabelled" / "config.yaml").read_text()
    # fine-tunes start from the pre-trained model, scratch runs do not
    assert "pretrain_main/model.safetensors" in (out / "finetune_main_n4" / "config.yaml").read_text()
    assert "init: null" in (out / "scratch_n4" / "config.yaml").read_text()
    for name, r in res["runs"].items():
        assert r["curve"]["steps"] == [0, 2, 4], name
        assert set(r["final"]) == {"acac_test_MD_300K", "acac_test_MD_600K"}
        assert r["final"]["acac_test_MD_300K"]["structures"] == 650
        assert any((Path(r["run_dir"]) / "tb").iterdir()), name
        assert "steps_to_scratch_final" in r
    # the pre-trained model at step 0 already differs from a fresh one
    assert res["runs"]["finetune_main_n4"]["curve"]["acac_test_MD_300K"]["forces_mae"][0] != \
        res["runs"]["scratch_n4"]["curve"]["acac_test_MD_300K"]["forces_mae"][0]
    for f in ("report.md", "learning_curves_forces.png", "learning_curves_energy.png", "ablation_curves_forces.png"):
        assert (out / f).stat().st_size > 0, f
    report = (out / "report.md").read_text()
    assert "| 4 | pre-trained: main | acac_test_MD_300K |" in report
    assert "| 4 | pre-trained: main | 2 |" in report  # the seed aggregate: config seed + seed 5
    # a second invocation reuses every finished run
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    status = json.loads((out / "results.json").read_text())["status"]
    assert all(s["reused"] for s in status.values())
