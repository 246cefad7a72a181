"""File format -> runtime weight. The only place that decides how a weight lives in memory.

The decoder (model.py) asks a `RuntimeWeights` for "the linear called blk.3.attn_q" and gets
an nn.Module with `forward(x: [..., in]) -> [..., out]`; it never sees a file format.

Runtime formats (kernels/qmatmul.c does the arithmetic):
    GGUF Q5_1, Q3_K, Q2_K,  used in place: the memory-mapped blocks (16-bit rows) are the weights
         IQ4_XS, F16, BF16
    GGUF Q4_0, Q4_1, Q8_0,  the same blocks, eight rows interleaved (x8) when the row count is a
         Q4_K, Q5_K, Q6_K   multiple of 8 (Q4_K and Q5_K with their 6-bit scales decoded: +2.8%,
                            +2.3%): copied once at load, and this process's pages of the file are
                            dropped, so memory holds the copy instead (not as well); in place
                            otherwise
    Q5_0                    repacked to Q8_0 blocks (q - 16 fits int8; exact), then as Q8_0
    everything else         dense fp32 (F32 and types without a kernel), as without a compiler
Quantized weights never exist as an fp32 copy; the embedding table dequantizes only the
rows it looks up, and a tied LM head shares the same blocks.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QType
from gguf.quants import dequantize
from torch import nn

from fastserve_edge.engine import kernels, memory
from fastserve_edge.models.config import ModelConfig
from fastserve_edge.errors import ConfigError, ModelFormatError
from fastserve_edge.models.tensors import ModelSource, RawTensor, block_rows, check_layout

REPACK_CHUNK_ROWS = 512  # rows repacked at a time: bounds the float temporaries
DENSE_PREFILL_ROWS = 192  # from this many rows on every format takes the fp32 GEMM (kernels/gemm.c:
                          # weights dequantized on the fly) rather than the integer kernels
                          # (packed prefills rely on it); Q8_0 (x8) and the 32-weight formats in
                          # the file's row order switch here. Q8_0's integer kernel reads 8-bit
                          # weights as they are: at 1 thread it still beat the GEMM at 128 rows.
# Where the GEMM wins earlier: rows from which it beat the integer kernels at 1 and 2 threads
# on Zen 3 (AVX2, no VNNI), 8192 x 2048 and SmolLM2's 1536 x 576 and 576 x 1536 (gemm/int):
DENSE_PREFILL_ROWS_OF = {
    kernels.FMT_Q4_0X8: 48, kernels.FMT_Q4_1X8: 48, kernels.FMT_Q4_KX8: 48,  # 1.1-1.4x at 48; 0.6-0.9x at 16
    kernels.FMT_Q5_KX8: 48, kernels.FMT_Q6_KX8: 48,  # as Q4_K's x8: the same GEMM panels; their own switch point not measured
    kernels.FMT_Q4_K: 32, kernels.FMT_Q5_K: 32, kernels.FMT_Q5_1: 32,  # rows decoded once per row: 1.5-1.7x at 32
    kernels.FMT_Q6_K: 96,  # its integer kernel takes 32 products an instruction: 1.2-1.3x at 96, 0.8-1.0x at 64
    # decoded once per row as Q5_K; not measured: Q5_K's row count
    kernels.FMT_Q2_K: 32, kernels.FMT_Q3_K: 32, kernels.FMT_IQ4_XS: 32,
    kernels.FMT_F16: 48, kernels.FMT_BF16: 48,  # an fp32 fma per weight either way: 1.25x at 48, 0.9x at 32
}
K_QUANT_X8 = (kernels.FMT_Q4_KX8, kernels.FMT_Q5_KX8, kernels.FMT_Q6_KX8)
NEVER_DENSE = 1 << 62  # x8 matrices on kernels with AVX-512 VNNI: the integer kernels win at any
                       # length (one 8192 x 2048 Q4_0 matrix, 512 rows, 1 thread on Zen 5: 140-150
                       # GMAC/s against the 512-bit GEMM's ~80; a 1B Q4_0's 512 tokens at 2 threads
                       # 55-67 tok/s against 38-53 on Zen 4, in 256-bit vectors there; K-quants through
                       # kx8_rows_dot's vpdpwssd on Zen 4, 8192 x 2048 and 2048 x 8192, 64 and 512
                       # rows: 1.3-1.5x the GEMM at 1 and 2 threads, 70-75 GMAC/s a core),
                       # so every prompt, alone or packed, takes them (each row its own bits either way)


ACTIVATIONS = ("int16", "int8")  # what the integer kernels quantize x to (qmatmul.c): int16 keeps
                                 # SmolLM2's logits within ~6e-4 of fp32; int8 is llama.cpp's choice,
                                 # ~4e-2 on SmolLM2's logits; 1.2x int16's decode on Zen 5 (rows),
                                 # 0.8-1.0x on Zen 4 (x8) where int16 takes 256-bit vpdpwssd; K-quant
                                 # matrices in x8 layouts on an AVX2 EPYC, one core: Q4_K 1.1x, Q5_K 1.5x,
                                 # Q6_K 1.1x (a 1B's matrices from memory; the models 0.95-1.15x)
INT8_FORMATS = (kernels.FMT_Q4_0, kernels.FMT_Q4_1, kernels.FMT_Q8,  # K-quants only in x8 layouts
                kernels.FMT_Q4_0X8, kernels.FMT_Q4_1X8, kernels.FMT_Q8X8) + K_QUANT_X8
_activations = "int16"  # for RuntimeWeights made from now on (set_activations)


def checked_activations(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ConfigError(f"--activations must be one of {', '.join(ACTIVATIONS)}, got {name!r}")
    return name


def set_activations(name: str) -> str:
    """The kernels' activation precision for models loaded from now on in this process (like
    torch's thread count, a setting of the machine's run: --activations)."""
    global _activations
    _activations = checked_activations(name)
    return name


GEMM_ROWS = 512  # rows of x per kernels.gemm call: its packed copy of x stays within 16 MiB (K = 8192)
GEMM_COLUMNS = 128  # the columns it dequantizes at a time per thread (gemm.c NC)
SCRATCH_FLOATS = 4 << 20  # 16 MiB of dequantized rows at a time during prefill (at most one
                          # matrix: 3.5 MiB on SmolLM2); 4 MiB made a 1B model's prefill 20% slower


class _Scratch(threading.local):
    """An fp32 buffer shared by every QuantLinear of a thread: holds a slice of one dequantized
    matrix (or the same slice of gate and up, QuantTensor.swiglu) at a time during prefill (a
    thread runs one forward at a time; the machines of an in-process tensor-parallel group are
    threads, each with its own)."""

    def __init__(self) -> None:
        self.buffer = torch.empty(0)

    def take(self, n: int, k: int) -> torch.Tensor:
        if self.buffer.numel() < n * k:
            self.buffer = torch.empty(n * k)
        return self.buffer[: n * k].view(n, k)


SCRATCH = _Scratch()


class DenseLinear(nn.Module):
    """y = x @ W.T (+ b), W dequantized at load: [out, in]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


