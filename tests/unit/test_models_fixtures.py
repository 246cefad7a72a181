"""The tiny-model fixtures are what the engine's golden tests trust, so they are tested here:
that transformers reads every arch and tensor type, that the GGUF and the HF folder hold the
same model, and that the llama.cpp conventions (q/k permutation, rope_freqs, K-quant blocks)
are the ones written."""

import numpy as np
import pytest
import torch

from tests import models_fixtures as mf

SMALL_VOCAB = 2048  # transformers loads this in ~0.2 s; the full 49152 takes ~8 s
K_DIMS = {"dim": 256, "ffn_dim": 512}  # K-quant super-blocks are 256 wide
IDS = [1, 9, 314, 159, 265, 358, 979, 323, 846, 264, 338, 327, 950, 288, 419, 716]


@pytest.fixture(scope="module")
def folder_logits(tmp_path_factory):
    """F32 logits of the HF folder of each arch, at the K-quant dims: the unquantized reference."""
    root = tmp_path_factory.mktemp("folders")
    out = {}
    for arch in mf.ARCHS:
        folder = mf.write_tiny_hf_folder(root / arch, arch, vocab_size=SMALL_VOCAB, **K_DIMS)
        out[arch] = mf.hf_logits(mf.hf_model_from_folder(folder), IDS)
    return out


# Worst max |logit error| against the F32 folder seen over the three archs at seed 0, with margin.
MAX_ERR = {"F32": 1e-4, "F16": 0.03, "BF16": 0.2, "Q8_0": 0.4, "Q6_K": 1.5, "Q5_0": 2.5, "Q5_1": 2.5,
           "Q5_K": 2.5, "Q4_0": 5.0, "Q4_1": 5.0, "Q4_K": 5.0}


@pytest.mark.parametrize("tensor_type", mf.TENSOR_TYPES)
@pytest.mark.parametrize("arch", mf.ARCHS)
def test_transformers_loads_every_arch_and_type(tmp_path, folder_logits, arch, tensor_type):
    path = mf.write_tiny_gguf(tmp_path / "m.gguf", arch, tensor_type=tensor_type, vocab_size=SMALL_VOCAB, **K_DIMS)
    logits = mf.hf_logits(mf.hf_model_from_gguf(path), IDS)

    assert logits.shape == (len(IDS), SMALL_VOCAB)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.5  # not a degenerate model: logits spread, next tokens differ
    assert len(set(logits.argmax(-1).tolist())) > len(IDS) // 2
    assert (logits - folder_logits[arch]).abs().max() < MAX_ERR[tensor_type]
    ref = folder_logits[arch].flatten()
    assert torch.corrcoef(torch.stack([logits.flatten(), ref]))[0, 1] > 0.9


@pytest.mark.parametrize("arch", mf.ARCHS)
def test_gguf_and_folder_are_the_same_model(tmp_path, arch):
    gguf_path = mf.write_tiny_gguf(tmp_path / "m.gguf", arch, vocab_size=SMALL_VOCAB, seed=3)
    folder = mf.write_tiny_hf_folder(tmp_path / "hf", arch, vocab_size=SMALL_VOCAB, seed=3)
    a = mf.hf_logits(mf.hf_model_from_gguf(gguf_path), IDS)
    b = mf.hf_logits(mf.hf_model_from_folder(folder), IDS)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", mf.ARCHS)
def test_qk_rows_stored_as_llama_cpp_does_and_transformers_undoes(tmp_path, arch):
    from gguf import GGUFReader

    path = mf.write_tiny_gguf(tmp_path / "m.gguf", arch, vocab_size=SMALL_VOCAB, n_heads=4, n_kv_heads=2)
    hf = mf.tiny_hf_state_dict(mf.tiny_spec(arch, vocab_size=SMALL_VOCAB, n_heads=4, n_kv_heads=2))
    stored = {t.name: torch.from_numpy(np.array(t.data)) for t in GGUFReader(path).tensors}
    loaded = mf.hf_model_from_gguf(path).state_dict()

    for proj, gguf_name, heads in (("q_proj", "attn_q", 4), ("k_proj", "attn_k", 2)):
        w = hf[f"model.layers.1.self_attn.{proj}.weight"]
        on_disk = stored[f"blk.1.{gguf_name}.weight"]
        expected = mf.llama_cpp_permute(w, heads) if arch == "llama" else w
        assert torch.equal(on_disk, expected)
        if arch == "llama":
            assert not torch.equal(on_disk, w)
        assert torch.equal(loaded[f"model.layers.1.self_attn.{proj}.weight"], w)  # HF in == HF out


def test_llama_cpp_permute_pairs_the_two_rotary_halves():
    # one head of dim 4: HF rows (x0, x1 | y0, y1) rotate x_j with y_j; GGML wants them adjacent
    w = torch.arange(4.0)[:, None]
    assert mf.llama_cpp_permute(w, 1).flatten().tolist() == [0.0, 2.0, 1.0, 3.0]


@pytest.mark.parametrize("tensor_type", mf.K_QUANTS)
def test_k_quant_blocks_decode_finite_and_close(tmp_path, tensor_type):
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize

    path = mf.write_tiny_gguf(tmp_path / "m.gguf", "qwen3", tensor_type=tensor_type, vocab_size=SMALL_VOCAB,
                              **K_DIMS)
    hf = mf.tiny_hf_state_dict(mf.tiny_spec("qwen3", vocab_size=SMALL_VOCAB, **K_DIMS))
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    rel_rms = {"Q4_K": 0.15, "Q5_K": 0.07, "Q6_K": 0.04}[tensor_type]

    for hf_name, gguf_name in (("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight"),
                               ("model.layers.1.self_attn.q_proj.weight", "blk.1.attn_q.weight"),
                               ("model.embed_tokens.weight", "token_embd.weight")):
        t = tensors[gguf_name]
        assert t.tensor_type == GGMLQuantizationType[tensor_type]
        w = dequantize(t.data, t.tensor_type)
        assert np.isfinite(w).all()
        ref = hf[hf_name].numpy()
        assert w.shape == ref.shape
        assert np.sqrt(np.mean((w - ref) ** 2)) < rel_rms * np.sqrt(np.mean(ref**2))
    assert tensors["blk.0.attn_norm.weight"].tensor_type == GGMLQuantizationType.F32


