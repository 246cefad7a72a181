"""The fuzz targets (targets.py) run in a subprocess whose kernels are the sanitizer build
(AddressSanitizer + UBSan: an out-of-bounds read in C ends it with a report), a bounded
number of examples each: FASTSERVE_FUZZ_EXAMPLES=N for longer runs (FASTSERVE_FUZZ_RANDOM=1
for new examples each run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastserve_edge.engine import kernels

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = {"wire": 400, "chunks": 300, "gguf": 200, "txt": 1000}  # ~50 s in all on 2 cores (sanitizer build cached)


def sanitized_env(tmp_path: Path) -> dict[str, str]:
    try:
        preload = kernels.sanitizer_preload()
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        pytest.skip(f"no sanitizer runtime: {err}")
    env = dict(os.environ, LD_PRELOAD=preload, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0",
               UBSAN_OPTIONS="print_stacktrace=1", PYTHONPATH=str(ROOT))
    env[kernels.SANITIZE_ENV] = "1"
    env.pop("FASTSERVE_NO_KERNELS", None)
    return env


def run(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


PROBE = """
import torch
from fastserve_edge.engine import kernels
k = kernels.load()
assert k is not None and "sanitize" in k.lib._name, "the sanitizer build did not load"
w = torch.zeros((4, 18), dtype=torch.uint8)  # 4 rows of one Q4_0 block
rows, out = torch.tensor([{row}], dtype=torch.int64), torch.empty((1, 32))
# the sizes the kernel checks, told wrong ({claim} rows) so that it reads where it is told
rc = k.lib.fs_dequant_rows(kernels.FMT_Q4_0, 32, w.data_ptr(), 18, 32, rows.data_ptr(), 1, out.data_ptr(), 1,
                           {claim}, {claim} * 18)
print("rc", rc)
"""


def test_the_sanitizer_build_catches_an_out_of_bounds_read(tmp_path):
    """The harnesses prove something only if a read past a buffer ends the process: row 400 of
    a 4-row matrix, with the sizes lied about so the kernel's own check lets it through."""
    env = sanitized_env(tmp_path)
    ok = run(env, "-c", PROBE.format(row=3, claim=4), timeout=300)
    assert ok.returncode == 0 and "rc 0" in ok.stdout, ok.stderr[-3000:]
    bad = run(env, "-c", PROBE.format(row=400, claim=1000), timeout=300)
    assert bad.returncode != 0 and "AddressSanitizer: heap-buffer-overflow" in bad.stderr, bad.stderr[-3000:]
    told = run(env, "-c", PROBE.format(row=400, claim=4), timeout=300)  # the sizes told right: refused, no read
    assert told.returncode == 0 and "rc -3" in told.stdout, told.stderr[-3000:]


@pytest.mark.parametrize("target", sorted(EXAMPLES))
def test_fuzz(tmp_path, target):
    env = sanitized_env(tmp_path)
    examples = int(os.environ.get("FASTSERVE_FUZZ_EXAMPLES", EXAMPLES[target]))
    result = run(env, "-m", "tests.fuzz.run", target, str(examples), timeout=max(600, examples))
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    assert f"{target}: {examples} examples, no failure" in result.stdout
