"""The CPU memory allocator setting for beseg's own training processes.

glibc's ``malloc`` serves every block above a dynamic threshold (128 KiB at first) with a fresh
``mmap`` and gives it back to the kernel with ``munmap`` when it is freed. A 3D training step
allocates and frees volumes of several MB many times (network activations, loss temporaries), so
each one is page-faulted in again: on the 2-core benchmark machine that is 40-50 % system time in a
convolution-heavy step, and about a third of the BE loss's time (docs/benchmarks.md). Keeping freed
memory in the process (PyTorch's CUDA caching allocator does the same on GPUs) removes that cost;
the price is that the resident size stays at its peak.

This is a property of the process, not of the loss, so it is set by the commands that own the
process (``beseg train``, ``compare``, ``demo``, ``reproduce`` and ``bench ... --malloc keep``),
never by library code that runs inside a user's loop. Users of the loss in their own CPU loop get
the same effect with ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647`` in the
environment (or another allocator such as jemalloc or tcmalloc via ``LD_PRELOAD``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["keep_freed_memory"]

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc caps the mmap threshold at 32 MiB on 64-bit systems (HEAP_MAX_SIZE / 2).
_MMAP_THRESHOLD = 32 * 2**20
_TRIM_THRESHOLD = 2**31 - 1


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks up to 32 MiB in the process instead of unmapping them.

    Returns:
        True when the setting was applied; False where it does not apply (not Linux with glibc,
        e.g. macOS or musl), which is harmless: those allocators already reuse memory.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        # Fixing either threshold also turns off glibc's dynamic adjustment of the mmap threshold.
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
        return libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1 and ok
    except (OSError, AttributeError):
        return False
