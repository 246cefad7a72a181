"""A Llama-3.2-1B-shaped GGUF with random weights: the speed of a 1B model without downloading one.

Speed depends on shapes and weight formats, not on what the weights say, so a random model
with the real shapes measures the same work. The vocabulary is SmolLM2's byte-level BPE
(49,152 tokens, taken from its GGUF) padded with unreachable `<dummy_N>` tokens to Llama 3's
128,256 rows, so both engines tokenize the same text and carry a full-size embedding and head.

    python bench/make_1b_gguf.py OUT.gguf --tokenizer-from SmolLM2-135M-Instruct.Q4_1.gguf
    python bench/make_1b_gguf.py OUT-q4_0.gguf --pure-quantize Q4_0 --source OUT.gguf
    python bench/make_1b_gguf.py 8B-q4_0.gguf --shape 8b --random-q4_0 --tokenizer-from ...

`--shape moe` is Qwen3-30B-A3B's layer shapes (qwen3moe: 2048 wide, 32 query and 4 KV heads of
128, 128 experts of 768 of which 8 are used, a 151,936-token vocabulary) with 6 layers instead
of 48, written F16 (~8.5 GB) for llama.cpp's quantizer: about 2.5 GB as Q4_K_M.
`--shape 8b` is Llama-3.1-8B's shapes (4096 wide, 32 layers, 14336 FFN, an untied head).
`--random-q4_0` writes Q4_0 blocks straight from random numbers (random nibbles, scales that
give the same spread as --pure-quantize's): no F16 file first, which for an 8B would be 16 GB
on disk and minutes of gguf-py quantizing for weights that mean nothing anyway.

`--pure-quantize` is the fallback when llama.cpp's quantizer is not available: every 2-D
weight becomes Q4_0 or Q8_0 (gguf-py's reference code), unlike llama.cpp's mixes, which keep
some tensors (the tied embedding, for one) in Q6_K.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

TOKENIZER_KEYS = (  # copied as they are from the tokenizer donor
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_space_prefix",
    "tokenizer.chat_template",
)
ROW_CHUNK = 4096  # rows generated or quantized at a time: bounds the float32 scratch memory


@dataclass(frozen=True)
class LlamaShape:
    vocab: int = 128256
    dim: int = 2048
    n_layers: int = 16
    n_heads: int = 32
    n_kv_heads: int = 8
    ffn_dim: int = 8192
    context_length: int = 2048
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    std: float = 0.02  # a fresh model's initialiser: activations stay finite through 16 layers
    tied: bool = True  # the output head is token_embd (Llama 3.2 1B/3B); else output.weight
    name: str = "llama-3.2-1b-shape-random"

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


LLAMA_32_1B = LlamaShape()
LLAMA_31_8B = LlamaShape(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, tied=False,
                         name="llama-3.1-8b-shape-random")
SHAPES = {"1b": LLAMA_32_1B, "8b": LLAMA_31_8B}


def tensor_shapes(shape: LlamaShape) -> Iterator[tuple[str, tuple[int, ...]]]:
    """GGUF tensor names with numpy shapes [out, in]; the output head is token_embd when tied."""
    kv = shape.n_kv_heads * shape.head_dim
    yield "token_embd.weight", (shape.vocab, shape.dim)
    for i in range(shape.n_layers):
        yield f"blk.{i}.attn_norm.weight", (shape.dim,)
        yield f"blk.{i}.attn_q.weight", (shape.dim, shape.dim)
        yield f"blk.{i}.attn_k.weight", (kv, shape.dim)
        yield f"blk.{i}.attn_v.weight", (kv, shape.dim)
        yield f"blk.{i}.attn_output.weight", (shape.dim, shape.dim)
        yield f"blk.{i}.ffn_norm.weight", (shape.dim,)
        yield f"blk.{i}.ffn_gate.weight", (shape.ffn_dim, shape.dim)
        yield f"blk.{i}.ffn_up.weight", (shape.ffn_dim, shape.dim)
        yield f"blk.{i}.ffn_down.weight", (shape.dim, shape.ffn_dim)
    yield "output_norm.weight", (shape.dim,)
    if not shape.tied:
        yield "output.weight", (shape.vocab, shape.dim)


@dataclass(frozen=True)
class MoeShape:
    """Qwen3-30B-A3B's layers (its config.json), fewer of them."""
    vocab: int = 151936
    dim: int = 2048
    n_layers: int = 6
    n_heads: int = 32
    n_kv_heads: int = 4
    head_dim: int = 128
    n_experts: int = 128
    n_experts_used: int = 8
    expert_ffn_dim: int = 768
    context_length: int = 4096
    rope_theta: float = 1000000.0
    norm_eps: float = 1e-6
    std: float = 0.02
    name: str = "qwen3-30b-a3b-shape-random"


