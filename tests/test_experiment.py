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


# ---------------------------------------------------------------------------- seeds, targets, corpus

def _normalised_plan(cfg, data, tmp: Path) -> list[dict]:
    from lamm_ds.experiments.pretrain_finetune import plan_runs

    def norm(s) -> str:
        return str(s).replace(str(tmp), "<tmp>").replace(str(REPO), "<repo>")

    return [{"name": r.name, "stage": r.stage, "variant": r.variant, "size": r.size, "seed": r.seed, "slots": r.slots,
             "depends": r.depends, "run_dir": norm(r.run_dir), "argv": [norm(a) for a in r.argv]}
            for r in plan_runs(cfg, data)]


@pytest.mark.parametrize("case", ["default", "controls", "seeded"])
def test_acac_only_plans_are_unchanged(case, tmp_path):
    """The acac-only configs plan the same runs with the same commands as before seeds and targets
    existed (tests/data/pretrain_finetune_plans.json), so their finished runs are still reused."""
    from lamm_ds.experiments.pretrain_finetune import ExperimentData

    files = {"default": ["pretrain_finetune.yaml"], "seeded": ["pretrain_finetune.yaml"],
             "controls": ["pretrain_finetune.yaml", "pretrain_finetune_controls.yaml"]}[case]
    extra = ["ablation_sizes=[50]", "extra_seeds=[7]", "seed_sizes=[100]"] if case == "seeded" else []
    cfg = load_experiment_config([str(REPO / "configs/experiments" / f) for f in files],
                                 [f"out_dir={tmp_path}/out", f"shared_data={tmp_path}/shared", *extra])
    data = ExperimentData(tmp_path / "demo", tmp_path / "bpa", {n: tmp_path / f"acac{n}" for n in cfg.sizes},
                          tmp_path / "subsets.json")
    golden = json.loads((REPO / "tests/data/pretrain_finetune_plans.json").read_text())[case]
    assert _normalised_plan(cfg, data, tmp_path) == golden


def _lamm_mini(tmp_path, *overrides):
    return load_experiment_config([str(REPO / "configs/experiments/lamm_mini.yaml")],
                                  [f"out_dir={tmp_path}/out", f"data_dir={tmp_path}/data", *overrides])


