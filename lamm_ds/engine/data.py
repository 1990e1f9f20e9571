"""From a DataConfig to datasets, fitted per-dataset statistics, and each rank's deterministic step
batches (the scheduler's split of the step's mixture draws)."""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path

import numpy as np
import torch

from lamm_ds.engine.config import ConfigError, DatasetConfig, RunConfig
from lamm_ds.graphs import GraphDataset, collate
from lamm_ds.mixture import MixtureStream
from lamm_ds.model.heads import DatasetStats, fit_dataset_stats
from lamm_ds.scheduler import StepScheduler, rank_slice
from lamm_ds.shards import LmdbDataset, is_dataset_dir, read_manifest
from lamm_ds.shards.subset import SubsetDataset


def open_datasets(entries: list[DatasetConfig], demo_dir: str | None = None, seed: int = 0) -> list[LmdbDataset]:
    """Open every configured dataset; generates the demo data first when configured and missing. An
    entry with ``samples: N`` becomes a :class:`SubsetDataset` of N structures drawn at random
    (``seed`` and its name fix the draw; with ``selection: fps`` a pool of candidates that
    :func:`lamm_ds.engine.replay.select_fps` narrows once the model exists)."""
    if not entries:
        raise ValueError("data.datasets is empty: list at least one {name, path}")
    names = [e.name for e in entries]
    if len(set(names)) != len(names) or not all(names):
        raise ValueError(f"dataset names must be unique and non-empty, got {names}")
    if demo_dir is not None and not all(is_dataset_dir(e.path) for e in entries):
        from lamm_ds.demo import make_demo

        make_demo(demo_dir)
    out = []
    for e in entries:
        if not is_dataset_dir(e.path):
            raise FileNotFoundError(f"dataset {e.name!r}: {e.path} is not a lamm-ds dataset directory "
                                    "(create it with `lamm-ds ingest`)")
        ds = LmdbDataset(e.path)
        out.append(random_subset(ds, e, seed) if e.samples else ds)
    return out


FPS_POOL = 10  # candidates per wanted structure for farthest-point sampling


def random_subset(ds: LmdbDataset, entry: DatasetConfig, seed: int):
    """``entry.samples`` structures of ``ds`` (FPS: up to FPS_POOL times as many candidates), seeded."""
    want = entry.samples * (FPS_POOL if entry.selection == "fps" else 1)
    if want >= len(ds):
        return SubsetDataset(ds, np.arange(len(ds))) if entry.selection == "fps" else ds
    rng = np.random.default_rng([seed, zlib.crc32(entry.name.encode())])
    return SubsetDataset(ds, rng.choice(len(ds), size=want, replace=False))


def with_replay(cfg: RunConfig) -> RunConfig:
    """``cfg`` with each ``finetune.replay`` item ("DATASET_DIR[:N]") added to ``data.datasets``: named
    after the dataset (its pre-trained head), N structures chosen by ``replay_selection``, the replay
    sets together taking ``replay_share`` of the draws (split by their sizes' temperature weights), their
    samples' errors weighted by ``replay_weight`` in the loss."""
    ft = cfg.finetune
    if not ft.replay:
        return cfg
    items = [parse_replay(item) for item in ft.replay]
    sizes = [n or read_manifest(path)["num_samples"] for path, n in items]
    weights = np.asarray(sizes, dtype=float) ** (1.0 / cfg.data.temperature)
    extra = [DatasetConfig(name=read_manifest(path)["name"], path=path, samples=n, selection=ft.replay_selection,
                           share=float(ft.replay_share * w / weights.sum()), loss_weight=ft.replay_weight)
             for (path, n), w in zip(items, weights)]
    clash = {e.name for e in extra} & {e.name for e in cfg.data.datasets}
    if clash:
        raise ConfigError(f"finetune.replay: {sorted(clash)} already in data.datasets; list a dataset once")
    data = dataclasses.replace(cfg.data, datasets=[*cfg.data.datasets, *extra])
    return dataclasses.replace(cfg, data=data)


def parse_replay(item: str) -> tuple[str, int]:
    """"DIR" or "DIR:N" -> (DIR, N or 0); the directory must be a lamm-ds dataset."""
    path, _, n = item.rpartition(":") if item.rpartition(":")[2].isdigit() else (item, "", "")
    if not is_dataset_dir(path):
        raise ConfigError(f"finetune.replay: {path} is not a lamm-ds dataset directory (from {item!r})")
    if n and int(n) < 1:
        raise ConfigError(f"finetune.replay: {item!r}: N must be >= 1")
    return path, int(n or 0)


