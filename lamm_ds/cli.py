"""The ``lamm-ds`` command line."""

from __future__ import annotations

import argparse
import json
import sys

from lamm_ds.ingest.formats import FORMATS
from lamm_ds.ingest.readers import EV_PER_A3


def _cmd_ingest(args) -> int:
    from lamm_ds.ingest import IngestOptions, LabelKeys, ingest
    from lamm_ds.shards import GraphSettings

    opts = IngestOptions(
        name=args.name,
        level_of_theory=args.level_of_theory,
        keys=LabelKeys(energy=args.energy_key, forces=args.forces_key, stress=args.stress_key,
                       stress_unit=args.stress_unit, allow_missing=args.allow_missing_labels,
                       unlabelled=args.unlabelled),
        max_atoms=None if args.max_atoms <= 0 else args.max_atoms,
        graph=GraphSettings(cutoff=args.cutoff, max_neighbors=args.max_neighbors, backend=args.nl_backend),
        shard_size=args.shard_size,
        workers=args.workers,
        force=args.force,
        trust_pickle=args.trust_pickle,
        skip_invalid=args.skip_invalid,
        progress=not args.quiet,
        format=args.format,
        energy_kind=args.energy_kind,
        split=args.split,
    )
    report = ingest(args.inputs, args.out, opts)
    lc = report.label_counts
    print(f"{report.path}: read {report.read}, wrote {report.written} (energy {lc['energy']}, forces "
          f"{lc['forces']}, stress {lc['stress']}, unlabelled {lc['unlabelled']}), dropped {report.dropped} "
          f"in {report.seconds:.1f} s")
    for name, entry in report.manifest["ingest"].get("formats", {}).items():
        energy = entry.get("energy")
        kept = f"; energy: {energy['kind']} ({energy['source_key']}, from {energy['source_unit']})" if energy else ""
        print(f"  format {name}: {entry['files']} file(s){kept}; level of theory: {report.manifest['level_of_theory']}")
    for reason, count in sorted(report.dropped_by_reason.items()):
        print(f"  dropped {count}: {reason} (see {report.path}/dropped.jsonl)")
    for note in report.notes:
        print(f"  note: {note}")
    return 0


def _check_index_against_manifest(ds, manifest: dict) -> None:
    """The memory-mapped index arrays must agree with the manifest's totals (one pass over them, far
    cheaper than ``verify``), so ``info`` never prints what a damaged index array holds."""
    idx = ds.index
    found = {"num_atoms": int(idx["natoms"].sum(dtype="int64")),
             "energy": int(idx["has_energy"].astype(bool).sum()), "forces": int(idx["has_forces"].astype(bool).sum()),
             "stress": int(idx["has_stress"].astype(bool).sum())}
    want = {"num_atoms": manifest["num_atoms"], **{k: manifest["label_counts"].get(k) for k in ("energy", "forces",
                                                                                                  "stress")}}
    bad = [f"{k}: index {found[k]}, manifest {want[k]}" for k in found if found[k] != want[k]]
    if bad or (len(ds) and idx["natoms"].min() < 1):
        raise ValueError(f"{ds.path}: the index arrays disagree with the manifest ({'; '.join(bad) or 'empty structure'}): "
                         f"the dataset is corrupt; `lamm-ds verify {ds.path}` checks every record")


def _cmd_info(args) -> int:
    from lamm_ds.shards import LmdbDataset, read_manifest

    manifest = read_manifest(args.dir)
    if args.json:
        print(json.dumps(manifest, indent=2, sort_keys=True))
        return 0
    ds = LmdbDataset(args.dir)
    lc = manifest["label_counts"]
    _check_index_against_manifest(ds, manifest)
    print(f"{manifest['name']} ({manifest['level_of_theory']}): {len(ds)} structures, "
          f"{manifest['num_atoms']} atoms, {len(manifest['shards'])} shard(s)")
    print(f"  labels: energy {lc['energy']}, forces {lc['forces']}, stress {lc['stress']}, "
          f"unlabelled {lc['unlabelled']}")
    print(f"  atoms per structure: {ds.natoms.min()}..{ds.natoms.max()}, edges per structure: "
          f"{ds.nedges.min()}..{ds.nedges.max()} (cutoff {manifest['graph']['cutoff']} Å, "
          f"max_neighbors {manifest['graph']['max_neighbors']})")
    print(f"  elements: {manifest['elements']}; dropped at ingest: {manifest['ingest']['dropped']}")
    return 0


