"""fairchem-core 1.x for parity tests (an optional test dependency, never a runtime one).

Imports its model modules without the package ``__init__`` (which pulls in huggingface_hub and
more) and, when torch_scatter is absent, with a small stand-in built on torch_geometric's native
scatter. Tests call :func:`import_fairchem` and are skipped, with the reason, when it fails.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import pytest
import torch


def _torch_scatter_stand_in() -> types.ModuleType:
    from torch_geometric.utils import scatter as pyg_scatter

    shim = types.ModuleType("torch_scatter")
    shim.scatter = lambda src, index, dim=0, out=None, dim_size=None, reduce="sum": pyg_scatter(
        src, index, dim=dim, dim_size=dim_size, reduce=reduce)

    def segment_coo(src, index, out=None, dim_size=None, reduce="sum"):
        # fairchem calls it on a sorted 1-D index along the first dimension
        return pyg_scatter(src, index, dim=0, dim_size=dim_size, reduce=reduce)

    shim.segment_coo = segment_coo
    shim.segment_csr = None
    return shim


def import_fairchem(check: str = "models/equiformer_v2/equiformer_v2.py") -> str:
    """Make ``fairchem.core`` importable (or skip the test); returns its source folder.
    ``check`` is a file (relative to ``fairchem/core``) the test needs."""
    spec = importlib.util.find_spec("fairchem")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("fairchem-core 1.x not installed (optional test dependency: pip install 'fairchem-core<2' --no-deps)")
    root = os.path.join(list(spec.submodule_search_locations)[0], "core")
    if not os.path.isfile(os.path.join(root, check)):
        pytest.skip(f"installed fairchem has no fairchem/core/{check} (need fairchem-core<2)")
    if "torch_scatter" not in sys.modules:
        try:
            import torch_scatter  # noqa: F401
        except ImportError:
            try:
                sys.modules["torch_scatter"] = _torch_scatter_stand_in()
            except ImportError as exc:
                pytest.skip(f"fairchem needs torch_scatter or torch_geometric: {exc}")
    for name, sub in (("fairchem.core", ""), ("fairchem.core.models", "models"), ("fairchem.core.common", "common"),
                      ("fairchem.core.modules", "modules"), ("fairchem.core.models.gemnet", "models/gemnet")):
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = [os.path.join(root, sub)]
            sys.modules[name] = mod
    return root


def import_fairchem_equiformer_v2():
    """fairchem's (EquiformerV2Backbone, EqV2ScalarHead, EqV2VectorHead, GraphData), or skip."""
    import_fairchem("models/equiformer_v2/equiformer_v2.py")
    try:
        from fairchem.core.models.base import GraphData
        from fairchem.core.models.equiformer_v2.equiformer_v2 import EquiformerV2Backbone
        from fairchem.core.models.equiformer_v2.heads import EqV2ScalarHead, EqV2VectorHead
    except ImportError as exc:
        pytest.skip(f"fairchem EquiformerV2 not importable here: {exc}")
    return EquiformerV2Backbone, EqV2ScalarHead, EqV2VectorHead, GraphData


def import_fairchem_painn():
    """fairchem's (PaiNN, PaiNNBackbone, PaiNNEnergyHead, PaiNNForceHead), or skip."""
    import_fairchem("models/painn/painn.py")
    try:
        from fairchem.core.models.painn.painn import PaiNN, PaiNNBackbone, PaiNNEnergyHead, PaiNNForceHead
    except ImportError as exc:
        pytest.skip(f"fairchem PaiNN not importable here: {exc}")
    return PaiNN, PaiNNBackbone, PaiNNEnergyHead, PaiNNForceHead


def fp64_geometry_on_fairchems_graph(net) -> None:
    """Run ``net``'s own graph generation (``otf_graph``: radius_graph_pbc, its neighbour cap,
    get_pbc_distances), which works in fp32 only, on an fp32 copy of the batch, then recompute that
    graph's edge vectors in fp64 from its own cell offsets: fairchem's edges, fp64 geometry."""
    import dataclasses

    build = net.generate_graph

    def generate_graph(data, **kwargs):
        fp32 = types.SimpleNamespace(**{k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v)
                                        for k, v in vars(data).items()})
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            graph = build(fp32, **kwargs)
        finally:
            torch.set_default_dtype(old)
        j, i = graph.edge_index
        offsets = torch.einsum("ek,ekl->el", graph.cell_offsets.to(data.pos.dtype), data.cell[data.batch[i]])
        vec = data.pos[j] - data.pos[i] + offsets
        return dataclasses.replace(graph, edge_distance=vec.norm(dim=-1), edge_distance_vec=vec)

    net.generate_graph = generate_graph


def fairchem_batch(frames, dtype=torch.float64):
    """What fairchem's models read from a batch of ase.Atoms: raw positions, cells, pbc, counts.
    A non-periodic frame gets a 40 Å box (fairchem needs a cell) and no images."""
    import numpy as np

    periodic = [bool(a.pbc.any()) for a in frames]
    cells = [np.asarray(a.cell[:]) if p else np.eye(3) * 40.0 for a, p in zip(frames, periodic)]
    natoms = torch.tensor([len(a) for a in frames])
    return types.SimpleNamespace(
        pos=torch.tensor(np.concatenate([a.positions for a in frames]), dtype=dtype),
        cell=torch.tensor(np.stack(cells), dtype=dtype), natoms=natoms,
        pbc=torch.tensor([[p] * 3 for p in periodic]),
        atomic_numbers=torch.tensor(np.concatenate([a.numbers for a in frames])),
        batch=torch.repeat_interleave(torch.arange(len(frames)), natoms))


def fairchem_denormalised(ckpt: dict, target: str, prediction: torch.Tensor, data) -> torch.Tensor:
    """fairchem's prediction path after the model (OCPTrainer._denorm_preds): the checkpoint's
    normaliser, then its element references, built with fairchem's own classes."""
    from fairchem.core.modules.normalization.element_references import create_element_references
    from fairchem.core.modules.normalization.normalizer import create_normalizer

    legacy = {"energy": "target", "forces": "grad_target"}
    norms = ckpt.get("normalizers") or {}
    state = norms.get(target) or norms.get(legacy.get(target, ""))
    if state:
        prediction = create_normalizer(state_dict=state).to(prediction.dtype)(prediction)
    refs = (ckpt.get("elementrefs") or {}).get(target)
    if refs:  # the trainer's outputs are (B, 1) for a per-system target such as the energy
        prediction = create_element_references(state_dict=refs)(prediction.view(-1, 1), data).view(-1)
    return prediction
