"""keep_freed_host_memory: freed host memory is reused, not page-faulted in anew on every allocation."""

import json
import subprocess
import sys

import pytest

from lamm_ds.engine.host_memory import is_glibc

GLIBC = is_glibc()

# allocate, touch and free a 64 MiB tensor (above glibc's largest mmap threshold) a few times and count
# the minor page faults of the last cycles, before and after keep_freed_host_memory
PROBE = """
import json, resource, torch
from lamm_ds.engine.host_memory import host_memory_mode, keep_freed_host_memory

def faults():
    for _ in range(2):
        torch.ones(16 * 2**20).sum()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        torch.ones(16 * 2**20).sum()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

system = faults()
applied = keep_freed_host_memory()
print(json.dumps({"system": system, "applied": applied, "kept": faults(), "mode": host_memory_mode()}))
"""


@pytest.mark.skipif(not GLIBC, reason="keep_freed_host_memory tunes glibc's malloc; this C library is not glibc")
def test_freed_host_memory_is_reused_instead_of_faulted_in_again():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    pages = 4 * 64 * 2**20 // 4096
    assert res["applied"] and res["mode"] == "kept"
    assert res["system"] > pages // 2, f"the default allocator was expected to fault pages in anew: {res}"
    assert res["kept"] < pages // 50, f"freed memory was not reused: {res}"