def _cmd_verify(args) -> int:
    from lamm_ds.shards import LmdbDataset

    for path in args.dirs:
        ds = LmdbDataset(path)
        ds.verify()
        print(f"{path}: {len(ds)} records OK, checksum matches")
    return 0


def _cmd_make_demo(args) -> int:
    from lamm_ds.demo import make_demo

    paths = make_demo(args.out, workers=args.workers, progress=True)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _cmd_make_corpus(args) -> int:
    from lamm_ds.corpus import SCALES, make_corpus
    from lamm_ds.corpus.build import CORPUS_RECORD

    paths = make_corpus(args.out, scale=args.scale, seed=args.seed, workers=args.workers,
                        progress=not args.quiet, subsets=args.subsets or None,
                        max_reject_rate=args.max_reject_rate)
    records = {n: json.loads((p / CORPUS_RECORD).read_text()) for n, p in paths.items()}
    for name, r in records.items():
        reasons = ", ".join(f"{k} {v}" for k, v in r["rejects_by_reason"].items()) or "none"
        lc = r["label_counts"]
        print(f"{name}: {r['ingested']} structures of {r['attempts']} attempts ({r['level_of_theory']}; energy "
              f"{lc['energy']}, forces {lc['forces']}, stress {lc['stress']}, unlabelled {lc['unlabelled']}); "
              f"rejected: {reasons}")
    from lamm_ds.corpus import coverage_table

    print(f"\nelement coverage (structures holding the element; scale {args.scale}: "
          f"{sum(SCALES[args.scale].values())} attempts):")
    print(coverage_table(records))
    return 0


def _run_training(config_files, overrides, run_dir, max_steps, quiet, resume=False, allow_config_change=False,
                  trust_pickle=False) -> int:
    """The training engine (lamm_ds/engine/ds_engine.py) in this process: one rank, the same loop,
    checkpoints and resume as under ``deepspeed``."""
    from pathlib import Path

    from lamm_ds.engine.config import load_config
    from lamm_ds.engine.ds_engine import run

    if max_steps is not None:
        overrides = [*overrides, f"max_steps={max_steps}"]
    cfg = load_config(config_files, overrides)
    summary = run(cfg, Path(run_dir), resume=resume, progress=not quiet, allow_config_change=allow_config_change,
                  trust_pickle=trust_pickle)
    history = summary["history"]
    losses = f"loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}; " if history else ""
    print(f"trained {cfg.max_steps} steps: {losses}model: {summary['model_path']}; "
          f"TensorBoard: tensorboard --logdir {Path(run_dir) / 'tb'}")
    for name, metrics in summary["evaluation"].items():
        print(f"  {name}: energy MAE {metrics['energy_mae_per_atom'] * 1000:.1f} meV/atom, "
              f"force MAE {metrics['forces_mae'] * 1000:.1f} meV/Å")
    return 0


def _cmd_train(args) -> int:
    from lamm_ds.engine.rundir import check_resume_arguments

    check_resume_arguments(args)
    return _run_training(args.config, args.overrides, args.run_dir, args.max_steps, args.quiet, args.resume,
                         args.allow_config_change, args.trust_pickle)


def _cmd_demo(args) -> int:
    from lamm_ds.demo import make_demo

    make_demo(args.data, progress=not args.quiet)
    overrides = [f"data.demo_dir={args.data}", *args.overrides]
    return _run_training([args.config], overrides, args.run_dir, args.max_steps, args.quiet)