def run_stream(cfg: RunConfig, datasets) -> MixtureStream:
    """The run's mixture stream: temperature sampling over the datasets, fixed shares where configured."""
    return MixtureStream([len(d) for d in datasets], cfg.data.temperature, cfg.seed, cfg.data.epoch_length,
                         shares=[e.share for e in cfg.data.datasets])


def fit_stats(dataset: LmdbDataset, max_z: int, samples: int, seed: int = 0,
              entry: DatasetConfig | None = None) -> DatasetStats:
    """References/normalisation from up to ``samples`` structures, chosen without decoding the rest.
    ``entry``: the dataset's config, whose ``references`` / ``reference_energies`` choose the E0s."""
    chosen = labelled_sample(dataset.index["has_energy"], dataset.index["has_forces"], samples, seed)
    structures = [dataset[int(k)] for k in chosen]
    refs = None if entry is None else chosen_references(entry, dataset, max_z, structures)
    return fit_dataset_stats(structures, max_z, refs)


def chosen_references(entry: DatasetConfig, dataset: LmdbDataset, max_z: int,
                      structures: list | None = None) -> np.ndarray | None:
    """Per-element reference energies set by the config (None: the least-squares fit). Every element
    of the dataset must get one; errors name the dataset, the file and the elements. ``structures``:
    the sample the ``average`` E0 is taken over."""
    from ase.data import atomic_numbers, chemical_symbols

    if entry.references == "fit" and not entry.reference_energies:
        return None
    given: dict[int, float] = {}
    source = "reference_energies"
    if entry.references == "fit":
        raise ValueError(f"dataset {entry.name!r}: reference_energies needs references 'zero', 'average' or "
                         "'isolated:<file>' (with 'fit' the least-squares fit sets every element)")
    if entry.references == "average":
        source = "the average energy per atom"
        given.update(dict.fromkeys((int(z) for z in dataset.manifest["elements"]),
                                   average_energy_per_atom(entry, dataset, structures or [])))
    if entry.references.startswith("isolated:"):
        source = entry.references[len("isolated:"):]
        given.update(isolated_atom_energies(source))
    refs = np.zeros(max_z + 1)
    for z, e in given.items():
        if z <= max_z:
            refs[z] = e
    for symbol, e in entry.reference_energies.items():
        z = atomic_numbers.get(str(symbol))
        if z is None or z > max_z:
            raise ValueError(f"dataset {entry.name!r}: reference_energies: {symbol!r} is not an element up to Z={max_z}")
        refs[z], given[z] = float(e), float(e)
    if entry.references != "zero":
        missing = [int(z) for z in dataset.manifest["elements"] if int(z) not in given]
        if missing:
            names = ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in missing)
            raise ValueError(f"dataset {entry.name!r}: no reference energy for {names} in {source}; add them there "
                             "or under reference_energies")
    return refs


def average_energy_per_atom(entry: DatasetConfig, dataset: LmdbDataset, structures: list) -> float:
    """Mean of E/N over the structures with an energy: one E0 for every element (MACE's simplest
    choice; robust where a least-squares fit is underdetermined, e.g. few structures of one
    composition)."""
    per_atom = [s.energy / s.natoms for s in structures if s.energy is not None]
    if not per_atom:
        raise ValueError(f"dataset {entry.name!r} ({dataset.path}): references 'average' needs energies, and the "
                         "sampled structures have none")
    return float(np.mean(per_atom))


def isolated_atom_energies(path: str) -> dict[int, float]:
    """Z -> energy (eV) of the single-atom structures of an ASE-readable file (MACE's E0s file habit)."""
    from lamm_ds.ingest.readers import LabelKeys, iter_source

    out: dict[int, float] = {}
    for s in iter_source(Path(path), LabelKeys(allow_missing=True)):
        if s.natoms != 1:
            continue
        if s.energy is None:
            raise ValueError(f"{path}: structure {s.source_index} (a single {int(s.numbers[0])}-atom) has no energy")
        z = int(s.numbers[0])
        if z in out and out[z] != s.energy:
            raise ValueError(f"{path}: two different energies for the isolated atom Z={z}: {out[z]} and {s.energy}")
        out[z] = float(s.energy)
    if not out:
        raise ValueError(f"{path}: no single-atom structures with an energy (an isolated-atoms file was expected)")
    return out


