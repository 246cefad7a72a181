"""Mixture-of-experts models (Qwen3-MoE, Mixtral) against transformers: tiny random models as
Hugging Face folders and as GGUF files, whole and split into stages, decoded one session and
several at once."""

from __future__ import annotations

import pytest
import torch

from fastserve_edge.engine.generate import DecodeStep, Pipeline, local_stages
from fastserve_edge.engine.model import MixtureOfExperts, expert_rows, sum_experts
from fastserve_edge.engine.sampling import Sampler, SamplingParams
from fastserve_edge.models import open_model
from tests import models_fixtures as mf
from tests import moe_fixtures as moe

VOCAB = 2048
IDS = [1, 1690, 198, 237, 359, 1789, 28, 253, 1593, 30, 2, 198, 1, 520, 931, 198, 57, 548]
GREEDY = SamplingParams(temperature=0, repeat_penalty=1.0)
CLOSE = 1e-3  # as test_engine_families: the fp16 KV cache's 3-4e-4


def pipeline(path, **kw) -> Pipeline:
    source = open_model(path)
    return Pipeline(source.config, local_stages(source, max_tokens=128, **kw), 128)


def rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module", params=moe.MOE_ARCHS)
def folder(request, tmp_path_factory):
    return moe.write_hf_folder(tmp_path_factory.mktemp(request.param) / "hf", request.param, seed=5, vocab_size=VOCAB)


def arch_of(folder) -> str:
    return "qwen3moe" if moe.hf_config_of(folder)["model_type"] == "qwen3_moe" else "mixtral"


def test_hf_folder_logits_and_greedy_match_transformers(folder):
    source = open_model(folder)
    assert source.config.moe and (source.config.n_experts, source.config.n_experts_used) == (8, 2)
    ref_model = moe.oracle(folder)
    ours = pipeline(folder).forward("s", IDS, 0, all_logits=True)
    assert rel_error(ours, mf.hf_logits(ref_model, IDS)) < CLOSE
    assert list(pipeline(folder).generate("g", IDS, Sampler(GREEDY), max_tokens=32)) == mf.hf_greedy(ref_model, IDS, 32)


@pytest.mark.parametrize("ttype", ["F32", "Q8_0"])
def test_gguf_logits_and_greedy_match_transformers(folder, tmp_path, ttype):
    path = moe.write_gguf(tmp_path / "m.gguf", folder, arch_of(folder), tensor_type=ttype)
    source = open_model(path)
    assert source.config.arch == ("qwen3moe" if arch_of(folder) == "qwen3moe" else "llama")
    assert not any("_exps" in n for n in source.names())  # every expert its own matrix
    assert source.has("blk.1.ffn_down.7.weight") and source.tensor("blk.1.ffn_down.7.weight").shape == (64, 32)
    ref_model = moe.oracle(folder, ttype)
    ours = pipeline(path).forward("s", IDS, 0, all_logits=True)
    ref = mf.hf_logits(ref_model, IDS)
    assert rel_error(ours, ref) < (CLOSE if ttype == "F32" else 1e-2)  # Q8_0: our int16 activations
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    if ttype == "F32":
        assert list(pipeline(path).generate("g", IDS, Sampler(GREEDY), max_tokens=32)) == mf.hf_greedy(ref_model, IDS, 32)


def test_k_quant_experts_load_and_match(tmp_path):
    """Q4_K experts (the Q4_K_M people download): rows of 256, blocks read in place."""
    folder = moe.write_hf_folder(tmp_path / "hf", "qwen3moe", seed=9, vocab_size=VOCAB, dim=256, expert_ffn=256)
    path = moe.write_gguf(tmp_path / "k.gguf", folder, "qwen3moe", tensor_type="Q4_K")
    ours = pipeline(path).forward("s", IDS, 0, all_logits=True)
    ref = mf.hf_logits(moe.oracle(folder, "Q4_K"), IDS)
    assert rel_error(ours, ref) < 2e-2


@pytest.mark.parametrize("arch", moe.MOE_ARCHS)
def test_every_split_point_gives_the_same_logits(tmp_path, arch):
    path = moe.write_gguf(tmp_path / "m.gguf", moe.write_hf_folder(tmp_path / "hf", arch, seed=3, vocab_size=VOCAB,
                                                                  n_layers=4), arch, tensor_type="F16")
    whole = pipeline(path).forward("s", IDS, 0, all_logits=True)
    for cuts in ([0, 1, 4], [0, 2, 4], [0, 3, 4], [0, 1, 2, 3, 4]):
        split = pipeline(path, boundaries=cuts).forward("s", IDS, 0, all_logits=True)
        torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)


def test_batched_decode_equals_each_session_alone(folder):
    """Several sessions' rows through the experts together (grouped by expert) give each the
    token it gets alone."""
    prompts = [IDS[:5], IDS[3:11], IDS[7:]]
    alone = []
    for i, p in enumerate(prompts):
        alone.append(list(pipeline(folder).generate(f"a{i}", p, Sampler(GREEDY), max_tokens=6)))
    pipe = pipeline(folder)
    greedy = Sampler(GREEDY)
    tokens = [pipe.next_token(f"b{i}", p, 0, greedy, p) for i, p in enumerate(prompts)]
    got = [[t] for t in tokens]
    for step in range(5):
        steps = [DecodeStep(f"b{i}", got[i][-1], len(p) + step, greedy, p) for i, p in enumerate(prompts)]
        for i, t in enumerate(pipe.next_tokens(steps)):
            got[i].append(t)
    assert got == alone


