"""The engine against transformers on small random-weight models of each family, written
as GGUF (every supported tensor type) and as Hugging Face folders."""

from __future__ import annotations

import json

import pytest
import torch

from fastserve_edge.engine.generate import GenerationStats, Pipeline, local_stages
from fastserve_edge.errors import ConfigError, ModelFormatError
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


# --- Gemma 3: local (sliding-window) and global layers, four norms a block, GeGLU, scaled embeddings.
# 8 layers: layer 5 global (every 6th), the rest local; a window of 4 against prompts of 18 and
# more tokens, so most keys are outside a local layer's window.
GEMMA = dict(n_layers=8, vocab_size=VOCAB)
LONG_IDS = (IDS * 3)[:50]


def _gemma_window_matters(model, ids) -> None:
    """The oracle itself with every layer global gives other logits: a test that passes is one
    where the window was applied."""
    ref = mf.hf_logits(model, ids)
    model.config.sliding_window = 1 << 20
    for layer in model.model.layers:
        layer.self_attn.sliding_window = 1 << 20
    assert rel_error(mf.hf_logits(model, ids), ref) > 0.05


@pytest.mark.parametrize("ttype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_K"])
def test_gemma3_gguf_logits_match_transformers(tmp_path, ttype):
    kquant = ttype in mf.K_QUANTS
    path = mf.write_tiny_gguf(tmp_path / "gemma3.gguf", mf.GEMMA3, tensor_type=ttype, seed=3,
                              dim=256 if kquant else 64, ffn_dim=512 if kquant else 128, **GEMMA)
    ours = pipeline(path).forward("s", LONG_IDS, 0, all_logits=True)
    ref = mf.hf_logits(mf.hf_model_from_gguf(path), LONG_IDS)
    assert ours.shape == ref.shape == (len(LONG_IDS), VOCAB)
    assert rel_error(ours, ref) < CLOSE
    # the same next token wherever transformers' top two differ by more than rounding (50
    # positions of a Q4_0 model hold a tie within 2e-4)
    top2 = ref.topk(2, dim=-1).values
    clear = top2[:, 0] - top2[:, 1] > 1e-2
    assert clear.sum() >= len(LONG_IDS) * 0.8 and torch.equal(ours.argmax(-1)[clear], ref.argmax(-1)[clear])
    if ttype == "F32":
        _gemma_window_matters(mf.hf_model_from_gguf(path), LONG_IDS)


def test_gemma3_gguf_linear_rope_scaling_on_global_layers(tmp_path):
    path = mf.write_tiny_gguf(tmp_path / "gemma3.gguf", mf.GEMMA3, seed=5, rope_linear_factor=8.0, **GEMMA)
    assert open_model(path).config.rope_linear_factor == 8.0
    ours = pipeline(path).forward("s", LONG_IDS, 0, all_logits=True)
    assert rel_error(ours, mf.hf_logits(mf.hf_model_from_gguf(path), LONG_IDS)) < CLOSE


@pytest.mark.parametrize("ttype", ["F32", "Q8_0"])
def test_gemma3_gguf_greedy_32_tokens_identical(tmp_path, ttype):
    path = mf.write_tiny_gguf(tmp_path / "gemma3.gguf", mf.GEMMA3, tensor_type=ttype, seed=5, **GEMMA)
    expected = mf.hf_greedy(mf.hf_model_from_gguf(path), IDS, 32)
    assert list(pipeline(path).generate("g", IDS, Sampler(GREEDY), max_tokens=32)) == expected


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gemma3_hf_folder_logits_match_transformers(tmp_path, dtype):
    # every 3rd layer global (2, 5), and linear rope scaling on them, as Gemma 3 4B+ have
    folder = mf.write_tiny_hf_folder(tmp_path / "gemma3", mf.GEMMA3, dtype=dtype, seed=11, sliding_pattern=3,
                                     rope_linear_factor=8.0, **GEMMA)
    cfg = open_model(folder).config
    assert [cfg.window(i) for i in range(8)] == [4, 4, 0, 4, 4, 0, 4, 4] and cfg.rope_linear_factor == 8.0
    ours = pipeline(folder).forward("s", LONG_IDS, 0, all_logits=True)
    ref = mf.hf_logits(mf.hf_model_from_folder(folder), LONG_IDS)
    assert rel_error(ours, ref) < (CLOSE if dtype == "float32" else 2e-2)


def test_gemma3_hf_folder_greedy_identical(tmp_path):
    folder = mf.write_tiny_hf_folder(tmp_path / "gemma3", mf.GEMMA3, seed=13, sliding_window=8, **GEMMA)
    expected = mf.hf_greedy(mf.hf_model_from_folder(folder), IDS, 32)
    assert list(pipeline(folder).generate("g", IDS, Sampler(GREEDY), max_tokens=32)) == expected


