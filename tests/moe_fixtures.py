"""Tiny random mixture-of-experts models (Qwen3-MoE, Mixtral) as Hugging Face folders and as
GGUF files written the way llama.cpp's converter lays them out, with transformers as the oracle.

transformers builds and saves the model (its in-memory layout of experts changes between
versions; its saved files keep one tensor per expert). The GGUF is written from those saved
tensors: every block's experts stacked into `ffn_{gate,up,down}_exps` [experts, rows, cols],
the router `ffn_gate_inp` in F32 (llama.cpp never quantizes it), Mixtral's q/k permuted as
for llama. The oracle of a quantized file is transformers with every matrix rounded through
the same format (blocks never cross rows, so rounding commutes with the q/k permute).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from tests import models_fixtures as mf

MOE_ARCHS = ("qwen3moe", "mixtral")
_ROUTER = {"qwen3moe": "mlp.gate", "mixtral": "block_sparse_moe.gate"}
_EXPERT = {"qwen3moe": ("mlp.experts", {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}),
           "mixtral": ("block_sparse_moe.experts", {"w1": "ffn_gate", "w3": "ffn_up", "w2": "ffn_down"})}
_ATTN = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
         "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm"}


def hf_config(arch: str, *, vocab_size: int, n_layers: int, dim: int, n_experts: int, used: int, expert_ffn: int,
              n_heads: int = 4, n_kv_heads: int = 2, context_length: int = 256):
    from transformers import MixtralConfig, Qwen3MoeConfig

    common = dict(vocab_size=vocab_size, hidden_size=dim, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                  num_key_value_heads=n_kv_heads, head_dim=dim // n_heads, max_position_embeddings=context_length,
                  num_experts_per_tok=used, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if arch == "qwen3moe":
        return Qwen3MoeConfig(**common, intermediate_size=4 * dim, moe_intermediate_size=expert_ffn,
                              num_experts=n_experts, norm_topk_prob=True, rope_theta=1e6, rms_norm_eps=1e-6)
    return MixtralConfig(**common, intermediate_size=expert_ffn, num_local_experts=n_experts, rope_theta=1e6,
                         rms_norm_eps=1e-5)


def write_hf_folder(path: Path, arch: str, *, seed: int = 0, vocab_size: int = 2048, n_layers: int = 2, dim: int = 64,
                    n_experts: int = 8, used: int = 2, expert_ffn: int = 32) -> Path:
    """A random model saved by transformers: weights of order 1/sqrt(fan-in) (so attention is
    far from uniform), the router's 4x that (the experts' scores far apart: two experts within
    the fp16 KV cache's rounding of each other would let either side pick either), norms
    1 + noise, float32."""
    from transformers import AutoModelForCausalLM

    assert arch in MOE_ARCHS, arch
    config = hf_config(arch, vocab_size=vocab_size, n_layers=n_layers, dim=dim, n_experts=n_experts, used=used,
                       expert_ffn=expert_ffn)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "embed" in name or "lm_head" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("gate.weight") and "experts" not in name:  # the router: clear choices, so
                p.copy_(4 * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))  # no near-tie flips
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    path = Path(path)
    model.save_pretrained(path)
    mf._hf_tokenizer(mf._resolve_vocab(None), vocab_size).save_pretrained(path)
    return path


def _saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def write_gguf(path: Path, folder: Path, arch: str, *, tensor_type: str = "F32") -> Path:
    """The GGUF llama.cpp's converter makes of `folder` (write_hf_folder's), every matrix but the
    router in tensor_type."""
    import gguf

    cfg = hf_config_of(folder)
    sd = _saved_tensors(folder)
    n_layers, dim = cfg["num_hidden_layers"], cfg["hidden_size"]
    n_experts = cfg.get("num_experts") or cfg["num_local_experts"]
    expert_ffn = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    gguf_arch = "qwen3moe" if arch == "qwen3moe" else "llama"
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(path, gguf_arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(n_layers)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(dim)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_rope_freq_base(float((cfg.get("rope_parameters") or {}).get("rope_theta") or cfg.get("rope_theta")))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_expert_count(n_experts)
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    if arch == "qwen3moe":
        w.add_expert_feed_forward_length(expert_ffn)
    w.add_vocab_size(cfg["vocab_size"])
    if tensor_type not in mf.FLOAT_TYPES:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value, vtype, sub_type in mf._tokenizer_fields(mf._resolve_vocab(None), cfg["vocab_size"]):
        w.add_key_value(key, value, vtype, sub_type)

    def matrix(name: str, t: torch.Tensor, ttype: str = tensor_type) -> None:
        data, qtype = mf.quantize_tensor(t.float().numpy(), ttype)
        w.add_tensor(name, data, raw_dtype=qtype)

    matrix("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].float().numpy())
    matrix("output.weight", sd["lm_head.weight"])
    prefix, names = _EXPERT[arch]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        for hf, ours in _ATTN.items():
            t = sd.get(p + hf + ".weight")
            if t is None:
                continue
            if arch == "mixtral" and hf in ("self_attn.q_proj", "self_attn.k_proj"):
                t = mf.llama_cpp_permute(t, heads if "q_proj" in hf else kv_heads)
            if t.dim() == 1:
                w.add_tensor(f"blk.{i}.{ours}.weight", t.float().numpy())
            else:
                matrix(f"blk.{i}.{ours}.weight", t)
        w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", sd[p + _ROUTER[arch] + ".weight"].float().numpy())
        for hf, ours in names.items():
            stacked = torch.stack([sd[f"{p}{prefix}.{e}.{hf}.weight"] for e in range(n_experts)]).float().numpy()
            if tensor_type in ("F32", "F16"):
                w.add_tensor(f"blk.{i}.{ours}_exps.weight", stacked.astype(np.float32 if tensor_type == "F32"
                                                                              else np.float16))
            else:  # [experts, rows, cols] -> each expert's rows in blocks, stacked: [experts, rows, bytes]
                parts = [mf.quantize_tensor(m, tensor_type) for m in stacked]
                w.add_tensor(f"blk.{i}.{ours}_exps.weight", np.stack([d for d, _ in parts]), raw_dtype=parts[0][1])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_config_of(folder: Path) -> dict:
    import json

    return json.loads((Path(folder) / "config.json").read_text())


def oracle(folder: Path, tensor_type: str = "F32"):
    """transformers' model of folder, every matrix but the router rounded through tensor_type."""
    from gguf.quants import dequantize
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    if tensor_type == "F32":
        return model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2 or name.endswith("gate.weight") and "experts" not in name:
                continue  # norms, and the router: F32 in the file
            flat = p.reshape(-1, p.shape[-1]).numpy()
            data, qtype = mf.quantize_tensor(flat, tensor_type)
            p.copy_(torch.from_numpy(np.ascontiguousarray(dequantize(data, qtype))).reshape(p.shape))
    return model
