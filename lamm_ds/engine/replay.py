"""Farthest-point selection of the structures a run trains on from a dataset with ``samples: N,
selection: fps`` (replayed pre-training data above all): N structures spread over the initial
model's feature space rather than drawn at random, so rare chemistry is kept (the idea of MACE's
``--pt_train_file`` sub-selection, done in our own model's features).

A structure's descriptor is the mean over its atoms of the backbone's invariant node features.
Rank 0 selects and writes ``<run_dir>/replay/<name>.json``; every rank reads that file, and a
resumed run reuses it, so every rank and every restart trains on the same structures.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lamm_ds.graphs import GraphDataset, collate
from lamm_ds.shards.subset import SubsetDataset


def farthest_points(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of ``k`` rows of ``x`` picked greedily, each the farthest from those picked before; the
    first is the row farthest from the mean (deterministic)."""
    x = np.asarray(x, dtype=np.float64)
    k = min(k, len(x))
    picked = [int(np.argmax(((x - x.mean(axis=0)) ** 2).sum(axis=1)))]
    dist2 = ((x - x[picked[0]]) ** 2).sum(axis=1)
    for _ in range(k - 1):
        nxt = int(np.argmax(dist2))
        picked.append(nxt)
        dist2 = np.minimum(dist2, ((x - x[nxt]) ** 2).sum(axis=1))
    return np.array(picked, dtype=np.int64)


@torch.no_grad()
def structure_descriptors(model, dataset, batch_size: int = 16) -> np.ndarray:
    """(len(dataset), C): per-structure mean of the model's invariant node features."""
    graphs = GraphDataset([dataset], model.cfg.cutoff, model.cfg.max_neighbors, strict=model.cfg.max_neighbors_strict)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = []
    try:
        for start in range(0, len(dataset), batch_size):
            batch = collate([graphs[(0, i)] for i in range(start, min(start + batch_size, len(dataset)))])
            batch = batch.to(device, torch.float32)
            out = model(batch, return_features=True)
            node = out["node_scalar"] if "node_scalar" in out else out["node_features"][:, 0, :]
            node = node.detach().float()
            sums = torch.zeros(batch.num_graphs, node.shape[1]).index_add_(0, batch.batch.cpu(), node.cpu())
            rows.append((sums / batch.natoms.cpu().unsqueeze(1).float()).numpy())
    finally:
        model.train(was_training)
    return np.concatenate(rows)


def _matches(file: Path, ds, samples: int) -> bool:
    """Whether ``file`` is a selection of ``samples`` structures of this dataset (kept on resume)."""
    if not file.is_file():
        return False
    record = json.loads(file.read_text())
    return record.get("dataset") == str(ds.path) and record.get("samples") == samples


def select_fps(model, datasets: list, entries: list, run_dir: Path, rank: int) -> list:
    """``datasets`` with every ``selection: fps`` pool narrowed to its ``samples`` structures."""
    if not any(e.samples and e.selection == "fps" for e in entries):
        return datasets
    folder = Path(run_dir) / "replay"
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        for e, ds in zip(entries, datasets):
            file = folder / f"{e.name}.json"
            if e.samples and e.selection == "fps" and not _matches(file, ds, e.samples):
                chosen = farthest_points(structure_descriptors(model, ds), e.samples)
                picked = sorted(ds.source_index(int(i)) for i in chosen)
                tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
                tmp.write_text(json.dumps({"dataset": str(ds.path), "samples": e.samples, "indices": picked}))
                os.replace(tmp, file)
    dist.barrier()
    out = []
    for e, ds in zip(entries, datasets):
        if e.samples and e.selection == "fps":
            record = json.loads((folder / f"{e.name}.json").read_text())
            ds = SubsetDataset(ds.base, record["indices"])
        out.append(ds)
    return out
