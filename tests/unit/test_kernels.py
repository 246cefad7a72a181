"""The quantized runtime weights and every kernel path, against gguf's own dequantization."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from fastserve_edge.engine import kernels
from fastserve_edge.engine.quant import QuantEmbedding, QuantLinear, quant_tensor
from fastserve_edge.models.tensors import RawTensor
from tests.models_fixtures import quantize_tensor

CPU_FLAGS = open("/proc/cpuinfo").read()
VARIANTS = ["portable"] + (["avx2"] if " avx2 " in CPU_FLAGS else []) + ["native"]
TYPES = ["Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K", "IQ4_XS", "F16", "BF16"]
SUPER_BLOCK_TYPES = ("Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K", "IQ4_XS")  # 256 weights a block: K a multiple of 256
K_TYPES: set[str] = set()  # every type is exact to its blocks now


def raw_matrix(ttype: str, n: int, k: int, seed: int = 0) -> tuple[RawTensor, torch.Tensor]:
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.05
    data, qtype = quantize_tensor(w, ttype)
    qtype = qtype if qtype is not None else GGMLQuantizationType[ttype]  # F16: the writer's own type
    reference = torch.from_numpy(dequantize(data, qtype).copy()).float()
    return RawTensor("w", qtype, (n, k), data), reference


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("ttype", TYPES)
@pytest.mark.parametrize("n,k,m", [(1, 256, 1), (37, 256, 1), (37, 512, 5), (3, 768, 17),
                                   (8, 256, 1), (40, 512, 5), (16, 768, 17)])  # multiples of 8: x8 layout
def test_matmul_matches_reference_dequantization(variant, ttype, n, k, m):
    if ttype not in SUPER_BLOCK_TYPES:  # block types of 32: odd multiples of the group too
        k = k - 32 * (k // 256 - 1) if k > 256 else k + 32
    raw, ref = raw_matrix(ttype, n, k, seed=n + k)
    q = quant_tensor(raw, kernels.load(variant))
    x = torch.randn(m, k)
    expected = x @ ref.T
    got = q.matmul(x)
    # error relative to |x_m| |w_n|, the size of each dot product's terms (a single output
    # can cancel to near zero). fp16 scales of the repacked K-quants (d * sub-scale) round at
    # ~5e-4; the other formats are the file's own blocks and only the activations round.
    scale = x.norm(dim=1)[:, None] * ref.norm(dim=1)[None, :]
    worst = ((got - expected).abs() / scale).max().item()
    assert worst < (1e-3 if ttype in K_TYPES else 5e-5), worst


@pytest.mark.parametrize("ttype", ["Q4_0", "Q4_1", "Q8_0"])
def test_one_row_is_the_same_through_either_x8_kernel(ttype):
    """Decode's one activation row: sixteen rows at once in 512-bit vectors (Intel's default,
    kernels.single_row_x16) or eight at a time (AMD's): the same integer sums and float steps
    per output, so the same bits, and both exact to the reference; 40 rows end in a lone group."""
    k = kernels.load()
    raw, ref = raw_matrix(ttype, 40, 544)
    q = quant_tensor(raw, k)
    x = torch.randn(1, 544)
    try:
        k.set_single_row_x16(True)
        sixteen = q.matmul(x)
        k.set_single_row_x16(False)
        eight = q.matmul(x)
    finally:
        k.set_single_row_x16(kernels.single_row_x16())
    assert torch.equal(sixteen, eight)
    expected = x @ ref.T
    assert ((sixteen - expected).abs() / (x.norm() * ref.norm(dim=1))).max().item() < 5e-5


AMX = kernels.load().amx  # this CPU and build have AMX's tiles, and Linux granted them


@pytest.mark.skipif(not AMX, reason="no AMX on this CPU (Sapphire Rapids and later) or build")
@pytest.mark.parametrize("ttype", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("n,k,m", [(16, 544, 16), (40, 544, 37), (48, 1024, 70), (16, 32, 17)])
def test_prompt_rows_on_amx_are_the_512_bit_kernels_bits(ttype, n, k, m):
    """16 prompt rows at a time on AMX's int8 tiles (int16 activations as two byte planes):
    the same outputs, bit for bit, as the 512-bit kernel, and exact to the reference; rows
    beyond a multiple of 16 and a lone last row group go through the 512-bit kernel."""
    kern = kernels.load()
    raw, ref = raw_matrix(ttype, n, k, seed=m)
    q = quant_tensor(raw, kern)
    x = torch.randn(m, k)
    try:
        before = kern.amx_products()
        tiles = q.matmul(x)
        assert kern.amx_products() - before == m // 16 * 16 * (n // 16)  # whole 16 x 16 tiles only
        assert not kern.set_amx(False)
        vectors = q.matmul(x)
    finally:
        kern.set_amx(True)
    assert torch.equal(tiles, vectors)
    scale = x.norm(dim=1)[:, None] * ref.norm(dim=1)[None, :]
    assert ((tiles - x @ ref.T).abs() / scale).max().item() < 5e-5


def test_amx_can_be_turned_off_and_on_again():
    kern = kernels.load()
    try:
        assert kern.set_amx(False) is False and kern.amx is False
        assert kern.set_amx(True) is AMX
    finally:
        kern.set_amx(True)


@pytest.mark.parametrize("ttype,n", [("Q4_0", 16), ("Q8_0", 9), ("Q4_K", 3)])
def test_activation_rows_beyond_one_tile_are_right(ttype, n):
    """Many rows go through the kernels a tile at a time (512 KiB of int16 activations: 32
    rows of K = 8192), each tile against every weight row; 70 rows cross two tiles' ends."""
    raw, ref = raw_matrix(ttype, n, 8192)
    q = quant_tensor(raw, kernels.load())
    x = torch.randn(70, 8192)
    got = q.k.matmul(q.kernel_fmt, q.group, q.blocks, n, 8192, x)  # the integer kernels, whatever dense_rows says
    scale = x.norm(dim=1)[:, None] * ref.norm(dim=1)[None, :]
    assert ((got - x @ ref.T).abs() / scale).max().item() < 5e-5
    for start in (32, 64):  # a row's bits do not depend on the tile it falls in
        assert torch.equal(got[start:], q.k.matmul(q.kernel_fmt, q.group, q.blocks, n, 8192, x[start:]))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("ttype", ["Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("n,k,m", [(8, 256, 8), (24, 768, 9), (40, 512, 70), (16, 512, 11),
                                   (16, 2048, 136)])  # 136: tiles of 128 and 8 rows; 9, 70, 11: each tail of four (VNNI)
def test_k_quant_prompt_rows_are_the_decode_kernels_bits(variant, ttype, n, k, m):
    """From eight activation rows on, a K-quant matrix in its eight-row layout is unpacked once
    per super-block for all of them (qmatmul.c kx8_rows_dot) instead of once per four rows:
    the same integer sums and float steps, so each row is what it gives alone, bit for bit
    (one or two row groups at a time; rows past a 64-row block; a lone last group)."""
    kern = kernels.load(variant)
    raw, ref = raw_matrix(ttype, n, k, seed=m)
    q = quant_tensor(raw, kern)
    x = torch.randn(m, k)
    before = kern.kx8_unpacked_products()
    together = kern.matmul(q.kernel_fmt, q.group, q.blocks, n, k, x)  # the integer kernels, whatever dense_rows says
    assert kern.kx8_unpacked_products() - before == (m * n // 8 if variant != "portable" else 0)
    alone = torch.cat([kern.matmul(q.kernel_fmt, q.group, q.blocks, n, k, x[i:i + 1]) for i in range(m)])
    assert torch.equal(together, alone)
    scale = x.norm(dim=1)[:, None] * ref.norm(dim=1)[None, :]
    assert ((together - x @ ref.T).abs() / scale).max().item() < 5e-5


@pytest.mark.parametrize("ttype", TYPES)
@pytest.mark.parametrize("n", [50, 48])  # 48: Q4_0/Q4_1/Q8_0/Q5_0 in the x8 layout
def test_rows_of_the_runtime_blocks_equal_gguf_dequantization(ttype, n):
    raw, ref = raw_matrix(ttype, n, 256)
    q = quant_tensor(raw, kernels.load())
    ids = torch.tensor([0, 7, n - 1, 7, 9])
    atol = 1e-3 * ref.abs().max().item() if ttype in K_TYPES else 0.0  # fp16 d*sc, -dmin*m
    torch.testing.assert_close(q.rows(ids), ref[ids], rtol=1e-3 if atol else 0.0, atol=atol)


@pytest.mark.parametrize("ttype,n", [("Q4_0", 7), ("Q8_0", 9), ("Q4_K", 9), ("Q6_K", 15), ("F16", 8), ("BF16", 3),
                                     ("Q5_K", 9), ("Q5_1", 5), ("Q2_K", 8), ("Q3_K", 3), ("IQ4_XS", 16)])
def test_in_place_formats_do_not_copy_the_file_blocks(ttype, n):
    raw, _ = raw_matrix(ttype, n, 256)
    q = quant_tensor(raw, kernels.load())
    assert q.blocks.data_ptr() == raw.data.ctypes.data
    assert q.nbytes == raw.nbytes


@pytest.mark.parametrize("ttype", ["Q4_0", "Q4_1", "Q8_0"])
def test_x8_layout_holds_the_same_bytes_in_eight_row_groups(ttype):
    raw, ref = raw_matrix(ttype, 24, 256)
    original = raw.data.copy()
    q = quant_tensor(raw, kernels.load())
    assert q.fmt in kernels.X8_OF.values() and q.rows_per_block_row == 8
    assert q.blocks.shape == (3, 8 * raw.data.shape[1]) and q.nbytes == raw.nbytes  # no bigger than the file's
    assert sorted(q.blocks.numpy().ravel().tolist()) == sorted(original.ravel().tolist())
    assert np.array_equal(raw.data, original)  # an array in memory is never released (only read-only file maps)
    torch.testing.assert_close(q.rows(torch.arange(24)), ref, rtol=0, atol=0)


def x8_layout(blocks: np.ndarray, block_bytes: int, head: int) -> np.ndarray:
    """The x8 layout built byte by byte: per row group of 8 and block, the 8 rows' heads
    (d; Q4_1 d then m, 2 bytes each) then chunk c = bytes 2c, 2c + 1 of each row's weights."""
    n = blocks.shape[0]
    b = blocks.reshape(n // 8, 8, -1, block_bytes)  # [group, row, block, byte]
    parts = [b[:, :, :, h:h + 2].transpose(0, 2, 1, 3).reshape(n // 8, -1, 16) for h in range(0, head, 2)]
    qs = b[:, :, :, head:].reshape(n // 8, 8, b.shape[2], -1, 2)  # [group, row, block, chunk, 2]
    parts.append(qs.transpose(0, 2, 3, 1, 4).reshape(n // 8, b.shape[2], -1))
    return np.concatenate(parts, axis=2).reshape(n // 8, -1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("ttype,block_bytes,head", [("Q4_0", 18, 2), ("Q4_1", 20, 4), ("Q8_0", 34, 2)])
def test_x8_repack_puts_every_byte_where_the_layout_says(variant, ttype, block_bytes, head):
    """Each variant's repack (the AVX2 one transposes 8 x 8 two-byte values in registers)
    against the layout built in numpy, from rows further apart than their own length."""
    raw, _ = raw_matrix(ttype, 24, 288, seed=3)
    wide = np.zeros((24, raw.data.shape[1] + 40), dtype=np.uint8)
    wide[:, 5:5 + raw.data.shape[1]] = raw.data
    rows = torch.from_numpy(wide)[:, 5:5 + raw.data.shape[1]]  # row stride 40 bytes longer than a row
    fmt = {"Q4_0": kernels.FMT_Q4_0, "Q4_1": kernels.FMT_Q4_1, "Q8_0": kernels.FMT_Q8}[ttype]
    got = kernels.load(variant).repack_x8(fmt, rows, 288)
    assert np.array_equal(got.numpy(), x8_layout(raw.data, block_bytes, head))


def chunked(blocks: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Bytes start .. stop of each row's blocks ([2 groups, 8 rows, blocks, bytes]) as the x8
    layouts put them: chunk c = bytes 2c, 2c + 1 of each of the eight rows, 16 bytes at a time."""
    part = blocks[:, :, :, start:stop]
    g, _, nb, width = part.shape
    return part.reshape(g, 8, nb, width // 2, 2).transpose(0, 2, 3, 1, 4).reshape(g, nb, width * 8)


# per K-quant: (file bytes per 256, x8 bytes per 256, [(x8 offset, file bytes start, stop)] of the weights' bytes)
K_X8_LAYOUTS = {
    "Q4_K": (144, 1184, [(160, 16, 144)]),                      # qs by pairs of sub-blocks
    "Q5_K": (176, 1440, [(160, 48, 176), (1184, 16, 48)]),      # qs as Q4_K's, then qh
    "Q6_K": (210, 1680, [(144, 0, 32), (400, 32, 64), (656, 128, 160),       # half 0: ql[0:32], ql[32:64], qh[0:32]
                         (912, 64, 96), (1168, 96, 128), (1424, 160, 192)]),  # half 1
}


@pytest.mark.parametrize("ttype", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_x8_repack_is_the_same_bytes_in_every_variant(ttype):
    file_bytes, x8_bytes, parts = K_X8_LAYOUTS[ttype]
    raw, _ = raw_matrix(ttype, 16, 768, seed=4)
    rows = torch.from_numpy(raw.data)
    fmt = {"Q4_K": kernels.FMT_Q4_K, "Q5_K": kernels.FMT_Q5_K, "Q6_K": kernels.FMT_Q6_K}[ttype]
    packed = [kernels.load(v).repack_x8(fmt, rows, 768) for v in VARIANTS]
    assert all(torch.equal(p, packed[0]) for p in packed[1:])
    got = packed[0].numpy().reshape(2, 3, x8_bytes)
    blocks = raw.data.reshape(2, 8, 3, file_bytes)
    for at, start, stop in parts:  # every weight byte where the layout says
        assert np.array_equal(got[:, :, at:at + 8 * (stop - start)], chunked(blocks, start, stop)), (at, start)


@pytest.mark.parametrize("ttype,fmt", [("Q4_K", kernels.FMT_Q4_KX8), ("Q5_K", kernels.FMT_Q5_KX8),
                                       ("Q6_K", kernels.FMT_Q6_KX8)])
def test_k_quant_x8_layouts_keep_every_weight(ttype, fmt):
    """Q4_K and Q5_K decode their 6-bit scales and mins to bytes (4 bytes a row per 256 more);
    Q6_K keeps the file's size. Rows, products (integer kernels and the GEMM) as the file's."""
    from fastserve_edge.engine.quant import runtime_nbytes

    file_bytes, x8_bytes, _ = K_X8_LAYOUTS[ttype]
    raw, ref = raw_matrix(ttype, 16, 512)
    q = quant_tensor(raw, kernels.load())
    assert q.fmt == fmt and q.rows_per_block_row == 8
    assert q.nbytes == raw.nbytes // file_bytes * x8_bytes // 8 == runtime_nbytes(raw)
    torch.testing.assert_close(q.rows(torch.arange(16)), ref, rtol=1e-6, atol=1e-6)
    torch.manual_seed(3)
    x = torch.randn(min(q.dense_rows, 200) + 5, 512)
    for rows in (x[:1], x[:3], x):  # decode, a few rows (integer kernels); a prompt (the GEMM; with VNNI the integer rows)
        expected = rows @ ref.T
        tol = 1e-4 if len(rows) > 3 and q.dense_rows > len(rows) else 5e-5  # int16 rounding, the worst of 200 rows
        assert ((q.matmul(rows) - expected).abs().max() / expected.abs().max()).item() < tol


def test_file_pages_of_a_repacked_matrix_are_dropped_and_come_back(tmp_path):
    """Load repacks Q4_0 from a memory-mapped file and drops this process's pages of the
    original: RSS holds the copy instead of both. The file's bytes are still there to read."""
    from fastserve_edge.engine import quant

    raw, ref = raw_matrix("Q4_0", 4096, 256)  # 576 KiB: whole pages inside
    path = tmp_path / "blocks.bin"
    raw.data.tofile(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r").reshape(raw.data.shape)
    assert np.array_equal(mapped, raw.data)  # every page touched: resident

    def resident_kib() -> int:
        with open("/proc/self/smaps") as f:
            lines = f.read().split("\n")
        for i, line in enumerate(lines):
            if line.endswith(str(path)):
                return next(int(x.split()[1]) for x in lines[i + 1:] if x.startswith("Rss:"))
        raise AssertionError("mapping not found")

    before = resident_kib()
    q = quant_tensor(RawTensor("w", raw.qtype, raw.shape, mapped), kernels.load())
    assert quant._read_only_file_map(mapped) and q.fmt == kernels.FMT_Q4_0X8
    assert before > 500 and resident_kib() < 16, (before, resident_kib())
    assert np.array_equal(mapped, raw.data)  # read again: from the page cache
    torch.testing.assert_close(q.rows(torch.tensor([0, 4095])), ref[[0, 4095]], rtol=0, atol=0)


def test_embedding_and_tied_head_share_blocks():
    raw, ref = raw_matrix("Q8_0", 100, 64)
    emb = QuantEmbedding(quant_tensor(raw, kernels.load()))
    head = emb.as_linear()
    assert isinstance(head, QuantLinear) and head.weight is emb.weight
    ids = torch.tensor([[3, 99], [0, 1]])
    assert emb(ids).shape == (2, 2, 64)
    torch.testing.assert_close(emb(ids)[0, 1], ref[99])
    h = torch.randn(1, 3, 64)
    torch.testing.assert_close(head(h), h @ ref.T, rtol=1e-3, atol=1e-3)


def test_types_without_a_kernel_format_fall_back_to_dense():
    raw, _ = raw_matrix("F32", 4, 64)
    assert quant_tensor(raw, kernels.load()) is None
    raw, _ = raw_matrix("F16", 4, 40)  # rows no multiple of 32: not the kernels' unit
    assert quant_tensor(raw, kernels.load()) is None


def test_without_a_compiler_the_dense_torch_path_still_runs(tmp_path):
    """A machine without cc: the kernels are unavailable, a warning says so, the model runs."""
    code = (
        "import warnings, torch\n"
        "from fastserve_edge.engine import kernels\n"
        "from fastserve_edge.engine.quant import RuntimeWeights\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    assert kernels.load() is None\n"
        "assert any('kernels unavailable' in str(w.message) for w in seen)\n"
        "print('dense ok')\n"
    )
    env = {**os.environ, "FASTSERVE_HOME": str(tmp_path), "CC": "/nonexistent/cc", "PATH": "/nonexistent"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "dense ok" in result.stdout


def test_bad_arguments_are_refused_not_crashed():
    k = kernels.load()
    blocks = torch.zeros((2, 18), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="fs_qmatmul failed"):
        k.matmul(kernels.FMT_Q4_0, 32, blocks, 2, 33, torch.zeros(1, 33))


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_matrices_of_mixed_formats_equal_separate_products(variant):
    """q/k/v of a Q4_K_M file mix Q4_K and Q6_K: one call, each part as its own matmul."""
    from fastserve_edge.engine.quant import FusedLinear

    k = kernels.load(variant)
    parts = [raw_matrix(t, n, 512, seed=i) for i, (t, n) in enumerate([("Q4_K", 64), ("Q4_K", 32), ("Q6_K", 32)])]
    # Q6_K also in a repacked 16-group int8 format in other files: covered through Q5_0 (group 32)
    linears = [QuantLinear(quant_tensor(raw, k), torch.randn(raw.shape[0]) if i == 2 else None)
               for i, (raw, _) in enumerate(parts)]
    fused = FusedLinear(linears)
    assert fused.multi is not None
    x = torch.randn(1, 3, 512)  # few rows: the fused integer kernel
    for got, linear in zip(fused(x), linears):
        torch.testing.assert_close(got, linear(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("m", [1, 3])
def test_row_pairs_that_straddle_fused_matrices_are_right(variant, m):
    """Rows go through the kernel two at a time: odd row counts put a pair across two
    matrices of different formats, which must fall back to one row at a time."""
    from fastserve_edge.engine.quant import FusedLinear

    k = kernels.load(variant)
    parts = [raw_matrix(t, n, 96, seed=i) for i, (t, n) in enumerate([("Q4_0", 33), ("Q8_0", 7), ("Q4_1", 5), ("Q4_0", 2)])]
    fused = FusedLinear([QuantLinear(quant_tensor(raw, k)) for raw, _ in parts])
    x = torch.randn(m, 96)
    for got, (_, ref) in zip(fused(x), parts):
        scale = x.norm(dim=1)[:, None] * ref.norm(dim=1)[None, :]
        assert ((got - x @ ref.T).abs() / scale).max().item() < 5e-5


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("ttype", TYPES)
@pytest.mark.parametrize("n,k,m,start,count", [(40, 256, 13, 0, 40), (37, 512, 7, 5, 30), (48, 768, 1, 16, 24),
                                               (16, 256, 6, 0, 16), (56, 512, 20, 8, 41)])
def test_gemm_is_exact_to_the_dequantized_rows(variant, ttype, n, k, m, start, count):
    """The prefill GEMM (kernels/gemm.c) on odd shapes: rows of x not a multiple of its six,
    columns not of its sixteen, a slice of W's rows from an odd start (x8 groups split), K not a
    multiple of 256 for the 32-weight formats; written into a column slice of a wider matrix,
    the columns beside it untouched. fp32 sums of the format's own weights: exact to ~1e-6."""
    if ttype not in SUPER_BLOCK_TYPES:
        k += 32
    raw, ref = raw_matrix(ttype, n, k, seed=n + k + m)
    q = quant_tensor(raw, kernels.load(variant))
    x = torch.randn(m, k)
    wide = torch.full((m, count + 5), 7.0)
    q.gemm(x, start, count, wide[:, 2:2 + count])
    expected = x.double() @ ref[start:start + count].double().T
    scale = x.norm(dim=1)[:, None].double() * ref[start:start + count].norm(dim=1)[None, :].double()
    assert ((wide[:, 2:2 + count] - expected).abs() / scale).max().item() < 1e-6
    assert (wide[:, :2] == 7.0).all() and (wide[:, 2 + count:] == 7.0).all()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("ttype", ["Q4_0", "Q4_K", "Q6_K", "F16"])
def test_gemm_gives_each_row_its_bits_whatever_the_other_rows_and_the_threads(variant, ttype):
    """A row's result is the same chain of fused multiply-adds wherever it falls in the six-row
    panels, however many rows come with it and however the columns split among threads: packed
    prefills rely on it. K = 4352 crosses the 2048-long k blocks."""
    raw, _ = raw_matrix(ttype, 72, 4352)
    q = quant_tensor(raw, kernels.load(variant))
    x = torch.randn(23, 4352)
    whole = q.gemm(x, 0, 72, torch.empty(23, 72))
    for rows in (slice(0, 1), slice(5, 23), slice(7, 13)):
        assert torch.equal(q.gemm(x[rows], 0, 72, torch.empty(len(range(23)[rows]), 72)), whole[rows])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 3)
        assert torch.equal(q.gemm(x, 0, 72, torch.empty(23, 72)), whole)
    finally:
        torch.set_num_threads(threads)


def test_gemm_refuses_bad_arguments():
    k = kernels.load()
    raw, _ = raw_matrix("Q4_0", 8, 64)
    q = quant_tensor(raw, k)
    x, y = torch.randn(3, 64), torch.empty(3, 8)
    work = torch.empty(k.lib.fs_gemm_work_floats(3, 64, 1))
    def call(m, count, K, ldy, n_rows=8, w_bytes=q.blocks.numel()):
        return k.lib.fs_gemm(q.fmt, 32, q.blocks.data_ptr(), q.blocks.stride(0), 0, count, K, x.data_ptr(), m,
                             y.data_ptr(), ldy, work.data_ptr(), 1, n_rows, w_bytes)

    assert call(3, 8, 64, 8) == 0
    for bad in ((0, 8, 64, 8), (3, 0, 64, 8), (3, 8, 48, 8), (3, 8, 64, 4)):  # no rows, no columns, K % 32, ldy < count
        assert call(*bad) < 0, bad
    # more rows than the matrix holds, or fewer bytes behind the pointer than its rows take
    assert call(3, 8, 64, 8, n_rows=7) < 0 and call(3, 8, 64, 8, w_bytes=q.blocks.numel() - 1) < 0
    with pytest.raises(AssertionError):  # the binding checks shapes before C sees them
        k.gemm(q.fmt, 32, q.blocks, 0, 8, 64, x, torch.empty(3, 7))


@pytest.mark.parametrize("gemm", [True, False])
@pytest.mark.parametrize("ttype", ["Q4_0", "Q4_K", "Q6_K"])
def test_prefill_rows_take_the_gemm_or_dequantized_slices(monkeypatch, ttype, gemm):
    """Many rows: the kernels' GEMM, or on a build without it (an older revision's, as
    bench/kernels_ab.py loads) the matrix dequantized a slice at a time (here 3 rows) for
    torch's GEMM."""
    from fastserve_edge.engine import quant

    monkeypatch.setattr(quant, "SCRATCH_FLOATS", 3 * 256)
    raw, ref = raw_matrix(ttype, 10, 256)
    q = quant_tensor(raw, kernels.load())
    monkeypatch.setattr(q.k, "has_gemm", gemm)
    calls = {"gemm": 0, "dequant_rows": 0}
    for name in calls:
        real = getattr(q.k, name)
        monkeypatch.setattr(q.k, name, lambda *a, _real=real, _name=name, **kw: calls.__setitem__(_name, calls[_name] + 1) or _real(*a, **kw))
    x = torch.randn(quant.DENSE_PREFILL_ROWS + 3, 256)
    torch.testing.assert_close(q.matmul(x), x @ ref.T, rtol=1e-5, atol=1e-5)
    assert calls == ({"gemm": 1, "dequant_rows": 0} if gemm else {"gemm": 0, "dequant_rows": 4})


@pytest.mark.parametrize("ttype", ["Q4_0", "Q8_0", "Q4_K", "Q6_K", "Q5_K", "Q2_K", "Q3_K", "IQ4_XS", "F16"])
def test_each_format_switches_to_the_gemm_at_its_own_row_count(monkeypatch, ttype):
    """One row fewer than dense_rows: the integer kernels; dense_rows: the GEMM; both exact."""
    raw, ref = raw_matrix(ttype, 16, 256)
    q = quant_tensor(raw, kernels.load())
    if q.dense_rows > 1024:
        pytest.skip("x8 matrices with VNNI never take the GEMM")
    calls = []
    real = q.k.gemm
    monkeypatch.setattr(q.k, "gemm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for m, dense in ((q.dense_rows - 1, False), (q.dense_rows, True)):
        x = torch.randn(m, 256)
        calls.clear()
        torch.testing.assert_close(q.matmul(x), x @ ref.T, rtol=1e-4, atol=1e-4)
        assert bool(calls) == dense, m


@pytest.mark.parametrize("gemm", [True, False])
@pytest.mark.parametrize("gate_type,up_type", [("Q4_0", "Q4_0"), ("Q4_K", "Q6_K")])
def test_prefill_swiglu_runs_gate_and_up_a_column_slice_at_a_time(monkeypatch, gate_type, up_type, gemm):
    """SwiGLU at prefill, a slice of columns at a time so only the [M, F] result is ever whole:
    with the kernels' GEMM, gate whole into it and up 4 columns at a time (11 columns: 4 + 4 + 3);
    without, gate and up slices share the scratch buffer (2 x 3 rows: 4 slices, the last short)."""
    from fastserve_edge.engine import quant

    monkeypatch.setattr(quant, "SCRATCH_FLOATS", 2 * 3 * 256)
    monkeypatch.setattr(quant, "GEMM_COLUMNS", 4)
    (g_raw, g_ref), (u_raw, u_ref) = raw_matrix(gate_type, 11, 256, seed=1), raw_matrix(up_type, 11, 256, seed=2)
    gate, up = quant_tensor(g_raw, kernels.load()), quant_tensor(u_raw, kernels.load())
    monkeypatch.setattr(gate.k, "has_gemm", gemm)
    slices = []
    real = up.gemm
    monkeypatch.setattr(up, "gemm", lambda x, start, count, out: slices.append(count) or real(x, start, count, out))
    fused = quant.FusedLinear([QuantLinear(gate), QuantLinear(up)])
    x = torch.randn(2, quant.DENSE_PREFILL_ROWS // 2 + 3, 256)  # [B, S, K]: B * S rows take the GEMM path
    got = fused.swiglu(x)
    assert got.shape == (2, quant.DENSE_PREFILL_ROWS // 2 + 3, 11)
    expected = torch.nn.functional.silu(x @ g_ref.T) * (x @ u_ref.T)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert slices == ([4, 4, 3] if gemm else [])
    # below the threshold the caller computes gate and up itself (the integer kernels)
    assert fused.swiglu(x[:, :4]) is None


# --- int8 activations (--activations int8): llama.cpp's precision ----------------------------

INT8_TYPES = ["Q4_0", "Q4_1", "Q8_0", "Q5_0"]  # Q5_0 runs as Q8 blocks


def int8_activations(x: torch.Tensor) -> torch.Tensor:
    """x as the int8 kernels see it: per group of 32, round(x / d) * d with d = max |x| / 127."""
    groups = x.reshape(*x.shape[:-1], -1, 32)
    d = groups.abs().amax(-1, keepdim=True) / 127
    return (torch.round(groups / torch.where(d > 0, d, 1)) * d).reshape(x.shape)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("ttype", INT8_TYPES)
@pytest.mark.parametrize("n,k,m", [(1, 288, 1), (37, 480, 1), (37, 480, 5), (3, 800, 17),  # rows as in the file
                                   (16, 288, 1), (48, 480, 5), (24, 800, 17), (8, 32, 9)])  # x8 (n % 8 == 0)
def test_int8_activation_kernels_are_exact_to_int8_rounded_activations(variant, ttype, n, k, m):
    """With int8 activations, in either layout, the product is that of the int8-rounded x with the exact weights
    (to float rounding), which the int16 kernels are not: they keep x to ~1e-5."""
    assert_exact_to_int8_rounded_activations(variant, ttype, n, k, m)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("ttype", ["Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("n,k,m", [(8, 256, 1), (16, 512, 1), (24, 768, 2), (40, 1280, 5), (16, 512, 17)])
def test_k_quants_in_x8_layouts_take_int8_activations(variant, ttype, n, k, m):
    """K-quant matrices in the x8 layouts (kx8_dot8_n, q6kx8_dot8_n): 1 to 4 activation rows a pass and a
    tile of 17, each row its own scales per 32 (one group 50x the rest)."""
    assert_exact_to_int8_rounded_activations(variant, ttype, n, k, m)


def assert_exact_to_int8_rounded_activations(variant: str, ttype: str, n: int, k: int, m: int):
    raw, ref = raw_matrix(ttype, n, k, seed=n + k)
    q = quant_tensor(raw, kernels.load(variant), activations="int8")
    assert q.kernel_fmt == q.fmt | kernels.FMT_ACT8
    assert q.rows_per_block_row == (8 if n % 8 == 0 and q.k.x8 else 1)
    torch.manual_seed(n + k + m)
    x = torch.randn(m, k)
    x[0, :32] *= 50  # one group far larger than the rest: every group has its own scale
    expected = int8_activations(x) @ ref.T
    scale = x.norm(dim=1)[:, None] * ref.norm(dim=1)[None, :]
    assert ((q.matmul(x) - expected).abs() / scale).max().item() < 5e-6
    # the test tells them apart: int16 activations are not int8-rounded (~3e-4 off here)
    x = torch.randn(m, k)
    scale = x.norm(dim=1)[:, None] * ref.norm(dim=1)[None, :]
    int16 = quant_tensor(raw, kernels.load(variant))
    assert ((int16.matmul(x) - int8_activations(x) @ ref.T).abs() / scale).max().item() > 5e-5


@pytest.mark.parametrize("ttype", ["Q4_K", "Q6_K", "Q2_K", "Q3_K", "IQ4_XS"])
def test_k_quants_in_the_files_rows_keep_int16_activations_when_int8_is_asked(ttype):
    raw, ref = raw_matrix(ttype, 9, 512)  # 9 rows: no x8 layout
    q = quant_tensor(raw, kernels.load(), activations="int8")
    assert q.kernel_fmt == q.fmt
    x = torch.randn(2, 512)
    scale = x.norm(dim=1)[:, None] * ref.norm(dim=1)[None, :]
    assert ((q.matmul(x) - x @ ref.T).abs() / scale).max().item() < 5e-5


# --- Q6_K: int16 activations with one scale per 256 (qmatmul.c q6row) --------------------


def int16_per_256(x: torch.Tensor) -> torch.Tensor:
    """x as the Q6_K kernel sees it, in float64: per 256, round(x / d) * d with d = max |x| / 32767
    (d and x / d in float32, as the kernel computes them)."""
    groups = x.reshape(*x.shape[:-1], -1, 256)
    d = groups.abs().amax(-1, keepdim=True) / 32767
    q = torch.round(groups * torch.where(d > 0, 1 / d, 0))
    return (q.double() * d.double()).reshape(x.shape)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n,k,m", [(1, 256, 1), (37, 768, 1), (5, 1280, 3), (2, 512, 17)])
def test_q6_k_rows_are_exact_to_activations_rounded_per_256(variant, n, k, m):
    """Q6_K takes x as int16 with one scale per super-block, split into high and low bytes:
    the product is that of the rounded x with the exact weights, to float rounding. One
    value 10^4 times the rest makes every other value of its 256 round coarsely, so an
    int16 rounding per 32 (the other formats') would be ~1e-5 off here."""
    raw, ref = raw_matrix("Q6_K", n, k, seed=n + k)
    q = quant_tensor(raw, kernels.load(variant))
    torch.manual_seed(n + k + m)
    x = torch.randn(m, k)
    x[0, 0] = 1e4
    x[-1, 256:] = 0.0 if k > 256 else x[-1, 256:]  # whole super-blocks of zeros: scale 0
    got = q.matmul(x).double()
    scale = x.double().norm(dim=1)[:, None] * ref.double().norm(dim=1)[None, :]
    rounded = ((got - int16_per_256(x) @ ref.double().T).abs() / scale).max().item()
    exact = ((got - x.double() @ ref.double().T).abs() / scale).max().item()
    assert rounded < 1e-6, rounded
    assert exact > 4 * rounded, (exact, rounded)


def assert_exact_at_the_extremes(q, ref: torch.Tensor):
    """q . x against float64 for x all +1, all -1 and alternating (int16 +-32767, int8 +-127)."""
    x = torch.ones(3, ref.shape[1])
    x[1] = -1.0
    x[2, ::2] = -1.0
    expected = x.double() @ ref.T
    assert ((q.matmul(x).double() - expected).abs() / expected.abs().max()).max().item() < 1e-6


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n,activations", [(4, "int16"), (8, "int16"), (8, "int8")])  # 8: the x8 layout
def test_q6_k_integer_sums_do_not_overflow_at_the_extremes(variant, n, activations):
    """Every weight at q = 0 or 63 with scale -128 or 127, every activation at +-max (int16
    +-32767: high byte 127 / -128, low byte 255 / 1; int8 +-127): the byte products and a
    super-block's integer sums at their largest, against float64."""
    k = 2048
    blocks = np.zeros((n, k // 256, 210), np.uint8)
    for row, (qv, sc) in enumerate([(63, -128), (0, 127), (63, 127), (0, -128)] * (n // 4)):
        blocks[row, :, :192] = 0xFF if qv == 63 else 0  # ql: four low bits, qh: two high bits
        blocks[row, :, 192:208] = np.array(sc, np.int8).view(np.uint8)
        blocks[row, :, 208:210] = np.array([1.0], np.float16).view(np.uint8)
    data = blocks.reshape(n, -1)
    ref = torch.from_numpy(dequantize(data, GGMLQuantizationType.Q6_K).copy()).double()
    assert set(ref.unique().tolist()) == {-128 * 31.0, 127 * -32.0, 127 * 31.0, -128 * -32.0}
    q = quant_tensor(RawTensor("w", GGMLQuantizationType.Q6_K, (n, k), data), kernels.load(variant), activations)
    assert q.kernel_fmt & kernels.FMT_ACT8 == (kernels.FMT_ACT8 if activations == "int8" else 0)
    assert_exact_at_the_extremes(q, ref)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("activations", ["int16", "int8"])
@pytest.mark.parametrize("ttype,block_bytes", [("Q4_K", 144), ("Q5_K", 176)])
def test_q4_k_and_q5_k_integer_sums_do_not_overflow_at_the_extremes(variant, ttype, block_bytes, activations):
    """Every weight at its largest q (15, 31) with its fifth bit, every activation at +-max:
    int8's int16 sums of kx8_dot8_n's steps at their largest (Q5_K's 4 steps: 4 x 2 x 31 x 127
    = 31496), int16's (+-32767) int32 sums of kx8_dot_n, against float64.
    Scales and mins at 63 (every byte 0xff), d 1, dmin 1/64."""
    n, k = 8, 1024
    blocks = np.full((n, k // 256, block_bytes), 0xFF, np.uint8)
    blocks[:, :, 0:2] = np.array([1.0], np.float16).view(np.uint8)
    blocks[:, :, 2:4] = np.array([1 / 64], np.float16).view(np.uint8)
    data = blocks.reshape(n, -1)
    qtype = GGMLQuantizationType[ttype]
    ref = torch.from_numpy(dequantize(data, qtype).copy()).double()
    assert set(ref.unique().tolist()) == {63.0 * (15 if ttype == "Q4_K" else 31) - 63 / 64}
    q = quant_tensor(RawTensor("w", qtype, (n, k), data), kernels.load(variant), activations)
    assert q.kernel_fmt == q.fmt | (kernels.FMT_ACT8 if activations == "int8" else 0) and q.rows_per_block_row == 8
    assert_exact_at_the_extremes(q, ref)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("m", [1, 2, 4, 7])
def test_int8_and_int16_parts_in_one_call_and_m_rows_bit_for_bit(variant, m):
    """q/k/v of a Q4_K_M file asked for int8: some parts int8, some int16, pairs straddling
    them; each part equals its own product, and each of M rows the bits of that row alone."""
    k = kernels.load(variant)
    specs = [("Q4_0", 33), ("Q4_K", 3), ("Q8_0", 7), ("Q6_K", 2),  # at most 8 matrices a call
             ("Q4_0", 24), ("Q4_1", 8), ("Q5_K", 8), ("Q6_K", 16)]  # the last four in the x8 layout
    tensors = [quant_tensor(raw_matrix(t, n, 256, seed=i)[0], k, activations="int8") for i, (t, n) in enumerate(specs)]
    multi = k.multi([(q.kernel_fmt, q.group, q.blocks, q.shape[0]) for q in tensors], 256)
    x = torch.randn(m, 256)
    together = multi(x)
    for r in range(m):
        assert torch.equal(together[r], multi(x[r:r + 1])[0]), r
    start = 0
    for q in tensors:
        torch.testing.assert_close(together[:, start:start + q.shape[0]], q.matmul(x), rtol=1e-5, atol=1e-5)
        start += q.shape[0]


def test_int8_activations_are_refused_for_k_quants_in_the_files_rows_and_unknown_flags():
    k = kernels.load()
    blocks = torch.zeros((2, 144), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="fs_qmatmul failed"):
        k.matmul(kernels.FMT_Q4_K | kernels.FMT_ACT8, 256, blocks, 2, 256, torch.zeros(1, 256))
    with pytest.raises(RuntimeError, match="fs_qmatmul failed"):
        k.matmul(kernels.FMT_Q4_0 | 0x200, 32, torch.zeros((2, 18), dtype=torch.uint8), 2, 32, torch.zeros(1, 32))


def test_the_activation_precision_is_checked_and_int16_by_default(monkeypatch, tmp_path):
    from fastserve_edge.engine import quant
    from fastserve_edge.errors import ConfigError
    from fastserve_edge.models import open_model
    from tests.models_fixtures import write_tiny_gguf

    monkeypatch.setattr(quant, "_activations", "int16")  # the default, restored after the test
    source = open_model(write_tiny_gguf(tmp_path / "tiny.gguf", "llama", tensor_type="Q4_0"))
    assert quant.RuntimeWeights(source).linear("blk.0.attn_q").weight.kernel_fmt == kernels.FMT_Q4_0X8
    with pytest.raises(ConfigError, match="--activations must be one of int16, int8, got 'int4'"):
        quant.set_activations("int4")
    with pytest.raises(ConfigError, match="--activations must be one of"):
        quant.RuntimeWeights(source, activations="fp8")
    assert quant._activations == "int16"  # a refused value changes nothing
    quant.set_activations("int8")  # models loaded from now on
    weights = quant.RuntimeWeights(source)
    assert weights.linear("blk.0.attn_q").weight.kernel_fmt == kernels.FMT_Q4_0X8 | kernels.FMT_ACT8
    assert quant.RuntimeWeights(source, activations="int16").linear("blk.0.attn_q").weight.kernel_fmt == kernels.FMT_Q4_0X8


# --- the one-token glue (decode.c) against the torch formulas of model.py --------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_rmsnorm_and_swiglu_match_torch(variant):
    k = kernels.load(variant)
    x, w = torch.randn(3, 77), torch.randn(77)
    torch.testing.assert_close(k.rmsnorm(x, w, 1e-5), torch.nn.functional.rms_norm(x, (77,), w, 1e-5))
    gu = torch.randn(1, 2 * 45)
    torch.testing.assert_close(k.swiglu(gu), torch.nn.functional.silu(gu[:, :45]) * gu[:, 45:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_rope_rows_rotates_a_prompts_heads_in_place(variant):
    """Prefill's rope (fs_rope_rows) on q as the fused projection leaves it: rows 3 heads
    wide inside wider rows; the other columns stay as they were."""
    from fastserve_edge.engine.model import apply_rope

    k = kernels.load(variant)
    S, heads, hd = 5, 3, 10
    qkv = torch.randn(S, heads * hd + 7)
    angles = torch.randn(S, hd // 2).repeat(1, 2)
    cos, sin = angles.cos(), angles.sin()
    q = qkv[:, : heads * hd].view(S, heads, hd)
    expected = apply_rope(q.transpose(0, 1), cos, sin).transpose(0, 1)
    rest = qkv[:, heads * hd:].clone()
    k.rope_rows(q, cos, sin)
    torch.testing.assert_close(q, expected)
    assert torch.equal(qkv[:, heads * hd:], rest)
    with pytest.raises(RuntimeError, match="fs_rope_rows"):  # odd head size: no halves to rotate
        k.rope_rows(torch.randn(2, 1, 3), torch.randn(2, 3), torch.randn(2, 3))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("S,pos,n_heads,n_kv,hd", [(1, 0, 2, 2, 16), (7, 0, 6, 2, 32), (37, 20, 4, 1, 64),
                                                    (20, 3, 8, 8, 128), (64, 0, 4, 2, 64)])
def test_attend_rows_is_causal_attention_over_the_cache(variant, S, pos, n_heads, n_kv, hd):
    """A prompt's attention (attend.c) against torch's, after a cached prefix of `pos` tokens:
    row i sees keys 0 .. pos + i; keys past that in the cache (stale ones) are never read."""
    k = kernels.load(variant)
    cap = pos + S + 9
    kc, vc = torch.randn(n_kv, cap, hd).half(), torch.randn(n_kv, cap, hd).half()
    kc[:, pos + S:] = vc[:, pos + S:] = float("nan")  # a stale row read would poison the output
    q = torch.randn(S, n_heads * hd + 5)[:, : n_heads * hd].view(S, n_heads, hd)  # rows further apart
    mask = torch.ones(S, pos + S, dtype=torch.bool).tril(diagonal=pos)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None], kc[None, :, :pos + S].float(), vc[None, :, :pos + S].float(), attn_mask=mask,
        enable_gqa=n_heads != n_kv)
    got = k.attend_rows(q, kc, vc, pos)
    torch.testing.assert_close(got, ref[0].transpose(0, 1).reshape(S, -1), rtol=1e-5, atol=1e-5)


def test_attend_rows_refuses_what_it_cannot_do():
    k = kernels.load()
    kc = torch.zeros(2, 8, 16).half()
    with pytest.raises(RuntimeError, match="fs_attend_rows"):  # the prompt would end past the cache
        k.attend_rows(torch.randn(5, 2, 16), kc, kc, 4)
    kc24 = torch.zeros(2, 8, 24).half()
    with pytest.raises(RuntimeError, match="head size 24"):  # heads of 16 floats at a time
        k.attend_rows(torch.randn(3, 2, 24), kc24, kc24, 0)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("ttype", TYPES)
def test_rows_of_x_may_lie_apart(variant, ttype):
    """Prefill hands down its SwiGLU product as the gate columns of the fused gate/up output:
    rows 2F apart. Every format gives the bits of the same rows packed (16-bit float matrices
    take a packed copy)."""
    k = kernels.load(variant)
    q = quant_tensor(raw_matrix(ttype, 24, 512)[0], k)
    wide = torch.randn(9, 2 * 512)
    x = wide[:, :512]
    assert not x.is_contiguous() and k.strided  # the build reads x where it is
    got = k.matmul(q.kernel_fmt, q.group, q.blocks, 24, 512, x)
    assert torch.equal(got, k.matmul(q.kernel_fmt, q.group, q.blocks, 24, 512, x.contiguous()))


def test_each_calling_thread_has_its_own_workspace():
    """The quantized activations live in a buffer per calling thread, kept between calls:
    threads calling at once (a peer serving two hosts) and a short call after a long one
    get what a fresh process would. One call's is over the 16 MiB kept (18 MiB of int16 rows):
    handed back after it, and the next call allocates again."""
    import threading

    k = kernels.load()
    cases = [(quant_tensor(raw_matrix(t, n, kk, seed=n)[0], k), torch.randn(m, kk))
             for t, n, kk, m in [("Q4_0", 64, 1024, 300), ("Q6_K", 9, 512, 40), ("Q8_0", 24, 2048, 3),
                                 ("Q4_0", 8, 8192, 1100)]]
    expected = [q.k.matmul(q.kernel_fmt, q.group, q.blocks, q.shape[0], q.shape[1], x) for q, x in cases]
    got: dict[int, list[torch.Tensor]] = {}

    def run(i: int) -> None:
        order = cases[i:] + cases[:i]  # each thread in its own order: different sizes at the same time
        got[i] = [q.k.matmul(q.kernel_fmt, q.group, q.blocks, q.shape[0], q.shape[1], x) for q, x in order * 3]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, outs in got.items():
        for j, out in enumerate(outs):
            assert torch.equal(out, expected[(i + j) % len(cases)]), (i, j)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n_heads,n_kv,hd,pos", [(4, 4, 8, 0), (6, 2, 10, 5), (9, 3, 64, 300), (8, 2, 128, 40),
                                                 (32, 4, 128, 600), (16, 1, 64, 100), (12, 2, 64, 33), (7, 7, 16, 3)])
def test_attend_one_matches_rope_cache_and_sdpa(variant, n_heads, n_kv, hd, pos):
    """One token's attention: rope, its key and value into the cache, every head over its kv
    head's keys (grouped-query heads eight, four, two and one at a time in 256-bit vectors;
    a head size that is no multiple of 8 a head at a time)."""
    from fastserve_edge.engine.kv_cache import KVCache
    from fastserve_edge.engine.model import apply_rope

    k = kernels.load(variant)
    cap = pos + 7
    kc, vc = torch.randn(n_kv, cap, hd).half(), torch.randn(n_kv, cap, hd).half()  # the cache's dtype
    qkv = torch.randn(1, (n_heads + 2 * n_kv) * hd)
    angles = torch.randn(1, hd // 2).repeat(1, 2)
    cos, sin = angles.cos(), angles.sin()
    q = qkv[:, : n_heads * hd].view(1, 1, n_heads, hd).transpose(1, 2)
    kk = qkv[:, n_heads * hd: (n_heads + n_kv) * hd].view(1, 1, n_kv, hd).transpose(1, 2)
    v = qkv[:, (n_heads + n_kv) * hd:].view(1, 1, n_kv, hd).transpose(1, 2)
    q, kk = apply_rope(q, cos, sin), apply_rope(kk, cos, sin)
    kk, v = kk.half().float(), v.half().float()  # the new token's k and v are stored as half floats too
    keys = torch.cat([kc[None, :, :pos].float(), kk], dim=2)
    values = torch.cat([vc[None, :, :pos].float(), v], dim=2)
    ref = torch.nn.functional.scaled_dot_product_attention(q, keys, values, enable_gqa=n_heads != n_kv)
    out = k.attend_one(qkv.clone(), cos[0], sin[0], kc, vc, pos, n_heads, n_kv, hd)
    # C's rope may round a last float bit differently (fused multiply-add), and a key rounded
    # to fp16 can then land on the neighbouring half float: compare to half-float precision
    torch.testing.assert_close(out, ref.transpose(1, 2).reshape(-1), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(kc[:, pos].float(), kk[0, :, 0], rtol=2e-3, atol=2e-3)  # the token's key went into the cache, rotated
    torch.testing.assert_close(vc[:, pos].float(), v[0, :, 0])
    assert isinstance(KVCache(1, n_kv, hd, cap).layer(0, cap)[0], torch.Tensor)


def test_the_one_token_block_path_equals_the_torch_path(tmp_path):
    from fastserve_edge.engine.generate import local_stages
    from fastserve_edge.models import open_model
    from tests.models_fixtures import write_tiny_gguf

    for arch in ("llama", "qwen2", "qwen3"):  # qwen2: q/k/v biases; qwen3: per-head q/k norms
        source = open_model(write_tiny_gguf(tmp_path / f"{arch}.gguf", arch, tensor_type="Q4_0"))
        (whole,) = local_stages(source, max_tokens=32)  # one C call per block
        (glue,) = local_stages(source, max_tokens=32)   # the C glue between kernel calls from Python
        (slow,) = local_stages(source, max_tokens=32)   # torch ops between kernel calls
        assert all(b.program is not None for b in whole.stage.blocks)
        for block in glue.stage.blocks:
            block.program = None
        for block in slow.stage.blocks:  # ... and torch's norms and rope at prefill too
            block.glue = block.program = block.attn.kernels = None
            block.attn_norm.kernels = block.ffn_norm.kernels = None
        assert all(b.attn.kernels is not None and b.attn_norm.kernels is not None for b in glue.stage.blocks)
        prompt = torch.tensor([[1, 5, 9, 2]])
        expected = slow.forward("s", prompt, 0)
        for fast in (whole, glue):  # prefill: C rmsnorm and rope against torch's (another order of sums,
            got = fast.forward("s", prompt, 0)  # so an int16 activation may round the other way)
            assert (got - expected).abs().max() <= 3e-4 * expected.abs().max(), arch
            assert torch.equal(got.argmax(-1), expected.argmax(-1))
        for pos, token in enumerate([7, 3, 11], start=4):
            step = torch.tensor([[token]])
            b = slow.forward("s", step, pos)
            for fast in (whole, glue):
                a = fast.forward("s", step, pos)
                # the same math summed in another order; the int16 activation rounding can then
                # differ in a last bit, so compare as the engine tests do: relative to the logits' scale
                assert (a - b).abs().max() <= 1e-4 * b.abs().max(), arch
                assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_prefill_glue_in_c_equals_torchs_on_float_weights(tmp_path, arch):
    """Without activation rounding (F32 weights stay dense) the C norms and rope of a prompt
    are torch's arithmetic up to float rounding."""
    from fastserve_edge.engine.generate import local_stages
    from fastserve_edge.models import open_model
    from tests.models_fixtures import write_tiny_gguf

    source = open_model(write_tiny_gguf(tmp_path / f"{arch}.gguf", arch, tensor_type="F32"))
    (fast,) = local_stages(source, max_tokens=32)
    (slow,) = local_stages(source, max_tokens=32)
    assert all(b.attn.kernels is not None and b.ffn_norm.kernels is not None for b in fast.stage.blocks)
    for block in slow.stage.blocks:
        block.attn.kernels = block.attn_norm.kernels = block.ffn_norm.kernels = None
    prompt = torch.tensor([[1, 5, 9, 2, 4, 4]])
    expected = slow.forward("s", prompt, 0)
    assert (fast.forward("s", prompt, 0) - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("m", [2, 4, 7])
def test_m_rows_at_once_give_the_bits_of_one_row_at_a_time(variant, m):
    """The batched decode step relies on it: session r's row of an M-row product is the
    product of its row alone, bit for bit, for every format (and for the odd last row)."""
    k = kernels.load(variant)
    specs = [("Q4_0", 5), ("Q4_1", 6), ("Q8_0", 4), ("Q4_K", 3), ("Q6_K", 2), ("Q4_0", 16), ("Q4_1", 8), ("Q8_0", 24)]
    parts = [raw_matrix(t, n, 256, seed=i)[0] for i, (t, n) in enumerate(specs)]
    tensors = [quant_tensor(p, k) for p in parts]
    assert sum(q.rows_per_block_row == 8 for q in tensors) == 3  # the x8 layout after odd-sized ones
    multi = k.multi([(q.fmt, q.group, q.blocks, q.shape[0]) for q in tensors], 256)
    x = torch.randn(m, 256)
    together = multi(x)
    for r in range(m):
        assert torch.equal(together[r], multi(x[r:r + 1])[0]), r


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("ttype,activations", [("Q4_0", "int16"), ("Q8_0", "int16"), ("Q4_K", "int16"),
                                               ("Q5_K", "int16"), ("Q6_K", "int16"), ("Q5_1", "int16"),
                                               ("IQ4_XS", "int16"), ("F16", "int16"), ("Q4_0", "int8"),
                                               ("Q4_K", "int8"), ("Q5_K", "int8"), ("Q6_K", "int8")])
def test_a_mixtures_experts_in_two_calls_give_each_experts_own_bits(variant, ttype, activations):
    """A decode row's chosen experts: their gates and ups in one call, their downs (each on its
    own expert's hidden row, rows strided as the SwiGLU product leaves them) in another, bit
    for bit each expert's own calls, in the order the experts are given."""
    k = kernels.load(variant)
    dim, width, n_experts = 256, 256, 5

    def matrix(n, kk, seed):
        q = quant_tensor(raw_matrix(ttype, n, kk, seed=seed)[0], k, activations=activations)
        return (q.kernel_fmt, q.group, q.blocks, q.shape[0])

    gate_ups = [k.multi([matrix(width, dim, 3 * e), matrix(width, dim, 3 * e + 1)], dim) for e in range(n_experts)]
    downs = [k.multi([matrix(dim, width, 3 * e + 2)], width) for e in range(n_experts)]
    experts = kernels.ExpertMatmuls(k, gate_ups, downs)
    x = torch.randn(1, dim)
    for chosen in ([0, 2, 3], [4], [1, 0, 4, 3, 2]):
        order = np.array(chosen)
        gate_up = experts.gate_up(order, x)
        assert gate_up.shape == (len(chosen), 2 * width)
        for i, e in enumerate(chosen):
            assert torch.equal(gate_up[i], gate_ups[e](x)[0]), (chosen, e)
        hidden = torch.randn(len(chosen), 2 * width)[:, :width]  # every other row's floats: strided
        out = experts.down(order, hidden)
        for i, e in enumerate(chosen):
            assert torch.equal(out[i], downs[e](hidden[i:i + 1])[0]), (chosen, e)


def test_experts_calls_refuse_what_does_not_fit():
    k = kernels.load("native")
    q = quant_tensor(raw_matrix("Q8_0", 64, 64)[0], k)
    gate_up = k.multi([(q.kernel_fmt, q.group, q.blocks, 64), (q.kernel_fmt, q.group, q.blocks, 64)], 64)
    down = k.multi([(q.kernel_fmt, q.group, q.blocks, 64)], 64)
    experts = kernels.ExpertMatmuls(k, [gate_up] * 20, [down] * 20)
    assert experts.fits(16) and not experts.fits(17)  # 2 matrices an expert, 32 a call
    with pytest.raises(ValueError, match="17 experts"):
        experts.gate_up(np.arange(17) % 20, torch.randn(1, 64))
    with pytest.raises(ValueError, match="hidden"):
        experts.down(np.array([0, 1]), torch.randn(3, 64))  # a row per expert
    with pytest.raises(ValueError, match="hidden"):
        experts.down(np.array([0]), torch.randn(1, 128)[:, ::2])  # a row's floats not side by side
    narrow = k.multi([(q.kernel_fmt, q.group, q.blocks, 32)], 64)
    with pytest.raises(ValueError, match="differ in shape"):
        kernels.ExpertMatmuls(k, [gate_up, gate_up], [down, narrow])
    # the C entry checks its arguments too: downs of different heights in one call
    fmts = (ctypes.c_int * 2)(q.kernel_fmt, q.kernel_fmt)
    groups = (ctypes.c_int * 2)(32, 32)
    ptrs = (ctypes.c_void_p * 2)(q.blocks.data_ptr(), q.blocks.data_ptr())
    strides = (ctypes.c_long * 2)(q.blocks.stride(0), q.blocks.stride(0))
    ns = (ctypes.c_int * 2)(64, 32)
    nbytes = (ctypes.c_long * 2)(q.blocks.numel(), q.blocks.numel())
    x, y = torch.randn(2, 64), torch.empty(2, 64)
    assert k.lib.fs_qmatmul_each(2, fmts, groups, ptrs, strides, ns, 64, x.data_ptr(), 64, y.data_ptr(), 1, nbytes) < 0
    ns[1] = 64
    assert k.lib.fs_qmatmul_each(2, fmts, groups, ptrs, strides, ns, 64, x.data_ptr(), 64, y.data_ptr(), 1, nbytes) == 0
    assert torch.equal(y[1], down(x[1:2])[0])


def test_a_batched_decode_step_gives_each_session_its_own_step_bit_for_bit(tmp_path):
    from fastserve_edge.engine.generate import local_stages
    from fastserve_edge.models import open_model
    from tests.models_fixtures import write_tiny_gguf

    for arch in ("llama", "qwen2", "qwen3"):
        source = open_model(write_tiny_gguf(tmp_path / f"{arch}.gguf", arch, tensor_type="Q4_0"))
        (batched,) = local_stages(source, max_tokens=64)
        (alone,) = local_stages(source, max_tokens=64)
        (fallback,) = local_stages(source, max_tokens=64)  # no C block program: sessions one by one
        for block in fallback.stage.blocks:
            block.program = None
        prompts = {"a": [1, 5, 9], "b": [2, 4, 6, 8, 10, 12], "c": [3]}  # different lengths: own positions
        for stage in (batched, alone, fallback):
            for sid, ids in prompts.items():
                stage.forward(sid, torch.tensor([ids]), 0)
        positions = [len(ids) for ids in prompts.values()]
        for step, tokens in enumerate([[7, 3, 11], [13, 2, 5]]):
            pos = [p + step for p in positions]
            got = batched.forward_batch(list(prompts), torch.tensor(tokens), pos)
            assert got.shape == (3, source.config.vocab_size)
            for r, sid in enumerate(prompts):
                assert torch.equal(got[r], alone.forward(sid, torch.tensor([[tokens[r]]]), pos[r])[0]), (arch, sid)
            torch.testing.assert_close(fallback.forward_batch(list(prompts), torch.tensor(tokens), pos), got)


def test_packed_prefills_give_each_session_its_own_prefill_bit_for_bit(tmp_path):
    """Pipeline.first_tokens packs the prompts long enough for the GEMM path into one forward:
    each session's logits and the KV it leaves are those of its prefill alone, bit for bit,
    at position 0 and after a cached prefix; a short prompt beside them runs alone."""
    from fastserve_edge.engine.generate import Pipeline, Prefill, local_stages
    from fastserve_edge.engine.quant import DENSE_PREFILL_ROWS
    from fastserve_edge.engine.sampling import Sampler, SamplingParams
    from fastserve_edge.models import open_model
    from tests.models_fixtures import write_tiny_gguf

    n = DENSE_PREFILL_ROWS
    # Q4_0: the integer kernels; F32: dense torch weights, a head whose GEMM differs by row count
    for arch, ttype in (("llama", "Q4_0"), ("qwen2", "Q4_0"), ("qwen3", "Q4_0"), ("llama", "F32")):
        source = open_model(write_tiny_gguf(tmp_path / f"{arch}-{ttype}.gguf", arch, tensor_type=ttype))
        (packed,) = local_stages(source, max_tokens=4 * n)
        (alone,) = local_stages(source, max_tokens=4 * n)
        vocab = source.config.vocab_size
        ids = {"a": [(7 * i) % vocab for i in range(n)], "b": [(3 * i + 1) % vocab for i in range(n + 9)]}
        for stage in (packed, alone):  # "b" has a cached prefix of 5 tokens: it goes on from there
            stage.forward("b", torch.tensor([ids["b"][:5]]), 0)
        feeds = [("a", ids["a"], 0), ("b", ids["b"][5:], 5)]
        got = packed.forward_packed([s for s, _, _ in feeds], [torch.tensor(x) for _, x, _ in feeds],
                                    [p for _, _, p in feeds])
        for (sid, x, pos), logits in zip(feeds, got):
            assert torch.equal(logits, alone.forward(sid, torch.tensor([x]), pos)[0]), (arch, ttype, sid)
            end = pos + len(x)
            for layer in range(len(packed.stage.blocks)):
                assert torch.equal(packed._cache(sid).k[layer][:, :, :end], alone._cache(sid).k[layer][:, :, :end])
                assert torch.equal(packed._cache(sid).v[layer][:, :, :end], alone._cache(sid).v[layer][:, :, :end])

    greedy = SamplingParams(temperature=0, repeat_penalty=1.0)
    together = Pipeline(source.config, local_stages(source, max_tokens=4 * n), 4 * n)
    one_by_one = Pipeline(source.config, local_stages(source, max_tokens=4 * n), 4 * n)
    prompts = {"a": ids["a"], "b": ids["b"], "short": [1, 2, 3]}
    calls = []
    stage = together.stages[0]
    original = stage.forward_packed
    stage.forward_packed = lambda sessions, xs, positions: calls.append(list(sessions)) or original(sessions, xs, positions)
    firsts = together.first_tokens([Prefill(s, x, 0, Sampler(greedy), x) for s, x in prompts.items()])
    assert calls == [["a", "b"]]  # the short one ran alone
    assert firsts == [one_by_one.next_token(s, x, 0, Sampler(greedy), x) for s, x in prompts.items()]


@pytest.mark.parametrize("vendor,family,split", [("AuthenticAMD", "25", True), ("AuthenticAMD", "26", False),
                                                 ("GenuineIntel", "6", False)])
def test_cpus_that_split_512_bit_vectors_build_without_the_512_bit_x8_kernels(monkeypatch, vendor, family, split):
    fields = {"vendor_id": vendor, "cpu family": family}
    monkeypatch.setattr(kernels, "_cpu_field", fields.__getitem__)
    assert kernels.half_width_512() is split
    assert ("-DFS_NO_X16" in kernels._flags("native")) is split
    assert "-DFS_NO_X16" not in kernels._flags("avx2")


def test_cpu_fields_come_from_proc_cpuinfo():
    assert kernels._cpu_field("no such field") == ""
    if "processor" in CPU_FLAGS:
        assert kernels._cpu_field("processor") == "0"


@pytest.mark.parametrize("variant", VARIANTS)
def test_where_prefill_switches_to_dequantize_and_gemm(variant):
    """x8 matrices stay on the integer kernels at any length where they have VNNI (they beat the
    GEMM there); elsewhere each format switches where the GEMM measured faster (quant.py)."""
    from fastserve_edge.engine import quant

    k = kernels.load(variant)
    x8 = quant.NEVER_DENSE if k.x8_vnni else 48
    expected = {"Q4_0": x8, "Q4_1": x8, "Q8_0": quant.NEVER_DENSE if k.x8_vnni else quant.DENSE_PREFILL_ROWS,
                "Q4_K": x8, "Q6_K": x8, "Q5_K": x8, "Q5_1": 32, "F16": 48, "BF16": 48,
                "Q2_K": 32, "Q3_K": 32, "IQ4_XS": 32}
    for ttype, rows in expected.items():
        q = quant_tensor(raw_matrix(ttype, 16, 256)[0], k)
        assert q.dense_rows == rows, ttype
    for ttype in ("Q4_K", "Q5_K", "Q6_K"):  # int8 activations: their kernels unpack per 2-4 rows, so the GEMM stays
        assert quant_tensor(raw_matrix(ttype, 16, 256)[0], k, "int8").dense_rows == 48, ttype
    in_file_order = {"Q4_0": quant.DENSE_PREFILL_ROWS, "Q4_K": 32, "Q5_K": 32, "Q6_K": 96}  # 50 rows: no x8 layout
    for ttype, rows in in_file_order.items():
        assert quant_tensor(raw_matrix(ttype, 50, 256)[0], k).dense_rows == rows, ttype
    assert k.x8_vnni == (variant == "native" and " avx512_vnni " in CPU_FLAGS and " avx512vl " in CPU_FLAGS)


def mapping_flags(address: int) -> set[str]:
    """VmFlags of the mapping of this process holding `address` (/proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(v, 16) for v in head.split("-"))
            inside = start <= address < end
        elif inside and head == "VmFlags:":
            return set(line.split()[1:])
    return set()


THP = open("/sys/kernel/mm/transparent_hugepage/enabled").read() if os.path.exists(
    "/sys/kernel/mm/transparent_hugepage/enabled") else ""


@pytest.mark.skipif("[never]" in THP or not THP, reason="transparent huge pages are off on this kernel")
def test_a_large_x8_copy_lands_in_huge_pages():
    """The repack asks for 2 MiB pages where the copy covers them whole (a 1B model's load:
    ~300 page faults instead of ~140k); what it writes is the same bytes either way. Whether the
    kernel grants them depends on how fragmented its memory is (CI got none once), so the test
    checks the request: the mapping is marked `hg` (MADV_HUGEPAGE)."""
    rows = torch.randint(0, 256, (4096, 2048 // 32 * 18), dtype=torch.uint8)  # Q4_0 blocks: 9 MiB
    k = kernels.load()
    out = k.repack_x8(kernels.FMT_Q4_0, rows, 2048)
    assert "hg" in mapping_flags(out.data_ptr() + out.numel() // 2)
    assert torch.equal(out, kernels.load("portable").repack_x8(kernels.FMT_Q4_0, rows, 2048))
