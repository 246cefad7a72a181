"""Our quantized matmul kernels (qmatmul.c; prefill's GEMM: gemm.c; a decode step's glue:
decode.c; a prompt's attention: attend.c), compiled on first use and called through ctypes.

The library is built once per machine with the system C compiler (`cc`, -O3, OpenMP) and
cached under the fastserve cache, keyed by source, flags and CPU. Variants:
    native    -march=native: AVX-512 VNNI or AVX2 where the CPU has them (the default)
    avx2      AVX2 + F16C, for testing that path on a newer CPU
    portable  plain C, no SIMD
When no compiler is present, `load()` returns None and quant.py keeps dense torch weights.

Every entry point that reads a weight matrix or looks rows up takes the sizes it may read
(bytes behind each pointer, rows held) and returns an error code rather than read past them;
the methods here turn the code into an exception. FASTSERVE_KERNELS_SANITIZE=1 builds them
with AddressSanitizer and UBSan (a separate cached library) for the fuzz tests (tests/fuzz):
the process must have the sanitizer runtime loaded first (LD_PRELOAD, sanitizer_preload()).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from functools import cache
from pathlib import Path

import numpy as np
import torch

from fastserve_edge.settings import Paths

SOURCES = [Path(__file__).with_name(name) for name in ("qmatmul.c", "decode.c", "gemm.c", "attend.c", "mesh.c")]
FLAGS = {
    "native": ["-march=native"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "portable": [],
}
FMT_Q4_0, FMT_Q4_1, FMT_Q8, FMT_Q4_K, FMT_Q6_K = 0, 1, 2, 3, 4
FMT_Q4_0X8, FMT_Q4_1X8, FMT_Q8X8, FMT_Q4_KX8 = 5, 6, 7, 8  # eight rows interleaved (qmatmul.c fs_repack_x8)
FMT_F16, FMT_BF16 = 9, 10  # rows of 16-bit floats, multiplied as they are (qmatmul.c f16_rows_dot)
FMT_Q5_K, FMT_Q5_1 = 11, 12  # GGUF's 5-bit blocks in place (qmatmul.c row_dot)
FMT_Q2_K, FMT_Q3_K, FMT_IQ4_XS = 13, 14, 15  # GGUF's 2-, 3-bit and non-linear 4-bit blocks in place (row_dot)
FMT_Q5_KX8, FMT_Q6_KX8 = 16, 17  # Q5_K, Q6_K eight rows interleaved (qmatmul.c kx8_dot_n, q6kx8_dot_n)
X8_OF = {FMT_Q4_0: FMT_Q4_0X8, FMT_Q4_1: FMT_Q4_1X8, FMT_Q8: FMT_Q8X8, FMT_Q4_K: FMT_Q4_KX8, FMT_Q5_K: FMT_Q5_KX8,
         FMT_Q6_K: FMT_Q6_KX8}
FMT_ACT8 = 0x100  # | Q4_0/Q4_1/Q8 (rows or x8) or an x8 K-quant layout: int8 activations (qmatmul.c)


def x8_group_bytes(fmt: int, k: int) -> int:
    """Bytes of eight rows of length k in the x8 layout of `fmt` (a file format of X8_OF):
    the same bytes as the file's, except Q4_K's and Q5_K's decoded scales (4 bytes a row per 256 more)."""
    if fmt in (FMT_Q4_K, FMT_Q5_K, FMT_Q6_K):
        return k // 256 * {FMT_Q4_K: 1184, FMT_Q5_K: 1440, FMT_Q6_K: 1680}[fmt]
    return 8 * (k // 32) * {FMT_Q4_0: 18, FMT_Q4_1: 20, FMT_Q8: 34}[fmt]


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _cpu_field(name: str) -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            line = next((line for line in f if line.split(":")[0].strip() == name), "")
    except OSError:
        line = ""
    return line.partition(":")[2].strip()


def half_width_512() -> bool:
    """AMD Zen 4 (family 0x19 with AVX-512) executes 512-bit vectors as two 256-bit halves.
    There the 512-bit x8 kernels (x16_dot_n) ran at ~0.6x the 256-bit ones in the same process,
    and a 1B Q4_0's 512-token prompt at 36 tok/s against dequantize + GEMM's 50, so its native
    build leaves them out (-DFS_NO_X16); Zen 5 and Intel's AVX-512 cores run them at full width."""
    return _cpu_field("vendor_id") == "AuthenticAMD" and _cpu_field("cpu family") == "25"


def single_row_x16() -> bool:
    """Whether decode's one activation row takes the 512-bit x8 kernel (qmatmul.c
    fs_set_single_row_x16) rather than one row group at a time: on Intel's AVX-512 cores, where
    decode was bound by the core (1.5-1.6x a 1B's decode on a Xeon at 13 GB/s a core); not on
    AMD's, where one stream from memory won (Zen 5: 1.2-1.3x; Zen 4 has no x16 kernel)."""
    return _cpu_field("vendor_id") == "GenuineIntel"


SANITIZE_ENV = "FASTSERVE_KERNELS_SANITIZE"
# out-of-bounds reads/writes and undefined behaviour end the process with a report (no recovery);
# -O0: the sanitizers find the same faults, and the build takes ~8 s where -O3's took minutes
SANITIZE_FLAGS = ["-O0", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]


def sanitized() -> bool:
    """Whether this process builds and loads the sanitizer build (FASTSERVE_KERNELS_SANITIZE=1)."""
    return os.environ.get(SANITIZE_ENV, "") not in ("", "0")


def sanitizer_preload() -> str:
    """LD_PRELOAD for a process that loads the sanitizer build: ASan's runtime must come
    before every other library (Python's own), so it cannot be loaded with the kernels."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or "cc"
    libs = []
    for name in ("libasan.so", "libubsan.so"):
        out = subprocess.run([compiler, f"-print-file-name={name}"], capture_output=True, text=True, timeout=30)
        path = out.stdout.strip()
        if out.returncode != 0 or not os.path.isabs(path):
            raise RuntimeError(f"{compiler} has no {name}: install the compiler's sanitizer runtime (libasan, libubsan)")
        libs.append(path)
    return ":".join(libs)


def _flags(variant: str) -> list[str]:
    return (FLAGS[variant] + (["-DFS_NO_X16"] if variant == "native" and half_width_512() else [])
            + (SANITIZE_FLAGS if sanitized() else []))


def _span(t: torch.Tensor) -> int:
    """Bytes from t's first element to the end of its last (strides >= 0): what the kernels
    may read at t.data_ptr()."""
    if t.numel() == 0:
        return 0
    return (1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))) * t.element_size()


def _build(variant: str, out: Path, sources: list[Path] = SOURCES) -> None:
    """Compile `sources` (these kernels, or another revision's for bench/kernels_ab.py) into `out`."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc/gcc) found")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        part = Path(tmp) / out.name
        cmd = [compiler, "-O3", "-fPIC", "-shared", "-fopenmp", *_flags(variant), *map(str, sources), "-o", str(part), "-lm"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
        os.replace(part, out)  # atomic: a concurrent process sees the old or the whole new file


class Kernels:
    """ctypes bindings of one compiled variant."""

    def __init__(self, path: Path, variant: str):
        self.variant = variant
        self.lib = ctypes.CDLL(str(path))
        p, i, l = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
        # the sizes the kernels check come last (an older build ignores them: bench/kernels_ab.py)
        self.lib.fs_qmatmul.argtypes = [i, i, p, l, i, i, p, i, p, i, l]
        self.lib.fs_qmatmul.restype = i
        # x rows any stride apart; absent from older builds (bench/kernels_ab.py)
        self.strided = hasattr(self.lib, "fs_qmatmul_strided")
        if self.strided:
            self.lib.fs_qmatmul_strided.argtypes = [i, i, p, l, i, i, p, l, i, p, i, l]
            self.lib.fs_qmatmul_strided.restype = i
        self.lib.fs_qmatmul_multi.argtypes = [i, p, p, p, p, p, i, p, i, p, i, p]
        self.lib.fs_qmatmul_multi.restype = i
        # a mixture's chosen experts' downs in one call; absent from older builds (bench/kernels_ab.py)
        if hasattr(self.lib, "fs_qmatmul_each"):
            self.lib.fs_qmatmul_each.argtypes = [i, p, p, p, p, p, i, p, l, p, i, p]
            self.lib.fs_qmatmul_each.restype = i
        self.lib.fs_dequant_rows.argtypes = [i, i, p, l, i, p, i, p, i, l, l]
        self.lib.fs_dequant_rows.restype = i
        # the x8 layout: absent only from an older revision's build (bench/kernels_ab.py)
        self.x8 = hasattr(self.lib, "fs_repack_x8")
        self.simd_bits = 0  # the x8 kernels' vector width (fs_simd_bits)
        if self.x8:
            self.lib.fs_simd_bits.restype = i
            self.simd_bits = self.lib.fs_simd_bits()
            self.lib.fs_repack_x8.argtypes = [i, p, l, i, i, p, i, l]
            self.lib.fs_repack_x8.restype = i
            self.lib.fs_release_file_pages.argtypes = [p, l]
            self.lib.fs_release_file_pages.restype = i
        if hasattr(self.lib, "fs_set_single_row_x16"):  # absent from older builds (kernels_ab)
            self.lib.fs_set_single_row_x16.argtypes = [i]
            self.lib.fs_set_single_row_x16.restype = None
            self.set_single_row_x16(single_row_x16())
        # AMX's tiles for 16 prompt rows at a time where the CPU and build have them (qmatmul.c
        # amx_dot16); absent from older builds (kernels_ab)
        self.amx = False
        if hasattr(self.lib, "fs_set_amx"):
            self.lib.fs_set_amx.argtypes = [i]
            self.lib.fs_set_amx.restype = i
            self.lib.fs_amx_products.restype = l
            self.set_amx(True)
        if hasattr(self.lib, "fs_kx8_unpacked_products"):  # absent from older builds (kernels_ab)
            self.lib.fs_kx8_unpacked_products.restype = l
        # the x8 kernels take vpdpwssd (fs_x8_vnni); an older build (kernels_ab): when 512-bit
        self.x8_vnni = bool(self.lib.fs_x8_vnni()) if hasattr(self.lib, "fs_x8_vnni") else self.simd_bits >= 512
        # prefill's fp32 GEMM over weights dequantized on the fly (gemm.c); absent from older builds
        self.has_gemm = hasattr(self.lib, "fs_gemm")
        if self.has_gemm:
            self.lib.fs_gemm.argtypes = [i, i, p, l, i, i, i, p, i, p, l, p, i, l, l]
            self.lib.fs_gemm.restype = i
            self.lib.fs_gemm_work_floats.argtypes = [i, i, i]
            self.lib.fs_gemm_work_floats.restype = l
        self._work = threading.local()  # fs_gemm's buffer, kept between calls: one per thread, as quant.SCRATCH
        f = ctypes.c_float
        self.lib.fs_rmsnorm.argtypes = [p, p, p, i, i, f]
        self.lib.fs_rmsnorm.restype = None
        # a prompt's rope and attention in C (decode.c, attend.c); absent from older builds (kernels_ab)
        self.prefill_glue = hasattr(self.lib, "fs_attend_rows") and hasattr(self.lib, "fs_rope_rows")
        if self.prefill_glue:
            self.lib.fs_attend_rows.argtypes = [p, l, p, p, i, i, i, i, i, i, p, i]
            self.lib.fs_attend_rows.restype = i
            self.lib.fs_rope_rows.argtypes = [p, l, i, i, i, p, p]
            self.lib.fs_rope_rows.restype = i
        self.lib.fs_swiglu.argtypes = [p, p, i]
        self.lib.fs_swiglu.restype = None
        self.lib.fs_attend_one.argtypes = [p, p, p, p, p, i, i, i, i, i, p, p, i]
        self.lib.fs_attend_one.restype = i
        self.lib.fs_block_work_floats.argtypes = [p, i]
        self.lib.fs_block_work_floats.restype = l
        self.lib.fs_block_one.argtypes = [p, p, p, p, i, i, p, p, p, i, l]
        self.lib.fs_block_one.restype = i
        if hasattr(self.lib, "fs_block_attend"):  # absent from older builds (bench/kernels_ab.py)
            self.lib.fs_block_attend.argtypes = [p, p, p, p, p, i, i, p, p, p, i, l]
            self.lib.fs_block_attend.restype = i
        self.lib.fs_block_batch_work_floats.argtypes = [p, i, i]
        self.lib.fs_block_batch_work_floats.restype = l
        self.lib.fs_block_batch.argtypes = [p, i, p, p, p, p, p, p, p, p, i, l]
        self.lib.fs_block_batch.restype = i
        # the tensor-parallel block and its data path (decode.c, mesh.c); absent from older builds
        self.tensor_parallel = hasattr(self.lib, "fs_tp_block_batch")
        if self.tensor_parallel:
            self.lib.fs_tp_work_floats.argtypes = [p, i, i]
            self.lib.fs_tp_work_floats.restype = l
            self.lib.fs_tp_block_batch.argtypes = [p, p, i, p, p, p, p, p, p, p, p, i, l]
            self.lib.fs_tp_block_batch.restype = i
            self.lib.fs_tp_forward.argtypes = [p, i, p, i, p, p, p, p, p, p, p, p, i, l]
            self.lib.fs_tp_forward.restype = i
            self.lib.fs_mesh_new.argtypes = [i, i, p, p]
            self.lib.fs_mesh_new.restype = p
            self.lib.fs_mesh_free.argtypes = [p]
            self.lib.fs_mesh_free.restype = None
            self.lib.fs_mesh_error.argtypes = [p]
            self.lib.fs_mesh_error.restype = ctypes.c_char_p
            for name in ("fs_mesh_failed_peer",):
                getattr(self.lib, name).argtypes = [p]
                getattr(self.lib, name).restype = i
            for name in ("fs_mesh_exchanges", "fs_mesh_bytes_out"):
                getattr(self.lib, name).argtypes = [p]
                getattr(self.lib, name).restype = l
            self.lib.fs_mesh_ms.argtypes = [p]
            self.lib.fs_mesh_ms.restype = ctypes.c_double
            self.lib.fs_mesh_allgather_rows.argtypes = [p, p, p, i, p, p, i]
            self.lib.fs_mesh_allgather_rows.restype = i
            self.lib.fs_mesh_exchange.argtypes = [p, p, p, p, p, i]
            self.lib.fs_mesh_exchange.restype = i
            self.lib.fs_mesh_crypto_available.restype = i

    def set_amx(self, on: bool) -> bool:
        """Prompt rows of the x8 Q4_0/Q4_1/Q8_0 matrices through AMX (on: where this build has
        it and Linux grants the tiles) or the 512-bit kernel; the same bits either way. For the
        whole library, as set_single_row_x16. Returns whether AMX is now in use."""
        self.amx = bool(self.lib.fs_set_amx(int(on)))
        return self.amx

    def amx_products(self) -> int:
        """Activation rows x 16 weight rows multiplied on AMX's tiles so far (the whole process)."""
        return self.lib.fs_amx_products() if hasattr(self.lib, "fs_amx_products") else 0

    def kx8_unpacked_products(self) -> int:
        """Activation rows x row groups of eight that K-quant x8 matrices took through their
        many-row kernel (each super-block unpacked once for all rows) so far, the whole process."""
        return self.lib.fs_kx8_unpacked_products() if hasattr(self.lib, "fs_kx8_unpacked_products") else 0

    def set_single_row_x16(self, on: bool) -> None:
        """One activation row through the 512-bit x8 kernel (on) or a row group at a time; for
        the whole library (every Kernels of this variant), as single_row_x16() chose at load."""
        self.lib.fs_set_single_row_x16(int(on))

    # -- one-token glue (decode.c): x is one contiguous float32 row ----------------------------
    def rmsnorm(self, x: torch.Tensor, w: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of x (last dim n) normalised and scaled by w; in place when out is x."""
        n = w.numel()
        out = torch.empty_like(x) if out is None else out
        self.lib.fs_rmsnorm(x.data_ptr(), w.data_ptr(), out.data_ptr(), x.numel() // n, n, eps)
        return out

    def attend_rows(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int) -> torch.Tensor:
        """Causal attention of S new tokens at pos.. over one layer's cache (attend.c): q [S,
        n_heads, hd] float32 (rows any stride apart, heads packed; roped), k_cache/v_cache
        [n_kv, cap, hd] float16 holding rows 0 .. pos + S - 1. Returns [S, n_heads * hd]."""
        rows, n_heads, hd = q.shape
        assert q.dtype == torch.float32 and q.stride(2) == 1 and q.stride(1) == hd
        assert k_cache.dtype == v_cache.dtype == torch.float16 and k_cache.is_contiguous() and v_cache.is_contiguous()
        out = torch.empty((rows, n_heads * hd))
        rc = self.lib.fs_attend_rows(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                                     k_cache.shape[1], pos, rows, n_heads, k_cache.shape[0], hd, out.data_ptr(),
                                     torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"fs_attend_rows failed ({rc}) for {rows} rows at pos {pos}, head size {hd}")
        return out

    def rope_rows(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rope in place: x [S, heads, hd] float32 (a view: rows any stride apart, heads packed),
        cos, sin [S, hd] contiguous (the positions of x's rows)."""
        rows, heads, hd = x.shape
        assert x.dtype == torch.float32 and x.stride(2) == 1 and x.stride(1) == hd
        assert cos.shape == sin.shape == (rows, hd) and cos.is_contiguous() and sin.is_contiguous()
        if self.lib.fs_rope_rows(x.data_ptr(), x.stride(0), rows, heads, hd, cos.data_ptr(), sin.data_ptr()) != 0:
            raise RuntimeError(f"fs_rope_rows failed for {tuple(x.shape)}")

    def swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[..., 2F] (gate | up) -> [..., F]: silu(gate) * up."""
        n = gate_up.shape[-1] // 2
        out = torch.empty((*gate_up.shape[:-1], n))
        self.lib.fs_swiglu(gate_up.data_ptr(), out.data_ptr(), n)
        return out

    def attend_one(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, pos: int, n_heads: int, n_kv: int, hd: int) -> torch.Tensor:
        """Rope, cache write and attention of one token; k_cache/v_cache: one layer's [n_kv, cap, hd]
        in float16 (kv_cache.KV_DTYPE)."""
        assert k_cache.dtype == v_cache.dtype == torch.float16 and k_cache.is_contiguous() and v_cache.is_contiguous()
        out = torch.empty(n_heads * hd)
        scratch = torch.empty(n_heads * (pos + 1))
        rc = self.lib.fs_attend_one(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(),
                                    v_cache.data_ptr(), k_cache.shape[1], pos, n_heads, n_kv, hd, out.data_ptr(),
                                    scratch.data_ptr(), torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"fs_attend_one failed ({rc}) at pos {pos}")
        return out

    def matmul(self, fmt: int, group: int, w: torch.Tensor, n: int, k: int, x: torch.Tensor) -> torch.Tensor:
        """x: [M, K] float32 -> [M, N]; w: uint8 [N, bytes_per_row] blocks. x's rows may lie
        any stride apart (a column slice), except for 16-bit float matrices. The kernel checks
        that N rows of K lie inside w."""
        if x.dim() != 2 or x.shape[1] != k:
            raise ValueError(f"matmul of x {tuple(x.shape)} with a matrix of K = {k}")
        y = torch.empty((x.shape[0], n), dtype=torch.float32)
        if self.strided and x.stride(1) == 1 and fmt not in (FMT_F16, FMT_BF16) and x.dtype == torch.float32:
            rc = self.lib.fs_qmatmul_strided(fmt, group, w.data_ptr(), w.stride(0), n, k, x.data_ptr(),
                                             max(x.stride(0), k), x.shape[0], y.data_ptr(), torch.get_num_threads(),
                                             _span(w))
        else:
            x = x.contiguous().float()
            rc = self.lib.fs_qmatmul(fmt, group, w.data_ptr(), w.stride(0), n, k, x.data_ptr(), x.shape[0],
                                     y.data_ptr(), torch.get_num_threads(), _span(w))
        if rc != 0:
            raise RuntimeError(f"fs_qmatmul failed ({rc}) for N={n} K={k} fmt={fmt} group={group}")
        return y

    def gemm(self, fmt: int, group: int, w: torch.Tensor, start: int, count: int, k: int, x: torch.Tensor,
             out: torch.Tensor) -> torch.Tensor:
        """out[M, count] (a column slice of a row-major matrix is fine) = x [M, K] float32 .
        W[start:start + count].T, W's rows dequantized on the fly (gemm.c); w as for
        dequant_rows (x8 formats: start is a row of the matrix, not of the groups)."""
        x = x.contiguous()
        m = x.shape[0]
        assert x.dtype == out.dtype == torch.float32 and x.shape[1] == k and out.shape == (m, count)
        assert out.stride(1) == 1 and (m == 1 or out.stride(0) >= count)
        threads = torch.get_num_threads()
        need = self.lib.fs_gemm_work_floats(m, k, threads)
        work = getattr(self._work, "gemm", None)
        if work is None or work.numel() < need:
            work = self._work.gemm = torch.empty(need)
        rows_per_block_row = 8 if fmt & 0xff in X8_OF.values() else 1
        rc = self.lib.fs_gemm(fmt & 0xff, group, w.data_ptr(), w.stride(0), start, count, k, x.data_ptr(), m,
                              out.data_ptr(), out.stride(0), work.data_ptr(), threads,
                              w.shape[0] * rows_per_block_row, _span(w))
        if rc != 0:
            raise RuntimeError(f"fs_gemm failed ({rc}) for rows {start}..{start + count} K={k} fmt={fmt}")
        return out

    def block(self, **spec) -> BlockProgram:
        """A decoder block run for one token in one call (BlockProgram's arguments)."""
        return BlockProgram(self, **spec)

    def multi(self, parts: list[tuple[int, int, torch.Tensor, int]], k: int) -> MultiMatmul:
        """A prepared call for matrices (fmt, group, blocks, n) that share their input."""
        return MultiMatmul(self, parts, k)

    def repack_x8(self, fmt: int, w: torch.Tensor, k: int) -> torch.Tensor:
        """Rows [N, bytes] of Q4_0/Q4_1/Q8/Q4_K blocks (N % 8 == 0) -> row groups [N / 8,
        x8_group_bytes] in the format's x8 layout (X8_OF[fmt]): eight rows interleaved."""
        n = w.shape[0]
        out = torch.empty((n // 8, x8_group_bytes(fmt, k)), dtype=torch.uint8)
        rc = self.lib.fs_repack_x8(fmt, w.data_ptr(), w.stride(0), n, k, out.data_ptr(), torch.get_num_threads(),
                                   _span(w))
        if rc != 0:
            raise RuntimeError(f"fs_repack_x8 failed ({rc}) for fmt={fmt} N={n} K={k}")
        return out

    def release_file_pages(self, data: np.ndarray) -> None:
        """Drop this process's pages of `data`, a read-only memory map of a file (quant.py
        checks): its repacked copy replaced it. The page cache keeps the file."""
        self.lib.fs_release_file_pages(data.ctypes.data, data.nbytes)

    def dequant_rows(self, fmt: int, group: int, w: torch.Tensor, k: int, rows: torch.Tensor | None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of W (all when `rows` is None) as float32 [R, K], into `out` when given.
        IndexError when a row is outside W (the kernel checks every index; nothing is read)."""
        if rows is not None:
            rows = rows.reshape(-1).to(torch.int64).contiguous()
        rows_per_block_row = 8 if fmt & 0xff in X8_OF.values() else 1  # x8: a block row is a group of 8
        n_rows = w.shape[0] * rows_per_block_row
        count = n_rows if rows is None else rows.numel()
        if out is None:
            out = torch.empty((count, k), dtype=torch.float32)
        assert out.shape == (count, k) and out.is_contiguous() and out.dtype == torch.float32
        rc = self.lib.fs_dequant_rows(fmt, group, w.data_ptr(), w.stride(0), k, None if rows is None else rows.data_ptr(),
                                      count, out.data_ptr(), torch.get_num_threads(), n_rows, _span(w))
        if rc == -3:
            raise IndexError(f"a row index is outside the {n_rows} rows of the matrix")
        if rc != 0:
            raise RuntimeError(f"fs_dequant_rows failed ({rc}) for {n_rows} rows of K={k} in {_span(w)} bytes")
        return out


class _Mats(ctypes.Structure):  # decode.c fs_mats
    _fields_ = [("count", ctypes.c_int), ("k", ctypes.c_int), ("fmts", ctypes.c_int * 8), ("groups", ctypes.c_int * 8),
                ("ns", ctypes.c_int * 8), ("ws", ctypes.c_void_p * 8), ("strides", ctypes.c_long * 8)]


class _Block(ctypes.Structure):  # decode.c fs_block
    _fields_ = [("dim", ctypes.c_int), ("n_heads", ctypes.c_int), ("n_kv", ctypes.c_int), ("hd", ctypes.c_int),
                ("ffn", ctypes.c_int), ("eps", ctypes.c_float),
                ("attn_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p), ("q_norm", ctypes.c_void_p),
                ("k_norm", ctypes.c_void_p), ("qkv_bias", ctypes.c_void_p),
                ("qkv", _Mats), ("wo", _Mats), ("gate_up", _Mats), ("down", _Mats),
                ("nbytes", (ctypes.c_long * 8) * 4)]  # bytes behind each matrix's pointer: qkv, wo, gate_up, down


class BlockProgram:
    """One decoder block described once for decode.c's fs_block_one: a token through the
    whole block in one call. Holds every tensor it points at. A mixture's block has no
    gate_up or down (ffn 0): attend() takes a token through its attention (fs_block_attend)
    and the experts come after, in their own calls (ExpertMatmuls)."""

    def __init__(self, kernels: Kernels, *, dim: int, n_heads: int, n_kv: int, head_dim: int, ffn: int, eps: float,
                 attn_norm: torch.Tensor, ffn_norm: torch.Tensor, q_norm: torch.Tensor | None,
                 k_norm: torch.Tensor | None, qkv_bias: torch.Tensor | None,
                 qkv: MultiMatmul, wo: MultiMatmul, gate_up: MultiMatmul | None = None, down: MultiMatmul | None = None):
        self.kernels = kernels
        self.n_kv, self.head_dim = n_kv, head_dim
        vectors = [attn_norm, ffn_norm, q_norm, k_norm, qkv_bias]
        lengths = [dim, dim, head_dim, head_dim, (n_heads + 2 * n_kv) * head_dim]
        for name, v, n in zip(("attn_norm", "ffn_norm", "q_norm", "k_norm", "qkv_bias"), vectors, lengths):
            if v is not None and v.numel() != n:
                raise ValueError(f"{name} has {v.numel()} values, the block needs {n}")
        self._keep = [v.contiguous().float() if v is not None else None for v in vectors]
        ptr = [v.data_ptr() if v is not None else None for v in self._keep]
        mats = (qkv, wo, gate_up, down)
        nbytes = ((ctypes.c_long * 8) * 4)(*((ctypes.c_long * 8)(*m.nbytes) if m else (ctypes.c_long * 8)() for m in mats))
        self.spec = _Block(dim, n_heads, n_kv, head_dim, ffn, eps, *ptr, *(m.as_struct() if m else _Mats() for m in mats),
                           nbytes)
        self.attention_only = gate_up is None and down is None
        if kernels.lib.fs_block_work_floats(ctypes.byref(self.spec), 0) < 0:
            shapes = "; ".join(f"{name} {m.k}, {m.total}" for name, m in zip(("qkv", "wo", "gate_up", "down"), mats) if m)
            raise ValueError(f"a block of dim {dim}, {n_heads} heads ({n_kv} kv) of {head_dim}, ffn {ffn} does not "
                             f"match its matrices (K, N: {shapes})")
        self._mats = mats  # their blocks stay alive
        self._work, self._work_cap = torch.empty(0), -1

    def __call__(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int,
                 cos: torch.Tensor, sin: torch.Tensor) -> None:
        """x: one contiguous float32 row [dim], updated in place; caches as attend_one's."""
        cap = self._room(x, k_cache, v_cache)
        rc = self.kernels.lib.fs_block_one(ctypes.byref(self.spec), x.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                           cap, pos, cos.data_ptr(), sin.data_ptr(), self._work.data_ptr(),
                                           torch.get_num_threads(), self._work.numel())
        if rc != 0:
            raise RuntimeError(f"fs_block_one failed ({rc}) at pos {pos}")

    def attend(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int,
               cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """A mixture's block up to its experts: x (as __call__'s) += its attention, in place;
        returns ffn_norm(x) [1, dim], what the router and the experts read."""
        cap = self._room(x, k_cache, v_cache)
        normed = torch.empty((1, self.spec.dim), dtype=torch.float32)
        rc = self.kernels.lib.fs_block_attend(ctypes.byref(self.spec), x.data_ptr(), normed.data_ptr(),
                                              k_cache.data_ptr(), v_cache.data_ptr(), cap, pos, cos.data_ptr(),
                                              sin.data_ptr(), self._work.data_ptr(), torch.get_num_threads(),
                                              self._work.numel())
        if rc != 0:
            raise RuntimeError(f"fs_block_attend failed ({rc}) at pos {pos}")
        return normed

    def _room(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> int:
        """Checks one token's row, and the caches when their size changed; the work buffer for
        them. Returns the caches' capacity."""
        cap = k_cache.shape[1]
        self._check_row(x, 1)
        if cap != self._work_cap:  # the cache grew (or is another's): the scores need more room
            # caches come from KVCache, the same layout for every session of this layer; checked
            # when their size changes, not at every layer of every token
            self._check_cache(k_cache, v_cache)
            need = self.kernels.lib.fs_block_work_floats(ctypes.byref(self.spec), cap)
            if self._work.numel() < need:
                self._work = torch.empty(need)
            self._work_cap = cap
        return cap

    def _check_row(self, x: torch.Tensor, m: int) -> None:
        """What the kernel writes without knowing its size: x [m, dim] float32."""
        if x.dtype != torch.float32 or not x.is_contiguous() or x.numel() != m * self.spec.dim:
            raise ValueError(f"block input {x.dtype} {tuple(x.shape)}: expected {m} contiguous float32 rows of {self.spec.dim}")

    def _check_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        """What the kernel reads and writes at a position: one layer's caches [n_kv, cap, hd] float16."""
        for c in (k_cache, v_cache):
            if (c.dtype != torch.float16 or not c.is_contiguous() or c.dim() != 3
                    or c.shape[0] != self.n_kv or c.shape[2] != self.head_dim or c.shape != k_cache.shape):
                raise ValueError(f"KV cache {c.dtype} {tuple(c.shape)}: expected float16 [{self.n_kv}, cap, {self.head_dim}]")

    def batch(self, x: torch.Tensor, caches: list[tuple[torch.Tensor, torch.Tensor]], positions: list[int],
              cos: torch.Tensor, sin: torch.Tensor) -> None:
        """x: [M, dim] contiguous float32, row r the newest token of a session whose cache is
        caches[r] at positions[r]; updated in place. cos, sin: the stage's whole rope tables."""
        m = x.shape[0]
        assert len(caches) == len(positions) == m
        self._check_row(x, m)
        for k, v in caches:
            self._check_cache(k, v)
        caps = [k.shape[1] for k, _ in caches]
        need = self.kernels.lib.fs_block_batch_work_floats(ctypes.byref(self.spec), m, max(caps))
        if self._work.numel() < need:
            self._work = torch.empty(need)
        pointers = ctypes.c_void_p * m
        rc = self.kernels.lib.fs_block_batch(
            ctypes.byref(self.spec), m, x.data_ptr(), pointers(*(k.data_ptr() for k, _ in caches)),
            pointers(*(v.data_ptr() for _, v in caches)), (ctypes.c_int * m)(*caps), (ctypes.c_int * m)(*positions),
            pointers(*(cos[p].data_ptr() for p in positions)), pointers(*(sin[p].data_ptr() for p in positions)),
            self._work.data_ptr(), torch.get_num_threads(), self._work.numel())
        if rc != 0:
            raise RuntimeError(f"fs_block_batch failed ({rc}) for {m} sessions at positions {positions}")


class ExchangeError(RuntimeError):
    """An exchange of the tensor-parallel data path failed: `peer` (its rank in the group, or
    -1) closed its connection, stopped answering, or sent a frame that failed its checks."""

    def __init__(self, message: str, peer: int, code: int):
        super().__init__(message)
        self.peer, self.code = peer, code


class Mesh:
    """mesh.c's fs_mesh: this machine's sealed connections to the others of a tensor-parallel
    group. fds[p]: a connected socket to rank p (the caller keeps them open while the mesh
    lives; -1 for this rank). keys: per peer (key of frames to it, key of frames from it), 32
    bytes each; None only to measure what the encryption costs."""

    def __init__(self, kernels: Kernels, rank: int, fds: list[int], keys: list[tuple[bytes, bytes]] | None):
        n = len(fds)
        if not kernels.tensor_parallel:
            raise RuntimeError("these kernels have no tensor-parallel data path (an older build)")
        if keys is not None and not kernels.lib.fs_mesh_crypto_available():
            raise RuntimeError("the system's libcrypto (libssl3) cannot be loaded: the data path cannot seal its "
                               "frames; install libssl3")
        packed = None
        if keys is not None:
            if len(keys) != n or any(len(a) != 32 or len(b) != 32 for a, b in keys):
                raise ValueError("a mesh needs a pair of 32-byte keys for each machine")
            packed = ctypes.create_string_buffer(b"".join(a + b for a, b in keys), 64 * n)
        self.kernels, self.n, self.rank = kernels, n, rank
        self.ptr = kernels.lib.fs_mesh_new(n, rank, (ctypes.c_int * n)(*fds), packed)
        if not self.ptr:
            raise ValueError(f"cannot build a mesh of {n} machines as rank {rank}")

    def _raise(self, rc: int) -> None:
        lib = self.kernels.lib
        message = (lib.fs_mesh_error(self.ptr) or b"").decode(errors="replace") or f"exchange failed ({rc})"
        raise ExchangeError(message, lib.fs_mesh_failed_peer(self.ptr), rc)

    def exchange(self, send: dict[int, torch.Tensor], recv: dict[int, torch.Tensor], timeout_ms: int = -1) -> None:
        """Send send[p] (contiguous) to each p in send, receive exactly recv[p]'s bytes from each
        p in recv, all at once. ExchangeError on failure."""
        n = self.n
        sp, sl = (ctypes.c_void_p * n)(), (ctypes.c_long * n)(*([-1] * n))
        rp, rl = (ctypes.c_void_p * n)(), (ctypes.c_long * n)(*([-1] * n))
        for p, t in send.items():
            assert t.is_contiguous()
            sp[p], sl[p] = t.data_ptr(), t.numel() * t.element_size()
        for p, t in recv.items():
            assert t.is_contiguous()
            rp[p], rl[p] = t.data_ptr(), t.numel() * t.element_size()
        rc = self.kernels.lib.fs_mesh_exchange(self.ptr, sp, sl, rp, rl, timeout_ms)
        if rc != 0:
            self._raise(rc)

    def allgather_rows(self, mine: torch.Tensor, at: list[int], timeout_ms: int = -1) -> torch.Tensor:
        """mine [M, at[rank+1] - at[rank]] float32 -> every machine's columns side by side [M, at[-1]]."""
        m = mine.shape[0]
        if len(at) != self.n + 1 or mine.dtype != torch.float32 or mine.numel() != m * (at[self.rank + 1] - at[self.rank]):
            raise ValueError(f"all-gather of {tuple(mine.shape)} with spans {at}")
        mine = mine.contiguous()
        full = torch.empty(m, at[-1])
        scratch = torch.empty(m * at[-1])
        rc = self.kernels.lib.fs_mesh_allgather_rows(self.ptr, mine.data_ptr(), full.data_ptr(), m,
                                                     (ctypes.c_int * len(at))(*at), scratch.data_ptr(), timeout_ms)
        if rc != 0:
            self._raise(rc)
        return full

    @property
    def exchanges(self) -> int:
        return self.kernels.lib.fs_mesh_exchanges(self.ptr)

    @property
    def bytes_out(self) -> int:
        return self.kernels.lib.fs_mesh_bytes_out(self.ptr)

    @property
    def seconds(self) -> float:
        """Wall time spent in exchanges so far (waiting for the others included)."""
        return self.kernels.lib.fs_mesh_ms(self.ptr) / 1e3

    def close(self) -> None:
        if self.ptr:
            self.kernels.lib.fs_mesh_free(self.ptr)
            self.ptr = None

    def __del__(self):
        self.close()


class _TPBlock(ctypes.Structure):  # decode.c fs_tp_block
    _fields_ = [("b", _Block), ("ranks", ctypes.c_int), ("rank", ctypes.c_int), ("timeout_ms", ctypes.c_int),
                ("heads_at", ctypes.c_int * 65), ("dim_at", ctypes.c_int * 65), ("ffn_at", ctypes.c_int * 65)]


class TensorBlockProgram:
    """One decoder block's slice on one machine of a tensor-parallel group (decode.c
    fs_tp_block_batch): M rows through the block with the group's four all-gathers. The
    block's own heads, FFN columns and output rows are this machine's; *_at give every
    machine's spans."""

    def __init__(self, kernels: Kernels, *, dim: int, n_heads: int, n_kv: int, head_dim: int, ffn: int, eps: float,
                 attn_norm: torch.Tensor, ffn_norm: torch.Tensor, q_norm: torch.Tensor | None,
                 k_norm: torch.Tensor | None, qkv_bias: torch.Tensor | None, qkv: MultiMatmul | None,
                 wo: MultiMatmul, gate_up: MultiMatmul, down: MultiMatmul, rank: int, heads_at: list[int],
                 dim_at: list[int], ffn_at: list[int], timeout_ms: int):
        self.kernels = kernels
        self.n_kv, self.head_dim, self.dim = n_kv, head_dim, dim
        vectors = [attn_norm, ffn_norm, q_norm, k_norm, qkv_bias]
        self._keep = [v.contiguous().float() if v is not None else None for v in vectors]
        ptr = [v.data_ptr() if v is not None else None for v in self._keep]
        empty = _Mats()
        mats = (qkv, wo, gate_up, down)
        nbytes = ((ctypes.c_long * 8) * 4)(*((ctypes.c_long * 8)(*(m.nbytes if m is not None else [])) for m in mats))
        block = _Block(dim, n_heads, n_kv, head_dim, ffn, eps, *ptr,
                       *(m.as_struct() if m is not None else empty for m in mats), nbytes)
        ranks = len(heads_at) - 1
        if not 1 <= ranks <= 64 or len(dim_at) != ranks + 1 or len(ffn_at) != ranks + 1:
            raise ValueError(f"spans for {ranks} machines")
        self.spec = _TPBlock(block, ranks, rank, timeout_ms, (ctypes.c_int * 65)(*heads_at),
                             (ctypes.c_int * 65)(*dim_at), (ctypes.c_int * 65)(*ffn_at))
        if kernels.lib.fs_tp_work_floats(ctypes.byref(self.spec), 1, 0) < 0:
            raise ValueError(f"a tensor-parallel slice of {n_heads} heads ({n_kv} kv) of {head_dim}, ffn {ffn}, "
                             f"as rank {rank} of spans heads {heads_at} dim {dim_at} ffn {ffn_at}, does not match "
                             "its matrices")
        self._mats = mats
        self._work = torch.empty(0)

    def batch(self, mesh: Mesh | None, x: torch.Tensor, caches: list[tuple[torch.Tensor, torch.Tensor]] | None,
              positions: list[int], cos: torch.Tensor, sin: torch.Tensor) -> None:
        """x: [M, dim] contiguous float32, the same on every machine, updated in place; row r at
        positions[r] of caches[r] (this machine's KV heads; None for a machine without heads).
        Rows may share a cache at consecutive positions (a prompt: each sees the ones before)."""
        m = x.shape[0]
        if x.dtype != torch.float32 or not x.is_contiguous() or x.numel() != m * self.dim:
            raise ValueError(f"block input {x.dtype} {tuple(x.shape)}: expected {m} contiguous float32 rows of {self.dim}")
        if len(positions) != m or (caches is not None and len(caches) != m):
            raise ValueError(f"{m} rows with {len(positions)} positions")
        if caches is None:
            if self.n_kv:
                raise ValueError("a slice with attention heads needs their KV caches")
            none = torch.zeros(1, dtype=torch.float16)
            caches = [(none, none)] * m
            caps = [p + 1 for p in positions]
        else:
            caps = [k.shape[1] for k, _ in caches]
        for k, v in caches if self.n_kv else ():
            if (k.dtype != torch.float16 or not k.is_contiguous() or not v.is_contiguous() or k.shape != v.shape
                    or k.dim() != 3 or k.shape[0] != self.n_kv or k.shape[2] != self.head_dim):
                raise ValueError(f"KV cache {tuple(k.shape)}: expected float16 [{self.n_kv}, cap, {self.head_dim}]")
        if any(not 0 <= p < c for p, c in zip(positions, caps)):
            raise ValueError(f"positions {positions} outside their caches ({caps})")
        need = self.kernels.lib.fs_tp_work_floats(ctypes.byref(self.spec), m, max(caps))
        if self._work.numel() < need:
            self._work = torch.empty(need)
        pointers = ctypes.c_void_p * m
        rc = self.kernels.lib.fs_tp_block_batch(
            ctypes.byref(self.spec), mesh.ptr if mesh is not None else None, m, x.data_ptr(),
            pointers(*(k.data_ptr() for k, _ in caches)), pointers(*(v.data_ptr() for _, v in caches)),
            (ctypes.c_int * m)(*caps), (ctypes.c_int * m)(*positions),
            pointers(*(cos[p].data_ptr() for p in positions)), pointers(*(sin[p].data_ptr() for p in positions)),
            self._work.data_ptr(), torch.get_num_threads(), self._work.numel())
        if rc <= -10 and mesh is not None:
            mesh._raise(rc // 10)
        if rc != 0:
            raise RuntimeError(f"fs_tp_block_batch failed ({rc}) for {m} rows at positions {positions}")


def tp_forward(programs: list[TensorBlockProgram], mesh: Mesh | None, x: torch.Tensor,
               caches: list[list[tuple[torch.Tensor, torch.Tensor]]] | None, positions: list[int],
               cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Every layer of a step in one C call (decode.c fs_tp_forward): programs[l] with caches[l][r]
    (each layer's caches of row r; None for a slice without heads), as TensorBlockProgram.batch
    layer after layer."""
    first = programs[0]
    L, m = len(programs), x.shape[0]
    if x.dtype != torch.float32 or not x.is_contiguous() or x.numel() != m * first.dim or len(positions) != m:
        raise ValueError(f"step input {x.dtype} {tuple(x.shape)} with {len(positions)} positions")
    if caches is None:
        if first.n_kv:
            raise ValueError("a slice with attention heads needs their KV caches")
        none = torch.zeros(1, dtype=torch.float16)
        flat = [(none, none)] * (L * m)
        caps = [p + 1 for p in positions] * L
    else:
        if len(caches) != L or any(len(c) != m for c in caches):
            raise ValueError(f"caches for {len(caches)} layers, {m} rows each expected")
        flat = [kv for layer in caches for kv in layer]
        for k, v in {id(kv[0]): kv for kv in flat}.values():
            if (k.dtype != torch.float16 or not k.is_contiguous() or not v.is_contiguous() or k.shape != v.shape
                    or k.dim() != 3 or k.shape[0] != first.n_kv or k.shape[2] != first.head_dim):
                raise ValueError(f"KV cache {tuple(k.shape)}: expected float16 [{first.n_kv}, cap, {first.head_dim}]")
        caps = [k.shape[1] for k, _ in flat]
    if any(not 0 <= positions[i % m] < c for i, c in enumerate(caps)):
        raise ValueError(f"positions {positions} outside their caches")
    lib = first.kernels.lib
    need = max(lib.fs_tp_work_floats(ctypes.byref(p.spec), m, max(caps)) for p in programs[:1])
    if first._work.numel() < need:
        first._work = torch.empty(need)
    pointers = ctypes.c_void_p * (L * m)
    rows = ctypes.c_void_p * m
    rc = lib.fs_tp_forward(
        (ctypes.c_void_p * L)(*(ctypes.addressof(p.spec) for p in programs)), L, mesh.ptr if mesh is not None else None,
        m, x.data_ptr(), pointers(*(k.data_ptr() for k, _ in flat)), pointers(*(v.data_ptr() for _, v in flat)),
        (ctypes.c_int * (L * m))(*caps), (ctypes.c_int * m)(*positions), rows(*(cos[p].data_ptr() for p in positions)),
        rows(*(sin[p].data_ptr() for p in positions)), first._work.data_ptr(), torch.get_num_threads(),
        first._work.numel())
    if rc <= -10 and mesh is not None:
        mesh._raise(rc // 10)
    if rc != 0:
        raise RuntimeError(f"fs_tp_forward failed ({rc}) for {m} rows at positions {positions}")


class MultiMatmul:
    """x [M, K] -> y [M, sum n] for several matrices at once; the ctypes arrays are built once."""

    def __init__(self, kernels: Kernels, parts: list[tuple[int, int, torch.Tensor, int]], k: int):
        count = len(parts)
        self.kernels, self.k, self.blocks = kernels, k, [p[2] for p in parts]  # keep blocks alive
        self.fmts = (ctypes.c_int * count)(*(p[0] for p in parts))
        self.groups = (ctypes.c_int * count)(*(p[1] for p in parts))
        self.ptrs = (ctypes.c_void_p * count)(*(p[2].data_ptr() for p in parts))
        self.strides = (ctypes.c_long * count)(*(p[2].stride(0) for p in parts))
        self.ns = (ctypes.c_int * count)(*(p[3] for p in parts))
        self.nbytes = (ctypes.c_long * count)(*(_span(p[2]) for p in parts))  # checked against ns, k by the kernel
        self.count, self.total = count, sum(p[3] for p in parts)

    def as_struct(self) -> _Mats:
        return _Mats(self.count, self.k, (ctypes.c_int * 8)(*self.fmts), (ctypes.c_int * 8)(*self.groups),
                     (ctypes.c_int * 8)(*self.ns), (ctypes.c_void_p * 8)(*self.ptrs), (ctypes.c_long * 8)(*self.strides))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous().float()
        if x.dim() != 2 or x.shape[1] != self.k:
            raise ValueError(f"matmul of x {tuple(x.shape)} with matrices of K = {self.k}")
        y = torch.empty((x.shape[0], self.total), dtype=torch.float32)
        rc = self.kernels.lib.fs_qmatmul_multi(self.count, self.fmts, self.groups, self.ptrs, self.strides, self.ns,
                                               self.k, x.data_ptr(), x.shape[0], y.data_ptr(),
                                               torch.get_num_threads(), self.nbytes)
        if rc != 0:
            raise RuntimeError(f"fs_qmatmul_multi failed ({rc}) for K={self.k}")
        return y


class ExpertMatmuls:
    """A mixture's experts in the kernels' one-call form, for one row (a decode step): the
    chosen experts' gates and ups in one call (x quantized once, one parallel region over all
    their rows), then each chosen expert's down on its own hidden row in one more
    (fs_qmatmul_each). Each output is the bits of that expert's own calls: every weight row's
    dot product is the same arithmetic whichever call it is in."""

    MAX_MATS = 32  # qmatmul.c's matrices in one call

    def __init__(self, kernels: Kernels, gate_ups: list[MultiMatmul], downs: list[MultiMatmul]):
        self.kernels, self.calls = kernels, (gate_ups, downs)  # the calls keep the blocks alive
        self.k_in, self.k_hidden = gate_ups[0].k, downs[0].k
        self.per_expert = gate_ups[0].count
        self.width, self.dim = gate_ups[0].total, downs[0].total
        if any(g.k != self.k_in or g.count != self.per_expert or g.total != self.width for g in gate_ups) or \
                any(d.k != self.k_hidden or d.count != 1 or d.total != self.dim for d in downs):
            raise ValueError("a mixture's experts differ in shape")
        self.packed_hidden = any(f & 0xff in (FMT_F16, FMT_BF16) for d in downs for f in d.fmts)  # x as it is: rows packed
        # per expert, its matrices' arguments as rows, gathered for the chosen experts each step
        self.gate_up_args = [np.array([list(getattr(g, name)) for g in gate_ups], dtype=dtype)
                             for name, dtype in _MATS_ARGS]
        self.down_args = [np.array([list(getattr(d, name)) for d in downs], dtype=dtype) for name, dtype in _MATS_ARGS]

    def fits(self, k: int) -> bool:
        """Whether k chosen experts' gates and ups fit one call."""
        return k * self.per_expert <= self.MAX_MATS

    def gate_up(self, experts: np.ndarray, x: torch.Tensor) -> torch.Tensor:
        """x [1, K] -> [k, gate | up of each expert], experts in the order given."""
        x = x.contiguous().float()
        if x.shape != (1, self.k_in) or not self.fits(len(experts)):
            raise ValueError(f"experts' gate/up of x {tuple(x.shape)}, {len(experts)} experts")
        fmts, groups, ptrs, strides, ns, nbytes = (a[experts].ravel() for a in self.gate_up_args)
        y = torch.empty((len(experts), self.width), dtype=torch.float32)
        rc = self.kernels.lib.fs_qmatmul_multi(len(fmts), fmts.ctypes.data, groups.ctypes.data, ptrs.ctypes.data,
                                               strides.ctypes.data, ns.ctypes.data, self.k_in, x.data_ptr(), 1,
                                               y.data_ptr(), torch.get_num_threads(), nbytes.ctypes.data)
        if rc != 0:
            raise RuntimeError(f"fs_qmatmul_multi failed ({rc}) for {len(experts)} experts' gate/up")
        return y

    def down(self, experts: np.ndarray, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [k, K'] (row i: expert experts[i]'s; rows any stride apart) -> [k, dim]."""
        k = len(experts)
        if self.packed_hidden:
            hidden = hidden.contiguous()
        if hidden.dim() != 2 or hidden.shape != (k, self.k_hidden) or hidden.dtype != torch.float32 \
                or hidden.stride(1) != 1 or hidden.stride(0) < self.k_hidden or not self.fits(k):
            raise ValueError(f"experts' down of hidden {tuple(hidden.shape)}, {k} experts")
        fmts, groups, ptrs, strides, ns, nbytes = (a[experts] for a in self.down_args)
        x_stride = hidden.stride(0) if k > 1 else self.k_hidden  # torch leaves a lone row's stride as it was
        y = torch.empty((k, self.dim), dtype=torch.float32)
        rc = self.kernels.lib.fs_qmatmul_each(k, fmts.ctypes.data, groups.ctypes.data, ptrs.ctypes.data,
                                              strides.ctypes.data, ns.ctypes.data, self.k_hidden, hidden.data_ptr(),
                                              x_stride, y.data_ptr(), torch.get_num_threads(),
                                              nbytes.ctypes.data)
        if rc != 0:
            raise RuntimeError(f"fs_qmatmul_each failed ({rc}) for {k} experts' down")
        return y


# MultiMatmul's ctypes arrays, in fs_qmatmul_multi's order, as numpy types of the same width
_MATS_ARGS = [("fmts", np.int32), ("groups", np.int32), ("ptrs", np.uintp), ("strides", np.int64),
              ("ns", np.int32), ("nbytes", np.int64)]


@cache
def load(variant: str = "native") -> Kernels | None:
    """The compiled kernels, building them on first use; None (with a warning) if that fails."""
    if os.environ.get("FASTSERVE_NO_KERNELS"):
        return None
    source = b"".join(path.read_bytes() for path in SOURCES)
    key = hashlib.sha256(source + " ".join(_flags(variant)).encode() + _cpu_id().encode()).hexdigest()[:16]
    build = f"{variant}-sanitize" if sanitized() else variant  # a separate file: it needs the runtime preloaded
    path = Paths.from_env().cache / "kernels" / f"qmatmul-{build}-{key}.so"
    try:
        if not path.exists():
            _build(variant, path)
        return Kernels(path, variant)
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        warnings.warn(f"quantized kernels unavailable, using dense torch weights (slower, more memory): {err}",
                      stacklevel=2)
        return None


def as_uint8_rows(data: np.ndarray) -> torch.Tensor:
    """A [rows, bytes] uint8 view of GGUF block data without copying the memory map."""
    with warnings.catch_warnings():  # the map is read-only; we never write through it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(data.view(np.uint8).reshape(data.shape[0], -1))