@pytest.mark.parametrize("kind", ["gguf", "hf"])
def test_gemma3_split_into_stages_matches_one_stage_and_transformers(tmp_path, kind):
    if kind == "gguf":
        path = mf.write_tiny_gguf(tmp_path / "gemma3.gguf", mf.GEMMA3, tensor_type="F16", seed=17,
                                  tie_embeddings=False, **GEMMA)
        oracle = mf.hf_model_from_gguf(path)
    else:
        path = mf.write_tiny_hf_folder(tmp_path / "gemma3", mf.GEMMA3, seed=17, **GEMMA)
        oracle = mf.hf_model_from_folder(path)
    whole = pipeline(path).forward("s", LONG_IDS, 0, all_logits=True)
    expected = mf.hf_greedy(oracle, IDS, 32)
    for cuts in ([0, 1, 8], [0, 5, 8], [0, 6, 8], [0, 3, 6, 8], [0, 2, 4, 5, 6, 7, 8]):
        split = pipeline(path, boundaries=cuts)
        torch.testing.assert_close(split.forward("s", LONG_IDS, 0, all_logits=True), whole, rtol=1e-5, atol=1e-5)
        assert list(split.generate("g", IDS, Sampler(GREEDY), max_tokens=32)) == expected, cuts


def test_gemma3_sliding_layer_cache_holds_only_its_window(tmp_path):
    path = mf.write_tiny_gguf(tmp_path / "gemma3.gguf", mf.GEMMA3, seed=19, **GEMMA)
    p = pipeline(path, boundaries=[0, 4, 8])
    list(p.generate("g", LONG_IDS, Sampler(GREEDY), max_tokens=20))  # 70 positions
    windows = [p.config.window(i) for i in range(8)]
    for stage in p.stages:
        cache = stage._caches["g"]
        for layer, (k, v) in enumerate(zip(cache.k, cache.v)):
            held = k.shape[2]
            if windows[stage.start + layer]:
                assert held == v.shape[2] == windows[stage.start + layer] == 4
            else:  # the global layer: every position so far (it grows by doubling up to max_tokens)
                assert held >= 70
    second = p.stages[1]._caches["g"]
    assert second.nbytes == 2 * 2 * 16 * 2 * (3 * 4 + second.k[1].shape[2])  # K and V, 2 heads of 16, fp16


def test_gemma3_rewind_reprefills_what_a_window_no_longer_holds(tmp_path):
    path = mf.write_tiny_gguf(tmp_path / "gemma3.gguf", mf.GEMMA3, seed=23, **GEMMA)
    p = pipeline(path)
    list(p.generate("s", LONG_IDS, Sampler(GREEDY), max_tokens=8))
    # the same session, a prompt that shares only the first 30 tokens: its local layers' rings
    # hold positions 54.. only, so it starts over; same answer as a new session
    again = LONG_IDS[:30] + [77, 78, 79]
    assert list(p.generate("s", again, Sampler(GREEDY), max_tokens=8)) == \
        list(pipeline(path).generate("t", again, Sampler(GREEDY), max_tokens=8))
    # a turn that continues the conversation reuses all of it
    stats = GenerationStats()
    held = p._seen["s"]
    list(p.generate("s", held + [80, 81], Sampler(GREEDY), max_tokens=4, stats=stats))
    assert stats.cached_tokens == len(held)


def test_gemma3_configs_the_engine_cannot_run_are_refused(tmp_path):
    folder = mf.write_tiny_hf_folder(tmp_path / "gemma3", mf.GEMMA3, seed=1, **GEMMA)
    config = json.loads((folder / "config.json").read_text())
    for change, message in (({"final_logit_softcapping": 30.0}, "soft-capping"),
                            ({"attn_logit_softcapping": 50.0}, "soft-capping"),
                            ({"model_type": "gemma3"}, "multimodal"),
                            ({"hidden_activation": "silu"}, "activation")):
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ModelFormatError, match=message):
            open_model(folder)


@pytest.mark.parametrize("speeds", [[1, 1], [3, 2, 1]])
def test_gemma3_tensor_parallel_group_is_one_machine_bit_for_bit(tmp_path, speeds):
    """Gemma 3 in the tensor layout (its blocks in torch on every machine, sliced as llama's;
    the post-norms on the gathered rows; the windows on each machine's heads): a prompt longer
    than the window and 10 decode steps give one machine's logits, bit for bit."""
    from tests.unit.test_tensor_parallel import assert_same_candidates, group_logits, group_of, one_machine_logits

    path = mf.write_tiny_gguf(tmp_path / "gemma3.gguf", mf.GEMMA3, tensor_type="Q8_0", seed=1, dim=128, ffn_dim=256,
                              **GEMMA)
    source = open_model(path)
    assert not source.config.fits_c_block and source.config.sliding_window
    prompt = LONG_IDS[:12]
    want = one_machine_logits(source, prompt, 10)
    with group_of(source, speeds) as (group, _, _, workers):
        got = group_logits(group, prompt, 10)
    assert_same_candidates(got, want)
    assert all(w.error is None for w in workers)
