"""Host memory of CPU training: keep freed blocks for reuse instead of handing them back to the kernel.

glibc's malloc serves every block above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
returns it with ``munmap`` when freed. A forward+backward of a large graph allocates many such
blocks (EquiformerV2's edge tensors: edges x coefficients x channels), so every step faults in and
zeroes gigabytes of new pages: measured on EquiformerV2-31M, 1.2 million page faults for one
256-atom cell, and a per-edge cost that grows with the graph (22.0 s instead of 17.4 s). That makes
a CPU step both slower and superlinear in size, which a linear cost model cannot predict.
:func:`keep_freed_host_memory` switches that off (``mallopt``: no mmap-served blocks, no trimming),
so freed memory is reused the way a GPU's caching allocator reuses it; the process's resident
memory then stays at its peak (which rose 2-6% in those measurements: 8.0 -> 8.1 GB for one cell,
15.2 -> 16.1 GB for two). The engine applies it on CPU devices (``keep_host_memory``).
"""

from __future__ import annotations

import ctypes
import platform

_M_TRIM_THRESHOLD = -1  # <malloc.h>: mallopt parameters
_M_MMAP_MAX = -4
_NEVER = -1             # mallopt's int converts to the threshold's size_t: -1 is SIZE_MAX bytes, never

_kept = False


def host_memory_mode() -> str:
    """``"kept"`` once :func:`keep_freed_host_memory` applied in this process, else ``"system"``."""
    return "kept" if _kept else "system"


def is_glibc() -> bool:
    """Whether this process's C library is glibc (the only one :func:`keep_freed_host_memory` tunes)."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def apply_keep_host_memory(device, keep: bool) -> None:
    """The ``keep_host_memory`` setting for a process computing on ``device``: CPU devices only (a
    GPU's own caching allocator already reuses its memory)."""
    if keep and device.type == "cpu":
        keep_freed_host_memory()


def keep_freed_host_memory() -> bool:
    """Make this process's glibc malloc keep freed memory (no mmap-served blocks, no trimming).

    Returns True when applied; False where the C library is not glibc (musl, macOS, Windows), which
    is then left as it is. Process-wide and for the rest of the process: blocks allocated afterwards
    are served from heap memory that stays mapped and is reused."""
    global _kept
    if not is_glibc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, _NEVER):
        _kept = True
    return _kept