def _cmd_evaluate(args) -> int:
    from pathlib import Path

    from lamm_ds import load_model
    from lamm_ds.engine.evaluate import (check_elements, choose_head, evaluate, load_structures, parity_plot,
                                         plot_name, result_keys)
    from lamm_ds.shards import is_dataset_dir

    model = load_model(args.model)
    inputs = []
    for source in args.data:
        name, structures = load_structures(source)
        # only a lamm-ds dataset's manifest name may select a head: a file's stem says nothing
        head = choose_head(model, name if is_dataset_dir(source) else None, args.head, what=str(source),
                           hint="pass --head NAME")
        if not args.allow_unseen_elements:  # all inputs checked before any is evaluated
            check_elements(model, head, structures, str(source), override="--allow-unseen-elements")
        inputs.append((source, name, structures, head))
    keys = result_keys([(source, name) for source, name, _, _ in inputs])
    plots = set()
    results = {}
    for key, (source, name, structures, head) in zip(keys, inputs):
        res = evaluate(model, structures, head=head, batch_size=args.batch_size, return_predictions=True,
                       allow_unseen_elements=args.allow_unseen_elements, source=str(source), check_finite=True)
        preds = res.pop("predictions")
        res["head"] = head
        res["source"] = str(source)
        if args.plot_dir:
            fname = plot_name(key)
            while fname in plots:
                fname = fname.removesuffix(".png") + "_.png"
            plots.add(fname)
            res["parity_plot"] = str(parity_plot(preds, Path(args.plot_dir) / fname, key))
        results[key] = res
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        from lamm_ds.engine.export import format_elements

        for name, r in results.items():
            print(f"{name} ({r['structures']} structures, head {r['head']}): "
                  f"energy MAE {r['energy_mae'] * 1000:.2f} meV ({r['energy_mae_per_atom'] * 1000:.2f} meV/atom), "
                  f"RMSE {r['energy_rmse'] * 1000:.2f} meV; force MAE {r['forces_mae'] * 1000:.2f} meV/Å, "
                  f"RMSE {r['forces_rmse'] * 1000:.2f} meV/Å" + (f"; plot {r['parity_plot']}" if "parity_plot" in r else "")
                  + (f"; NOT TRAINED ON {format_elements(r['unseen_elements'])}" if "unseen_elements" in r else ""))
            if "by_config_type" in r:
                print(_config_type_table(r["by_config_type"]))
    return 0