def test_plan_with_pretrain_and_finetune_seeds_and_two_targets(tmp_path):
    from lamm_ds.experiments.pretrain_finetune import plan_runs
    from lamm_ds.experiments.pretrain_finetune.plan import plan_counts, planned_data

    cfg = _lamm_mini(tmp_path, "pretrain_seeds=[0,1]", "variants.4.seeds=[1]")
    assert [t.name for t in cfg.fine_targets] == ["acac", "3bpa"] and cfg.finetune_seeds == [1, 2]
    runs = plan_runs(cfg, planned_data(cfg))
    by = {r.name: r for r in runs}
    core, knobs = ["main", "no_mean_sub", "labelled_only", "unlabelled_only"], \
        ["sigma_0.1", "pf_weight_0.3", "labelled_share_0.25", "denoise_head"]
    pretrains = {f"pretrain_{v}_s{s}" for v in core for s in (0, 1)} | {"pretrain_sigma_0.1_s1"} \
        | {f"pretrain_{v}_s0" for v in knobs[1:]}
    assert {r.name for r in runs if r.stage == "pretrain"} == pretrains
    cells = ["acac_n50", "acac_n100", "3bpa_n100"]
    assert {r.name for r in runs if r.stage == "scratch"} == {f"scratch_{c}_f{f}" for c in cells for f in (1, 2)}
    fts = {r.name for r in runs if r.stage == "finetune"}
    assert len(fts) == len(pretrains) * len(cells) * 2 and "finetune_labelled_only_s1_3bpa_n100_f2" in fts
    assert plan_counts(runs) == {"runs": 90, "pretrain": 12, "finetune": 72, "scratch": 6}
    assert runs[0].name == "pretrain_main_s0" and runs[1].name == "scratch_acac_n50_f1"
    # each later pre-training is followed by its own fine-tunes
    k = [r.name for r in runs].index("pretrain_no_mean_sub_s1")
    assert all(r.depends == ["pretrain_no_mean_sub_s1"] for r in runs[k + 1:k + 7])
    # pre-training seeds: both the run's and the denoising noise's, after the variant's overrides
    p = by["pretrain_no_mean_sub_s1"]
    assert p.argv[-3:] == ["denoise.mean_subtraction=false", "seed=1", "denoise.seed=1"] and p.pretrain_seed == 1
    assert any(a.startswith("data.corpus_dir=") and a.endswith("data/corpus_small") for a in p.argv)
    assert not any("demo_dir" in a for a in p.argv)
    only = json.loads(next(a for a in by["pretrain_unlabelled_only_s0"].argv if a.startswith("data.datasets="))
                      .split("=", 1)[1])
    assert [d["name"] for d in only] == ["pubchem3d_mmff"]
    # fine-tunes: from that seed's model, the target's subset, head and test sets, the fine-tuning seed last
    ft = by["finetune_unlabelled_only_s1_3bpa_n100_f2"]
    assert ft.depends == ["pretrain_unlabelled_only_s1"] and (ft.seed, ft.pretrain_seed, ft.target) == (2, 1, "3bpa")
    assert ft.argv[ft.argv.index("--init") + 1] == str(tmp_path / "out/pretrain_unlabelled_only_s1/model.safetensors")
    assert f"data.datasets.0.path={tmp_path / 'data/3bpa_n100'}" in ft.argv and "data.datasets.0.name=3bpa" in ft.argv
    assert ft.argv[-2:] == ["finetune.head_init_from=pubchem3d_mmff", "seed=2"]
    evals = json.loads(next(a for a in ft.argv if a.startswith("eval_datasets=")).split("=", 1)[1])
    assert [(e["name"], e["head"]) for e in evals] == [("3bpa_holdout", "3bpa"), ("3bpa_train_mixedT", "3bpa")]
    assert evals[0]["path"] == str(tmp_path / "data/3bpa_tests/3bpa_holdout.xyz")
    sc = by["scratch_acac_n50_f1"]
    assert "--init" not in sc.argv and sc.argv[-1] == "seed=1" and not any(".name=" in a for a in sc.argv)
    assert by["finetune_main_s0_acac_n100_f1"].argv[-1] == "seed=1"
    for r in runs:  # every override comes after the last option
        first_override = next(k for k, a in enumerate(r.argv) if "=" in a and not a.startswith("-"))
        assert not any(a.startswith("--") for a in r.argv[first_override:]), r.name


def test_lamm_mini_sizes_and_knob_selection(tmp_path):
    from lamm_ds.experiments.pretrain_finetune import plan_runs
    from lamm_ds.experiments.pretrain_finetune.plan import plan_counts, planned_data

    full = _lamm_mini(tmp_path)
    assert plan_counts(plan_runs(full, planned_data(full))) == {"runs": 118, "pretrain": 16, "finetune": 96,
                                                                 "scratch": 6}
    core = _lamm_mini(tmp_path, "only_variants=[main,no_mean_sub,labelled_only,unlabelled_only]")
    assert plan_counts(plan_runs(core, planned_data(core)))["runs"] == 90
    with pytest.raises(ConfigError, match="only_variants"):
        _lamm_mini(tmp_path, "only_variants=[no_mean_sub]")


