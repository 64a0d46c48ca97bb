"""The CPU allocator setting of beseg's training commands: freed volumes stay in the process."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

_PROBE = """
import sys
from beseg.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None

def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

import torch
before = rss_kib()
x = torch.ones(4 * 2**20)  # 16 MiB, as a training step's activation volume
x.add_(1)
during = rss_kib()
del x
after = rss_kib()
print(applied, during - before, during - after)
"""


@pytest.mark.slow
@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_keeps_a_freed_volume_that_glibc_would_unmap():
    def probe(mode):
        out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
        applied, grew, returned = out.stdout.split()
        return applied, int(grew), int(returned)

    _, grew, returned = probe("default")
    assert grew > 15_000 and returned > 15_000  # glibc unmaps it: the next volume faults in again
    applied, grew, returned = probe("keep")
    assert applied == "True" and grew > 15_000 and returned < 1_000  # kept for the next allocation

