"""keep_freed_host_memory: freed host memory is reused, not page-faulted in anew on every allocation."""

import json
import subprocess
import sys

import pytest

from lamm_ds.engine.host_memory import is_glibc

GLIBC = is_glibc()
BLOCK_PAGES = 64 * 2**20 // 4096

# A 64 MiB block is above glibc's largest mmap threshold (32 MiB), so the default allocator serves
# it with a fresh mapping every time. The probe counts the minor page faults of malloc+touch+free
# cycles straight through libc (a torch loop's own small allocations can fragment the heap so that
# an occasional cycle grows it, which made a fault count of torch tensors flaky), and asks where a
# torch tensor of that size lives: in the brk heap or in a mapping of its own.
PROBE = """
import ctypes, json, resource, torch
from lamm_ds.engine.host_memory import host_memory_mode, keep_freed_host_memory

BLOCK = 64 * 2**20
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def minor_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def faults_per_cycle(cycles=6):
    counts = []
    for _ in range(cycles + 1):
        before = minor_faults()
        block = libc.malloc(BLOCK)
        ctypes.memset(block, 1, BLOCK)
        libc.free(block)
        counts.append(minor_faults() - before)
    return counts[1:]  # the first cycle may grow the heap

def tensor_in_brk_heap():
    address = torch.ones(BLOCK // 4).data_ptr()
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            low, high = (int(x, 16) for x in line.split()[0].split("-"))
            return low <= address < high
    return False

system = {"faults": faults_per_cycle(), "in_heap": tensor_in_brk_heap()}
applied = keep_freed_host_memory()
kept = {"faults": faults_per_cycle(), "in_heap": tensor_in_brk_heap()}
print(json.dumps({"system": system, "kept": kept, "applied": applied, "mode": host_memory_mode()}))
"""


@pytest.mark.skipif(not GLIBC, reason="keep_freed_host_memory tunes glibc's malloc; this C library is not glibc")
def test_freed_host_memory_is_reused_instead_of_faulted_in_again():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["applied"] and res["mode"] == "kept"
    system, kept = res["system"], res["kept"]
    assert min(system["faults"]) > BLOCK_PAGES // 2, f"the default allocator was expected to fault pages in anew: {res}"
    assert not system["in_heap"], f"the default allocator was expected to map a 64 MiB tensor on its own: {res}"
    assert max(kept["faults"]) < BLOCK_PAGES // 50, f"freed memory was not reused: {res}"
    assert kept["in_heap"], f"a 64 MiB torch tensor did not come from the kept heap: {res}"