QWEN3_30B_A3B_6L = MoeShape()


def moe_tensor_shapes(shape: MoeShape) -> Iterator[tuple[str, tuple[int, ...]]]:
    """qwen3moe's GGUF tensors with numpy shapes: [out, in], experts stacked first."""
    q, kv, E, F = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim, shape.n_experts, shape.expert_ffn_dim
    yield "token_embd.weight", (shape.vocab, shape.dim)
    for i in range(shape.n_layers):
        yield f"blk.{i}.attn_norm.weight", (shape.dim,)
        yield f"blk.{i}.attn_q.weight", (q, shape.dim)
        yield f"blk.{i}.attn_k.weight", (kv, shape.dim)
        yield f"blk.{i}.attn_v.weight", (kv, shape.dim)
        yield f"blk.{i}.attn_q_norm.weight", (shape.head_dim,)
        yield f"blk.{i}.attn_k_norm.weight", (shape.head_dim,)
        yield f"blk.{i}.attn_output.weight", (shape.dim, q)
        yield f"blk.{i}.ffn_norm.weight", (shape.dim,)
        yield f"blk.{i}.ffn_gate_inp.weight", (E, shape.dim)
        yield f"blk.{i}.ffn_gate_exps.weight", (E, F, shape.dim)
        yield f"blk.{i}.ffn_up_exps.weight", (E, F, shape.dim)
        yield f"blk.{i}.ffn_down_exps.weight", (E, shape.dim, F)
    yield "output_norm.weight", (shape.dim,)
    yield "output.weight", (shape.vocab, shape.dim)


def write_random_moe(out: Path, *, tokenizer_from: Path, shape: MoeShape = QWEN3_30B_A3B_6L, seed: int = 0) -> None:
    """F16 matrices (the router F32, as llama.cpp keeps it), F32 norms of ones; tensor by
    tensor, then renamed into place. The router's weights are larger than the rest, so each
    token's choice of experts is clear and varies from token to token, as a trained one's."""
    part = out.with_name(out.name + ".part")
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(part, arch="qwen3moe")
    try:
        _add_tokenizer(writer, shape.vocab, tokenizer_from)
        writer.add_name(shape.name)
        writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
        writer.add_vocab_size(shape.vocab)
        writer.add_context_length(shape.context_length)
        writer.add_embedding_length(shape.dim)
        writer.add_block_count(shape.n_layers)
        writer.add_feed_forward_length(6144)  # Qwen3-30B-A3B's dense size: in the file, unused
        writer.add_head_count(shape.n_heads)
        writer.add_head_count_kv(shape.n_kv_heads)
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
        writer.add_rope_freq_base(shape.rope_theta)
        writer.add_layer_norm_rms_eps(shape.norm_eps)
        writer.add_expert_count(shape.n_experts)
        writer.add_expert_used_count(shape.n_experts_used)
        writer.add_expert_feed_forward_length(shape.expert_ffn_dim)
        shapes = list(moe_tensor_shapes(shape))
        for name, dims in shapes:
            dtype = np.float32 if len(dims) == 1 or "ffn_gate_inp" in name else np.float16
            writer.add_tensor_info(name, dims, np.dtype(dtype), int(np.prod(dims)) * np.dtype(dtype).itemsize)
        _finish_header(writer)
        for name, dims in shapes:
            if len(dims) == 1:
                writer.write_tensor_data(np.ones(dims, dtype=np.float32))
            elif "ffn_gate_inp" in name:
                writer.write_tensor_data(rng.standard_normal(dims, dtype=np.float32) * 0.2)
            else:
                flat = (int(np.prod(dims[:-1])), dims[-1])
                data = np.empty(flat, dtype=np.float16)
                for r in range(0, flat[0], ROW_CHUNK):
                    rows = min(ROW_CHUNK, flat[0] - r)
                    data[r:r + rows] = rng.standard_normal((rows, flat[1]), dtype=np.float32) * shape.std
                writer.write_tensor_data(data.reshape(dims))
        writer.close()
        os.replace(part, out)
    finally:
        writer.close()
        part.unlink(missing_ok=True)