def _config_type_table(by_type: dict) -> str:
    """Per-config_type errors as an aligned text table (meV, meV/atom, meV/Å)."""
    def ms(x):
        return "-" if x != x else f"{x * 1000:.2f}"  # NaN: no label of that kind

    head = ("config_type", "structures", "E MAE/atom", "E RMSE/atom", "F MAE", "F RMSE")
    rows = [head] + [(k, str(v["structures"]), ms(v["energy_mae_per_atom"]), ms(v["energy_rmse_per_atom"]),
                      ms(v["forces_mae"]), ms(v["forces_rmse"])) for k, v in by_type.items()]
    widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
    lines = ["  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    return "\n".join(lines[:1] + ["  (meV/atom and meV/Å)"] + lines[1:])


def _cmd_predict(args) -> int:
    from lamm_ds import load_model
    from lamm_ds.engine.predict import predict_to_extxyz

    report = predict_to_extxyz(load_model(args.model), args.data, args.out, head=args.head,
                               batch_size=args.batch_size, allow_unseen_elements=args.allow_unseen_elements,
                               force=args.force)
    for source, (n, head) in report.per_source.items():
        print(f"{source}: {n} structures, head {head}")
    print(f"wrote {report.structures} structures to {report.out} (predictions lamm_energy / lamm_forces"
          " / lamm_stress, reference labels REF_energy / REF_forces / REF_stress)")
    return 0


def _cmd_convert_fairchem(args) -> int:
    from lamm_ds.model.convert_fairchem import convert_fairchem

    path = convert_fairchem(args.checkpoint, args.out, dataset=args.dataset, trust_pickle=args.trust_pickle,
                            weights=args.weights, scale_file=args.scale_file)
    from lamm_ds.engine.export import read_export_metadata

    extra = json.loads(read_export_metadata(path).get("extra", "{}"))
    family = extra.get("source", "fairchem EquiformerV2").removeprefix("fairchem ")
    scales = f", scale factors from {extra['scale_factors']}" if "scale_factors" in extra else ""
    print(f"{args.checkpoint} -> {path} ({family}, energy head {args.dataset!r}, "
          f"{extra.get('weights', 'raw')} weights{scales})")
    return 0


def _cmd_calibrate(args) -> int:
    from pathlib import Path

    from lamm_ds.engine.config import load_config
    from lamm_ds.engine.schedule import COST_FILE, calibrate

    cfg = load_config(args.config or ["configs/demo.yaml"], args.overrides)
    model, report = calibrate(cfg, batches=args.batches, repeats=args.repeats, max_graphs=args.max_graphs,
                              seed=args.seed, device=args.device, progress=not args.quiet,
                              max_atoms=args.max_atoms)
    out = Path(args.out) if args.out else Path(args.run_dir) / COST_FILE
    model.save(out)
    if args.json:
        print(json.dumps({**report, "path": str(out)}, indent=2))
    else:
        c = report["coefficients"]
        print(f"cost model: {c['atoms']:.4g} s/atom + {c['edges']:.4g} s/edge + {c['graphs']:.4g} s/graph "
              f"+ {c['const']:.4g} s/micro-batch")
        print(f"fit: {report['summary']}")
        d = report["fit_on_model_edges"]
        print(f"  (diagnostic: with the model's own edge counts instead of the stored ones: R² {d['r2']:.4f}, "
              f"worst relative error {d['max_rel_error'] * 100:.1f}%)")
        print(f"saved to {out} (train with --run-dir {out.parent} or schedule.cost_model={out})")
    return 0


def _configured_ranks(cfg, run_dir: str | None) -> int:
    """The rank count a plan report is for: schedule.plan_ranks, else the world size of --run-dir's run."""
    from pathlib import Path

    if cfg.schedule.plan_ranks:
        return cfg.schedule.plan_ranks
    env = Path(run_dir) / "environment.json" if run_dir else None
    if env is not None and env.is_file():
        return int(json.loads(env.read_text())["world_size"])
    raise ValueError("plan-report: pass --ranks N (the number of ranks you train on): the config does not set "
                     "schedule.plan_ranks" + (f" and {env} does not exist" if env else " and no --run-dir was given"))


def _cmd_plan_report(args) -> int:
    from pathlib import Path

    from lamm_ds.engine.config import load_config
    from lamm_ds.engine.schedule import plan_report

    cfg = load_config(args.config or ["configs/demo.yaml"], args.overrides)
    ranks = args.ranks or _configured_ranks(cfg, args.run_dir)
    res = plan_report(cfg, ranks, args.steps, args.out, strategies=args.strategies or None,
                      run_dir=Path(args.run_dir) if args.run_dir else None)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for name, r in res["strategies"].items():
            print(f"{name:>9}: predicted {r['predicted_time_s']:.4g} s for {res['steps']} steps, efficiency "
                  f"{r['efficiency']:.3f} (perfect balance = 1), {r.get('speedup_vs_fixed', float('nan')):.2f}x vs fixed")
        print(f"plot: {res['png']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from lamm_ds.engine.rundir import add_resume_arguments

    parser = argparse.ArgumentParser(prog="lamm-ds", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="convert structures (extxyz, ASE db, fairchem LMDB, the paper's "
                                            "datasets' HDF5/SDF/JSON/LMDB files) to a lamm-ds dataset")
    p.add_argument("inputs", nargs="+", help="files, directories or globs")
    p.add_argument("--name", required=True, help="dataset name (selects its energy head in training)")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--level-of-theory", default="unknown",
                   help="e.g. 'PBE+D3/def2-SVP' (default: the format's own, e.g. Transition1x's wB97x/6-31G(d))")
    p.add_argument("--format", default="auto", choices=["auto", *FORMATS],
                   help="source format (default: from the file name and a look inside; docs/datasets.md)")
    p.add_argument("--energy-kind", default=None,
                   help="which energy to store where a format holds several: total / atomization (transition1x, "
                        "qm7x), total / formation (spice), total / formation / gfn2 (qmugs), uncorrected / "
                        "corrected (mptrj), adsorption / total (odac23); default: the first")
    p.add_argument("--split", default=None, help="Transition1x split group (data, train, val, test; default: "
                                                 "train + val + test)")
    p.add_argument("--energy-key", default=None, help="info key of the energy (default: 'energy' if present)")
    p.add_argument("--forces-key", default=None, help="per-atom array of forces (default: 'forces' if present)")
    p.add_argument("--stress-key", default=None, help="info key of the stress (default: 'stress' if present)")
    p.add_argument("--stress-unit", default="eV/A3", choices=sorted(EV_PER_A3), help="unit of the stored stress")
    p.add_argument("--allow-missing-labels", action="store_true",
                   help="store structures lacking an explicitly named label without it instead of failing, "
                        "and accept a file in which no structure has any label")
    p.add_argument("--unlabelled", action="store_true",
                   help="store every structure without labels, even where the file has some (e.g. force-field "
                        "energies); a file with no labels at all is an error without this")
    p.add_argument("--max-atoms", type=int, default=300, help="drop larger structures (<=0: keep all)")
    p.add_argument("--cutoff", type=float, default=6.0, help="cutoff for the stored edge counts (Å)")
    p.add_argument("--max-neighbors", type=int, default=50, help="neighbour cap for the stored edge counts")
    p.add_argument("--nl-backend", default="vesin", choices=["vesin", "matscipy"])
    p.add_argument("--shard-size", type=int, default=100_000, help="structures per LMDB shard")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow reading pickled fairchem/OCP LMDBs (unpickling can run arbitrary code)")
    p.add_argument("--skip-invalid", action="store_true",
                   help="drop (and report) invalid structures (NaN/inf values, bad atomic numbers or cells, "
                        "coincident atoms) instead of failing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("info", help="print a dataset's manifest")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true", help="the manifest as JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("verify", help="re-read every record and check the dataset checksum")
    p.add_argument("dirs", nargs="+")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("make-demo", help="generate and ingest the embedded demo datasets")
    p.add_argument("--out", default="data/demo")
    p.add_argument("--workers", type=int, default=1)
    p.set_defaults(func=_cmd_make_demo)

    p = sub.add_parser("make-corpus", help="generate the LaMM-mini real-chemistry corpus (needs the corpus extra)")
    p.add_argument("--out", required=True, help="corpus directory (one scale and seed per directory)")
    p.add_argument("--scale", default="tiny", choices=["tiny", "small", "medium"],
                   help="tiny: a minute or two on 2 cores (tests); small: the experiment; medium: a GPU box")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="worker processes (one thread each; 0: in this process)")
    p.add_argument("--subsets", nargs="*", default=None, help="only these subsets (default: all)")
    p.add_argument("--max-reject-rate", type=float, default=0.25,
                   help="stop when more than this share of a subset's attempts is rejected")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_make_corpus)

    p = sub.add_parser("train", help="train from a config in this process (the engine of launch/pretrain.py, one rank)")
    p.add_argument("--config", action="append", default=[], help="YAML config (repeatable, merged in order)")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--max-steps", type=int, default=None)
    add_resume_arguments(p)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.hidden=128")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("demo", help="generate the demo data (once) and pre-train on it")
    p.add_argument("--data", default="data/demo")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("evaluate", help="energy/force MAE and RMSE of an exported model, with parity plots")
    p.add_argument("model", help="exported model file (model.safetensors)")
    p.add_argument("data", nargs="+", help="lamm-ds dataset directories or ASE-readable files")
    p.add_argument("--head", default=None,
                   help="energy head to use (default: the model's only head, or the head named like a lamm-ds "
                        "dataset's manifest name; otherwise required)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--plot-dir", default=None, help="write parity_<name>.png plots into this directory (default: none)")
    p.add_argument("--allow-unseen-elements", action="store_true",
                   help="evaluate structures with elements the head was not trained on (refused by default)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="write a model's energy/forces/stress for every structure as extxyz, "
                                       "beside the reference labels")
    p.add_argument("model", help="exported model file (model.safetensors)")
    p.add_argument("data", nargs="+", help="lamm-ds dataset directories or ASE-readable files (labels optional)")
    p.add_argument("--out", required=True, help="output extxyz file (written when complete)")
    p.add_argument("--head", default=None, help="energy head to use (default as for evaluate)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--allow-unseen-elements", action="store_true",
                   help="predict structures with elements the head was not trained on (refused by default)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("convert-fairchem", help="convert a fairchem 1.x EquiformerV2 or PaiNN checkpoint to a lamm-ds model file")
    p.add_argument("checkpoint", help="fairchem .pt checkpoint (read with torch.load(weights_only=True))")
    p.add_argument("out", help="output model file (.safetensors), loadable by lamm_ds.load_model")
    p.add_argument("--dataset", default="fairchem", help="name of the energy head (dataset) in the lamm-ds model")
    p.add_argument("--trust-pickle", action="store_true",
                   help="fully unpickle a checkpoint that weights-only loading refuses (this can run arbitrary "
                        "code: only for files you trust)")
    p.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                   help="auto (default): the EMA weights when the checkpoint has them and its config an ema_decay, "
                        "as fairchem's predictor uses; ema / raw: force one")
    p.add_argument("--scale-file", default=None,
                   help="PaiNN only: fairchem scale-factor file (JSON, or a .pt read weights-only) for a checkpoint "
                        "whose own scale factors are unfitted and whose config names a scale_file")
    p.set_defaults(func=_cmd_convert_fairchem)

    p = sub.add_parser("calibrate", help="time real micro-batches and fit the scheduler's cost model")
    p.add_argument("--config", action="append", default=None, help="YAML config (repeatable; default configs/demo.yaml)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--run-dir", help="save as <run-dir>/cost_model.json (used by training in that run dir)")
    where.add_argument("--out", help="save to this JSON file (use with schedule.cost_model=<file>)")
    p.add_argument("--batches", type=int, default=40, help="micro-batches of mixed sizes to time")
    p.add_argument("--repeats", type=int, default=3, help="timings per micro-batch (the minimum is kept)")
    p.add_argument("--max-graphs", type=int, default=None, help="largest micro-batch (default 2 x data.batch_size)")
    p.add_argument("--max-atoms", type=int, default=None,
                   help="atoms per micro-batch at most (default schedule.max_atoms_per_rank, else no cap)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="print the fit report as JSON")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.hidden=128")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("plan-report", help="draw predicted per-rank load of naive vs balanced plans (PNG)")
    p.add_argument("--config", action="append", default=None, help="YAML config (repeatable; default configs/demo.yaml)")
    p.add_argument("--ranks", type=int, default=None,
                   help="number of ranks to plan for (default: schedule.plan_ranks, else the world size of --run-dir)")
    p.add_argument("--steps", type=int, default=64, help="steps to plan")
    p.add_argument("--out", default="plan_report.png")
    p.add_argument("--strategies", nargs="+", default=None,
                   help="default: fixed atoms and schedule.strategy (balanced if that is fixed or atoms)")
    p.add_argument("--run-dir", default=None, help="take the cost model from <run-dir>/cost_model.json")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.batch_size=16")
    p.set_defaults(func=_cmd_plan_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides given after an option land here (argparse cannot interleave them)
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except BrokenPipeError:  # e.g. `lamm-ds info DIR | head`
        sys.stderr.close()
        return 0
    except (ValueError, RuntimeError, FileNotFoundError, KeyError, FloatingPointError) as exc:
        print(f"lamm-ds {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
