import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real DFT data not found at {SHARED_DATA.resolve()} (expected ../shared/data beside the repo)")
    return SHARED_DATA.resolve()


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict:
    """The embedded demo datasets, generated once per test session at reduced size."""
    from lamm_ds.demo import DemoSizes, make_demo

    out = tmp_path_factory.mktemp("demo")
    return make_demo(out, DemoSizes(metals=60, metals_test=20, energy_only=30, molecules=60, downstream=40, downstream_test=20))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: a second intra-op thread only adds spin-wait stalls when the CPU is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