def _add_tokenizer(writer: gguf.GGUFWriter, vocab: int, tokenizer_from: Path) -> None:
    """The donor's byte-level BPE padded with unreachable `<dummy_N>` tokens to `vocab` rows."""
    donor = gguf.GGUFReader(tokenizer_from)
    tokens = list(_field(donor, "tokenizer.ggml.tokens") or [])
    types = list(_field(donor, "tokenizer.ggml.token_type") or [])
    if not tokens or len(tokens) > vocab or len(types) != len(tokens):
        raise ValueError(f"{tokenizer_from} has no usable tokenizer.ggml.tokens/token_type for a {vocab}-token vocabulary")
    pad = range(len(tokens), vocab)
    writer.add_token_list(tokens + [f"<dummy_{i}>" for i in pad])
    writer.add_token_types(types + [int(gguf.TokenType.NORMAL)] * len(pad))
    for key in TOKENIZER_KEYS:
        field = donor.get_field(key)
        if field is None:
            continue
        main = field.types[0]
        sub = field.types[1] if main == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), main, sub_type=sub)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _field(reader: gguf.GGUFReader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _add_metadata(writer: gguf.GGUFWriter, shape: LlamaShape, tokenizer_from: Path, file_type: int, name: str) -> None:
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_vocab_size(shape.vocab)
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(shape.dim)
    writer.add_block_count(shape.n_layers)
    writer.add_feed_forward_length(shape.ffn_dim)
    writer.add_head_count(shape.n_heads)
    writer.add_head_count_kv(shape.n_kv_heads)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.norm_eps)
    _add_tokenizer(writer, shape.vocab, tokenizer_from)


def _open_streaming(path: Path) -> gguf.GGUFWriter:
    return gguf.GGUFWriter(path, arch="llama")


def _add_quantized_infos(writer: gguf.GGUFWriter, shapes: list[tuple[str, tuple[int, ...]]], qtype) -> None:
    """The tensor table of a file whose vectors are F32 and matrices qtype, then the header."""
    for name, dims in shapes:
        if len(dims) == 1:
            writer.add_tensor_info(name, dims, np.dtype(np.float32), int(np.prod(dims)) * 4)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(dims, qtype)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
    _finish_header(writer)


