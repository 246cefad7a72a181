"""The engine against transformers on small random-weight models of each family, written
as GGUF (every supported tensor type) and as Hugging Face folders."""

from __future__ import annotations

import pytest
import torch

from fastserve_edge.engine.generate import Pipeline, local_stages
from fastserve_edge.engine.sampling import Sampler, SamplingParams
from fastserve_edge.models import open_model
from tests import models_fixtures as mf

VOCAB = 2048  # a slice of SmolLM2's vocabulary keeps transformers' GGUF parsing fast
IDS = [1, 1690, 198, 237, 359, 1789, 28, 253, 1593, 30, 2, 198, 1, 520, 931, 198, 57, 548]  # all < VOCAB
GREEDY = SamplingParams(temperature=0, repeat_penalty=1.0)
# Keys and values are cached as fp16 (kv_cache.KV_DTYPE, as llama.cpp): 3-4e-4 of relative
# logit error against transformers' fp32 on these models, where the math alone gives < 1e-5.
# A real mistake (rope, GQA, a scale) shows as 1e-1 and more.
CLOSE = 1e-3


def pipeline(path, **kw) -> Pipeline:
    source = open_model(path)
    return Pipeline(source.config, local_stages(source, max_tokens=128, **kw), 128)


def rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("arch", mf.ARCHS)
@pytest.mark.parametrize("ttype", mf.TENSOR_TYPES)
def test_gguf_logits_match_transformers(tmp_path, arch, ttype):
    kquant = ttype in mf.K_QUANTS
    path = mf.write_tiny_gguf(tmp_path / f"{arch}.gguf", arch, tensor_type=ttype, vocab_size=VOCAB,
                              dim=256 if kquant else 64, ffn_dim=512 if kquant else 128, seed=3,
                              tie_embeddings=arch != "qwen2")
    ours = pipeline(path).forward("s", IDS, 0, all_logits=True)
    ref = mf.hf_logits(mf.hf_model_from_gguf(path), IDS)
    assert ours.shape == ref.shape == (len(IDS), VOCAB)
    # the same blocks on both sides; ours multiplies them in place with activations held to
    # 16 bits per 32 values, so only float rounding (and the fp16 KV cache) differs
    assert rel_error(ours, ref) < CLOSE
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("arch", mf.ARCHS)
def test_gguf_greedy_32_tokens_identical(tmp_path, arch):
    path = mf.write_tiny_gguf(tmp_path / f"{arch}.gguf", arch, tensor_type="Q8_0", vocab_size=VOCAB, seed=5)
    expected = mf.hf_greedy(mf.hf_model_from_gguf(path), IDS, 32)
    assert list(pipeline(path).generate("g", IDS, Sampler(GREEDY), max_tokens=32)) == expected


def test_llama3_rope_scaling_from_gguf_rope_freqs(tmp_path):
    path = mf.write_tiny_gguf(tmp_path / "l3.gguf", "llama", vocab_size=VOCAB, rope_scaling_llama3=True,
                              context_length=512, seed=7)
    long_ids = (IDS * 6)[:100]  # scaling matters past the (fixture's) original context of 64
    ours = pipeline(path).forward("s", long_ids, 0, all_logits=True)
    ref = mf.hf_logits(mf.hf_model_from_gguf(path), long_ids)
    assert rel_error(ours, ref) < CLOSE


@pytest.mark.parametrize("arch", mf.ARCHS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_folder_logits_match_transformers(tmp_path, arch, dtype):
    folder = mf.write_tiny_hf_folder(tmp_path / arch, arch, vocab_size=VOCAB, dtype=dtype, seed=11,
                                     rope_scaling_llama3=arch == "llama", context_length=512)
    ours = pipeline(folder).forward("s", IDS, 0, all_logits=True)
    ref = mf.hf_logits(mf.hf_model_from_folder(folder), IDS)
    assert rel_error(ours, ref) < (CLOSE if dtype == "float32" else 2e-2)


@pytest.mark.parametrize("arch", mf.ARCHS)
def test_hf_folder_greedy_identical(tmp_path, arch):
    folder = mf.write_tiny_hf_folder(tmp_path / arch, arch, vocab_size=VOCAB, seed=13)
    expected = mf.hf_greedy(mf.hf_model_from_folder(folder), IDS, 32)
    assert list(pipeline(folder).generate("g", IDS, Sampler(GREEDY), max_tokens=32)) == expected


@pytest.mark.parametrize("arch", mf.ARCHS)
def test_every_split_point_gives_the_same_logits(tmp_path, arch):
    path = mf.write_tiny_gguf(tmp_path / f"{arch}.gguf", arch, tensor_type="F16", vocab_size=VOCAB,
                              n_layers=4, seed=17, tie_embeddings=False)
    whole = pipeline(path).forward("s", IDS, 0, all_logits=True)
    for cuts in ([0, 1, 4], [0, 2, 4], [0, 3, 4], [0, 1, 2, 3, 4]):
        split = pipeline(path, boundaries=cuts).forward("s", IDS, 0, all_logits=True)
        torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
