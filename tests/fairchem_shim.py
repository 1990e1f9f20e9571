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


def import_fairchem_painn():
    """fairchem's (PaiNN, PaiNNBackbone, PaiNNEnergyHead, PaiNNForceHead), or skip."""
    import_fairchem("models/painn/painn.py")
    try:
        from fairchem.core.models.painn.painn import PaiNN, PaiNNBackbone, PaiNNEnergyHead, PaiNNForceHead
    except ImportError as exc:
        pytest.skip(f"fairchem PaiNN not importable here: {exc}")
    return PaiNN, PaiNNBackbone, PaiNNEnergyHead, PaiNNForceHead


def float64_default():
    """Context: torch's default dtype fp64 (fairchem builds constants in the default dtype)."""
    class _Ctx:
        def __enter__(self):
            self.old = torch.get_default_dtype()
            torch.set_default_dtype(torch.float64)

        def __exit__(self, *exc):
            torch.set_default_dtype(self.old)
    return _Ctx()
