"""This machine, measured: memory it can offer, matmul speed in our weight format, memory bandwidth.

The planner divides layers by these numbers, so the speeds are measured through the same
runtime path a stage uses (a Q4_0 `QuantLinear` on the compiled kernels; dense torch when
there is no compiler), not looked up. Measuring takes about 1.5 s and is cached per CPU,
thread count and kernel build in `cache_dir/profile.json`; free memory changes from minute
to minute and is always read fresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastserve_edge.errors import ConfigError

log = logging.getLogger(__name__)

CACHE_FILE = "profile.json"
CACHE_VERSION = 2  # bump when what is measured, or how, changes: old entries are then ignored

# The test matrix: a 1B-3B model's MLP projection shape. 2048 x 8192 Q4_0 is 9.4 MB of blocks.
MATRIX_N, MATRIX_K = 2048, 8192
PREFILL_ROWS = 256           # above quant.DENSE_PREFILL_ROWS: the dequantize + GEMM path
DECODE_SECONDS = 0.4         # time budget of each measurement; best call wins (other
PREFILL_SECONDS = 0.6        # processes on the machine only ever make a call slower)
BANDWIDTH_SECONDS = 0.3
BANDWIDTH_BYTES = 256 << 20  # well above any last-level cache

FREE_MEMORY_MARGIN = 0.10     # without --max-memory, offer MemAvailable less 10% ...
FREE_MEMORY_RESERVE = 64 << 20  # ... and less 64 MiB; --max-memory is taken as given
SIZE_FORMS = "a number of bytes (2000000000) or a number with a unit: 512M, 8G, 1.5GiB, 8GB"
_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,        # K/M/G/T as memory sizes: binary
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,            # SI units when written with B
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)


@dataclass(frozen=True)
class Profile:
    memory_bytes: int        # offered: MemAvailable (and the cgroup's room), capped by --max-memory
    total_memory_bytes: int  # MemTotal
    decode_gflops: float     # one row through a Q4_0 QuantLinear (integer kernel): decode-shaped
    prefill_gflops: float    # PREFILL_ROWS rows through the same layer (dequantize + GEMM)
    bandwidth_gbs: float     # reading a large buffer (best of a few): bounds decode of big layers
    threads: int
    cpu: str                 # "model name" from /proc/cpuinfo


def parse_size(text: str) -> int:
    """'8G', '512M', '1.5GiB', '8GB', '2000000000' -> bytes (K/M/G/T and KiB.. are 1024-based,
    KB/MB/GB/TB 1000-based)."""
    match = _SIZE.fullmatch(str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ConfigError(f"{text!r} is not a size; use {SIZE_FORMS}")
    number = match.group(1)
    if unit in ("", "b") and not number.isdigit():
        raise ConfigError(f"{text!r}: a size in bytes must be a whole number; use {SIZE_FORMS}")
    size = int(float(number) * _UNITS[unit]) if "." in number else int(number) * _UNITS[unit]
    if size <= 0:
        raise ConfigError(f"{text!r}: a size must be more than 0 bytes; use {SIZE_FORMS}")
    return size


# --- memory ------------------------------------------------------------------------------------

def _meminfo(path: str = "/proc/meminfo") -> dict[str, int]:
    out: dict[str, int] = {}
    with open(path, encoding="ascii", errors="replace") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup v2 memory limit (containers), None when unlimited."""
    try:
        with open("/proc/self/cgroup", encoding="ascii") as f:
            rel = next((line.strip()[3:] for line in f if line.startswith("0::")), None)
        if rel is None:
            return None
        base = Path("/sys/fs/cgroup") / rel.lstrip("/")
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((base / "memory.current").read_text()))
    except (OSError, ValueError):
        return None


def read_memory(max_memory: int | None = None) -> tuple[int, int]:
    """(offered, total) bytes right now."""
    if max_memory is not None and max_memory <= 0:
        raise ConfigError(f"--max-memory must be more than 0 bytes, got {max_memory}")
    info = _meminfo()
    total = info.get("MemTotal", 0)
    offered = info.get("MemAvailable", info.get("MemFree", 0))
    room = _cgroup_room()
    if room is not None:
        offered = min(offered, room)
    if max_memory is not None:
        offered = min(offered, max_memory)
    else:  # leave room for the OS, the runtime and the page cache
        offered = max(0, int(offered * (1 - FREE_MEMORY_MARGIN)) - FREE_MEMORY_RESERVE)
    return offered, total


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


# --- speed -------------------------------------------------------------------------------------

def _best_seconds(call: Callable[[], object], budget: float, *, min_calls: int = 3) -> float:
    """The fastest of as many calls as fit in `budget` seconds (at least `min_calls`), after a warm-up."""
    call()
    best = math.inf
    start = time.perf_counter()
    calls = 0
    while calls < min_calls or time.perf_counter() - start < budget:
        t = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t)
        calls += 1
    return best


