"""The exponential moving average of the weights (optim.ema_decay, lamm_ds/engine/ema.py): its
arithmetic, which steps it counts, checkpoints and exact resume, the exports, the ZeRO-3 refusal."""

import json
import logging
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lamm_ds import load_model
from lamm_ds.engine.checkpoint import CheckpointError, weights_only_loader
from lamm_ds.engine.config import ConfigError, load_config
from lamm_ds.engine.data import open_datasets
from lamm_ds.engine.ds_engine import main, run
from lamm_ds.engine.ema import EMA_FILE, WeightEMA, current_weights
from lamm_ds.engine.evaluate import evaluate_entries, read_curve
from lamm_ds.engine.model_init import build_model
from lamm_ds.engine.rundir import ConfigChangedError

TINY = ["model.hidden=16", "model.layers=2", "model.num_rbf=8", "model.cutoff=4.0", "model.max_neighbors=12",
        "data.batch_size=6", "log_every=1", "optim.lr=2e-3", "optim.warmup_steps=2", "data.stats_samples=50",
        "eval_max_structures=8"]


def _over(demo, *extra):
    return [*TINY, f"data.demo_dir={demo['demo_metals'].parent}", *extra]


def _cfg(demo, *extra):
    return load_config(["configs/demo.yaml"], _over(demo, *extra))


def _ema_file(tag_dir):
    with safe_open(str(tag_dir / EMA_FILE), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _raw_module(tag_dir):
    """The module weights DeepSpeed saved in a checkpoint (ZeRO 0-2)."""
    return weights_only_loader()(str(tag_dir / "mp_rank_00_model_states.pt"), map_location="cpu")["module"]


def _extra(path):
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["extra"])


# -- the arithmetic, on a plain torch model ------------------------------------------------------

class _Engine:
    """What WeightEMA reads of a DeepSpeed engine: module, optimizer, ZeRO stage, skipped steps."""

    def __init__(self, module, optimizer, stage=0):
        self.module, self.optimizer, self.stage, self.skipped_steps = module, optimizer, stage, 0

    def zero_optimization_stage(self):
        return self.stage


def test_ema_decay_is_validated():
    assert load_config([], []).optim.ema_decay == 0.0
    assert load_config([], ["optim.ema_decay=0.999"]).optim.ema_decay == 0.999
    for bad in ("1", "1.5", "-0.1", "nan"):
        with pytest.raises(ConfigError, match=r"optim.ema_decay must be 0 \(off\) or in \(0, 1\)"):
            load_config([], [f"optim.ema_decay={bad}"])


def test_update_is_the_standard_average_of_the_trainable_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    model[0].bias.requires_grad_(False)  # frozen: not averaged
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine, decay = _Engine(model, opt), 0.7
    ema = WeightEMA.from_engine(engine, decay)
    assert sorted(ema.shadow) == ["0.weight", "1.bias", "1.weight"]
    ref = {n: p.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(5, 3)).pow(2).sum().backward()
        opt.step()
        assert ema.update(engine)
        for n, p in model.named_parameters():
            if p.requires_grad:
                ref[n] = decay * ref[n] + (1 - decay) * p.detach().double()
    assert ema.updates == 4
    for n, r in ref.items():
        assert torch.allclose(ema.shadow[n].double(), r, rtol=1e-6, atol=1e-7), n
        assert not torch.allclose(ema.shadow[n], dict(model.named_parameters())[n])  # it lags the weights
    # a step DeepSpeed's fp16 loss scaler skipped (the weights did not move) is not averaged in
    before = {n: t.clone() for n, t in ema.shadow.items()}
    engine.skipped_steps += 1
    assert not ema.update(engine)
    assert ema.updates == 4 and all(torch.equal(before[n], ema.shadow[n]) for n in before)
    assert ema.update(engine) and ema.updates == 5


