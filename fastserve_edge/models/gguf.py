"""GGUF files: metadata -> ModelConfig, tensors still in their file format (memory-mapped).

Conventions of llama.cpp that matter here:
- tensor shapes are stored innermost-first (ne0 = input features); we expose torch order.
- for arch "llama", convert_hf_to_gguf permutes the rows of attn_q/attn_k so that rope can
  rotate adjacent pairs; our decoder rotates halves (as Hugging Face does), so those rows
  are put back here, once, at the file-format boundary. qwen2/qwen3 are stored unpermuted.
- Llama 3.1/3.2 rope scaling is stored as a `rope_freqs.weight` tensor of per-frequency
  divisors (and sometimes `rope.scaling.*` keys).
"""

from __future__ import annotations

import hashlib
from functools import cached_property
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from fastserve_edge.engine.config import SUPPORTED_ARCHS, ModelConfig, RopeScaling
from fastserve_edge.errors import ModelFormatError, ModelNotFound
from fastserve_edge.models.tensors import SUPPORTED_TYPES, RawTensor

_SUPPORTED_TYPE_NAMES = ", ".join(t.name for t in SUPPORTED_TYPES)


def open_reader(path: Path) -> gguf.GGUFReader:
    """A memory-mapped reader; a truncated or foreign file becomes a ModelFormatError."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFound(f"no such model file: {path}")
    try:
        reader = gguf.GGUFReader(path, "r")
    except (ValueError, KeyError, IndexError, OSError, EOFError, OverflowError) as err:
        raise ModelFormatError(
            f"{path} is not a readable GGUF file ({err}); it may be truncated or corrupt: "
            "download it again (`fastserve pull`)"
        ) from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise ModelFormatError(
                f"{path} is truncated: tensor {t.name} ends at byte {t.data_offset + t.n_bytes:,} "
                f"but the file has {size:,} bytes; download it again (`fastserve pull`)"
            )
    return reader


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """All key/value fields as plain Python values (strings, numbers, lists)."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = field.contents()
    return out


def config_from_metadata(meta: dict[str, Any], tensor_names: set[str], path: Path) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ModelFormatError(
            f"{path.name}: architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHS)}"
        )

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ModelFormatError(f"{path.name}: metadata key {arch}.{name} is missing; the file is incomplete")
        return value

    n_heads = int(key("attention.head_count"))
    dim = int(key("embedding_length"))
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
    if not vocab:
        raise ModelFormatError(f"{path.name}: no vocabulary size (neither {arch}.vocab_size nor tokenizer tokens)")
    scaling = None
    if str(meta.get(f"{arch}.rope.scaling.type", "")).lower() == "llama3" or "rope_freqs.weight" in tensor_names:
        scaling = RopeScaling(
            factor=float(meta.get(f"{arch}.rope.scaling.factor", 8.0)),
            original_context_length=int(meta.get(f"{arch}.rope.scaling.original_context_length", 8192)),
        )
    return ModelConfig(
        arch=arch,
        n_layers=int(key("block_count")),
        dim=dim,
        n_heads=n_heads,
        n_kv_heads=int(key("attention.head_count_kv", n_heads)),
        head_dim=int(key("attention.key_length", dim // n_heads)),
        ffn_dim=int(key("feed_forward_length")),
        vocab_size=int(vocab),
        context_length=int(key("context_length", 2048)),
        norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        tie_embeddings="output.weight" not in tensor_names,
        attn_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        name=str(meta.get("general.name", path.stem)),
    )


def _unpermute_rows(n_out: int, n_head: int) -> np.ndarray:
    """Row index that undoes llama.cpp's q/k permute (pairs -> halves within each head)."""
    half = n_out // n_head // 2
    # permute(w) = w.reshape(n_head, 2, half, ...).swapaxes(1, 2): row (h, i, j) came from (h, j, i)
    return np.arange(n_out).reshape(n_head, half, 2).swapaxes(1, 2).reshape(-1)


class GGUFModel:
    """A GGUF file opened in place: config, tokenizer metadata, tensors by canonical name."""

    kind = "gguf"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.reader = open_reader(self.path)
        self.metadata = read_metadata(self.reader)
        self._tensors = {t.name: t for t in self.reader.tensors}
        self.config = config_from_metadata(self.metadata, set(self._tensors), self.path)
        for t in self.reader.tensors:
            if t.tensor_type not in SUPPORTED_TYPES:
                raise ModelFormatError(
                    f"{self.path.name}: tensor {t.name} has type {t.tensor_type.name}, which is not "
                    f"supported; supported types: {_SUPPORTED_TYPE_NAMES}. Re-quantize the model "
                    "to one of them (e.g. llama-quantize ... Q4_K_M)"
                )

    def has(self, name: str) -> bool:
        return name in self._tensors

    def tensor(self, name: str) -> RawTensor:
        t = self._tensors.get(name)
        if t is None:
            raise ModelFormatError(f"{self.path.name}: tensor {name} is missing; the file is incomplete or not a {self.config.arch} model")
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        raw = RawTensor(name, t.tensor_type, shape, t.data)
        if self.config.arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = self.config.n_heads if "attn_q" in name else self.config.n_kv_heads
            raw = raw.take_rows(_unpermute_rows(shape[0], heads))
        return raw

    def tokenizer(self):
        from fastserve_edge.models.tokenizer import Tokenizer

        return Tokenizer.from_gguf_metadata(self.metadata)

    @cached_property
    def quantization(self) -> str:
        """The type that holds most of the weights, e.g. "Q4_1"."""
        by_type: dict[str, int] = {}
        for t in self.reader.tensors:
            by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + int(t.n_elements)
        return max(by_type, key=by_type.__getitem__)

    @cached_property
    def n_params(self) -> int:
        return sum(int(t.n_elements) for t in self.reader.tensors)

    @cached_property
    def digest(self) -> str:
        """A cheap identity: sha256 over size, header and tensor table (not the 1+ GB of weights)."""
        h = hashlib.sha256(str(self.path.stat().st_size).encode())
        h.update(bytes(self.reader.data[: self.reader.data_offset]))
        return h.hexdigest()
