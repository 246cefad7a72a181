"""Tiny random-weight models on disk, and the transformers oracle that reads them back.

The builders write the same model two ways from one seed:

- `write_tiny_gguf`: a GGUF file laid out the way llama.cpp's `convert_hf_to_gguf.py` writes it
  (tensor names, metadata keys, the q/k row permutation for `llama`, `rope_freqs` for llama3
  rope scaling, 1-D tensors kept F32), in any of F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q5_K/Q6_K,
  or Q2_K/Q3_K/IQ4_XS.
- `write_tiny_hf_folder`: config.json + model.safetensors + tokenizer files, as the hub ships them.

`tiny_hf_state_dict` is the single source of the weights (HF names and layout), so a GGUF and a
folder built with the same arguments hold the same model up to quantization.

The oracle (`hf_model_from_gguf`, `hf_model_from_folder`, `hf_logits`, `hf_greedy`) is plain
transformers on float32. Where transformers' GGUF loader does not read what llama.cpp writes
(qwen3 head_dim, llama3 `rope_freqs`), `hf_model_from_gguf` supplies it from the file itself.

The vocabulary is SmolLM2's (49152 tokens), copied from a real GGUF: `smollm2_path()`.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ARCHS = ("llama", "qwen2", "qwen3")
# Gemma 3 text (tests of its own: transformers' GGUF loader needs more fixups, see hf_model_from_gguf)
GEMMA3 = "gemma3"
ALL_ARCHS = ARCHS + (GEMMA3,)
FLOAT_TYPES = ("F32", "F16", "BF16")
BLOCK_QUANTS = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # gguf-py has quantizers for these
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")  # gguf-py only dequantizes these; quantizers are below
TENSOR_TYPES = FLOAT_TYPES + BLOCK_QUANTS + K_QUANTS
# 2-, 3-bit and non-linear 4-bit super-blocks (quantizers below, plain round-to-nearest): write_tiny_gguf
# takes them, but they stay out of TENSOR_TYPES (the transformers oracle's tolerances are for 4 bits and up)
LOW_BIT_QUANTS = ("Q2_K", "Q3_K", "IQ4_XS")

# Llama 3.x's rope_scaling, except original_max_position_embeddings: 8192 (the real value) leaves
# every frequency of a 16-wide head at a short position almost unchanged, 64 makes the scaling
# change logits within the first few dozen positions, so a test can tell it was applied.
LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

# The real model is pulled once per machine by the project's own `pull` into this test home
# (outside the repo) and reused by later runs; FASTSERVE_TEST_SMOLLM2 points at a file instead.
TEST_HOME = Path(os.environ.get("FASTSERVE_TEST_HOME", Path(tempfile.gettempdir()) / "fastserve-test-home"))

_HF_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
             "gemma3": "Gemma3ForCausalLM"}
# Per-arch values of the released models: llama2/SmolLM-style vs Qwen2.5/Qwen3.
_ROPE_THETA = {"llama": 10000.0, "qwen2": 1000000.0, "qwen3": 1000000.0, "gemma3": 1000000.0}
_RMS_EPS = {"llama": 1e-5, "qwen2": 1e-6, "qwen3": 1e-6, "gemma3": 1e-6}


@functools.cache
def smollm2_path() -> Path:
    """The real SmolLM2 GGUF (tests' golden model; tiny models borrow its tokenizer)."""
    if env := os.environ.get("FASTSERVE_TEST_SMOLLM2"):
        return Path(env)
    from fastserve_edge.models.registry import resolve
    from fastserve_edge.settings import load_settings

    settings = load_settings({"FASTSERVE_HOME": str(TEST_HOME)})
    return resolve("smollm2-135m", settings, pull_missing=True).path


@dataclass(frozen=True)
class TinyModelSpec:
    arch: str
    vocab_size: int
    n_layers: int = 2
    dim: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 128
    head_dim: int | None = None  # None: dim // n_heads
    context_length: int = 256
    rope_theta: float | None = None  # None: the arch's released value (_ROPE_THETA)
    rms_eps: float | None = None  # None: the arch's released value (_RMS_EPS)
    tie_embeddings: bool = True
    rope_scaling_llama3: bool = False
    # gemma3 only
    sliding_window: int = 4
    sliding_pattern: int = 6
    rope_linear_factor: float | None = None  # global layers' linear rope scaling (rope_scaling "linear")

    def __post_init__(self):
        if self.arch not in ALL_ARCHS:
            raise ValueError(f"arch {self.arch!r} is not one of {ALL_ARCHS}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim is None and self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not a multiple of n_heads={self.n_heads}; pass head_dim")
        if self.hd % 2:
            raise ValueError(f"head_dim={self.hd} must be even for rope")
        if self.rope_scaling_llama3 and self.arch != "llama":
            raise ValueError("llama3 rope scaling is written as llama.cpp's rope_freqs.weight, a llama-arch tensor")

    @property
    def hd(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    @property
    def theta(self) -> float:
        return self.rope_theta if self.rope_theta is not None else _ROPE_THETA[self.arch]

    @property
    def eps(self) -> float:
        return self.rms_eps if self.rms_eps is not None else _RMS_EPS[self.arch]


# ---------------------------------------------------------------------------------------------
# weights


def tiny_hf_state_dict(spec: TinyModelSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 weights in HF names and layout ([out, in] for Linear), deterministic in seed.

    q/k are scaled so attention is far from uniform (scores of order 1), the rest so the residual
    stream stays of order 1; norms are 1 + noise so a wrong or missing norm changes the logits.
    """
    g = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def norm(n: int) -> torch.Tensor:
        # Gemma's RMSNorm multiplies by 1 + w: the same scale of weights, centred on 0
        return (0.0 if spec.arch == GEMMA3 else 1.0) + normal(n, std=0.1)

    d, hd, f = spec.dim, spec.hd, spec.ffn_dim
    q_out, kv_out = spec.n_heads * hd, spec.n_kv_heads * hd
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": normal(spec.vocab_size, d, std=0.1)}
    for i in range(spec.n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = norm(d)
        sd[p + "self_attn.q_proj.weight"] = normal(q_out, d, std=1.0 / math.sqrt(d))
        sd[p + "self_attn.k_proj.weight"] = normal(kv_out, d, std=1.0 / math.sqrt(d))
        sd[p + "self_attn.v_proj.weight"] = normal(kv_out, d, std=0.5 / math.sqrt(d))
        sd[p + "self_attn.o_proj.weight"] = normal(d, q_out, std=0.5 / math.sqrt(q_out))
        if spec.arch == "qwen2":
            sd[p + "self_attn.q_proj.bias"] = normal(q_out, std=0.2)
            sd[p + "self_attn.k_proj.bias"] = normal(kv_out, std=0.2)
            sd[p + "self_attn.v_proj.bias"] = normal(kv_out, std=0.2)
        if spec.arch in ("qwen3", GEMMA3):
            sd[p + "self_attn.q_norm.weight"] = norm(hd)
            sd[p + "self_attn.k_norm.weight"] = norm(hd)
        sd[p + "post_attention_layernorm.weight"] = norm(d)
        if spec.arch == GEMMA3:
            sd[p + "pre_feedforward_layernorm.weight"] = norm(d)
            sd[p + "post_feedforward_layernorm.weight"] = norm(d)
        sd[p + "mlp.gate_proj.weight"] = normal(f, d, std=1.0 / math.sqrt(d))
        sd[p + "mlp.up_proj.weight"] = normal(f, d, std=1.0 / math.sqrt(d))
        sd[p + "mlp.down_proj.weight"] = normal(d, f, std=0.5 / math.sqrt(f))
    sd["model.norm.weight"] = norm(d)
    if not spec.tie_embeddings:
        sd["lm_head.weight"] = normal(spec.vocab_size, d, std=0.1)
    return sd


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp convert_hf_to_gguf `LlamaModel.permute`: HF q/k rows -> GGUF rows.

    HF rotates the two halves of each head (rotate_half); GGML's rope rotates adjacent pairs.
    Within each head, row j of the first half and row j of the second half become rows 2j, 2j+1.
    For k, n_head is the number of kv heads.
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """`rope_freqs.weight` as llama.cpp writes it for rope_type llama3: [head_dim // 2] float32.

    llama.cpp divides frequency i by factor i (ggml_rope_ext freq_factors); transformers'
    `_compute_llama3_parameters` gives the same inv_freq.
    """
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# K-quant encoders (gguf-py ships only the decoders). Simple min/max fits, not llama.cpp's
# iterative search: the blocks are valid and close to the input, which is all a fixture needs.

_QK_K = 256


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """8 six-bit scales and 8 six-bit mins per super-block -> the 12 bytes of Q4_K/Q5_K."""
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return out


def _affine_k(x: np.ndarray, levels: int, scale_max: int = 63):
    """x: [nb, S, G] -> d, dmin (f16 [nb]), sc, mn (uint8 [nb, S], at most scale_max), q (uint8 [nb, S, G])."""
    lo = np.minimum(x.min(axis=-1), 0.0)
    hi = np.maximum(x.max(axis=-1), 0.0)
    scale, mins = (hi - lo) / levels, -lo
    d = _f16(scale.max(axis=-1) / scale_max)
    dmin = _f16(mins.max(axis=-1) / scale_max)
    d32 = np.where(d > 0, d.astype(np.float32), 1.0)[:, None]
    dmin32 = np.where(dmin > 0, dmin.astype(np.float32), 1.0)[:, None]
    sc = np.clip(np.rint(scale / d32), 0, scale_max).astype(np.uint8)
    mn = np.clip(np.rint(mins / dmin32), 0, scale_max).astype(np.uint8)
    eff_scale = (d.astype(np.float32)[:, None] * sc)[..., None]
    eff_min = (dmin.astype(np.float32)[:, None] * mn)[..., None]
    q = np.rint((x + eff_min) / np.where(eff_scale > 0, eff_scale, 1.0))
    return d, dmin, sc, mn, np.clip(q, 0, levels).astype(np.uint8)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """q: [nb, 8, 32] values < 16 -> [nb, 128]: byte c*32+i holds sub-block 2c (low), 2c+1 (high)."""
    q = q.reshape(q.shape[0], 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(q.shape[0], 128)


def _quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    x = blocks.reshape(-1, 8, 32)
    d, dmin, sc, mn, q = _affine_k(x, 15)
    return np.concatenate(
        [d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), _pack_k_scales(sc, mn), _nibbles(q)],
        axis=1,
    )


def _quantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    x = blocks.reshape(-1, 8, 32)
    d, dmin, sc, mn, q = _affine_k(x, 31)
    high = (q >> 4).astype(np.uint8)  # [nb, 8, 32]: bit j of qh[i] is the 5th bit of sub-block j
    qh = np.zeros((x.shape[0], 32), dtype=np.uint8)
    for j in range(8):
        qh |= high[:, j] << j
    return np.concatenate(
        [
            d.view(np.uint8).reshape(-1, 2),
            dmin.view(np.uint8).reshape(-1, 2),
            _pack_k_scales(sc, mn),
            qh,
            _nibbles(q & 0x0F),
        ],
        axis=1,
    )


def _quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    x = blocks.reshape(-1, 16, 16)
    scale = np.abs(x).max(axis=-1) / 31
    d = _f16(scale.max(axis=-1) / 127)
    d32 = np.where(d > 0, d.astype(np.float32), 1.0)[:, None]
    sc = np.clip(np.rint(scale / d32), -128, 127).astype(np.int8)
    eff = (d.astype(np.float32)[:, None] * sc)[..., None]
    q = np.clip(np.rint(x / np.where(eff > 0, eff, 1.0)), -32, 31) + 32
    u = q.astype(np.uint8).reshape(-1, 2, 128)  # two halves of 128
    lo, hi = u & 0x0F, u >> 4
    ql = (lo[:, :, :64] | (lo[:, :, 64:] << 4)).reshape(-1, 128)
    qh = (hi[:, :, 0:32] | (hi[:, :, 32:64] << 2) | (hi[:, :, 64:96] << 4) | (hi[:, :, 96:128] << 6)).reshape(-1, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(-1, 2)], axis=1)


def _two_bit_fields(q: np.ndarray) -> np.ndarray:
    """q: [nb, 256] values < 4 -> [nb, 64]: weight 128h + 32t + l in bits 2t, 2t + 1 of byte 32h + l."""
    q = q.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _quantize_q2_k(blocks: np.ndarray) -> np.ndarray:
    x = blocks.reshape(-1, 16, 16)
    d, dmin, sc, mn, q = _affine_k(x, 3, scale_max=15)
    return np.concatenate([sc | (mn << 4), _two_bit_fields(q.reshape(-1, 256)),
                           d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2)], axis=1)


def _quantize_q3_k(blocks: np.ndarray) -> np.ndarray:
    x = blocks.reshape(-1, 16, 16)
    scale = np.abs(x).max(axis=-1) / 4  # q - 4 in -4..3: the largest |x| of a sub-block at -4 or 3
    d = _f16(scale.max(axis=-1) / 31)
    d32 = np.where(d > 0, d.astype(np.float32), 1.0)[:, None]
    sc = np.clip(np.rint(scale / d32), 0, 31).astype(np.int32)
    eff = (d.astype(np.float32)[:, None] * sc)[..., None]
    q = (np.clip(np.rint(x / np.where(eff > 0, eff, 1.0)), -4, 3) + 4).astype(np.uint8).reshape(-1, 256)
    hmask = np.zeros((x.shape[0], 32), dtype=np.uint8)  # bit t of byte l: the third bit of weight 32t + l
    for t in range(8):
        hmask |= (q[:, 32 * t:32 * t + 32] >> 2) << t
    u = (sc + 32).astype(np.uint8)  # 6 bits: low 4 in bytes 0..7 (j < 8 low nibble, j >= 8 high), high 2 in 8..11
    scales = np.zeros((x.shape[0], 12), dtype=np.uint8)
    scales[:, :8] = (u[:, :8] & 0x0F) | ((u[:, 8:] & 0x0F) << 4)
    for j in range(16):
        scales[:, 8 + j % 4] |= (u[:, j] >> 4) << (2 * (j // 4))
    return np.concatenate([hmask, _two_bit_fields(q & 3), scales, d.view(np.uint8).reshape(-1, 2)], axis=1)


IQ4_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)


def _quantize_iq4_xs(blocks: np.ndarray) -> np.ndarray:
    x = blocks.reshape(-1, 8, 32)
    at = np.abs(x).argmax(axis=-1)[..., None]
    scale = -np.take_along_axis(x, at, axis=-1)[..., 0] / 127  # the largest |x| of a sub-block on level -127
    d = _f16(np.abs(scale).max(axis=-1) / 31)
    d32 = np.where(d > 0, d.astype(np.float32), 1.0)[:, None]
    ls = np.clip(np.rint(scale / d32), -32, 31).astype(np.int32)
    eff = (d.astype(np.float32)[:, None] * ls)[..., None]
    v = x / np.where(eff != 0, eff, 1.0)
    q = np.abs(v[..., None] - IQ4_LEVELS).argmin(axis=-1).astype(np.uint8)  # [nb, 8, 32]: nearest level
    u = (ls + 32).astype(np.uint16)
    scales_h = np.zeros(x.shape[0], dtype=np.uint16)
    for j in range(8):
        scales_h |= (u[:, j] >> 4) << (2 * j)
    scales_l = ((u[:, 0::2] & 0x0F) | ((u[:, 1::2] & 0x0F) << 4)).astype(np.uint8)
    qs = (q[:, :, :16] | (q[:, :, 16:] << 4)).reshape(-1, 128)  # Q4_0's order per 32
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), scales_h.view(np.uint8).reshape(-1, 2), scales_l, qs],
                          axis=1)


_K_ENCODERS = {"Q4_K": _quantize_q4_k, "Q5_K": _quantize_q5_k, "Q6_K": _quantize_q6_k,
               "Q2_K": _quantize_q2_k, "Q3_K": _quantize_q3_k, "IQ4_XS": _quantize_iq4_xs}

# where random_blocks puts fp16 scales in a block: (block bytes, offsets)
_SCALE_AT = {"Q2_K": (84, (80, 82)), "Q3_K": (110, (108,)), "IQ4_XS": (136, (0,)),
             "Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,))}


def random_blocks(tensor_type: str, rows: int, cols: int, rng: np.random.Generator, scale: float = 1e-3) -> np.ndarray:
    """Valid random blocks of a K-quant or IQ4_XS: uint8 [rows, cols / 256 * block bytes], every
    byte random except the fp16 scales, which are finite, of either sign, |d| in [scale / 4, scale]:
    every bit pattern of the quants and sub-block scales, none of a real file's regularity."""
    size, offsets = _SCALE_AT[tensor_type]
    blocks = rng.integers(0, 256, (rows, cols // _QK_K, size), dtype=np.uint8)
    for at in offsets:
        d = rng.uniform(scale / 4, scale, (rows, cols // _QK_K)) * rng.choice([-1.0, 1.0], (rows, cols // _QK_K))
        blocks[:, :, at:at + 2] = d.astype(np.float16)[..., None].view(np.uint8)
    return blocks.reshape(rows, -1)


def quantize_tensor(w: np.ndarray, tensor_type: str):
    """float32 [rows, cols] -> (array for GGUFWriter.add_tensor, GGMLQuantizationType or None).

    Raises ValueError when cols is not a multiple of the type's block size.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quantize

    w = np.ascontiguousarray(w, dtype=np.float32)
    if tensor_type == "F32":
        return w, None
    if tensor_type == "F16":
        return w.astype(np.float16), None
    qtype = GGMLQuantizationType[tensor_type]
    block, type_size = GGML_QUANT_SIZES[qtype]
    if w.shape[-1] % block:
        raise ValueError(
            f"{tensor_type} needs every weight's input dimension to be a multiple of {block}, "
            f"and one is {w.shape[-1]}; use dim/ffn_dim/n_heads*head_dim multiples of {block} "
            f"(dim=256, ffn_dim=512 for K-quants)"
        )
    if tensor_type in _K_ENCODERS:
        rows = w.reshape(-1, block)
        data = _K_ENCODERS[tensor_type](rows).reshape(*w.shape[:-1], w.shape[-1] // block * type_size)
    else:
        data = quantize(w, qtype)
    return data, qtype


# ---------------------------------------------------------------------------------------------
# tokenizer metadata


@functools.cache
def _source_tokenizer_fields(vocab_from: Path) -> tuple[tuple[str, object, object, object], ...]:
    """(key, value, type, sub_type) of every tokenizer.* field of a GGUF, in file order."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(vocab_from)
    out = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        out.append((key, field.contents(), vtype, sub_type))
    return tuple(out)


@functools.cache
def _tokenizer_fields(vocab_from: Path, vocab_size: int | None) -> tuple[tuple[str, object, object, object], ...]:
    """The tokenizer.* fields of vocab_from, cut to its first vocab_size tokens when given.

    A BPE vocabulary's first N tokens with the merges that stay inside them is again a valid BPE
    (SmolLM2: 17 specials, the byte tokens, then one token per merge in merge order).
    """
    fields = _source_tokenizer_fields(vocab_from)
    if vocab_size is None:
        return fields
    values = {key: value for key, value, *_ in fields}
    tokens = values["tokenizer.ggml.tokens"]
    specials = [values[k] for k in values if k.endswith("_token_id")]
    if not max(specials, default=0) < vocab_size <= len(tokens):
        raise ValueError(f"vocab_size must be in ({max(specials, default=0)}, {len(tokens)}], got {vocab_size}")
    kept = set(tokens[:vocab_size])
    out = []
    for key, value, vtype, sub_type in fields:
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            value = value[:vocab_size]
        elif key == "tokenizer.ggml.merges":
            value = [m for m in value if (parts := m.split(" ", 1))[0] in kept and parts[1] in kept
                     and parts[0] + parts[1] in kept]
        out.append((key, value, vtype, sub_type))
    return tuple(out)


def _resolve_vocab(vocab_from: Path | None) -> Path:
    path = vocab_from if vocab_from is not None else smollm2_path()
    if not Path(path).exists():
        raise FileNotFoundError(f"no GGUF to copy a tokenizer from at {path}; pass vocab_from")
    return Path(path)


def _n_tokens(fields) -> int:
    return len(next(value for key, value, *_ in fields if key == "tokenizer.ggml.tokens"))


# ---------------------------------------------------------------------------------------------
# writers


def tiny_spec(
    arch: str,
    *,
    vocab_from: Path | None = None,
    vocab_size: int | None = None,
    n_layers: int = 2,
    dim: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    ffn_dim: int = 128,
    head_dim: int | None = None,
    rope_scaling_llama3: bool = False,
    tie_embeddings: bool = True,
    context_length: int = 256,
    rope_theta: float | None = None,
    rms_eps: float | None = None,
    **gemma,
) -> TinyModelSpec:
    """The spec the writers build from the same arguments: `tiny_hf_state_dict(tiny_spec(...), seed)`
    gives the HF weights a written file holds."""
    fields = _tokenizer_fields(_resolve_vocab(vocab_from), vocab_size)
    return TinyModelSpec(
        arch=arch, vocab_size=_n_tokens(fields), n_layers=n_layers, dim=dim, n_heads=n_heads,
        n_kv_heads=n_kv_heads, ffn_dim=ffn_dim, head_dim=head_dim, context_length=context_length,
        rope_theta=rope_theta, rms_eps=rms_eps, tie_embeddings=tie_embeddings,
        rope_scaling_llama3=rope_scaling_llama3, **gemma,
    )


def _gguf_name(hf_name: str, arch: str = "llama") -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, i, rest = hf_name.split(".", 3)
    part, kind = rest.rsplit(".", 1)
    names = _GEMMA3_BLOCK_NAMES if arch == GEMMA3 else _BLOCK_NAMES
    return f"blk.{i}.{names[part]}.{kind}"


_BLOCK_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# llama.cpp's gemma3 names (gguf-py MODEL_TENSOR.ATTN_POST_NORM, FFN_PRE_NORM, FFN_POST_NORM)
_GEMMA3_BLOCK_NAMES = {
    **_BLOCK_NAMES,
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}

_FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
              "Q4_K": 15, "Q5_K": 17, "Q6_K": 18, "BF16": 32,  # LlamaFileType: *_K as the _M mixes
              "Q2_K": 10, "Q3_K": 12, "IQ4_XS": 30}


def write_tiny_gguf(
    path: Path,
    arch: str,
    *,
    tensor_type: str = "F32",
    seed: int = 0,
    n_layers: int = 2,
    dim: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    ffn_dim: int = 128,
    head_dim: int | None = None,
    vocab_from: Path | None = None,
    rope_scaling_llama3: bool = False,
    tie_embeddings: bool = True,
    context_length: int = 256,
    rope_theta: float | None = None,
    rms_eps: float | None = None,
    embed_type: str | None = None,
    vocab_size: int | None = None,
    chat_template: str | None = None,
    **gemma,
) -> Path:
    """Write a random-weight GGUF as llama.cpp would have converted the same HF model.

    tensor_type applies to every 2-D weight; embed_type (default: tensor_type) overrides it for
    token_embd/output, as llama.cpp's mixes do (SmolLM2's Q4_1 file has a Q8_0 token_embd).
    Norms, biases and rope_freqs stay F32 (gemma3's norms store w + 1, as convert_hf_to_gguf
    writes them; gemma: its TinyModelSpec fields, e.g. sliding_window). vocab_size (default: all of vocab_from's tokens)
    keeps only the first tokens: transformers loads a 2048-token model several times faster
    than a 49152-token one, whose tokenizer metadata gguf-py takes seconds to parse.
    chat_template (default: vocab_from's) replaces tokenizer.chat_template.
    """
    import gguf

    known = TENSOR_TYPES + LOW_BIT_QUANTS
    if tensor_type not in known or (embed_type or tensor_type) not in known:
        raise ValueError(f"tensor types must be among {known}")
    fields = _tokenizer_fields(_resolve_vocab(vocab_from), vocab_size)
    spec = tiny_spec(
        arch, vocab_from=vocab_from, vocab_size=vocab_size, n_layers=n_layers, dim=dim, n_heads=n_heads,
        n_kv_heads=n_kv_heads, ffn_dim=ffn_dim, head_dim=head_dim, context_length=context_length,
        rope_theta=rope_theta, rms_eps=rms_eps, tie_embeddings=tie_embeddings,
        rope_scaling_llama3=rope_scaling_llama3, **gemma,
    )

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny-{arch}-{tensor_type.lower()}")
    w.add_type("model")
    w.add_block_count(spec.n_layers)
    w.add_context_length(spec.context_length)
    w.add_embedding_length(spec.dim)
    w.add_feed_forward_length(spec.ffn_dim)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(spec.n_kv_heads)
    w.add_rope_freq_base(spec.theta)
    w.add_layer_norm_rms_eps(spec.eps)
    w.add_file_type(_FILE_TYPE[tensor_type])
    w.add_vocab_size(spec.vocab_size)
    if arch == "llama":
        w.add_rope_dimension_count(spec.hd)
    if arch == GEMMA3:
        # as convert_hf_to_gguf's Gemma3Model: the window, no pattern (llama.cpp: every 6th layer
        # global), no local rope base (10000), no query_pre_attn_scalar (llama.cpp: head_dim)
        if spec.sliding_pattern != 6:
            raise ValueError("a gemma3 GGUF has no key for a sliding pattern other than llama.cpp's 6")
        w.add_sliding_window(spec.sliding_window)
        if spec.rope_linear_factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(spec.rope_linear_factor)
    if arch in ("qwen3", GEMMA3) or spec.head_dim is not None:
        # convert_hf_to_gguf writes these whenever config.json has head_dim (every Qwen3 does)
        w.add_key_length(spec.hd)
        w.add_value_length(spec.hd)
    if tensor_type not in FLOAT_TYPES or (embed_type or tensor_type) not in FLOAT_TYPES:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value, vtype, sub_type in fields:
        if chat_template is None or key != "tokenizer.chat_template":
            w.add_key_value(key, value, vtype, sub_type)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    if rope_scaling_llama3:
        # llama.cpp's convention for llama3 scaling: this tensor only, no rope.scaling.* keys
        # (a rope.scaling.factor key would make llama.cpp also apply linear scaling).
        factors = llama3_rope_factors(spec.hd, spec.theta, LLAMA3_ROPE_SCALING)
        w.add_tensor("rope_freqs.weight", factors.numpy())

    for hf_name, t in tiny_hf_state_dict(spec, seed).items():
        if arch == "llama" and hf_name.endswith("q_proj.weight"):
            t = llama_cpp_permute(t, spec.n_heads)
        elif arch == "llama" and hf_name.endswith("k_proj.weight"):
            t = llama_cpp_permute(t, spec.n_kv_heads)
        name = _gguf_name(hf_name, arch)
        if arch == GEMMA3 and hf_name.endswith("norm.weight"):
            t = t + 1.0  # convert_hf_to_gguf Gemma3Model: norm_shift
        if t.ndim == 1:
            w.add_tensor(name, t.numpy().astype(np.float32))
            continue
        is_embedding = name in ("token_embd.weight", "output.weight")
        ttype = (embed_type or tensor_type) if is_embedding else tensor_type
        data, qtype = quantize_tensor(t.numpy(), ttype)
        w.add_tensor(name, data, raw_dtype=qtype)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_hf_config(spec: TinyModelSpec, dtype: str = "float32") -> dict:
    """config.json as the hub ships it for these classes (rope_theta/rope_scaling top level)."""
    cfg = {
        "architectures": [_HF_CLASS[spec.arch]],
        "model_type": spec.arch,
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.dim,
        "intermediate_size": spec.ffn_dim,
        "num_hidden_layers": spec.n_layers,
        "num_attention_heads": spec.n_heads,
        "num_key_value_heads": spec.n_kv_heads,
        "head_dim": spec.hd,
        "hidden_act": "silu",
        "max_position_embeddings": spec.context_length,
        "rms_norm_eps": spec.eps,
        "rope_theta": spec.theta,
        "rope_scaling": dict(LLAMA3_ROPE_SCALING) if spec.rope_scaling_llama3 else None,
        "tie_word_embeddings": spec.tie_embeddings,
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if spec.arch == GEMMA3:
        return _gemma3_hf_config(spec, cfg)
    if spec.arch == "llama":
        cfg["mlp_bias"] = False
    if spec.arch != "llama":
        cfg["use_sliding_window"] = False
        cfg["sliding_window"] = None
    if spec.arch == "qwen2":
        del cfg["attention_bias"]  # Qwen2 always has q/k/v biases; its config has no switch
    return cfg


def _gemma3_hf_config(spec: TinyModelSpec, cfg: dict) -> dict:
    """Gemma3TextConfig as google/gemma-3-1b-it's config.json writes it (transformers 4.50 keys)."""
    del cfg["rope_scaling"]
    cfg.update({
        "model_type": "gemma3_text",
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": spec.hd,  # what llama.cpp assumes for the GGUF (all but 27B: head_dim)
        "sliding_window": spec.sliding_window,
        "sliding_window_pattern": spec.sliding_pattern,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": ({"rope_type": "linear", "factor": spec.rope_linear_factor}
                         if spec.rope_linear_factor is not None else None),
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "pad_token_id": 0,
    })
    return cfg


@functools.cache
def _hf_tokenizer(vocab_from: Path, vocab_size: int | None):
    """transformers' fast tokenizer converted from the (cut) GGUF vocabulary."""
    from gguf import GGUFWriter
    from transformers import AutoTokenizer

    if vocab_size is None:
        return AutoTokenizer.from_pretrained(str(vocab_from.parent), gguf_file=vocab_from.name)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_only = Path(tmp) / "vocab.gguf"
        w = GGUFWriter(vocab_only, "llama")
        for key, value, vtype, sub_type in _tokenizer_fields(vocab_from, vocab_size):
            w.add_key_value(key, value, vtype, sub_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
        return AutoTokenizer.from_pretrained(tmp, gguf_file=vocab_only.name)


def write_tiny_hf_folder(
    path: Path,
    arch: str,
    *,
    seed: int = 0,
    n_layers: int = 2,
    dim: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    ffn_dim: int = 128,
    head_dim: int | None = None,
    vocab_from: Path | None = None,
    rope_scaling_llama3: bool = False,
    tie_embeddings: bool = True,
    context_length: int = 256,
    rope_theta: float | None = None,
    rms_eps: float | None = None,
    dtype: str = "float32",
    vocab_size: int | None = None,
    **gemma,
) -> Path:
    """Write config.json, model.safetensors, tokenizer.json/tokenizer_config.json into path.

    Same weights as write_tiny_gguf with the same arguments. dtype: "float32", "bfloat16" or
    "float16" (the stored tensors, rounded; config torch_dtype says the same). Tied models store no lm_head.weight, as on the hub.
    """
    from safetensors.torch import save_file

    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype {dtype!r} is not float32, bfloat16 or float16")
    vocab_path = _resolve_vocab(vocab_from)
    spec = tiny_spec(
        arch, vocab_from=vocab_from, vocab_size=vocab_size, n_layers=n_layers, dim=dim, n_heads=n_heads,
        n_kv_heads=n_kv_heads, ffn_dim=ffn_dim, head_dim=head_dim, context_length=context_length,
        rope_theta=rope_theta, rms_eps=rms_eps, tie_embeddings=tie_embeddings,
        rope_scaling_llama3=rope_scaling_llama3, **gemma,
    )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in tiny_hf_state_dict(spec, seed).items()}
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(tiny_hf_config(spec, dtype), indent=2) + "\n")
    _hf_tokenizer(vocab_path, vocab_size).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------
# transformers oracle


def _gguf_oracle_fixups(path: Path) -> tuple[int | None, torch.Tensor | None]:
    """(head_dim from attention.key_length, rope_freqs) that transformers' GGUF loader ignores."""
    # transformers' own header reader: gguf-py's GGUFReader takes seconds on a 49152-token vocabulary
    from transformers.integrations.gguf import GgufHeader, load_gguf_state_dict, read_gguf_metadata

    metadata, tensor_names = read_gguf_metadata(str(path))
    head_dim = metadata.get(f"{metadata['general.architecture']}.attention.key_length")
    rope_freqs = None
    if "rope_freqs.weight" in tensor_names:
        lazy = load_gguf_state_dict(GgufHeader.from_file(str(path)))["rope_freqs.weight"]
        rope_freqs = lazy[:].float().clone()
    return (int(head_dim) if head_dim is not None else None), rope_freqs


def hf_model_from_gguf(path: Path):
    """transformers' model of a GGUF (dequantized to float32), in eval mode.

    Patches two things transformers 5.x's GGUF loader drops for llama/qwen2/qwen3:
    `{arch}.attention.key_length` (Qwen3Config would otherwise default head_dim to 128) and the
    llama3 `rope_freqs.weight` tensor (applied to inv_freq as llama.cpp does: freq / factor).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    head_dim, rope_freqs = _gguf_oracle_fixups(path)
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    if head_dim is not None:
        config.head_dim = head_dim
    if config.model_type == "gemma3_text":
        _gemma3_oracle_fixups(config, path)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, config=config, dtype=torch.float32
    )
    if rope_freqs is not None:
        rotary = model.model.rotary_emb
        assert rotary.inv_freq.shape == rope_freqs.shape, (rotary.inv_freq.shape, rope_freqs.shape)
        rotary.inv_freq = rotary.original_inv_freq / rope_freqs
        rotary.original_inv_freq = rotary.inv_freq.clone()
    return model.eval()


def _gemma3_oracle_fixups(config, path: Path) -> None:
    """What transformers' GGUF loader leaves at Gemma3TextConfig's defaults but llama.cpp derives:
    query_pre_attn_scalar (head_dim below 27B; the default is 256), and rope scaling (linear,
    global layers only)."""
    from transformers.integrations.gguf import read_gguf_metadata

    metadata, _ = read_gguf_metadata(str(path))
    config.query_pre_attn_scalar = config.head_dim
    if str(metadata.get("gemma3.rope.scaling.type", "")).lower() == "linear":
        config.rope_parameters["full_attention"].update(
            rope_type="linear", factor=float(metadata["gemma3.rope.scaling.factor"]))


def hf_model_from_folder(path: Path):
    """transformers' model of an HF folder, computed in float32, in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@torch.inference_mode()
def hf_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits of one prompt, no cache: [S, vocab] float32."""
    out = model(input_ids=torch.tensor([ids]), use_cache=False)
    return out.logits[0].float()


@torch.inference_mode()
def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens after ids, decoding one at a time on transformers' KV cache; no EOS stop.

    A plain loop rather than `generate`, whose generation_config would stop at EOS.
    """
    from transformers import DynamicCache

    # transformers 5.x renamed past_key_values to cache (the old name warns until 5.40)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    kv = {cache_kw: DynamicCache(), "use_cache": True}
    tokens: list[int] = []
    step = ids
    while len(tokens) < n:
        logits = model(input_ids=torch.tensor([step]), **kv).logits  # [1, len(step), vocab]
        tokens.append(int(logits[0, -1].argmax()))
        step = tokens[-1:]
    return tokens
