"""What the commands share (cli/common.py)."""

from __future__ import annotations

import subprocess
import sys

PROGRAM = """
import gc, weakref
import torch
from cli.common import freeze_imports

freeze_imports()
assert gc.get_freeze_count() > 100_000, gc.get_freeze_count()  # torch's modules and functions
class Node: pass
a, b = Node(), Node()
a.other, b.other = b, a  # a cycle made after the freeze
gone = weakref.ref(a)
del a, b
gc.collect()
assert gone() is None  # still collected: only what existed at the freeze is exempt
print("ok")
"""


def test_freeze_imports_exempts_what_was_imported_and_still_collects_new_cycles():
    out = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