def test_only_the_chosen_experts_run(folder):
    """A token reads only the experts its router picks: the others' weights are never touched."""
    stage = local_stages(open_model(folder), max_tokens=64)[0]
    block_moe = stage.stage.blocks[0].ffn
    assert isinstance(block_moe, MixtureOfExperts)
    calls: list[int] = []
    for e, expert in enumerate(block_moe.experts):
        expert.register_forward_pre_hook(lambda module, args, e=e: calls.append(e))
    x = torch.randn(1, 1, 64)
    _, chosen = block_moe.route(x.reshape(1, -1))
    block_moe(x)
    assert sorted(calls) == sorted(chosen[0].tolist()) and len(calls) == 2


def test_one_token_goes_straight_to_the_chosen_experts_kernels_with_the_modules_bits(folder, tmp_path):
    """Decode's one row skips the modules (their dispatch was a third of a step at two threads):
    the chosen experts' gates and ups run in one kernel call, their downs in one more, in
    expert order, and the output is the modules' bit for bit (what a batch, a prefill and an
    expert-parallel group compute)."""
    path = moe.write_gguf(tmp_path / "q.gguf", folder, arch_of(folder), tensor_type="Q8_0")
    block_moe = local_stages(open_model(path), max_tokens=64)[0].stage.blocks[0].ffn
    kernels = block_moe._kernels
    assert kernels is not None
    ran: list[tuple[str, list[int]]] = []

    def counted(name, call):
        return lambda experts, x: ran.append((name, experts.tolist())) or call(experts, x)

    kernels.gate_up, kernels.down = counted("gate_up", kernels.gate_up), counted("down", kernels.down)
    for seed in range(4):
        x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(seed))
        rows = x.reshape(1, -1)
        weights, chosen = block_moe.route(rows)
        ran.clear()
        fast = block_moe(x).reshape(1, -1)
        assert ran == [("gate_up", sorted(chosen[0].tolist())), ("down", sorted(chosen[0].tolist()))]
        parts = [(hit, block_moe.run_expert(e, rows, hit, weights[hit, slot, None])) for e, hit, slot in expert_rows(chosen)]
        assert torch.equal(fast, sum_experts(1, 64, parts))


def test_k_rows_of_one_part_add_in_order_as_k_parts():
    """Decode's one row passes its k expert outputs as one part (k rows into row 0): index_add_
    adds them one after another, the bits of one part per expert in expert order (and not of
    another order: the magnitudes make the order show)."""
    y = torch.randn(8, 2048, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 8)[:, None]
    one = torch.zeros(1, dtype=torch.long)
    in_order = sum_experts(1, 2048, [(one, y[i:i + 1]) for i in range(8)])
    assert torch.equal(sum_experts(1, 2048, [(torch.zeros(8, dtype=torch.long), y)]), in_order)
    assert not torch.equal(sum_experts(1, 2048, [(one, y[i:i + 1]) for i in reversed(range(8))]), in_order)


def test_a_dense_mixture_has_no_kernel_path(folder):
    block_moe = local_stages(open_model(folder), max_tokens=64)[0].stage.blocks[0].ffn
    assert block_moe._kernels is None  # fp32 experts from a folder: through the modules


def test_a_config_with_impossible_experts_is_refused(tmp_path):
    import json

    from fastserve_edge.errors import ModelFormatError

    folder = moe.write_hf_folder(tmp_path / "hf", "mixtral", seed=1, vocab_size=VOCAB)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_experts_per_tok"] = 9  # more than its 8 experts
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match="experts"):
        open_model(folder)


def test_quantized_decode_through_the_c_attention_agrees_with_prefill(folder, tmp_path):
    """A quantized mixture decodes one token at a time through the C attention glue and the
    experts' own kernels: each greedy token is the one a prefill of the same text picks."""
    path = moe.write_gguf(tmp_path / "q.gguf", folder, arch_of(folder), tensor_type="Q8_0")
    pipe = pipeline(path)
    assert all(block.glue is not None for block in pipe.stages[0].stage.blocks)
    tokens = list(pipe.generate("g", IDS, Sampler(GREEDY), max_tokens=8))
    logits = pipeline(path).forward("p", IDS + tokens[:-1], 0, all_logits=True)
    assert logits[len(IDS) - 1:].argmax(-1).tolist() == tokens