def labelled_sample(has_energy: np.ndarray, has_forces: np.ndarray, samples: int, seed: int,
                    chunk: int = 1 << 22) -> np.ndarray:
    """Sorted indices of up to ``samples`` samples with energy or forces, drawn at random (``seed``).

    The same indices as ``sort(rng.choice(flatnonzero(labelled), samples))``, but computed in
    chunks of the memory-mapped flags: the labelled indices of a 10^8-sample dataset would be
    0.8 GB held at start-up. The draw is over ranks among the labelled samples, mapped back to
    sample indices chunk by chunk."""
    n = len(has_energy)
    counts = [int(np.count_nonzero(np.asarray(has_energy[a:a + chunk]) | np.asarray(has_forces[a:a + chunk])))
              for a in range(0, n, chunk)]
    total = sum(counts)
    if total > samples:
        ranks = np.sort(np.random.default_rng(seed).choice(total, samples, replace=False))
    else:
        ranks = np.arange(total, dtype=np.int64)
    out, base, lo = [], 0, 0
    for k, a in enumerate(range(0, n, chunk)):
        hi = int(np.searchsorted(ranks, base + counts[k], side="left"))
        if hi > lo:
            local = np.flatnonzero(np.asarray(has_energy[a:a + chunk]) | np.asarray(has_forces[a:a + chunk]))
            out.append(local[ranks[lo:hi] - base] + a)
        base, lo = base + counts[k], hi
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def plan_step(stream: MixtureStream, epoch_length: int, step: int, batch_size: int) -> tuple[int, np.ndarray,
                                                                                              np.ndarray, np.ndarray]:
    """(epoch, positions, dataset ids, indices) of the ``batch_size`` draws of step ``step``.

    Step s takes global positions [s*B, (s+1)*B) of the concatenated epoch streams: a pure
    function of (seed, step), so every rank and every resumed run computes the same draws.
    """
    positions = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
    epochs = positions // epoch_length
    ks = np.empty(batch_size, dtype=np.int64)
    idx = np.empty(batch_size, dtype=np.int64)
    for e in np.unique(epochs):
        sel = epochs == e
        k, i = stream.epoch(int(e)).take(positions[sel] - e * epoch_length)
        ks[sel], idx[sel] = k, i
    return int(epochs[0]), positions, ks, idx


class RankStepBatches(torch.utils.data.Dataset):
    """Item ``s``: (epoch, this rank's batch of step ``s``, predicted seconds of every rank (world,)).

    The split of a step's draws over ranks is the scheduler's plan (``schedule.strategy``; "fixed":
    draw ``d`` goes to rank ``d % world``). With ``schedule.plan_ranks = P > world`` the plan is
    made for P ranks and real rank r runs plan slots ``[r*P/world, (r+1)*P/world)`` concatenated."""

    def __init__(self, graphs: GraphDataset, scheduler: StepScheduler, rank: int, world: int):
        self.graphs, self.scheduler, self.rank, self.world = graphs, scheduler, rank, world
        self.slots = rank_slice(scheduler.ranks, world, rank)
        self.per = scheduler.ranks // world

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, step: int):
        plan = self.scheduler.plan(step)
        mine = (plan.rank >= self.slots.start) & (plan.rank < self.slots.stop)
        samples = [self.graphs[(int(k), int(i), int(p))]
                   for k, i, p in zip(plan.ks[mine], plan.idx[mine], plan.positions[mine])]
        if self.per == 1:
            predicted = plan.predicted
        else:  # real rank = consecutive plan slots in one micro-batch
            real = plan.rank // self.per
            predicted = self.scheduler.cost_model.batch_cost(
                np.bincount(real, plan.natoms, self.world), np.bincount(real, plan.nedges, self.world),
                np.bincount(real, minlength=self.world))
        return plan.epoch, collate(samples), torch.as_tensor(np.asarray(predicted, dtype=np.float64))


def step_loader(graphs: GraphDataset, scheduler: StepScheduler, rank: int, world: int, start_step: int,
                end_step: int, num_workers: int):
    """This rank's batches for steps ``start_step .. end_step-1`` in order (resume = start later)."""
    return torch.utils.data.DataLoader(RankStepBatches(graphs, scheduler, rank, world), batch_size=None,
                                       sampler=range(start_step, end_step), num_workers=num_workers)