def test_general_form_config_is_validated(tmp_path):
    target = "targets=[{name: a, train_file: a/train.xyz, sizes: [5], test_files: [a/test.xyz]}]"
    cfg = load_experiment_config([], [target])
    t = cfg.fine_targets[0]
    assert cfg.named_targets and t.curve_sets == ["a_test"] and t.target_set == "a_test"
    assert load_experiment_config([], []).fine_targets[0].name == "acac"
    with pytest.raises(ConfigError, match="acac-only form"):
        load_experiment_config([], [target, "sizes=[5]"])
    with pytest.raises(ConfigError, match="extra_seeds"):
        load_experiment_config([], ["finetune_seeds=[1]", "extra_seeds=[2]", "seed_sizes=[50]"])
    with pytest.raises(ConfigError, match="pretrain_seeds"):
        load_experiment_config([], ["pretrain_seeds=[1, 1]"])
    with pytest.raises(ConfigError, match="target_set"):
        load_experiment_config([], [target.replace("]}]", "], target_set: nope}]")])
    with pytest.raises(ConfigError, match="has_a_dot"):
        load_experiment_config([], [target.replace("name: a,", "name: has_a_dot.,")])
    with pytest.raises(ConfigError, match="scael"):
        load_experiment_config([], ["corpus={scael: small}"])


def test_paired_intervals_match_a_hand_computation():
    from lamm_ds.experiments.pretrain_finetune.stats import (excludes_zero, paired_difference, paired_ratio, same_key,
                                                             scratch_key)

    variant = {(0, 1): 0.10, (0, 2): 0.12, (1, 1): 0.11, (1, 2): 0.15}
    main = {(0, 1): 0.09, (0, 2): 0.10, (1, 1): 0.10, (1, 2): 0.12, (2, 1): 0.5}  # (2, 1): no partner
    d = paired_difference(variant, main, same_key)
    # the unit is the pre-training seed: differences averaged over each seed's fine-tunes first
    per_seed = [(0.01 + 0.02) / 2, (0.01 + 0.03) / 2]
    mean = sum(per_seed) / 2
    sd = (sum((x - mean) ** 2 for x in per_seed) / 1) ** 0.5
    half = 12.706204736174707 * sd / 2 ** 0.5  # t(0.975, 1 degree of freedom) * sd / sqrt(2)
    assert d["n"] == 2 and d["pairs"] == 4 and d["unit"] == "pre-training seeds"
    assert d["mean"] == pytest.approx(0.0175) and d["sd"] == pytest.approx(sd)
    assert (d["low"], d["high"]) == (pytest.approx(mean - half), pytest.approx(mean + half))
    assert excludes_zero(d) is False
    tight = paired_difference({**variant, (2, 1): 0.52, (2, 2): 0.6}, {**main, (2, 2): 0.57}, same_key)
    assert tight["n"] == 3 and tight["low"] > 0 and excludes_zero(tight) is True
    # one pre-training seed: the interval is over its fine-tuning seeds, and says so
    ft = paired_difference({(0, 1): 0.10, (0, 2): 0.12, (0, 3): 0.11}, main, same_key)
    assert ft["n"] == 2 and ft["unit"].startswith("fine-tuning seeds")
    # vs scratch: each (pretrain seed, fine-tuning seed) with the scratch run of that fine-tuning seed
    scratch = {(None, 1): 0.2, (None, 2): 0.3}
    s = paired_difference(variant, scratch, scratch_key)
    assert s["n"] == 2 and s["pairs"] == 4 and s["mean"] == pytest.approx((-0.1 - 0.18 - 0.09 - 0.15) / 4)
    r = paired_ratio({(0, 1): 0.1, (0, 2): 0.4}, {(0, 1): 0.2, (0, 2): 0.2}, same_key)
    assert r["ratio"] == pytest.approx(1.0) and r["low"] < 1 < r["high"]
    one = paired_difference({(0, 1): 0.3}, {(0, 1): 0.1}, same_key)
    assert one["n"] == 1 and one["mean"] == pytest.approx(0.2) and one["low"] is None and one["high"] is None
    assert one["note"] == "n=1: no interval" and excludes_zero(one) is None