def test_a_decode_steps_attention_is_one_c_call_with_the_glues_bits(folder, tmp_path):
    """A quantized mixture's decode step takes each block's attention (norm, projections,
    rope, cache, heads, wo, residual, the FFN's norm) in one C call (fs_block_attend): every
    logit of each step is the step-by-step glue's (attend_row, what a tensor-parallel group
    runs on its heads), bit for bit."""
    path = moe.write_gguf(tmp_path / "q.gguf", folder, arch_of(folder), tensor_type="Q8_0")
    fast, slow = pipeline(path), pipeline(path)
    assert all(block.attention_program is not None and block.program is None for block in fast.stages[0].stage.blocks)
    for block in slow.stages[0].stage.blocks:
        block.attention_program = None
    calls = []
    program = fast.stages[0].stage.blocks[0].attention_program
    real = program.attend
    program.attend = lambda *a: calls.append(1) or real(*a)
    a, b = fast.forward("s", IDS, 0), slow.forward("s", IDS, 0)
    for step in range(6):
        token = int(a.argmax())
        a = fast.forward("s", [token], len(IDS) + step)
        b = slow.forward("s", [token], len(IDS) + step)
        assert torch.equal(a, b), step
    assert len(calls) == 6


def test_an_attention_only_block_is_refused_by_the_whole_block_kernels(folder, tmp_path):
    """The C whole-block entry points run an FFN: given a mixture's attention-only block they
    refuse it rather than read matrices that are not there."""
    import ctypes

    path = moe.write_gguf(tmp_path / "q.gguf", folder, arch_of(folder), tensor_type="Q8_0")
    program = pipeline(path).stages[0].stage.blocks[0].attention_program
    lib = program.kernels.lib
    spec = ctypes.byref(program.spec)
    assert lib.fs_block_work_floats(spec, 16) > 0
    assert lib.fs_block_batch_work_floats(spec, 1, 16) == -1
    work = torch.empty(lib.fs_block_work_floats(spec, 16))
    row, cache = torch.zeros(program.spec.dim), torch.zeros(program.n_kv, 16, program.head_dim, dtype=torch.float16)
    rope = torch.zeros(program.head_dim)
    assert lib.fs_block_one(spec, row.data_ptr(), cache.data_ptr(), cache.data_ptr(), 16, 0, rope.data_ptr(),
                            rope.data_ptr(), work.data_ptr(), 1, work.numel()) == -1
    with pytest.raises(RuntimeError, match="fs_block_attend failed"):  # too little room for its cache
        program._work_cap = 16
        program._work = torch.empty(4)
        program.attend(row, cache, cache, 0, rope, rope)


@pytest.mark.parametrize("arch", moe.MOE_ARCHS)
@pytest.mark.parametrize("speeds", [[1, 1], [3, 2, 1]])
def test_expert_parallel_group_is_one_machine_bit_for_bit(tmp_path, arch, speeds):
    """The tensor layout of a mixture: whole experts per machine by speed, the router on every
    machine, the weighted outputs gathered and added in expert order: every logit of a prompt
    and of each decode step is one machine's, bit for bit (3 machines: one holds no heads)."""
    from fastserve_edge.engine.tensor import Slices, SliceWeights, TensorSlice
    from tests.unit.test_tensor_parallel import assert_same_candidates, group_logits, group_of, one_machine_logits

    folder = moe.write_hf_folder(tmp_path / "hf", arch, seed=4, vocab_size=VOCAB, dim=128, n_layers=3)
    source = open_model(moe.write_gguf(tmp_path / "m.gguf", folder, arch, tensor_type="Q8_0"))
    prompt = IDS[:8]
    want = one_machine_logits(source, prompt, 10)
    with group_of(source, speeds) as (group, slices, _, workers):
        got = group_logits(group, prompt, 10)
        assert slices.ffn_at[-1] == 8 and slices.ranks == len(speeds)  # experts, whole
    assert_same_candidates(got, want)
    assert all(w.error is None for w in workers)
    # a machine loads only its own experts
    slices = Slices.split(source.config, speeds)
    part = TensorSlice(SliceWeights(source, slices, 1), max_tokens=64)
    held = sorted(int(e) for e in part.blocks[0].ffn.experts.keys())
    assert held == list(range(slices.ffn_at[1], slices.ffn_at[2])) and len(held) < 8
    assert not slices.holds(source.config, f"blk.0.ffn_up.{slices.ffn_at[0]}.weight", 1)


def test_the_planners_shape_of_a_mixture_reads_only_the_chosen_experts(folder, tmp_path):
    from fastserve_edge.cluster.coordinator import model_shape
    from fastserve_edge.cluster.shard_cache import build_manifest

    path = moe.write_gguf(tmp_path / "m.gguf", folder, arch_of(folder), tensor_type="Q8_0")
    source = open_model(path)
    shape = model_shape(source, build_manifest(source, path, tmp_path / "cache"), 128)
    c = source.config
    attn = 2 * c.dim * c.n_heads * c.head_dim + 2 * c.dim * c.n_kv_heads * c.head_dim
    experts = 3 * c.dim * c.expert_ffn_dim
    assert shape.read_share == pytest.approx((attn + 2 * experts + 8 * c.dim) / (attn + 8 * experts + 8 * c.dim))
    assert shape.exchange_floats == c.n_heads * c.head_dim + c.dim + 2 * c.dim  # heads, wo, 2 experts' outputs
    assert sum(shape.layer_bytes) > 8 * 3 * c.dim * c.expert_ffn_dim * c.n_layers  # every expert held
