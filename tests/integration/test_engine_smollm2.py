"""The engine on the real SmolLM2-135M-Instruct (Q4_1) against transformers reading the same file."""

from __future__ import annotations

import pytest
import torch

from fastserve_edge.engine.generate import Pipeline, local_stages
from fastserve_edge.engine.quant import DENSE_PREFILL_ROWS
from fastserve_edge.engine.sampling import Sampler, SamplingParams

GREEDY = SamplingParams(temperature=0, repeat_penalty=1.0)
PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "List three colours of the rainbow.",
    "Explain gravity to a child in two sentences.",
]


@pytest.fixture(scope="module")
def whole(smollm2_source):
    return Pipeline(smollm2_source.config, local_stages(smollm2_source, max_tokens=256), 256)


@pytest.fixture(scope="module")
def tokenizer(smollm2_source):
    return smollm2_source.tokenizer()


def chat_ids(tokenizer, text):
    return tokenizer.encode_chat([{"role": "user", "content": text}])


LONG_PROMPT = "Summarise this: " + " ".join(PROMPTS * 5)


@pytest.mark.parametrize("text", [PROMPTS[0], LONG_PROMPT], ids=["integer-kernels", "dequantize-gemm"])
def test_logits_match_transformers(whole, tokenizer, smollm2_hf, text):
    """A short prompt goes through the integer kernels, a long one (DENSE_PREFILL_ROWS and
    more) through the kernels' GEMM (kernels/gemm.c), SwiGLU a slice at a time, except for
    the x8 matrices of a build with AVX-512 VNNI, which stay on the integer kernels (tile by tile)."""
    ids = chat_ids(tokenizer, text)
    assert (len(ids) >= DENSE_PREFILL_ROWS) == (text is LONG_PROMPT) and len(ids) < 256, len(ids)
    ours = whole.forward("logits", ids, 0, all_logits=True)
    with torch.no_grad():
        ref = smollm2_hf(torch.tensor([ids])).logits[0]
    rel = ((ours - ref).norm() / ref.norm()).item()
    assert rel < 2e-3, rel  # ~9e-4 with the fp16 KV cache (llama.cpp's default too), ~1e-4 without
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    whole.drop("logits")


@pytest.mark.parametrize("text", PROMPTS)
def test_greedy_32_tokens_identical_to_transformers(whole, tokenizer, smollm2_hf, text):
    ids = chat_ids(tokenizer, text)
    with torch.no_grad():
        ref = smollm2_hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    ours = list(whole.generate(f"greedy-{text}", ids, Sampler(GREEDY), max_tokens=32))
    whole.drop(f"greedy-{text}")
    assert ours == ref


@pytest.mark.parametrize("cuts", [[0, 1, 30], [0, 15, 30], [0, 7, 8, 29, 30]])
def test_split_into_stages_gives_the_same_logits(smollm2_source, whole, tokenizer, cuts):
    ids = chat_ids(tokenizer, PROMPTS[1])
    split = Pipeline(smollm2_source.config, local_stages(smollm2_source, max_tokens=256, boundaries=cuts), 256)
    expected = whole.forward("split", ids, 0, all_logits=True)
    got = split.forward("split", ids, 0, all_logits=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    # and decode steps after the prefill agree as well
    for pos, token in enumerate([42, 1337, 7], start=len(ids)):
        torch.testing.assert_close(split.forward("split", [token], pos), whole.forward("split", [token], pos),
                                   rtol=1e-5, atol=1e-4)
    whole.drop("split")


def test_second_turn_reuses_the_cached_prefix_with_same_tokens(smollm2_source, whole, tokenizer):
    first = chat_ids(tokenizer, PROMPTS[0])
    answer = list(whole.generate("multi", first, Sampler(GREEDY), max_tokens=8))
    follow = tokenizer.encode_chat([
        {"role": "user", "content": PROMPTS[0]},
        {"role": "assistant", "content": tokenizer.decode(answer)},
        {"role": "user", "content": "And of Italy?"},
    ])
    from fastserve_edge.engine.generate import GenerationStats

    stats = GenerationStats()
    cached = list(whole.generate("multi", follow, Sampler(GREEDY), max_tokens=12, stats=stats))
    assert stats.cached_tokens > len(first) // 2
    fresh = Pipeline(smollm2_source.config, whole.stages, 256)
    assert list(fresh.generate("fresh", follow, Sampler(GREEDY), max_tokens=12)) == cached
    whole.drop("multi")
    fresh.drop("fresh")


def test_int8_activations_trade_accuracy_as_documented(smollm2_source, tokenizer, smollm2_hf):
    """--activations int8 (llama.cpp's precision): SmolLM2's logits ~4e-2 from transformers',
    where the default int16 keeps ~6e-4 (test above), which is why int16 is the default. The
    one-token block path (decode.c) is as far off as the prompt kernels, no further (int8
    rounding amplifies their tiny differences: the two paths are ~1e-2 apart, int16's 7e-5)."""
    int8 = Pipeline(smollm2_source.config, local_stages(smollm2_source, max_tokens=256, activations="int8"), 256)
    ids = chat_ids(tokenizer, PROMPTS[1])
    prompt = int8.forward("prompt", ids, 0, all_logits=True)
    with torch.no_grad():
        ref = smollm2_hf(torch.tensor([ids])).logits[0]
    rel = ((prompt - ref).norm() / ref.norm()).item()
    assert 1e-2 < rel < 8e-2, rel  # ~4e-2 measured: int8 really runs, and no worse than measured
    for pos, token in enumerate(ids):  # the same prompt one token at a time
        last = int8.forward("steps", [token], pos)
    assert ((last - ref[-1]).norm() / ref[-1].norm()).item() < 8e-2  # 1.2e-2 measured (the prompt's row: 1.9e-2)
    int8.drop("prompt")
    int8.drop("steps")
