"""The allocator policy: large freed blocks go back to the system instead of staying resident."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys, torch
from fastserve_edge.engine import memory
if sys.argv[1] == "on":
    assert memory.release_large_frees()
def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
base = rss_mib()
for mib in (16, 12, 8, 6):  # prefill-sized activations, freed one after another
    t = torch.ones(mib << 18)
    del t
print(rss_mib() - base)
"""


def _kept_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_activations_leave_the_resident_set():
    # without the policy glibc's sliding threshold keeps the later blocks on the heap
    assert _kept_mib("off") > 5
    assert _kept_mib("on") < 2