def check_ids(ids: torch.Tensor, vocab: int) -> None:
    """IndexError unless every id is in [0, vocab): ids come from peers and callers, and
    index a table (a kernel reads the row in place)."""
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"token ids must be integers, got {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        bad = ids[(ids < 0) | (ids >= vocab)].reshape(-1)[0]
        raise IndexError(f"token id {int(bad)} is outside the vocabulary [0, {vocab})")


class DenseEmbedding(nn.Module):
    """Rows of the token table [vocab, D]."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        check_ids(ids, self.weight.shape[0])
        return F.embedding(ids, self.weight).float()

    def as_linear(self) -> DenseLinear:
        """Tied head: the same table used as the LM head (shared storage, no copy)."""
        return DenseLinear(self.weight)


def _whole_block_rows(rows: int, per: int) -> int:
    """`rows` rounded down to a multiple of `per` (at least one block row)."""
    return max(per, rows // per * per)


class QuantTensor:
    """A matrix [N, K] as rows of quantized blocks: blocks uint8 [N, K / group * block_bytes]."""

    def __init__(self, blocks: torch.Tensor, fmt: int, group: int, shape: tuple[int, int], k: kernels.Kernels,
                 activations: str = "int16"):
        self.blocks, self.fmt, self.group, self.shape, self.k = blocks, fmt, group, shape, k
        # x8 formats: each row of `blocks` holds a group of eight matrix rows
        self.rows_per_block_row = 8 if fmt in kernels.X8_OF.values() else 1
        # the format as the integer kernels take it: with int8 activations where the format has them
        self.kernel_fmt = fmt | kernels.FMT_ACT8 if activations == "int8" and fmt in INT8_FORMATS else fmt
        # from this many rows on, the GEMM (matmul) rather than the integer kernel
        self.dense_rows = DENSE_PREFILL_ROWS_OF.get(fmt, DENSE_PREFILL_ROWS)
        if self.rows_per_block_row == 8 and k.x8_vnni and (fmt not in K_QUANT_X8 or self.kernel_fmt == fmt):
            self.dense_rows = NEVER_DENSE  # K-quants with int16 activations (kx8_rows_dot; the int8 ones re-unpack)

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x: [M, K] float32 -> [M, N]. Few rows: integer kernel; many: the kernels' fp32 GEMM
        (weights dequantized on the fly), or on a build without it torch's GEMM over a
        dequantized slice of rows at a time."""
        n, k = self.shape
        if x.shape[0] < self.dense_rows:
            return self.k.matmul(self.kernel_fmt, self.group, self.blocks, n, k, x)
        y = torch.empty((x.shape[0], n))
        if self.k.has_gemm:
            return self.gemm(x, 0, n, y)
        step = _whole_block_rows(SCRATCH_FLOATS // k, self.rows_per_block_row)
        for start in range(0, n, step):  # a slice of rows at a time keeps the buffer small
            count = min(step, n - start)
            w = self.k.dequant_rows(self.fmt, self.group, self._slice(start, count), k, None,
                                    out=SCRATCH.take(count, k))
            y[:, start:start + count] = F.linear(x, w)
        return y

    def gemm(self, x: torch.Tensor, start: int, count: int, out: torch.Tensor) -> torch.Tensor:
        """out [M, count] = x [M, K] . W[start:start + count].T through the kernels' fp32 GEMM
        (kernels/gemm.c: the rows dequantized on the fly), GEMM_ROWS rows of x at a time."""
        for m0 in range(0, x.shape[0], GEMM_ROWS):
            self.k.gemm(self.fmt, self.group, self.blocks, start, count, self.shape[1], x[m0:m0 + GEMM_ROWS],
                        out[m0:m0 + GEMM_ROWS])
        return out

    def _slice(self, start: int, count: int) -> torch.Tensor:
        """The blocks of matrix rows start .. start + count (whole block rows)."""
        per = self.rows_per_block_row
        assert start % per == 0 and (count % per == 0 or start + count == self.shape[0])
        return self.blocks[start // per:-(-(start + count) // per)]

    def swiglu(self, up: QuantTensor, x: torch.Tensor) -> torch.Tensor:
        """silu(x @ self.T) * (x @ up.T) for prefill (x: [M, K], M >= both dense_rows), a
        slice of output columns at a time, so only the [M, F] result is ever whole (not a
        second [M, F] for up): gate whole into the result and up a slice at a time in the
        scratch buffer (kernels' GEMM), or gate and up slices side by side in it (torch's)."""
        n, k = self.shape
        assert up.shape == self.shape and x.shape[0] >= max(self.dense_rows, up.dense_rows)
        out = torch.empty((x.shape[0], n))
        if self.k.has_gemm and up.k.has_gemm:
            step = max(GEMM_COLUMNS, SCRATCH_FLOATS // x.shape[0] // GEMM_COLUMNS * GEMM_COLUMNS)
            self.gemm(x, 0, n, out)
            for start in range(0, n, step):
                count = min(step, n - start)
                gate = out[:, start:start + count]
                torch.mul(F.silu(gate, inplace=True), up.gemm(x, start, count, SCRATCH.take(x.shape[0], count)), out=gate)
            return out
        # both slices together hold no more than one whole matrix (SmolLM2's 3.5 MiB stays 3.5)
        per = max(self.rows_per_block_row, up.rows_per_block_row)  # whole block rows of both
        step = _whole_block_rows(min(SCRATCH_FLOATS // (2 * k), (n + 1) // 2), per)
        for start in range(0, n, step):
            count = min(step, n - start)
            both = SCRATCH.take(2 * count, k)
            self.k.dequant_rows(self.fmt, self.group, self._slice(start, count), k, None, out=both[:count])
            self.k.dequant_rows(up.fmt, up.group, up._slice(start, count), k, None, out=both[count:])
            gate_up = F.linear(x, both)
            torch.mul(F.silu(gate_up[:, :count], inplace=True), gate_up[:, count:], out=out[:, start:start + count])
        return out

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows [len(ids), K]."""
        return self.k.dequant_rows(self.fmt, self.group, self.blocks, self.shape[1], ids)


class QuantLinear(nn.Module):
    def __init__(self, weight: QuantTensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = weight
        self.register_buffer("bias", bias, persistent=False)
        self.out_features, self.in_features = weight.shape

    def one_call(self) -> kernels.MultiMatmul | None:
        """This matrix as the kernels' one-call form (for a whole block in C), if it has no bias."""
        if self.bias is not None:
            return None
        q = self.weight
        return q.k.multi([(q.kernel_fmt, q.group, q.blocks, q.shape[0])], self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and self.bias is None and x.dtype == torch.float32:  # one-token path: [1, K]
            return self.weight.matmul(x)
        lead = x.shape[:-1]
        y = self.weight.matmul(x.reshape(-1, self.in_features).float())
        if self.bias is not None:
            y += self.bias
        return y.reshape(*lead, self.out_features)


class FusedLinear(nn.Module):
    """Several linears reading the same x (q/k/v; gate/up): returns a tuple of their outputs.

    With quantized weights one kernel call quantizes x once and computes all of them in one
    parallel region; otherwise (dense weights, or prefill) each part runs on its own."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.sizes = [p.out_features for p in parts]
        self.in_features = parts[0].in_features
        quant = [p for p in parts if isinstance(p, QuantLinear)]
        self.multi, self.dense_rows = None, DENSE_PREFILL_ROWS
        if len(quant) == len(parts):
            w = [p.weight for p in quant]
            self.multi = w[0].k.multi([(q.kernel_fmt, q.group, q.blocks, q.shape[0]) for q in w], self.in_features)
            self.dense_rows = min(q.dense_rows for q in w)  # from here on the parts run separately
        biases = [p.bias if p.bias is not None else torch.zeros(p.out_features) for p in parts]
        self.bias = torch.cat(biases) if any(p.bias is not None for p in parts) else None

    def project(self, row: torch.Tensor) -> torch.Tensor:
        """One row [1, K] -> [1, sum of outputs], the parts side by side (biases added)."""
        y = self.multi(row)
        if self.bias is not None:
            y += self.bias
        return y

    def swiglu(self, x: torch.Tensor) -> torch.Tensor | None:
        """silu(gate(x)) * up(x) of a quantized [gate, up] pair at prefill (QuantTensor.swiglu),
        or None: one token, dense weights, biases (the caller takes the outputs instead)."""
        rows = x.reshape(-1, self.in_features)
        if len(self.parts) != 2 or self.bias is not None:
            return None
        gate, up = (getattr(p, "weight", None) for p in self.parts)
        if not isinstance(gate, QuantTensor) or not isinstance(up, QuantTensor) or gate.shape != up.shape:
            return None
        if rows.shape[0] < max(gate.dense_rows, up.dense_rows):
            return None
        return gate.swiglu(up, rows.float()).reshape(*x.shape[:-1], gate.shape[0])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        if self.multi is None or rows.shape[0] >= self.dense_rows:
            return tuple(p(x) for p in self.parts)  # each part on its own path
        outs = self.multi(rows.float()).split(self.sizes, dim=-1)
        return tuple((o if p.bias is None else o + p.bias).reshape(*lead, o.shape[-1])
                     for o, p in zip(outs, self.parts))


class QuantEmbedding(nn.Module):
    def __init__(self, weight: QuantTensor):
        super().__init__()
        self.weight = weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        check_ids(ids, self.weight.shape[0])
        return self.weight.rows(ids).reshape(*ids.shape, self.weight.shape[1])

    def as_linear(self) -> QuantLinear:
        return QuantLinear(self.weight)


# --- GGUF blocks -> runtime blocks ----------------------------------------------------------

def _fp16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(*values.shape, 2)


def _repack_by_division(raw: np.ndarray, qtype: QType, scale: np.ndarray, group: int) -> np.ndarray:
    """Blocks whose weights are scale * small integer -> int8 blocks of `group` (fp16 scale)."""
    rows = raw.shape[0]
    w = dequantize(raw, qtype).reshape(rows, -1, group)
    safe = np.where(scale == 0, 1.0, scale)[..., None]
    q = np.rint(w / safe).astype(np.int8)
    out = np.empty((rows, q.shape[1], 2 + group), dtype=np.uint8)
    out[..., 0:2] = _fp16_bytes(scale)
    out[..., 2:] = q.view(np.uint8)
    return out.reshape(rows, -1)


def _repack_q5_0(raw: np.ndarray) -> np.ndarray:
    d = raw.reshape(raw.shape[0], -1, 22)[..., 0:2].copy().view(np.float16).astype(np.float32)[..., 0]
    return _repack_by_division(raw, QType.Q5_0, d, 32)


IN_PLACE = {
    QType.Q4_0: (kernels.FMT_Q4_0, 32), QType.Q4_1: (kernels.FMT_Q4_1, 32),
    QType.Q8_0: (kernels.FMT_Q8, 32), QType.Q4_K: (kernels.FMT_Q4_K, 256), QType.Q6_K: (kernels.FMT_Q6_K, 256),
    QType.F16: (kernels.FMT_F16, 32), QType.BF16: (kernels.FMT_BF16, 32),  # group: K a multiple of 32
    QType.Q5_K: (kernels.FMT_Q5_K, 256), QType.Q5_1: (kernels.FMT_Q5_1, 32),
    QType.Q2_K: (kernels.FMT_Q2_K, 256), QType.Q3_K: (kernels.FMT_Q3_K, 256), QType.IQ4_XS: (kernels.FMT_IQ4_XS, 256),
}
REPACKED = {
    QType.Q5_0: (kernels.FMT_Q8, 32, _repack_q5_0),
}


def runtime_nbytes(raw: RawTensor) -> int:
    """Bytes `raw` takes once loaded (what a machine must hold for it): the planner's unit."""
    elements = int(np.prod(raw.shape))
    if isinstance(raw.data, np.ndarray) and len(raw.shape) == 2:
        if raw.qtype in IN_PLACE and raw.shape[1] % IN_PLACE[raw.qtype][1] == 0:
            fmt = IN_PLACE[raw.qtype][0]
            if fmt in kernels.X8_OF and raw.shape[0] % 8 == 0:  # quant_tensor's x8 copy (Q4_K: decoded scales)
                return raw.shape[0] // 8 * kernels.x8_group_bytes(fmt, raw.shape[1])
            return raw.nbytes
        if raw.qtype in REPACKED:
            return elements // 32 * 34
    return elements * 4  # dense fp32 (vectors, float matrices, formats without a kernel)


def quant_tensor(raw: RawTensor, k: kernels.Kernels, activations: str = "int16") -> QuantTensor | None:
    """The runtime form of a quantized GGUF matrix, or None when it has none (use dense).
    The blocks' row count and stride come from the qtype and logical shape (block_rows), never
    from the array as it arrived: ValueError when the data is not exactly that."""
    if not isinstance(raw.data, np.ndarray) or len(raw.shape) != 2:
        return None
    check_layout(raw)
    if raw.qtype in IN_PLACE:
        fmt, group = IN_PLACE[raw.qtype]
        if raw.shape[1] % group != 0:
            return None  # a 16-bit float matrix whose rows are no multiple of 32 (the kernels' unit)
        blocks = kernels.as_uint8_rows(raw.data)
        assert tuple(blocks.shape) == block_rows(raw.qtype, raw.shape)  # [N, bytes per row], check_layout's
    elif raw.qtype in REPACKED:
        fmt, group, repack = REPACKED[raw.qtype]
        data = np.asarray(raw.data)
        parts = [repack(data[i:i + REPACK_CHUNK_ROWS]) for i in range(0, data.shape[0], REPACK_CHUNK_ROWS)]
        blocks = torch.from_numpy(np.concatenate(parts))
    else:
        return None
    if fmt in kernels.X8_OF and raw.shape[0] % 8 == 0 and k.x8:
        interleaved = k.repack_x8(fmt, blocks, raw.shape[1])
        if _read_only_file_map(raw.data):
            k.release_file_pages(raw.data)  # the copy replaces the file's pages in memory, not adds to them
        return QuantTensor(interleaved, kernels.X8_OF[fmt], group, raw.shape, k, activations)
    return QuantTensor(blocks, fmt, group, raw.shape, k, activations)


def _read_only_file_map(data: object) -> bool:
    """A numpy view of a file opened read-only with np.memmap (gguf.py): its pages can be
    dropped and come back from the file. Anything else (arrays, torch tensors) would lose data."""
    return isinstance(data, np.memmap) and data.mode == "r" and getattr(data, "_mmap", None) is not None


class RuntimeWeights:
    """Hands the decoder its weights by canonical name, converted once, cached for tying."""

    def __init__(self, source: ModelSource, dtype: torch.dtype = torch.float32, *, quantized: bool = True,
                 variant: str = "native", activations: str | None = None):
        self.source = source
        self.config: ModelConfig = source.config  # every tensor's shape is checked against it
        self.dtype = dtype
        self.activations = checked_activations(activations) if activations is not None else _activations
        self.kernels = kernels.load(variant) if quantized else None
        memory.release_large_frees()  # a process that runs a model gives back prefill's activations
        self._embedding: nn.Module | None = None

    def has(self, name: str) -> bool:
        return self.source.has(name)

    def _raw(self, name: str) -> RawTensor:
        """The tensor `name`, checked: its shape is the one the config gives it, and its data
        is exactly that shape in its format. ModelFormatError otherwise (before any kernel or
        allocation sees it)."""
        raw = self.source.tensor(name)
        want = self.config.weight_shape(name)
        if want is not None and tuple(raw.shape) != want:
            c = self.config
            raise ModelFormatError(
                f"tensor {name} has shape {list(raw.shape)}, but the model's config (dim {c.dim}, {c.n_heads} heads "
                f"of {c.head_dim}, {c.n_kv_heads} kv heads, ffn {c.ffn_dim}, vocabulary {c.vocab_size}) gives it "
                f"{list(want)}: the model file is corrupt or was converted wrongly; download or convert it again")
        try:
            check_layout(raw)
        except ValueError as err:
            raise ModelFormatError(f"tensor {name}: {err}; the model file (or the part a peer was sent) is corrupt: "
                                   "download it again") from None
        return raw

    def vector(self, name: str) -> torch.Tensor:
        """Norm weights and biases: always fp32, they are tiny and sensitive."""
        return self._raw(name).to_float(torch.float32)

    def _quant(self, raw: RawTensor) -> QuantTensor | None:
        return quant_tensor(raw, self.kernels, self.activations) if self.kernels is not None else None

    def linear(self, name: str, *, bias: bool = False) -> nn.Module:
        raw = self._raw(f"{name}.weight")
        b = self.vector(f"{name}.bias") if bias else None
        q = self._quant(raw)
        return QuantLinear(q, b) if q is not None else DenseLinear(raw.to_float(self.dtype), b)

    def fused(self, names: list[str], *, bias: bool = False) -> FusedLinear:
        return FusedLinear([self.linear(name, bias=bias) for name in names])

    def embedding(self) -> nn.Module:
        if self._embedding is None:
            raw = self._raw("token_embd.weight")
            q = self._quant(raw)
            self._embedding = QuantEmbedding(q) if q is not None else DenseEmbedding(raw.to_float(self.dtype))
        return self._embedding

    def head(self, tied: bool) -> nn.Module:
        return self.embedding().as_linear() if tied else self.linear("output")