def _finish_header(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()


def write_random_llama(out: Path, *, tokenizer_from: Path, shape: LlamaShape = LLAMA_32_1B, seed: int = 0) -> None:
    """F16 matrices, F32 norms (all ones); written tensor by tensor, then renamed into place."""
    part = out.with_name(out.name + ".part")
    rng = np.random.default_rng(seed)
    writer = _open_streaming(part)
    try:
        _add_metadata(writer, shape, tokenizer_from, int(gguf.LlamaFileType.MOSTLY_F16),
                      "llama-3.2-1b-shape-random")
        shapes = list(tensor_shapes(shape))
        for name, dims in shapes:
            dtype = np.float32 if len(dims) == 1 else np.float16
            writer.add_tensor_info(name, dims, np.dtype(dtype), int(np.prod(dims)) * np.dtype(dtype).itemsize)
        _finish_header(writer)
        for _, dims in shapes:
            if len(dims) == 1:
                writer.write_tensor_data(np.ones(dims, dtype=np.float32))
                continue
            data = np.empty(dims, dtype=np.float16)
            for r in range(0, dims[0], ROW_CHUNK):
                rows = min(ROW_CHUNK, dims[0] - r)
                data[r:r + rows] = rng.standard_normal((rows, dims[1]), dtype=np.float32) * shape.std
            writer.write_tensor_data(data)
        writer.close()
        os.replace(part, out)
    finally:
        writer.close()
        part.unlink(missing_ok=True)


PURE_TYPES = {
    "Q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "Q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}


def quantize_pure(source: Path, out: Path, qtype_name: str, *, tokenizer_from: Path,
                  shape: LlamaShape = LLAMA_32_1B) -> None:
    """Every 2-D tensor of `source` (written by write_random_llama) in one block format."""
    qtype, file_type = PURE_TYPES[qtype_name]
    reader = gguf.GGUFReader(source)
    tensors = {t.name: t for t in reader.tensors}
    part = out.with_name(out.name + ".part")
    writer = _open_streaming(part)
    try:
        _add_metadata(writer, shape, tokenizer_from, int(file_type), f"llama-3.2-1b-shape-random-{qtype_name.lower()}-pure")
        shapes = list(tensor_shapes(shape))
        _add_quantized_infos(writer, shapes, qtype)
        for name, dims in shapes:
            src = tensors[name].data  # numpy view into the memory-mapped source: [out, in]
            if len(dims) == 1:
                writer.write_tensor_data(np.asarray(src, dtype=np.float32))
                continue
            data = np.empty(gguf.quant_shape_to_byte_shape(dims, qtype), dtype=np.uint8)
            for r in range(0, dims[0], ROW_CHUNK):
                rows = slice(r, min(r + ROW_CHUNK, dims[0]))
                data[rows] = gguf.quants.quantize(np.asarray(src[rows], dtype=np.float32), qtype)
            writer.write_tensor_data(data)
        writer.close()
        os.replace(part, out)
    finally:
        writer.close()
        part.unlink(missing_ok=True)


Q4_0_BLOCK = 32  # weights per block: an fp16 scale then 16 bytes of 4-bit values (x - 8) * scale
Q4_0_SCALE = 0.02 / 4.6  # nibbles uniform on 0..15 have a spread of 4.6: the weights get std 0.02


def write_random_q4_0(out: Path, *, tokenizer_from: Path, shape: LlamaShape, seed: int = 0) -> None:
    """Every matrix in Q4_0 made of random blocks (F32 norms, all ones); tensor by tensor, then
    renamed into place. Memory: one ROW_CHUNK of blocks at a time."""
    qtype = gguf.GGMLQuantizationType.Q4_0
    part = out.with_name(out.name + ".part")
    rng = np.random.default_rng(seed)
    writer = _open_streaming(part)
    try:
        _add_metadata(writer, shape, tokenizer_from, int(gguf.LlamaFileType.MOSTLY_Q4_0), f"{shape.name}-q4_0")
        shapes = list(tensor_shapes(shape))
        _add_quantized_infos(writer, shapes, qtype)
        for _, dims in shapes:
            if len(dims) == 1:
                writer.write_tensor_data(np.ones(dims, dtype=np.float32))
                continue
            blocks = dims[1] // Q4_0_BLOCK
            data = np.empty((dims[0], blocks, 18), dtype=np.uint8)
            for r in range(0, dims[0], ROW_CHUNK):
                rows = min(ROW_CHUNK, dims[0] - r)
                scale = (rng.uniform(0.5, 1.5, (rows, blocks, 1)) * Q4_0_SCALE).astype(np.float16)
                data[r:r + rows, :, :2] = scale.view(np.uint8)
                data[r:r + rows, :, 2:] = rng.integers(0, 256, (rows, blocks, 16), dtype=np.uint8)
            writer.write_tensor_data(data.reshape(dims[0], blocks * 18))
        writer.close()
        os.replace(part, out)
    finally:
        writer.close()
        part.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--tokenizer-from", type=Path, required=True, help="a GGUF with a gpt2-style BPE vocabulary")
    parser.add_argument("--pure-quantize", choices=sorted(PURE_TYPES), help="quantize --source instead of writing F16")
    parser.add_argument("--source", type=Path, help="the F16 file for --pure-quantize")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", choices=sorted([*SHAPES, "moe"]), default="1b")
    parser.add_argument("--random-q4_0", action="store_true", help="random Q4_0 blocks, no F16 file first")
    args = parser.parse_args()
    if args.shape == "moe":
        write_random_moe(args.out, tokenizer_from=args.tokenizer_from, seed=args.seed)
        return
    shape = SHAPES[args.shape]
    if args.random_q4_0:
        write_random_q4_0(args.out, tokenizer_from=args.tokenizer_from, shape=shape, seed=args.seed)
    elif shape is not LLAMA_32_1B:
        parser.error(f"--shape {args.shape} is written with --random-q4_0 only")
    elif args.pure_quantize:
        if args.source is None:
            parser.error("--pure-quantize needs --source")
        quantize_pure(args.source, args.out, args.pure_quantize, tokenizer_from=args.tokenizer_from)
    else:
        write_random_llama(args.out, tokenizer_from=args.tokenizer_from, seed=args.seed)


if __name__ == "__main__":
    main()
