"""Q2_K, Q3_K and IQ4_XS multiplied in place (qmatmul.c row_dot), against gguf's own
dequantization: random valid blocks (every bit pattern of quants and scales), odd shapes,
decode's one row, a few rows, and the prefill GEMM; a tiny model file of each type; and
blocks too short for their shape refused before any kernel reads them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType
from gguf.quants import dequantize

from fastserve_edge.engine import kernels
from fastserve_edge.engine.generate import LocalStage, local_stages
from fastserve_edge.engine.model import Stage
from fastserve_edge.engine.quant import FusedLinear, QuantLinear, RuntimeWeights, quant_tensor, runtime_nbytes
from fastserve_edge.errors import ModelFormatError
from fastserve_edge.models import open_model
from fastserve_edge.models.tensors import RawTensor
from tests import models_fixtures as mf

CPU_FLAGS = open("/proc/cpuinfo").read()
VARIANTS = ["portable"] + (["avx2"] if " avx2 " in CPU_FLAGS else []) + ["native"]
SMALL = ["Q2_K", "Q3_K", "IQ4_XS"]
FMT = {"Q2_K": kernels.FMT_Q2_K, "Q3_K": kernels.FMT_Q3_K, "IQ4_XS": kernels.FMT_IQ4_XS}
BLOCK_BYTES = {"Q2_K": 84, "Q3_K": 110, "IQ4_XS": 136}  # per 256 weights (ggml-common.h)
# the int16 activations (per 32, |x| / 32767) against exact weights: the existing formats' bound
# (test_kernels), relative to |x_m| |w_n|, the size of each dot product's terms
INT16_TOL = 5e-5


def random_matrix(ttype: str, n: int, k: int, seed: int) -> tuple[RawTensor, torch.Tensor]:
    """Random valid blocks [n, k] and gguf's dequantization of them (float32)."""
    data = mf.random_blocks(ttype, n, k, np.random.default_rng(seed))
    reference = torch.from_numpy(dequantize(data, QType[ttype]).copy()).float()
    return RawTensor("w", QType[ttype], (n, k), data), reference


def quantized_matrix(ttype: str, n: int, k: int, seed: int) -> tuple[RawTensor, torch.Tensor]:
    """Gaussian weights through models_fixtures' quantizer (the other formats' test matrices)."""
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.05
    data, qtype = mf.quantize_tensor(w, ttype)
    return RawTensor("w", qtype, (n, k), data), torch.from_numpy(dequantize(data, qtype).copy()).float()


def worst(got: torch.Tensor, x: torch.Tensor, ref: torch.Tensor) -> float:
    expected = x.double() @ ref.double().T
    scale = x.double().norm(dim=1)[:, None] * ref.double().norm(dim=1)[None, :]
    return ((got.double() - expected).abs() / scale).max().item()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("ttype", SMALL)
@pytest.mark.parametrize("n,k", [(1, 256), (7, 768), (13, 2816), (33, 256), (8, 512)])
def test_matvec_and_matmul_match_gguf_dequantization(variant, ttype, n, k):
    """One row (decode), a few rows (the integer kernel), dense_rows and more (the GEMM)."""
    raw, ref = random_matrix(ttype, n, k, seed=n * k)
    q = quant_tensor(raw, kernels.load(variant))
    assert q.fmt == FMT[ttype] and q.group == 256 and q.rows_per_block_row == 1
    assert q.blocks.data_ptr() == raw.data.ctypes.data and q.nbytes == raw.nbytes == n * k // 256 * BLOCK_BYTES[ttype]
    torch.manual_seed(n + k)
    for m in (1, 3, q.dense_rows - 1):  # the integer kernels
        x = torch.randn(m, k)
        assert worst(q.matmul(x), x, ref) < INT16_TOL, m
    for m in (q.dense_rows, q.dense_rows + 7):  # the fp32 GEMM over rows dequantized on the fly
        x = torch.randn(m, k)
        assert worst(q.matmul(x), x, ref) < 1e-6, m


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("ttype", SMALL)
def test_rows_dequantize_exactly_as_gguf(variant, ttype):
    """The embedding's rows and the GEMM's panels: every weight bit for bit (d * sc * q is
    exact in float32 for these formats' few bits)."""
    raw, ref = random_matrix(ttype, 21, 768, seed=5)
    q = quant_tensor(raw, kernels.load(variant))
    ids = torch.tensor([0, 20, 7, 7, 13])
    assert torch.equal(q.rows(ids), ref[ids])
    assert torch.equal(q.rows(torch.arange(21)), ref)


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_row_through_the_integer_kernel_is_exact_to_its_int16_activations(variant):
    """Per 32 values x rounds to int16 (d = max |x| / 32767): with those activations the kernel's
    product is the exact one to float rounding, for each format. One group 10^4 times the
    others: every group has its own scale."""
    torch.manual_seed(0)
    x = torch.randn(1, 2816)
    x[0, 32:64] *= 1e4
    groups = x.reshape(1, -1, 32)
    d = groups.abs().amax(-1, keepdim=True) / 32767
    rounded = (torch.round(groups / d) * d.double()).reshape(x.shape)
    for ttype in SMALL:
        raw, ref = random_matrix(ttype, 9, 2816, seed=1)
        got = quant_tensor(raw, kernels.load(variant)).matmul(x).double()
        scale = x.double().norm() * ref.double().norm(dim=1)
        assert ((got - rounded @ ref.double().T).abs() / scale).max().item() < 2e-7, ttype