def _fake_run(variant, target, size, pseed, fseed, f300, steps=(0, 50, 100)):
    curve = [f300 * (3 - k) for k in range(len(steps))]
    final = {"t_test": {"forces_mae": f300, "energy_mae_per_atom": f300 / 10, "forces_rmse": f300,
                        "energy_rmse_per_atom": f300 / 10}}
    return {"stage": "scratch" if variant == "scratch" else "finetune", "variant": variant, "target": target,
            "size": size, "seed": fseed, "pretrain_seed": pseed, "steps": steps[-1], "wall_s": 1.0, "final": final,
            "curve": {"steps": list(steps), "t_test": {"forces_mae": curve, "energy_mae_per_atom": curve}}}


def test_statistics_report_and_plots_from_collected_runs(tmp_path):
    from lamm_ds.experiments.pretrain_finetune.plots import plot_curves
    from lamm_ds.experiments.pretrain_finetune.report import _steps_to_scratch, headline, report_markdown
    from lamm_ds.experiments.pretrain_finetune.stats import compare, ranking, steps_summary

    runs = {}
    for f in (1, 2):
        runs[f"scratch_t_n10_f{f}"] = _fake_run("scratch", "t", 10, None, f, 0.2 + 0.01 * f)
        for s in (0, 1):
            runs[f"finetune_main_s{s}_t_n10_f{f}"] = _fake_run("main", "t", 10, s, f, 0.1 + 0.01 * s + 0.002 * f)
        runs[f"finetune_knob_s0_t_n10_f{f}"] = _fake_run("knob", "t", 10, 0, f, 0.15 + 0.001 * f)
    runs["finetune_once_s0_t_n10_f1"] = _fake_run("once", "t", 10, 0, 1, 0.12)
    targets = [{"name": "t", "sizes": [10], "test_sets": ["t_test"], "curve_sets": ["t_test"], "target_set": "t_test"}]
    res = {"named_targets": True, "targets": targets, "sizes": [10], "target_set": "t_test", "runs": runs,
           "pretrain": {}, "variants": [{"name": "main"}, {"name": "knob"}, {"name": "once"}]}
    _steps_to_scratch(res)
    res["stats"] = compare(res, "main")
    res["ranking"] = ranking(res["stats"], targets)
    res["steps_summary"] = steps_summary(runs)
    m = res["stats"]["t"]["10"]["t_test"]["forces_mae"]
    assert m["arms"]["main"]["n"] == 4 and m["vs_scratch"]["main"]["pairs"] == 4
    assert m["vs_scratch"]["main"]["n"] == 2 and m["vs_scratch"]["main"]["unit"] == "pre-training seeds"
    assert m["vs_main"]["knob"]["n"] == 2 and m["vs_main"]["knob"]["unit"].startswith("fine-tuning seeds")
    assert m["vs_main"]["once"]["n"] == 1 and m["vs_main"]["once"]["low"] is None
    assert [r["variant"] for r in res["ranking"]["t"]["10"]["order"]] == ["main", "once", "knob", "scratch"]
    assert res["ranking"]["t"]["10"]["order"][0]["vs_scratch_excludes_zero"] is True
    # curves at 3x, 2x, 1x the final error: pre-training seed 0 gets below scratch's final error at step
    # 50 (2 x 0.102 <= 0.21), seed 1 only at 100 (2 x 0.112 > 0.21)
    assert runs["finetune_main_s0_t_n10_f1"]["steps_to_scratch_final"] == 50
    assert runs["finetune_main_s1_t_n10_f1"]["steps_to_scratch_final"] == 100
    assert res["steps_summary"]["t"]["10"]["main"] == {"n": 4, "reached": 4, "median": 75, "min": 50, "max": 100}
    h = headline(res, "main")
    assert list(h)[:2] == ["force_mae_ratio_t_n10", "force_mae_ratio_t_n10_ci95"]
    assert h["main_vs_knob_force_mae_ratio_t_n10"] < 1 and len(h["main_vs_knob_force_mae_ratio_t_n10_ci95"]) == 2
    assert h["main_vs_once_force_mae_ratio_t_n10_ci95"] is None
    md = report_markdown(res, "main")
    assert "(n=1, no interval)" in md and "| t | 10 | t_test | 1 | main |" in md and "not reached" not in md
    assert [p.name for p in plot_curves(res, tmp_path, "main")] == [
        "learning_curves_forces_t.png", "learning_curves_energy_t.png", "ablation_curves_forces_t.png"]