def test_k_quant_needs_256_wide_inputs(tmp_path):
    with pytest.raises(ValueError, match="multiple of 256"):
        mf.write_tiny_gguf(tmp_path / "m.gguf", "llama", tensor_type="Q4_K", vocab_size=SMALL_VOCAB)


def test_llama3_rope_scaling_is_a_rope_freqs_tensor_both_loaders_agree_on(tmp_path):
    from transformers.integrations.gguf import read_gguf_metadata

    ids = list(range(20, 84))  # past original_max_position_embeddings=64, where scaling bites hardest
    scaled = mf.write_tiny_gguf(tmp_path / "s.gguf", "llama", vocab_size=SMALL_VOCAB, rope_scaling_llama3=True)
    plain = mf.write_tiny_gguf(tmp_path / "p.gguf", "llama", vocab_size=SMALL_VOCAB)
    folder = mf.write_tiny_hf_folder(tmp_path / "hf", "llama", vocab_size=SMALL_VOCAB, rope_scaling_llama3=True)

    metadata, tensor_names = read_gguf_metadata(str(scaled))
    assert "rope_freqs.weight" in tensor_names
    assert not [k for k in metadata if ".rope.scaling." in k]  # llama.cpp would add linear scaling on top
    a = mf.hf_logits(mf.hf_model_from_gguf(scaled), ids)
    torch.testing.assert_close(a, mf.hf_logits(mf.hf_model_from_folder(folder), ids), rtol=0, atol=1e-4)
    assert (a - mf.hf_logits(mf.hf_model_from_gguf(plain), ids)).abs().max() > 0.3


def test_qwen3_head_dim_other_than_dim_over_heads(tmp_path):
    kw = {"vocab_size": SMALL_VOCAB, "dim": 64, "n_heads": 4, "head_dim": 32}  # 4 * 32 != 64
    gguf_path = mf.write_tiny_gguf(tmp_path / "m.gguf", "qwen3", **kw)
    model = mf.hf_model_from_gguf(gguf_path)
    assert model.config.head_dim == 32
    folder = mf.write_tiny_hf_folder(tmp_path / "hf", "qwen3", **kw)
    torch.testing.assert_close(mf.hf_logits(model, IDS), mf.hf_logits(mf.hf_model_from_folder(folder), IDS),
                               rtol=0, atol=1e-5)


def test_untied_output_and_mixed_embedding_type(tmp_path):
    from gguf import GGMLQuantizationType, GGUFReader

    path = mf.write_tiny_gguf(tmp_path / "m.gguf", "qwen2", tensor_type="Q4_0", embed_type="Q8_0",
                              tie_embeddings=False, vocab_size=SMALL_VOCAB)
    types = {t.name: t.tensor_type for t in GGUFReader(path).tensors}
    assert types["output.weight"] == types["token_embd.weight"] == GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.Q4_0
    assert types["blk.0.attn_q.bias"] == GGMLQuantizationType.F32
    model = mf.hf_model_from_gguf(path)
    assert not model.config.tie_word_embeddings
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_greedy_on_cache_matches_argmax_without_cache(tmp_path):
    model = mf.hf_model_from_gguf(mf.write_tiny_gguf(tmp_path / "m.gguf", "qwen2", vocab_size=SMALL_VOCAB))
    tokens = mf.hf_greedy(model, IDS[:5], 8)
    assert len(tokens) == 8
    full = mf.hf_logits(model, IDS[:5] + tokens[:-1]).argmax(-1)[4:].tolist()
    assert tokens == full


def test_full_smollm2_vocabulary_by_default(tmp_path):
    from transformers.integrations.gguf import read_gguf_metadata

    path = mf.write_tiny_gguf(tmp_path / "m.gguf", "llama", n_layers=1)
    metadata, _ = read_gguf_metadata(str(path))
    source, _ = read_gguf_metadata(str(mf.smollm2_path()))
    assert metadata["tokenizer.ggml.tokens"] == metadata["llama.vocab_size"] == 49152  # counts, from this reader
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        assert metadata[key] == source[key]
    for key in ("block_count", "context_length", "embedding_length", "feed_forward_length",
                "attention.head_count", "attention.head_count_kv", "rope.freq_base",
                "attention.layer_norm_rms_epsilon", "rope.dimension_count"):
        assert f"llama.{key}" in metadata
    logits = mf.hf_logits(mf.hf_model_from_gguf(path), IDS[:4])
    assert logits.shape == (4, 49152) and torch.isfinite(logits).all()


def test_folder_tokenizer_and_bf16_weights(tmp_path):
    import json

    from safetensors import safe_open
    from transformers import AutoTokenizer

    folder = mf.write_tiny_hf_folder(tmp_path / "hf", "qwen3", vocab_size=SMALL_VOCAB, dtype="bfloat16")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["tie_word_embeddings"]
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok.encode("the in a")
    assert ids and max(ids) < SMALL_VOCAB and tok.decode(ids) == "the in a"
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    logits = mf.hf_logits(mf.hf_model_from_folder(folder), IDS)
    assert torch.isfinite(logits).all()