def extreme_blocks(ttype: str, rows: int, k: int) -> np.ndarray:
    """Every weight at its format's largest integer magnitude: Q2_K q = 3 at scale 15 (and min
    15); Q3_K q - 4 = -4 at scale -32 (128 in the int16 lane); IQ4_XS level -127 at scale -32."""
    blocks = np.zeros((rows, k // 256, BLOCK_BYTES[ttype]), np.uint8)
    one = np.array([1.0], np.float16).view(np.uint8)
    if ttype == "Q2_K":
        blocks[:, :, :80] = 0xFF  # scales (scale | min << 4) and qs
        blocks[:, :, 80:82] = blocks[:, :, 82:84] = one
    elif ttype == "Q3_K":
        blocks[:, :, 108:110] = one  # hmask 0: q - 4; qs 0; scales 0: -32
    else:
        blocks[:, :, 0:2] = one  # scales 0: -32; nibbles 0: level -127
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("ttype", SMALL)
def test_integer_sums_do_not_overflow_at_the_extremes(variant, ttype):
    """Weights at the format's extremes against activations at +-32767 (x = +-1): a group's
    int32 lanes at their largest, against float64."""
    k = 2048
    data = extreme_blocks(ttype, 2, k)
    ref = torch.from_numpy(dequantize(data, QType[ttype]).copy()).double()
    assert ref.abs().unique().tolist() == [{"Q2_K": 30.0, "Q3_K": 128.0, "IQ4_XS": 4064.0}[ttype]]
    q = quant_tensor(RawTensor("w", QType[ttype], (2, k), data), kernels.load(variant))
    x = torch.ones(3, k)
    x[1] = -1.0
    x[2, ::2] = -1.0
    expected = x.double() @ ref.T
    assert ((q.matmul(x).double() - expected).abs() / (ref.abs().sum(dim=1))).max().item() < 1e-6


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("m", [1, 2, 5])
def test_fused_parts_of_mixed_formats_and_m_rows_bit_for_bit(variant, m):
    """q/k/v or gate/up of a Q3_K_M-style file mix formats in one call: row pairs straddle the
    parts (odd counts), each part equals its own product, each of M rows the bits of that row
    alone (a batched decode step relies on it)."""
    k = kernels.load(variant)
    specs = [("Q2_K", 7), ("Q3_K", 5), ("IQ4_XS", 3), ("Q4_K", 2), ("Q3_K", 1), ("Q6_K", 3)]
    parts = [(random_matrix if t in SMALL else quantized_matrix)(t, n, 512, seed=i) for i, (t, n) in enumerate(specs)]
    linears = [QuantLinear(quant_tensor(raw, k)) for raw, _ in parts]
    fused = FusedLinear(linears)
    assert fused.multi is not None
    torch.manual_seed(m)
    x = torch.randn(m, 512)
    outs = fused(x)
    for got, linear, (_, ref) in zip(outs, linears, parts):
        assert torch.equal(got, linear(x))
        assert worst(got, x, ref) < INT16_TOL
    together = fused.multi(x)
    for r in range(m):
        assert torch.equal(together[r], fused.multi(x[r:r + 1])[0]), r


@pytest.mark.parametrize("ttype,rel_rms", [("Q2_K", 0.4), ("Q3_K", 0.22), ("IQ4_XS", 0.1)])
def test_the_fixtures_quantizers_write_blocks_close_to_the_weights(ttype, rel_rms):
    """models_fixtures' round-to-nearest quantizers (the tiny models' weights): gguf decodes
    what they write close to the float weights (Gaussian weights, plain rounding)."""
    w = np.random.default_rng(0).standard_normal((16, 768)).astype(np.float32) * 0.05
    data, qtype = mf.quantize_tensor(w, ttype)
    assert qtype == QType[ttype] and data.shape == (16, 3 * BLOCK_BYTES[ttype])
    back = dequantize(data, qtype)
    assert np.sqrt(np.mean((back - w) ** 2)) < rel_rms * np.sqrt(np.mean(w ** 2))


# --- a tiny model file of each type ----------------------------------------------------------

K_DIMS = {"dim": 256, "ffn_dim": 512, "n_heads": 4, "n_kv_heads": 2}  # 256-wide super-blocks
VOCAB = 512


def dense_stage(source, max_tokens: int) -> LocalStage:
    """The same model with every weight dequantized to fp32 by gguf (no kernels): the oracle."""
    weights = RuntimeWeights(source, quantized=False)
    return LocalStage(Stage(source.config, weights, 0, source.config.n_layers, max_tokens=max_tokens))


@pytest.mark.parametrize("ttype", SMALL)
def test_a_tiny_model_file_of_each_type_loads_in_place_and_generates(tmp_path, ttype):
    path = mf.write_tiny_gguf(tmp_path / f"{ttype}.gguf", "llama", tensor_type=ttype, vocab_size=VOCAB, seed=3,
                              **K_DIMS)
    source = open_model(path)
    assert source.tensor("blk.0.ffn_down.weight").qtype == QType[ttype]
    assert source.quantization == {"Q2_K": "Q2_K", "Q3_K": "Q3_K_M", "IQ4_XS": "IQ4_XS"}[ttype]
    weights = RuntimeWeights(source)
    for name in ("blk.0.attn_v", "blk.1.ffn_down", "blk.1.ffn_gate"):  # (llama q, k: an unpermuted copy)
        raw = source.tensor(f"{name}.weight")
        q = weights.linear(name).weight
        assert q.fmt == FMT[ttype] and q.blocks.data_ptr() == raw.data.ctypes.data  # the file's own bytes
        assert runtime_nbytes(raw) == raw.nbytes
    (ours,) = local_stages(source, max_tokens=64)
    oracle = dense_stage(source, max_tokens=64)
    ids = torch.tensor([[1, 17, 300, 5, 42, 9, 200, 11]])
    got, expected = ours.forward("s", ids, 0), oracle.forward("s", ids, 0)
    assert torch.isfinite(got).all() and expected.std() > 0.1
    assert (got - expected).norm() / expected.norm() < 1e-3  # int16 activations and float order only
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    for pos, token in enumerate([7, 3, 11, 250], start=ids.shape[1]):  # decode: one row at a time
        step = torch.tensor([[token]])
        a, b = ours.forward("s", step, pos), oracle.forward("s", step, pos)
        assert (a - b).norm() / b.norm() < 1e-3
        assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_a_long_prompt_takes_the_gemm_and_agrees_with_the_dense_oracle(tmp_path):
    """A prompt of dense_rows tokens and more runs the fp32 GEMM over dequantized slices: the
    same logits (to the activations' rounding) as the dense oracle."""
    path = mf.write_tiny_gguf(tmp_path / "q3.gguf", "qwen3", tensor_type="Q3_K", embed_type="IQ4_XS",
                              vocab_size=VOCAB, seed=4, **K_DIMS)
    source = open_model(path)
    (ours,) = local_stages(source, max_tokens=128)
    oracle = dense_stage(source, max_tokens=128)
    ids = torch.tensor([[(11 * i + 3) % VOCAB for i in range(80)]])
    got, expected = ours.forward("s", ids, 0), oracle.forward("s", ids, 0)
    assert (got - expected).norm() / expected.norm() < 1e-3
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


# --- hostile: bytes short for the shape ------------------------------------------------------

@pytest.mark.parametrize("ttype", SMALL)
def test_blocks_short_for_their_shape_are_refused(tmp_path, ttype):
    """A row one byte short (a truncated or forged part): the layout check names the rows and
    bytes the shape takes; through the runtime weights, a ModelFormatError naming the tensor."""
    raw, _ = random_matrix(ttype, 6, 512, seed=2)
    row = 2 * BLOCK_BYTES[ttype]
    short = RawTensor(raw.name, raw.qtype, raw.shape, np.ascontiguousarray(raw.data[:, :-1]))
    with pytest.raises(ValueError, match=f"is not 6 rows of {row} bytes, what {ttype} \\[6, 512\\] takes"):
        quant_tensor(short, kernels.load())
    few = RawTensor(raw.name, raw.qtype, raw.shape, np.ascontiguousarray(raw.data[:5]))  # a row missing
    with pytest.raises(ValueError, match=f"is not 6 rows of {row} bytes"):
        quant_tensor(few, kernels.load())
    with pytest.raises(ValueError, match=f"not a whole number of {ttype} blocks of 256"):
        quant_tensor(RawTensor(raw.name, raw.qtype, (6, 288), raw.data), kernels.load())

    path = mf.write_tiny_gguf(tmp_path / "m.gguf", "llama", tensor_type=ttype, vocab_size=VOCAB, **K_DIMS)
    source = open_model(path)
    good = source.tensor("blk.1.ffn_up.weight")
    cut = RawTensor(good.name, good.qtype, good.shape, np.ascontiguousarray(good.data[:, :-2]))

    class Cut:  # the file's model with one tensor cut short, as a peer might be sent it
        config = source.config

        def tensor(self, name):
            return cut if name == good.name else source.tensor(name)

        def has(self, name):
            return source.has(name)

        def names(self):
            return source.names()

    with pytest.raises(ModelFormatError, match=r"blk\.1\.ffn_up\.weight: .*rows of .* bytes"):
        local_stages(Cut(), max_tokens=8)


@pytest.mark.parametrize("ttype", SMALL)
def test_a_file_that_ends_inside_a_tensor_of_these_types_is_refused(tmp_path, ttype):
    """The file's last tensor of the type one byte short of what its shape takes (and the
    tensors after it gone): refused when the file is opened, not when a kernel reads."""
    import gguf

    path = mf.write_tiny_gguf(tmp_path / "m.gguf", "llama", tensor_type=ttype, vocab_size=VOCAB, **K_DIMS)
    last = max((t for t in gguf.GGUFReader(path).tensors if t.tensor_type == QType[ttype]), key=lambda t: t.data_offset)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:last.data_offset + last.n_bytes - 1])
    with pytest.raises(ModelFormatError, match=f"truncated.*{last.name}"):
        open_model(cut)


