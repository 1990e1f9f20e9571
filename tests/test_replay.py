"""Replay of pre-training data during fine-tuning (``--replay DATASET[:N]``): subsets, fixed shares of
the draws, farthest-point selection in the model's feature space, the set's own head trained."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from run_helpers import REPO, TINY
from run_helpers import child_env as _env

from lamm_ds.engine.config import ConfigError, load_config
from lamm_ds.engine.data import open_datasets, parse_replay, run_stream, with_replay
from lamm_ds.engine.replay import farthest_points
from lamm_ds.mixture.sampler import mixture_probabilities
from lamm_ds.shards import LmdbDataset
from lamm_ds.shards.subset import SubsetDataset


def _launch(script, run_dir, demo, *args):
    cmd = [sys.executable, str(REPO / "launch" / script), "--run-dir", str(run_dir), "--quiet", *TINY,
           f"data.demo_dir={demo['demo_metals'].parent}", *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def pretrained(demo_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("replay") / "pre"
    proc = _launch("pretrain.py", run_dir, demo_data, "--max-steps", "4", "checkpoint.every=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir / "model.safetensors"


def _finetune_args(demo, *extra):
    return ["--max-steps", "4", "data.batch_size=6", "denoise_unlabelled=false", "eval_datasets=[]",
            "optim.weight_decay=0", f"data.datasets=[{{name: demo_downstream, path: {demo['demo_downstream']}}}]",
            *extra]


def test_shares_fix_a_datasets_fraction_of_the_draws():
    p = mixture_probabilities([100, 400, 1000], 2.0, [None, None, 0.2])
    assert p[2] == pytest.approx(0.2) and p[:2].sum() == pytest.approx(0.8)
    assert p[1] / p[0] == pytest.approx(2.0)  # the rest still by temperature: sqrt(400/100)
    np.testing.assert_allclose(mixture_probabilities([3, 5], 2.0, [None, None]), mixture_probabilities([3, 5], 2.0))
    for bad in ([None, 1.0], [0.5, 0.5], [None, -0.1]):
        with pytest.raises(ValueError, match="share"):
            mixture_probabilities([3, 5], 2.0, bad)


def test_farthest_points_spread_over_the_features():
    x = np.array([[0.0, 0], [0.1, 0], [10, 0], [10.1, 0], [0, 10], [5, 5]])
    # first the point farthest from the mean (0, 10); then the farthest from it (10.1, 0); then (0, 0),
    # 10 Å from both, before (5, 5) at 7 Å: one point from each cluster, never a near-duplicate
    assert farthest_points(x, 3).tolist() == [4, 3, 0]
    assert farthest_points(x, 10).size == len(x)


def test_subset_dataset_reads_the_chosen_structures(demo_data):
    base = LmdbDataset(demo_data["demo_metals"])
    sub = SubsetDataset(base, [7, 2, 5, 2])
    assert len(sub) == 3 and sub.source_index(0) == 2
    assert np.array_equal(sub[1].positions, base[5].positions)
    assert sub.natoms.tolist() == [int(base.natoms[i]) for i in (2, 5, 7)]
    assert sub.manifest["num_samples"] == 3 and sum(sub.manifest["label_counts"].values()) >= 3
    with pytest.raises(ValueError, match="indices in 0"):
        SubsetDataset(base, [len(base)])


def test_replay_items_become_datasets_with_a_fixed_share(demo_data):
    metals, energy = str(demo_data["demo_metals"]), str(demo_data["demo_energy"])
    cfg = load_config([], [f"data.datasets=[{{name: demo_downstream, path: {demo_data['demo_downstream']}}}]",
                           f'finetune.replay=["{metals}:12", "{energy}"]', "finetune.replay_share=0.3"])
    run_cfg = with_replay(cfg)
    entries = run_cfg.data.datasets
    assert [e.name for e in entries] == ["demo_downstream", "demo_metals", "demo_energy"]
    assert entries[1].samples == 12 and entries[2].samples == 0
    assert entries[1].share + entries[2].share == pytest.approx(0.3)
    assert [e.loss_weight for e in entries] == [1.0, 1.0, 1.0]  # finetune.replay_weight's default
    weighted = with_replay(load_config([], [f"data.datasets=[{{name: demo_downstream, path: "
                                            f"{demo_data['demo_downstream']}}}]", f'finetune.replay=["{metals}"]',
                                            "finetune.replay_weight=0.25"])).data.datasets
    assert [e.loss_weight for e in weighted] == [1.0, 0.25]
    for bad in ("finetune.replay_weight=0", "finetune.replay_weight=-1", "finetune.replay_weight=.nan"):
        with pytest.raises(ConfigError, match="replay_weight must be a finite number > 0"):
            load_config([], [bad])
    with pytest.raises(ConfigError, match="loss_weight must be a finite number > 0"):
        load_config([], [f"data.datasets=[{{name: a, path: {metals}, loss_weight: 0}}]"])
    datasets = open_datasets(entries, None, seed=0)
    assert len(datasets[1]) == 12 and isinstance(datasets[1], SubsetDataset)
    again = open_datasets(entries, None, seed=0)[1]
    assert again.indices.tolist() == datasets[1].indices.tolist()  # seeded: every rank draws the same
    counts = run_stream(run_cfg, datasets).counts(0)
    assert (counts[1] + counts[2]) / sum(counts) == pytest.approx(0.3, abs=0.01)
    with pytest.raises(ConfigError, match="not a lamm-ds dataset directory"):
        parse_replay("/nonexistent:5")
    twice = load_config([], [f"data.datasets=[{{name: demo_metals, path: {metals}}}]", f'finetune.replay=["{metals}"]'])
    with pytest.raises(ConfigError, match="already in data.datasets"):
        with_replay(twice)


def test_each_graph_is_weighted_by_its_run_datasets_loss_weight(demo_data):
    from lamm_ds.engine.step import graph_loss_weights

    metals = demo_data["demo_metals"]
    cfg = with_replay(load_config([], [f"data.datasets=[{{name: demo_downstream, path: {demo_data['demo_downstream']}}}]",
                                       f'finetune.replay=["{metals}"]', "finetune.replay_weight=0.25"]))
    run_ids = torch.tensor([1, 0, 0, 1, 1])  # the run's dataset index (before the head remap)
    assert graph_loss_weights(cfg, run_ids).tolist() == [0.25, 1.0, 1.0, 0.25, 0.25]
    unweighted = with_replay(load_config([], [f'finetune.replay=["{metals}"]']))
    assert graph_loss_weights(unweighted, run_ids) is None  # every weight 1: the plain loss, no multiply


def test_finetuning_with_replay_trains_the_replayed_head(pretrained, demo_data, tmp_path):
    run = tmp_path / "ft"
    proc = _launch("finetune.py", run, demo_data, "--init", str(pretrained),
                   "--replay", f"{demo_data['demo_metals']}:10", *_finetune_args(demo_data),
                   "finetune.replay_selection=fps", "finetune.replay_share=0.5", "finetune.replay_weight=0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    chosen = json.loads((run / "replay" / "demo_metals.json").read_text())
    assert chosen["samples"] == 10 and len(set(chosen["indices"])) == 10
    import lamm_ds

    before, after = lamm_ds.load_model(pretrained).state_dict(), lamm_ds.load_model(run / "model.safetensors")
    assert after.dataset_names == ["demo_metals", "demo_energy", "demo_molecules", "demo_downstream"]
    a = after.state_dict()
    assert not torch.equal(before["heads.demo_metals.mlp.0.weight"], a["heads.demo_metals.mlp.0.weight"])
    assert torch.equal(before["heads.demo_energy.mlp.0.weight"], a["heads.demo_energy.mlp.0.weight"])  # not replayed
    saved = (run / "config.yaml").read_text()
    assert "replay:" in saved and saved.count("name: demo_metals") == 0  # the config as given, not expanded


def test_replaying_a_set_the_model_has_no_head_for_is_refused(pretrained, demo_data, tmp_path):
    proc = _launch("finetune.py", tmp_path / "ft", demo_data, "--init", str(pretrained),
                   "--replay", str(demo_data["demo_downstream_test"]), *_finetune_args(demo_data))
    assert proc.returncode == 2
    assert "which is not a head of the pre-trained model" in proc.stderr