def test_a_weight_that_does_not_move_keeps_its_exact_bits():
    """A trainable weight no gradient reaches (a head of a set not in the fine-tuning mix) must come out
    of the average bit for bit: decay * w + (1 - decay) * w rounds (0.9 * w + 0.1 * w != w in fp32)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = _Engine(model, torch.optim.AdamW(model[1].parameters(), lr=0.1))
    ema = WeightEMA.from_engine(engine, 0.9)
    w = start["0.weight"]
    assert not torch.equal(0.9 * w + (1 - 0.9) * w, w)  # the rounding the lerp form avoids
    for _ in range(20):
        engine.optimizer.zero_grad()
        model[1](torch.randn(5, 4)).pow(2).sum().backward()  # only the second layer gets gradients
        engine.optimizer.step()
        assert ema.update(engine)
    assert torch.equal(ema.shadow["0.weight"], start["0.weight"]) and torch.equal(ema.shadow["0.bias"], start["0.bias"])
    assert not torch.equal(ema.shadow["1.weight"], start["1.weight"])


def test_mixed_precision_at_zero0_averages_the_fp32_masters():
    """bf16/fp16 at ZeRO 0: DeepSpeed keeps fp32 masters beside the 16-bit module weights."""
    model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    masters = [p.detach().float() + 1e-3 for p in model.parameters()]  # not bf16-representable
    opt = type("Opt", (), {"fp16_groups": [list(model.parameters())], "fp32_groups": [masters]})()
    weights = current_weights(_Engine(model, opt, stage=0))
    assert torch.equal(weights["weight"], masters[0]) and torch.equal(weights["bias"], masters[1])
    weights = current_weights(_Engine(model, opt, stage=2))  # ZeRO 1-2: masters are partitioned
    assert weights["weight"].dtype == torch.float32 and torch.equal(weights["weight"], model.weight.float())


# -- in the training loop ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ema_run(demo_data, tmp_path_factory, one_thread):
    """4 steps, EMA decay 0.5, a checkpoint after every step, step 1 skipped (non-finite loss)."""
    run_dir = tmp_path_factory.mktemp("ema") / "run"
    cfg = _cfg(demo_data, "max_steps=4", "optim.ema_decay=0.5", "checkpoint.every=1", "checkpoint.keep_last=10",
               "faults.inject_nan_steps=[1]", "eval_every=2")
    return cfg, run_dir, run(cfg, run_dir, progress=False)


def test_training_averages_after_every_applied_step(ema_run):
    cfg, run_dir, summary = ema_run
    ckpts = run_dir / "checkpoints"
    tags = sorted(p.name for p in ckpts.iterdir() if p.is_dir())
    assert tags == ["step00000001", "step00000003", "step00000004"]  # step 1 was skipped: no checkpoint
    d = cfg.optim.ema_decay
    previous = build_model(cfg, open_datasets(cfg.data.datasets)).state_dict()  # the weights at step 0
    for tag, updates in zip(tags, (1, 2, 3)):
        ema, meta = _ema_file(ckpts / tag)
        assert meta["updates"] == str(updates) and float(meta["decay"]) == d
        raw = _raw_module(ckpts / tag)
        for n, t in ema.items():
            assert torch.allclose(t, d * previous[n] + (1 - d) * raw[n], rtol=1e-6, atol=1e-7), (tag, n)
        previous = ema
        sealed = json.loads((ckpts / tag / "lamm_complete.json").read_text())["files"]
        assert EMA_FILE in sealed  # covered by the checkpoint's hashes
    assert summary["skipped_steps"] == 1 and summary["ema"] == {"decay": d, "updates": 3}


def test_exports_hold_the_average_and_the_raw_weights(ema_run):
    cfg, run_dir, summary = ema_run
    last = run_dir / "checkpoints" / "step00000004"
    ema, _ = _ema_file(last)
    raw = _raw_module(last)
    exported = load_file(str(run_dir / "model.safetensors"))
    exported_raw = load_file(str(run_dir / "model_raw.safetensors"))
    assert exported.keys() == exported_raw.keys() == raw.keys()
    for k in exported:
        assert torch.equal(exported_raw[k], raw[k].float() if raw[k].is_floating_point() else raw[k]), k
        want = ema[k] if k in ema else exported_raw[k]  # buffers (references, scales) as in the module
        assert torch.equal(exported[k], want), k
    assert any(not torch.equal(exported[k], exported_raw[k]) for k in ema)
    assert _extra(run_dir / "model.safetensors") == {"steps": 4, "world_size": 1, "weights": "ema",
                                                     "ema_decay": 0.5, "ema_updates": 3}
    assert _extra(run_dir / "model_raw.safetensors")["weights"] == "raw"
    stored = json.loads((run_dir / "summary.json").read_text())
    assert stored["weights"] == "ema" and stored["model_path"] == str(run_dir / "model.safetensors")
    assert stored["raw_model_path"] == str(run_dir / "model_raw.safetensors")


def test_evaluation_measures_the_average(ema_run):
    cfg, run_dir, summary = ema_run
    from lamm_ds.engine.evaluate import evaluate_prepared, prepare_eval_sets

    points = read_curve(run_dir / "eval_curve.jsonl")
    assert [p["step"] for p in points] == [0, 4]  # the point due after the skipped step 1 is not taken
    name = cfg.eval_datasets[0].name
    ema_model, raw_model = load_model(run_dir / "model.safetensors"), load_model(run_dir / "model_raw.safetensors")

    def same(a, b):  # energy MAE: the metric the 3 averaged steps move most
        return a[name]["energy_mae"] == pytest.approx(b[name]["energy_mae"], rel=1e-7)

    ema_eval = evaluate_entries(ema_model, cfg.eval_datasets)
    assert same(summary["evaluation"], ema_eval)
    assert not same(evaluate_entries(raw_model, cfg.eval_datasets), ema_eval)
    # the last curve point (eval_max_structures of the set) is the averaged model's too
    c = ema_model.cfg
    sets = prepare_eval_sets(cfg.eval_datasets, c.cutoff, c.max_neighbors, cfg.eval_max_structures,
                             c.max_neighbors_strict)
    assert same(points[-1], evaluate_prepared(ema_model, sets))
    assert not same(points[-1], evaluate_prepared(raw_model, sets))


def _rewind(run_dir, to_dir, tag):
    """A copy of a finished run as a kill right after checkpoint ``tag`` would have left it."""
    shutil.copytree(run_dir, to_dir)
    ckpts = to_dir / "checkpoints"
    for p in ckpts.iterdir():
        if p.is_dir() and p.name > tag:
            shutil.rmtree(p)
    (ckpts / "latest").write_text(tag)
    for name in ("model.safetensors", "model_raw.safetensors", "summary.json"):
        (to_dir / name).unlink()


@pytest.mark.parametrize("ds", ["zero0_fp32", "zero2_fp32"])
def test_resume_continues_the_average_exactly(demo_data, tmp_path, one_thread, ds):
    over = ["max_steps=6", "optim.ema_decay=0.8", "checkpoint.every=3", f"deepspeed_config=ds_configs/{ds}.json"]
    cfg = _cfg(demo_data, *over)
    straight = tmp_path / "straight"
    run(cfg, straight, progress=False)
    resumed = tmp_path / "resumed"
    _rewind(straight, resumed, "step00000003")
    summary = run(cfg, resumed, resume=True, progress=False)
    assert summary["start_step"] == 3 and summary["ema"]["updates"] == 6
    for name in ("model.safetensors", "model_raw.safetensors", f"checkpoints/step00000006/{EMA_FILE}"):
        a, b = load_file(str(straight / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs after resume"


def test_resume_without_an_average_in_the_checkpoint(demo_data, tmp_path, one_thread):
    run_dir = tmp_path / "plain"
    run(_cfg(demo_data, "max_steps=2"), run_dir, progress=False)
    assert not (run_dir / "model_raw.safetensors").exists()
    assert _extra(run_dir / "model.safetensors")["weights"] == "raw"
    assert json.loads((run_dir / "summary.json").read_text())["weights"] == "raw"
    assert not list((run_dir / "checkpoints").rglob(EMA_FILE))
    cfg = _cfg(demo_data, "max_steps=4", "optim.ema_decay=0.9")
    with pytest.raises(ConfigChangedError, match=r"optim.ema_decay: 0.0 -> 0.9"):
        run(cfg, run_dir, resume=True, progress=False)
    with pytest.raises(CheckpointError, match=rf"step00000002/{EMA_FILE}: missing: optim.ema_decay=0.9"):
        run(cfg, run_dir, resume=True, progress=False, allow_config_change=True)


def test_zero3_is_refused_with_one_line(demo_data, tmp_path, caplog):
    argv = ["--run-dir", str(tmp_path / "z3"), "--quiet", "--max-steps", "2",
            *_over(demo_data, "optim.ema_decay=0.99", "model.forces=direct",
                   "deepspeed_config=ds_configs/zero3_fp32.json")]
    with caplog.at_level(logging.ERROR, logger="lamm_ds"):
        assert main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "optim.ema_decay=0.99" in errors[0] and "ZeRO stage 3" in errors[0]
    assert not (tmp_path / "z3" / "checkpoints").exists()


def test_bf16_zero0_averages_the_fp32_master_weights(demo_data, tmp_path, one_thread):
    """With a tiny decay the average follows the weights within far less than bf16's resolution:
    it averaged the fp32 masters, not the bf16 module weights."""
    cfg = _cfg(demo_data, "max_steps=2", "optim.ema_decay=1e-6", "deepspeed_config=ds_configs/zero0_bf16.json",
               "checkpoint.every=0")
    run(cfg, tmp_path / "bf16", progress=False)
    ema = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    raw = load_file(str(tmp_path / "bf16" / "model_raw.safetensors"))
    k = "backbone.embedding.weight"
    assert not torch.equal(raw[k], raw[k].bfloat16().float())  # the masters hold more than bf16 does
    assert torch.allclose(ema[k], raw[k], rtol=1e-5, atol=1e-8)


def test_finetuning_averages_only_what_it_trains(ema_run, demo_data, tmp_path, one_thread):
    _, pre_dir, _ = ema_run
    cfg = load_config(["configs/finetune_demo.yaml"], [
        f"data.demo_dir={demo_data['demo_metals'].parent}", f"finetune.init={pre_dir / 'model.safetensors'}",
        "max_steps=2", "data.batch_size=4", "data.stats_samples=50", "finetune.freeze_backbone=true",
        "optim.ema_decay=0.9", "eval_datasets=[]"])
    run(cfg, tmp_path / "ft", progress=False)
    ema, _ = _ema_file(tmp_path / "ft" / "checkpoints" / "step00000002")
    assert ema and all(k.startswith("heads.") or k.startswith("force_head.") for k in ema)
    before, after = load_file(str(pre_dir / "model.safetensors")), load_file(str(tmp_path / "ft" / "model.safetensors"))
    emb = "backbone.embedding.weight"  # its rows of elements new to the model are initialised, then frozen
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone.") and k != emb)
    raw = load_file(str(tmp_path / "ft" / "model_raw.safetensors"))
    head = "heads.demo_downstream.mlp.0.weight"
    assert head in ema and not torch.equal(after[head], raw[head])  # the new head is averaged


@pytest.mark.slow
def test_two_ranks_resume_continues_the_average_exactly(demo_data, tmp_path):
    """torchrun, 2 ranks, ZeRO 1: every rank keeps the average; resumed, it ends where a straight run does."""
    from test_deepspeed import _run

    over = ["optim.ema_decay=0.8", "checkpoint.every=2", "deepspeed_config=ds_configs/zero1_fp32.json"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(["--max-steps", "4"], straight, demo_data, *over, launcher="torchrun")
    _rewind(straight, resumed, "step00000002")
    _run(["--max-steps", "4", "--resume"], resumed, demo_data, *over, launcher="torchrun")
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["start_step"] == 2 and summary["ema"]["updates"] == 4
    for name in ("model.safetensors", "model_raw.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