@pytest.mark.parametrize("ttype", SMALL)
def test_the_kernels_refuse_sizes_their_bytes_do_not_hold(ttype):
    """Below the Python checks: every entry point is told the bytes behind the pointer and
    refuses a row count, K or stride that would read past them."""
    k = kernels.load()
    raw, _ = random_matrix(ttype, 4, 512, seed=0)
    blocks = torch.from_numpy(raw.data)
    fmt, x = FMT[ttype], torch.zeros(1, 512)
    assert k.lib.fs_row_bytes(fmt, 512) == 2 * BLOCK_BYTES[ttype]
    assert k.lib.fs_row_bytes(fmt, 288) == -1  # no whole number of super-blocks
    with pytest.raises(RuntimeError, match="fs_qmatmul failed"):
        k.matmul(fmt, 256, blocks, 5, 512, x)  # one row more than the bytes hold
    with pytest.raises(RuntimeError, match="fs_qmatmul failed"):
        k.matmul(fmt, 256, blocks[:, :-1], 4, 512, x)  # rows one byte shorter than K takes
    with pytest.raises(RuntimeError, match="fs_qmatmul failed"):
        k.matmul(fmt, 32, blocks, 4, 512, x)  # a group other than the super-block
    with pytest.raises(RuntimeError, match="fs_qmatmul failed"):
        k.matmul(fmt | kernels.FMT_ACT8, 256, blocks, 4, 512, x)  # int8 activations: not for these
    with pytest.raises(RuntimeError, match="fs_dequant_rows failed"):
        k.dequant_rows(fmt, 256, blocks[:, :-1], 512, None)
    with pytest.raises(IndexError):
        k.dequant_rows(fmt, 256, blocks, 512, torch.tensor([4]))
    work = torch.empty(k.lib.fs_gemm_work_floats(1, 512, 1))
    y = torch.empty(1, 4)
    assert k.lib.fs_gemm(fmt, 256, blocks.data_ptr(), blocks.stride(0), 0, 4, 512, x.data_ptr(), 1, y.data_ptr(),
                         4, work.data_ptr(), 1, 4, blocks.numel() - 1) < 0