def test_corpus_mode_prepares_targets_without_demo_data(shared_data, tmp_path, monkeypatch):
    """With `corpus`, prepare_data asks lamm_ds.corpus.make_corpus for the pre-training data (faked
    here), neither makes the demo sets nor ingests 3BPA, and still prepares every target."""
    import types

    import ase.io

    from lamm_ds.experiments.pretrain_finetune import plan_runs
    from lamm_ds.experiments.pretrain_finetune.plan import prepare_data

    calls = []

    def make_corpus(out, scale, seed, workers, progress):
        calls.append((Path(out), scale, seed, workers, progress))
        return {n: Path(out) / n for n in ("pubchem3d_mmff", "qmugs_xtb", "t1x_xtb", "oc20_emt", "oc20_emt_energy",
                                           "bulk_gfn1")}

    def no_demo(*args, **kwargs):
        raise AssertionError("make_demo called in corpus mode")

    monkeypatch.setitem(sys.modules, "lamm_ds.corpus", types.SimpleNamespace(make_corpus=make_corpus))
    monkeypatch.setattr("lamm_ds.demo.make_demo", no_demo)
    cfg = _lamm_mini(tmp_path, f"shared_data={shared_data}", f"corpus.dir={tmp_path}/corpus",
                     "targets.0.sizes=[4,8]", "targets.1.sizes=[6]", "targets.1.holdout=5")
    data = prepare_data(cfg, progress=True)
    assert calls == [(tmp_path / "corpus", "small", 0, 2, True)]
    assert data.demo_dir is None and not (tmp_path / "data/3bpa").exists() and not (tmp_path / "data/demo").exists()
    record = json.loads(data.subsets_file.read_text())["targets"]
    assert set(record["acac"]["subsets"]["4"]) < set(record["acac"]["subsets"]["8"])
    held = record["3bpa"]["tests"]["3bpa_holdout"]["holdout_frames"]
    assert len(held) == 5 and not set(held) & set(record["3bpa"]["subsets"]["6"])
    assert len(ase.io.read(tmp_path / "data/3bpa_tests/3bpa_holdout.xyz", ":")) == 5
    mixed = record["3bpa"]["tests"]["3bpa_train_mixedT"]
    assert mixed["excluded"] == 31 and mixed["frames"] == 469  # the frames train_mixedT shares with train_300K
    from lamm_ds.shards import LmdbDataset

    assert len(LmdbDataset(tmp_path / "data/3bpa_n6")) == 6 and LmdbDataset(tmp_path / "data/3bpa_n6").name == "3bpa"
    pre = next(r for r in plan_runs(cfg, data) if r.name == "pretrain_labelled_only_s0")
    sets = json.loads(next(a for a in pre.argv if a.startswith("data.datasets=")).split("=", 1)[1])
    assert sets[0] == {"name": "qmugs_xtb", "path": str(tmp_path / "corpus/qmugs_xtb")} and len(sets) == 5


def test_plan_refuses_a_misspelt_variant_override(tmp_path):
    from lamm_ds.experiments.pretrain_finetune import plan_runs
    from lamm_ds.experiments.pretrain_finetune.plan import planned_data

    cfg = _lamm_mini(tmp_path, "variants.1.overrides=[denoise.sigam=0.1]")
    with pytest.raises(ExperimentError, match="variant 'no_mean_sub' overrides.*sigam"):
        plan_runs(cfg, planned_data(cfg))