def _q4_0_layer(n: int, k: int, seed: int = 0):
    """A QuantLinear [n, k] of random Q4_0 blocks in the runtime form, or a dense fp32 layer
    when the kernels are unavailable (what the runtime itself would then use)."""
    import numpy as np
    import torch

    from fastserve_edge.engine import kernels
    from fastserve_edge.engine.quant import DenseLinear, QuantLinear, QuantTensor

    rng = np.random.default_rng(seed)
    blocks = np.empty((n, k // 32, 18), dtype=np.uint8)  # Q4_0 block: fp16 scale + 32 4-bit weights
    blocks[..., 0:2] = (rng.standard_normal((n, k // 32, 1)) * 0.01).astype(np.float16).view(np.uint8)
    blocks[..., 2:] = rng.integers(0, 256, (n, k // 32, 16), dtype=np.uint8)
    lib = kernels.load()
    if lib is None:
        return DenseLinear(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)))
    tensor = QuantTensor(torch.from_numpy(blocks.reshape(n, -1)), kernels.FMT_Q4_0, 32, (n, k), lib)
    return QuantLinear(tensor)


def kernel_variant() -> str:
    """Which matmul code the measurements are of: the compiled variant and its source, or dense."""
    from fastserve_edge.engine import kernels

    lib = kernels.load()
    if lib is None:
        return "dense"
    source = b"".join(path.read_bytes() for path in kernels.SOURCES)
    return f"{lib.variant}-{hashlib.sha256(source).hexdigest()[:12]}"


def _bandwidth_gbs() -> float:
    import torch

    buf = torch.ones(BANDWIDTH_BYTES // 4)  # fp32; ones() touches every page before timing
    return BANDWIDTH_BYTES / _best_seconds(buf.sum, BANDWIDTH_SECONDS) / 1e9


def measure(threads: int) -> Profile:
    """Measure this machine with `threads` threads (about 1.5 s)."""
    import torch

    if threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            layer = _q4_0_layer(MATRIX_N, MATRIX_K)
            flops = 2 * MATRIX_N * MATRIX_K  # per row
            x1 = torch.randn(1, MATRIX_K)
            xp = torch.randn(PREFILL_ROWS, MATRIX_K)
            decode = flops / _best_seconds(lambda: layer(x1), DECODE_SECONDS) / 1e9
            prefill = PREFILL_ROWS * flops / _best_seconds(lambda: layer(xp), PREFILL_SECONDS) / 1e9
            bandwidth = _bandwidth_gbs()
    finally:
        torch.set_num_threads(before)
    offered, total = read_memory()
    return Profile(memory_bytes=offered, total_memory_bytes=total, decode_gflops=round(decode, 2),
                   prefill_gflops=round(prefill, 2), bandwidth_gbs=round(bandwidth, 2), threads=threads,
                   cpu=cpu_name())


# --- cache -------------------------------------------------------------------------------------

_SPEEDS = ("decode_gflops", "prefill_gflops", "bandwidth_gbs")


def _cache_key(cpu: str, threads: int, variant: str) -> str:
    return f"{cpu}|threads={threads}|{variant}"


def _read_cache(path: Path) -> dict[str, dict[str, float]]:
    """The cached entries; {} when missing, and {} with a log line when unreadable or of another version."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        log.warning("ignoring unreadable profile cache %s (%s); measuring again", path, err)
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
        log.warning("ignoring profile cache %s of another format; measuring again", path)
        return {}
    return data["entries"]


def _valid_entry(entry: object) -> bool:
    return isinstance(entry, dict) and all(
        isinstance(entry.get(k), (int, float)) and not isinstance(entry.get(k), bool)
        and math.isfinite(entry[k]) and entry[k] > 0 for k in _SPEEDS)


def _write_cache(path: Path, entries: dict[str, dict[str, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".profile-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": CACHE_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the whole new file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_profile(cache_dir: Path, *, threads: int, max_memory: int | None = None,
                 reprofile: bool = False) -> Profile:
    """This machine's profile: speeds from the cache (measured once per CPU, thread count and
    kernel build, or again with `reprofile`), memory read now and capped at `max_memory`."""
    offered, total = read_memory(max_memory)
    path = Path(cache_dir) / CACHE_FILE
    cpu = cpu_name()
    key = _cache_key(cpu, threads, kernel_variant())
    entries = _read_cache(path)
    entry = entries.get(key)
    if reprofile or not _valid_entry(entry):
        measured = measure(threads)
        entry = {k: getattr(measured, k) for k in _SPEEDS} | {"measured_at": round(time.time())}
        entries = {k: v for k, v in entries.items() if _valid_entry(v)} | {key: entry}
        try:
            _write_cache(path, entries)
        except OSError as err:
            log.warning("could not save the profile to %s (%s); it will be measured again next time", path, err)
    speeds = {k: float(entry[k]) for k in _SPEEDS}
    return Profile(memory_bytes=offered, total_memory_bytes=total, threads=threads, cpu=cpu, **speeds)
