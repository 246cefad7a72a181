"""Hugging Face model folders: config.json + *.safetensors + tokenizer.json.

Tensors are exposed under the canonical (GGUF) names so the engine sees one vocabulary
of weights whatever the file. HF already stores q/k in the rotate-halves layout.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from gguf import GGMLQuantizationType as QType
from safetensors import SafetensorError, safe_open

from fastserve_edge.models.config import SUPPORTED_ARCHS, ModelConfig, RopeScaling
from fastserve_edge.errors import ModelFormatError, ModelNotFound
from fastserve_edge.models.tensors import RawTensor

_DTYPES = {torch.float32: QType.F32, torch.float16: QType.F16, torch.bfloat16: QType.BF16}

# HF name (with {i} for the layer) -> canonical name
_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "blk.{i}.attn_q.bias",
    "model.layers.{i}.self_attn.k_proj.bias": "blk.{i}.attn_k.bias",
    "model.layers.{i}.self_attn.v_proj.bias": "blk.{i}.attn_v.bias",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.self_attn.q_norm.weight": "blk.{i}.attn_q_norm.weight",
    "model.layers.{i}.self_attn.k_norm.weight": "blk.{i}.attn_k_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
    # mixture of experts: Qwen3MoE (mlp.gate, mlp.experts.E.*_proj), Mixtral (block_sparse_moe, w1 w3 w2)
    "model.layers.{i}.mlp.gate.weight": "blk.{i}.ffn_gate_inp.weight",
    "model.layers.{i}.mlp.experts.{e}.gate_proj.weight": "blk.{i}.ffn_gate.{e}.weight",
    "model.layers.{i}.mlp.experts.{e}.up_proj.weight": "blk.{i}.ffn_up.{e}.weight",
    "model.layers.{i}.mlp.experts.{e}.down_proj.weight": "blk.{i}.ffn_down.{e}.weight",
    "model.layers.{i}.block_sparse_moe.gate.weight": "blk.{i}.ffn_gate_inp.weight",
    "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight": "blk.{i}.ffn_gate.{e}.weight",
    "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight": "blk.{i}.ffn_up.{e}.weight",
    "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight": "blk.{i}.ffn_down.{e}.weight",
}
# Gemma 3's four norms a block: its post_attention_layernorm is not llama's pre-FFN norm
_GEMMA3_NAMES = {
    **_NAMES,
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.post_attention_norm.weight",
    "model.layers.{i}.pre_feedforward_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.post_feedforward_layernorm.weight": "blk.{i}.post_ffw_norm.weight",
}


def _patterns(names: dict[str, str]) -> list[tuple[re.Pattern, str]]:
    return [(re.compile("^" + re.escape(k).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)") + "$"),
             v) for k, v in names.items()]


_PATTERNS = _patterns(_NAMES)
_ARCH_PATTERNS = {"gemma3": _patterns(_GEMMA3_NAMES)}
# model_type -> arch; Gemma 3's multimodal "gemma3" folders are refused below
_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3moe", "mixtral": "llama",
                "gemma3_text": "gemma3"}


def canonical_name(hf_name: str, arch: str = "llama") -> str | None:
    for pattern, target in _ARCH_PATTERNS.get(arch, _PATTERNS):
        m = pattern.match(hf_name)
        if m:
            for field, value in m.groupdict().items():
                target = target.replace("{" + field + "}", value)
            return target
    return None


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def config_from_hf(cfg: dict[str, Any], path: Path) -> ModelConfig:
    if not isinstance(cfg, dict):
        raise ModelFormatError(f"{path}/config.json is not a JSON object; it is not a model config")
    model_type = str(cfg.get("model_type", "")).lower()
    if model_type == "gemma3":
        raise ModelFormatError(f"{path}: a multimodal Gemma 3 folder (Gemma3ForConditionalGeneration); only the "
                               "text-only ones (model_type gemma3_text: Gemma 3 1B, or a GGUF conversion) are supported")
    arch = _MODEL_TYPES.get(model_type, model_type)
    if arch not in SUPPORTED_ARCHS:
        raise ModelFormatError(
            f"{path}: model_type {model_type!r} is not supported; supported: {', '.join(_MODEL_TYPES)}"
        )
    try:
        n_heads = int(cfg["num_attention_heads"])
        dim = int(cfg["hidden_size"])
        scaling = None
        if arch == "gemma3":
            return _gemma3_config(cfg, path, n_heads, dim)
        rope = cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type"))
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                original_context_length=int(rope.get("original_max_position_embeddings", 8192)),
            )
        elif rope_type not in (None, "default"):
            raise ModelFormatError(f"{path}: rope scaling {rope_type!r} is not supported; supported: llama3")
        theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        moe = {}
        if model_type in ("qwen3_moe", "mixtral"):
            if model_type == "qwen3_moe" and (cfg.get("mlp_only_layers") or int(cfg.get("decoder_sparse_step", 1)) != 1):
                raise ModelFormatError(f"{path}: dense layers among the expert layers (mlp_only_layers, "
                                       "decoder_sparse_step) are not supported")
            moe = dict(n_experts=int(cfg.get("num_experts") or cfg["num_local_experts"]),
                       n_experts_used=int(cfg["num_experts_per_tok"]),
                       expert_ffn_dim=int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"]),
                       norm_topk=bool(cfg.get("norm_topk_prob", True)))  # Mixtral: softmax over the chosen
        return ModelConfig(
            arch=arch,
            n_layers=int(cfg["num_hidden_layers"]),
            dim=dim,
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=int(cfg.get("head_dim") or dim // n_heads),
            ffn_dim=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            context_length=int(cfg.get("max_position_embeddings", 2048)),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attn_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
            qk_norm=arch in ("qwen3", "qwen3moe"),
            name=path.name,
            **moe,
        )
    except KeyError as err:
        raise ModelFormatError(f"{path}/config.json lacks {err}; it is not a complete {arch} config") from None
    except (TypeError, ValueError, AttributeError, OverflowError, ZeroDivisionError) as err:
        raise ModelFormatError(f"{path}/config.json describes no model we can run ({err}); fix the file or "
                               "download the model again") from None


def _gemma3_config(cfg: dict[str, Any], path: Path, n_heads: int, dim: int) -> ModelConfig:
    """Gemma3TextConfig (transformers 4.50+, both its rope layouts) -> ModelConfig; what the
    engine cannot run (soft-capping, bidirectional attention, another activation) is refused."""
    for cap in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(cap) is not None:
            raise ModelFormatError(f"{path}/config.json sets {cap}; logit soft-capping is not supported "
                                   "(Gemma 3 has none)")
    if cfg.get("use_bidirectional_attention"):
        raise ModelFormatError(f"{path}/config.json: bidirectional attention (an embedding model) is not supported")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ModelFormatError(f"{path}/config.json: activation {act!r}; Gemma 3 uses gelu_pytorch_tanh, the only one supported")
    n_layers = int(cfg["num_hidden_layers"])
    head_dim = int(cfg.get("head_dim") or 256)
    # rope: old layout (rope_theta, rope_local_base_freq, rope_scaling for the global layers) or
    # transformers 5's rope_parameters {"full_attention": {...}, "sliding_attention": {...}}
    params = cfg.get("rope_parameters") or {}
    full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    scaling = cfg.get("rope_scaling") or {k: v for k, v in full.items() if k != "rope_theta"}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise ModelFormatError(f"{path}: rope scaling {rope_type!r} is not supported for gemma3; supported: linear")
    if local.get("rope_type", "default") != "default":
        raise ModelFormatError(f"{path}: rope scaling on the sliding-window layers is not supported")
    window = int(cfg.get("sliding_window") or 0)
    pattern = int(cfg.get("sliding_window_pattern") or 6)
    types = cfg.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != n_layers:
            raise ValueError(f"layer_types must list the {n_layers} layers")
        pattern = next((p for p in range(1, n_layers + 2) if types == [
            "sliding_attention" if (i + 1) % p else "full_attention" for i in range(n_layers)]), 0)
        if not pattern:
            raise ModelFormatError(f"{path}/config.json: layer_types {types} follow no 'every n-th layer global' "
                                   "pattern; only that layout is supported")
    return ModelConfig(
        arch="gemma3", n_layers=n_layers, dim=dim, n_heads=n_heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads), head_dim=head_dim,
        ffn_dim=int(cfg["intermediate_size"]), vocab_size=int(cfg["vocab_size"]),
        context_length=int(cfg.get("max_position_embeddings", 131072)),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(full.get("rope_theta") or cfg.get("rope_theta") or 1_000_000.0),
        rope_local_theta=float(local.get("rope_theta") or cfg.get("rope_local_base_freq") or 10_000.0),
        rope_linear_factor=float(scaling["factor"]) if rope_type == "linear" else 1.0,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        attn_bias=bool(cfg.get("attention_bias", False)), qk_norm=True, post_norms=True, gelu_ffn=True,
        scale_embeddings=True, query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)),
        sliding_window=window, sliding_pattern=pattern if window else 0, name=path.name,
    )


class HFModel:
    """A Hugging Face folder opened in place (safetensors are memory-mapped by safe_open)."""

    kind = "hf"

    def __init__(self, path: Path):
        self.path = Path(path)
        if not is_hf_folder(self.path):
            raise ModelNotFound(
                f"{self.path} is not a Hugging Face model folder (needs config.json and *.safetensors)"
            )
        try:
            self.hf_config = json.loads((self.path / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ModelFormatError(f"{self.path}/config.json is not valid JSON ({err})") from None
        except RecursionError:  # the C parser's nesting limit is Python's recursion limit
            raise ModelFormatError(f"{self.path}/config.json nests too deeply to be a model config") from None
        self.config = config_from_hf(self.hf_config, self.path)
        self._files: dict[str, Any] = {}
        self._where: dict[str, tuple[Path, str]] = {}
        for file in sorted(self.path.glob("*.safetensors")):
            try:
                handle = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as err:
                raise ModelFormatError(f"{file} is not a readable safetensors file ({err}); it may be truncated") from None
            self._files[str(file)] = handle
            for hf_name in handle.keys():
                name = canonical_name(hf_name, self.config.arch)
                if name is not None:
                    self._where[name] = (file, hf_name)
        if self.config.tie_embeddings:
            self._where.pop("output.weight", None)
        elif "output.weight" not in self._where:
            raise ModelFormatError(f"{self.path}: lm_head.weight is missing and tie_word_embeddings is false")

    def has(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return sorted(self._where)

    def tensor(self, name: str) -> RawTensor:
        where = self._where.get(name)
        if where is None:
            raise ModelFormatError(f"{self.path}: tensor {name} is missing from the safetensors files")
        file, hf_name = where
        try:
            value = self._files[str(file)].get_tensor(hf_name)
        except SafetensorError as err:
            raise ModelFormatError(f"{file}: cannot read {hf_name} ({err}); the file may be truncated") from None
        qtype = _DTYPES.get(value.dtype)
        if qtype is None:
            raise ModelFormatError(f"{file}: {hf_name} has dtype {value.dtype}; supported: float32, float16, bfloat16")
        if self.config.arch == "gemma3" and name.endswith("norm.weight"):
            # Gemma's RMSNorm multiplies by (1 + w), in fp32; GGUF files store w + 1 (as
            # convert_hf_to_gguf does), and so does this: one RMSNorm for both
            value, qtype = value.float() + 1.0, QType.F32
        return RawTensor(name, qtype, tuple(value.shape), value)

    def tokenizer(self):
        from fastserve_edge.models.tokenizer import Tokenizer

        return Tokenizer.from_hf_folder(self.path)

    @property
    def quantization(self) -> str | None:
        return weights_summary(self.path)[1]

    @property
    def n_params(self) -> int:
        return weights_summary(self.path)[0]


def weights_summary(folder: Path) -> tuple[int, str | None]:
    """(parameter count, dominant dtype such as "F16") from the safetensors headers alone."""
    params = 0
    by_dtype: dict[str, int] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(shard), framework="numpy") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    n = 1
                    for dim in sl.get_shape():
                        n *= int(dim)
                    params += n
                    by_dtype[sl.get_dtype()] = by_dtype.get(sl.get_dtype(), 0) + n
        except (OSError, SafetensorError) as err:
            raise ModelFormatError(f"{shard} is not a readable safetensors file ({err}); it may be truncated") from None
    return params, (max(by_dtype, key=by_dtype.__getitem__).upper() if by_dtype else None)
