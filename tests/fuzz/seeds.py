"""Writes the fuzz seed corpus (tests/fuzz/corpus/): `python -m tests.fuzz.seeds`.

Tiny valid inputs, a few KB each: GGUF models of one layer (dim 32, two heads of 16, one kv
head, ffn 32, sixteen tokens; no tokenizer), the wire payloads a peer receives (hidden
states, a layer's tensors as LoadStage fetches them), and mDNS TXT records.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf.quants import quantize

from fastserve_edge.cluster.discovery import NodeInfo
from fastserve_edge.cluster.wire import pack_hidden, pack_tensors
from fastserve_edge.models.gguf import GGUFModel

CORPUS = Path(__file__).with_name("corpus")
DIM, HEADS, KV_HEADS, FFN, VOCAB = 32, 2, 1, 32, 16
HD = DIM // HEADS


def tiny_gguf(path: Path, arch: str, qtype: gguf.GGMLQuantizationType, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(1)
    w.add_context_length(16)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(VOCAB)
    shapes = {"token_embd.weight": (VOCAB, DIM), "output_norm.weight": (DIM,),
              "blk.0.attn_norm.weight": (DIM,), "blk.0.ffn_norm.weight": (DIM,),
              "blk.0.attn_q.weight": (HEADS * HD, DIM), "blk.0.attn_k.weight": (KV_HEADS * HD, DIM),
              "blk.0.attn_v.weight": (KV_HEADS * HD, DIM), "blk.0.attn_output.weight": (DIM, HEADS * HD),
              "blk.0.ffn_gate.weight": (FFN, DIM), "blk.0.ffn_up.weight": (FFN, DIM),
              "blk.0.ffn_down.weight": (DIM, FFN)}
    if arch == "qwen2":
        shapes |= {"blk.0.attn_q.bias": (HEADS * HD,), "blk.0.attn_k.bias": (KV_HEADS * HD,),
                   "blk.0.attn_v.bias": (KV_HEADS * HD,)}
    if arch == "qwen3":
        shapes |= {"blk.0.attn_q_norm.weight": (HD,), "blk.0.attn_k_norm.weight": (HD,)}
    for name, shape in shapes.items():
        values = rng.standard_normal(shape).astype(np.float32) * 0.1
        if len(shape) == 1:
            w.add_tensor(name, values + 1.0)
        else:
            w.add_tensor(name, quantize(values, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main() -> None:
    for kind in ("gguf", "wire", "txt"):
        (CORPUS / kind).mkdir(parents=True, exist_ok=True)
    Q = gguf.GGMLQuantizationType
    models = [tiny_gguf(CORPUS / "gguf" / "llama-q4_0.gguf", "llama", Q.Q4_0, 0),
              tiny_gguf(CORPUS / "gguf" / "qwen2-q8_0.gguf", "qwen2", Q.Q8_0, 1),
              tiny_gguf(CORPUS / "gguf" / "qwen3-q4_1.gguf", "qwen3", Q.Q4_1, 2)]
    wire = CORPUS / "wire"
    (wire / "hidden-f32.bin").write_bytes(pack_hidden(torch.randn(1, 2, DIM)))
    (wire / "hidden-bf16.bin").write_bytes(pack_hidden(torch.randn(1, DIM).bfloat16()))
    source = GGUFModel(models[0])
    layer = [source.tensor(n) for n in source.names() if n.startswith("blk.0.ffn")]
    (wire / "layer-q4_0.bin").write_bytes(pack_tensors(layer))
    (wire / "embedding-q4_0.bin").write_bytes(pack_tensors([source.tensor("token_embd.weight")]))
    node = NodeInfo(node_id="0123456789abcdef", name="pc-1", port=7070, cluster_id="fedcba9876543210",
                    state="ready", memory_bytes=8 << 30, decode_gflops=12.5, prefill_gflops=80.0, bandwidth_gbs=9.5)
    (CORPUS / "txt" / "peer.json").write_text(json.dumps(node.to_properties(), indent=1) + "\n")
    host = NodeInfo(node_id="00000000", name="host", port=1, cluster_id="", role="host")
    (CORPUS / "txt" / "host.json").write_text(json.dumps(host.to_properties(), indent=1) + "\n")


if __name__ == "__main__":
    main()
