"""Tensor parallelism in one process: machines are threads joined by the real data path
(TCP on loopback, sealed frames). The group's logits and greedy answers are one machine's bit
for bit (the exact design); a broken link gives a clear error, never a hang."""

from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import contextmanager

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastserve_edge.cluster import datapath
from fastserve_edge.engine import kernels as kernels_mod
from fastserve_edge.models.config import ModelConfig
from fastserve_edge.engine.generate import Pipeline, local_stages
from fastserve_edge.engine.kernels import ExchangeError, Mesh
from fastserve_edge.engine.sampling import Sampler, SamplingParams
from fastserve_edge.engine.tensor import (ROW_GROUP, Slices, SliceWeights, TensorGroup, TensorSlice, TensorWorker,
                                          apportion)
from fastserve_edge.models import open_model
from tests.models_fixtures import smollm2_path, write_tiny_gguf

KERNELS = kernels_mod.load()
pytestmark = pytest.mark.skipif(KERNELS is None, reason="no C compiler: the kernels are not built")


@contextmanager
def group_of(source, speeds, *, max_tokens=256, timeout_ms=30_000):
    """A TensorGroup over len(speeds) machines: rank 0 here, the others on threads."""
    n = len(speeds)
    slices = Slices.split(source.config, speeds)
    listeners = [datapath.listen("127.0.0.1") for _ in range(n)]
    addresses = [("127.0.0.1", lst.getsockname()[1]) for lst in listeners]
    secret = datapath.new_plan_secret()
    parts = [TensorSlice(SliceWeights(source, slices, r), max_tokens=max_tokens, timeout_ms=timeout_ms)
             for r in range(n)]
    links: list = [None] * n
    workers: list[TensorWorker] = []

    def run(r):
        links[r] = datapath.connect(KERNELS, r, addresses, listeners[r], secret)
        if r:
            worker = TensorWorker(parts[r], links[r].mesh)
            workers.append(worker)
            worker.serve()

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(1, n)]
    for t in threads:
        t.start()
    run(0)
    group = TensorGroup(parts[0], links[0].mesh if n > 1 else None)
    try:
        yield group, slices, links, workers
    finally:
        group.close()
        for t in threads:
            t.join(10)
        for link in links:
            if link is not None:
                link.close()
        for lst in listeners:
            lst.close()
    assert not any(t.is_alive() for t in threads)


def one_machine_logits(source, prompt, steps):
    """One machine: the prompt as chat sends it (Stage.forward), then a token at a time through
    the C block (a decode step): the logits after the prompt and after each greedy token."""
    stage = local_stages(source, max_tokens=1024)[0]
    logits = stage.forward("s", torch.tensor([prompt]), 0)[0]
    out = [logits]
    for i in range(steps):
        logits = stage.forward_batch(["s"], torch.tensor([int(logits.argmax())]), [len(prompt) + i])[0]
        out.append(logits)
    return out


def group_logits(group, prompt, steps):
    out = [group.forward("s", torch.tensor([prompt]), 0)[0]]
    for i in range(steps):
        out.append(group.forward_batch(["s"], torch.tensor([int(out[-1].argmax())]), [len(prompt) + i])[0])
    return out


def assert_same_candidates(ours, theirs):
    """Every logit the group sends back is one machine's, bit for bit, and the best is the same."""
    for step, (a, b) in enumerate(zip(ours, theirs)):
        kept = torch.isfinite(a)
        assert kept.sum() >= min(64, a.numel()), step
        assert torch.equal(a[kept], b[kept]), f"step {step}: {(a[kept] - b[kept]).abs().max()}"
        assert int(a.argmax()) == int(b.argmax()), step
        assert torch.equal(b.topk(20).values, a.topk(20).values), step  # the top 20 were all sent


PROMPT = [1, 17, 42, 99, 7, 3, 250, 11]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("speeds", [[1, 1], [3, 2, 1]])
def test_group_logits_are_one_machines(tmp_path, arch, speeds):
    source = open_model(write_tiny_gguf(tmp_path / f"{arch}.gguf", arch, tensor_type="Q4_0", dim=128, ffn_dim=256,
                                        n_heads=4, n_kv_heads=2, n_layers=3))
    want = one_machine_logits(source, PROMPT, 12)
    with group_of(source, speeds) as (group, slices, _, workers):
        got = group_logits(group, PROMPT, 12)
        assert slices.ranks == len(speeds)
    assert_same_candidates(got, want)
    assert all(w.error is None for w in workers)


@pytest.mark.parametrize("speeds", [[1, 1], [5, 3, 2], [1, 1, 1, 1, 1]])
def test_smollm2_group_answers_as_one_machine(speeds):
    """SmolLM2 (3 KV heads): 2 machines, 3 with uneven shares, and 5 (more machines than KV
    heads: two hold no attention and take FFN, output and vocabulary rows)."""
    source = open_model(smollm2_path())
    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 30, 2]
    want = one_machine_logits(source, prompt, 16)
    with group_of(source, speeds) as (group, slices, links, _):
        got = group_logits(group, prompt, 16)
        if len(speeds) == 5:
            assert [slices.kv_at[r + 1] - slices.kv_at[r] for r in range(5)].count(0) == 2
        assert links[0].mesh.exchanges > 0
    assert_same_candidates(got, want)


def test_a_long_prompt_takes_one_machines_gemm_path_bit_for_bit():
    """600 prompt rows: the GEMM path (from DENSE_PREFILL_ROWS rows), in two steps of the group
    (PREFILL_ROWS at most), against one machine's single forward."""
    source = open_model(smollm2_path())
    prompt = [(7 * i) % 40000 + 100 for i in range(600)]
    want = one_machine_logits(source, prompt, 4)
    with group_of(source, [2, 1], max_tokens=1024) as (group, *_):
        got = group_logits(group, prompt, 4)
    assert_same_candidates(got, want)


def test_pipeline_over_a_group_generates_one_machines_answer(tmp_path):
    source = open_model(write_tiny_gguf(tmp_path / "llama.gguf", "llama", tensor_type="Q4_0", dim=128, ffn_dim=256))
    sampler = Sampler(SamplingParams(temperature=0))
    stages = local_stages(source, max_tokens=128)
    alone = list(Pipeline(source.config, stages, 128).generate("a", PROMPT, sampler, max_tokens=24))
    with group_of(source, [2, 1], max_tokens=128) as (group, *_):
        pipe = Pipeline(source.config, [group], 128)
        first = list(pipe.generate("a", PROMPT, sampler, max_tokens=24))
        again = list(pipe.generate("b", PROMPT, sampler, max_tokens=24))  # a second session
        batch = pipe.next_tokens([])
        pipe.drop("a")
    assert first == again
    assert batch == []
    assert first == alone


# -- the slices ----------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.05, 20), min_size=1, max_size=64), st.integers(1, 16), st.integers(1, 8),
       st.integers(4, 200), st.integers(8, 600), st.integers(40, 5000))
def test_slices_cover_every_row_once(speeds, n_kv, group, dim_units, ffn_units, vocab_units):
    cfg = ModelConfig(arch="llama", n_layers=2, dim=dim_units * ROW_GROUP, n_heads=n_kv * group, n_kv_heads=n_kv,
                      head_dim=64, ffn_dim=ffn_units * ROW_GROUP, vocab_size=vocab_units * ROW_GROUP - 7,
                      context_length=256, rope_theta=1e4, norm_eps=1e-5)
    if len(speeds) > min(dim_units, ffn_units):
        with pytest.raises(Exception, match="more than"):
            Slices.split(cfg, speeds)
        return
    s = Slices.split(cfg, speeds)
    for at, total in ((s.kv_at, n_kv), (s.dim_at, cfg.dim), (s.ffn_at, cfg.ffn_dim), (s.vocab_at, cfg.vocab_size)):
        assert at[0] == 0 and at[-1] == total and list(at) == sorted(at) and len(at) == len(speeds) + 1
    for at in (s.dim_at, s.ffn_at):
        assert all(at[r + 1] > at[r] and at[r] % ROW_GROUP == 0 for r in range(len(speeds)))
    # proportional: a machine's FFN share is within one group of its speed's share
    units = [(s.ffn_at[r + 1] - s.ffn_at[r]) // ROW_GROUP for r in range(len(speeds))]
    spare = ffn_units - len(speeds)
    for u, w in zip(units, speeds):
        assert abs((u - 1) - spare * w / sum(speeds)) <= 1
    assert Slices.split(cfg, speeds) == s  # deterministic


def test_apportion_refuses_what_cannot_be_split():
    assert apportion(10, [1, 1, 2]) == [3, 3, 4]
    assert apportion(3, [1, 1, 1, 1, 1], at_least=0) == [1, 1, 1, 0, 0]
    with pytest.raises(ValueError):
        apportion(2, [1, 1, 1])
    with pytest.raises(ValueError):
        apportion(8, [1, float("nan")])


# -- the data path: every failure is a clear error, never a hang -----------------------------

def pair(keys_a=None, keys_b=None):
    a, b = socket.socketpair()
    ka = keys_a if keys_a is not None else (os.urandom(32), os.urandom(32))
    kb = keys_b if keys_b is not None else (ka[1], ka[0])
    m0 = Mesh(KERNELS, 0, [-1, a.fileno()], [(bytes(32), bytes(32)), ka])
    m1 = Mesh(KERNELS, 1, [b.fileno(), -1], [kb, (bytes(32), bytes(32))])
    return m0, m1, a, b


def test_a_frame_goes_through_sealed():
    m0, m1, a, b = pair()
    data = torch.arange(1000, dtype=torch.float32)
    got = torch.zeros(1000)
    t = threading.Thread(target=m1.exchange, args=({}, {0: got}))
    t.start()
    m0.exchange({1: data}, {})
    t.join(5)
    assert torch.equal(got, data)
    assert m0.bytes_out == 8 + 4000 + 16


def test_a_wrong_key_fails_the_tag():
    m0, m1, a, b = pair(keys_b=(os.urandom(32), os.urandom(32)))
    m0.exchange({1: torch.ones(16)}, {})
    with pytest.raises(ExchangeError, match="authentication tag") as err:
        m1.exchange({}, {0: torch.zeros(16)}, timeout_ms=2000)
    assert err.value.peer == 0


def test_a_garbled_frame_fails_the_tag():
    m0, m1, a, b = pair()
    sent = torch.ones(64)
    m0.exchange({1: sent}, {})
    frame = bytearray(b.recv(1 << 16, socket.MSG_PEEK))
    b.recv(len(frame))  # take it off the wire and put back one bit flipped
    frame[20] ^= 0x10
    a.sendall(bytes(frame))
    with pytest.raises(ExchangeError, match="authentication tag"):
        m1.exchange({}, {0: torch.zeros(64)}, timeout_ms=2000)


def test_a_replayed_frame_is_refused():
    m0, m1, a, b = pair()
    m0.exchange({1: torch.ones(8)}, {})
    frame = b.recv(1 << 16, socket.MSG_PEEK)
    m1.exchange({}, {0: torch.zeros(8)}, timeout_ms=2000)
    a.sendall(frame)  # the same frame again
    with pytest.raises(ExchangeError, match="out of sequence"):
        m1.exchange({}, {0: torch.zeros(8)}, timeout_ms=2000)


def test_a_frame_of_the_wrong_size_is_refused_before_it_is_read():
    m0, m1, a, b = pair()
    m0.exchange({1: torch.ones(1 << 12)}, {})  # 16 KiB where 64 bytes are expected
    with pytest.raises(ExchangeError, match="where 64 were expected"):
        m1.exchange({}, {0: torch.zeros(16)}, timeout_ms=2000)


def test_a_machine_that_leaves_or_stops_mid_exchange():
    m0, m1, a, b = pair()
    t0 = time.monotonic()
    with pytest.raises(ExchangeError, match="stopped answering") as err:
        m0.exchange({}, {1: torch.zeros(16)}, timeout_ms=300)
    assert err.value.peer == 1 and time.monotonic() - t0 < 3
    b.close()
    with pytest.raises(ExchangeError, match="closed its connection"):
        m0.exchange({}, {1: torch.zeros(16)}, timeout_ms=2000)


def test_a_group_whose_machine_dies_mid_answer_raises_not_hangs(tmp_path):
    source = open_model(write_tiny_gguf(tmp_path / "llama.gguf", "llama", tensor_type="Q4_0", dim=128, ffn_dim=256))
    with group_of(source, [1, 1], timeout_ms=2000) as (group, _, links, workers):
        group.forward("s", torch.tensor([PROMPT]), 0)
        for sock in links[1].sockets:  # the other machine goes away mid-conversation
            sock.shutdown(socket.SHUT_RDWR)
        with pytest.raises(ExchangeError) as err:
            group.forward_batch(["s"], torch.tensor([5]), [len(PROMPT)])
        assert err.value.peer == 1


def test_the_data_port_ignores_strangers_and_needs_the_plan_secret():
    listeners = [datapath.listen("127.0.0.1") for _ in range(2)]
    addresses = [("127.0.0.1", lst.getsockname()[1]) for lst in listeners]
    secret = datapath.new_plan_secret()
    stranger = socket.create_connection(addresses[0])
    stranger.sendall(b"GET / HTTP/1.1\r\n\r\n" + bytes(64))
    replay = socket.create_connection(addresses[0])
    replay.sendall(datapath._hello(datapath.new_plan_secret(), 1, 0))  # another plan's hello
    got = {}
    t = threading.Thread(target=lambda: got.update(one=datapath.connect(KERNELS, 1, addresses, listeners[1], secret)))
    t.start()
    zero = datapath.connect(KERNELS, 0, addresses, listeners[0], secret, timeout_s=5)
    t.join(5)
    out = torch.zeros(4)
    zero.mesh.exchange({1: torch.tensor([1.0, 2, 3, 4])}, {})
    got["one"].mesh.exchange({}, {0: out})
    assert out.tolist() == [1, 2, 3, 4]
    try:
        assert stranger.recv(16) == b""  # closed unanswered
    except ConnectionResetError:
        pass
    # a machine with the wrong secret never gets through: the wait ends with a clear error
    with pytest.raises(datapath.DataPathError, match=r"machines \[1\] of the group did not connect"):
        t = threading.Thread(target=lambda: datapath.connect(KERNELS, 1, addresses, listeners[1], os.urandom(32),
                                                             timeout_s=1), daemon=True)
        t.start()
        datapath.connect(KERNELS, 0, addresses, listeners[0], secret, timeout_s=1)
    for x in (zero, got["one"]):
        x.close()


def test_several_sessions_in_one_step_get_what_each_gets_alone(tmp_path):
    """serve's batched decode: M sessions' rows in one step of the group, each the bits it gets alone."""
    source = open_model(write_tiny_gguf(tmp_path / "qwen3.gguf", "qwen3", tensor_type="Q4_0", dim=128, ffn_dim=256))
    prompts = {"a": PROMPT, "b": PROMPT[::-1], "c": PROMPT[:5]}
    with group_of(source, [1, 2]) as (group, *_):
        alone = {s: group_logits(group, p, 6) for s, p in prompts.items()}
        for s in prompts:
            group.drop(s)
        last = {s: int(group.forward(s, torch.tensor([p]), 0)[0].argmax()) for s, p in prompts.items()}
        together = {s: [] for s in prompts}
        for i in range(6):
            names = list(prompts)
            logits = group.forward_batch(names, torch.tensor([last[s] for s in names]),
                                         [len(prompts[s]) + i for s in names])
            for s, row in zip(names, logits):
                together[s].append(row)
                last[s] = int(row.argmax())
    for s in prompts:
        assert_same_candidates(together[s], alone[s][1:])


# -- a LoadStage for a slice, as a stranger might send it -------------------------------------

def tensor_plan(**override):
    from fastserve_edge.cluster.protocol import peer_pb2
    fields = dict(rank=1, kv_at=[0, 1, 3], dim_at=[0, 288, 576], ffn_at=[0, 768, 1536], vocab_at=[0, 24576, 49152],
                  data_addresses=["10.0.0.1:4000", "10.0.0.2:4001"], secret=bytes(32))
    fields.update(override)
    return peer_pb2.TensorPlan(**fields)


@pytest.mark.parametrize("override, words", [
    (dict(rank=0), "rank 0"),
    (dict(rank=2), "rank 2 of 2"),
    (dict(kv_at=[0, 2, 1]), "kv spans"),
    (dict(dim_at=[0, 288, 577]), "dim spans"),
    (dict(ffn_at=[0, 0, 1536]), "ffn spans"),
    (dict(vocab_at=[0, 49152]), "all of one length"),
    (dict(secret=bytes(8)), "8-byte secret"),
    (dict(data_addresses=["10.0.0.1:4000", "x"]), "is not ip:port"),
    (dict(data_addresses=["10.0.0.1:4000"]), "1 data addresses"),
])
def test_a_bad_tensor_plan_is_refused_before_anything_is_fetched(override, words):
    from fastserve_edge.cluster.peer import TensorOrder
    from fastserve_edge.cluster.wire import WireError
    cfg = open_model(smollm2_path()).config
    assert TensorOrder.from_pb(tensor_plan(), cfg).rank == 1
    with pytest.raises(WireError, match=words):
        TensorOrder.from_pb(tensor_plan(**override), cfg)


def test_a_slice_part_is_named_by_its_key_and_a_bad_key_is_refused():
    from fastserve_edge.cluster.peer import part_from_pb, part_to_pb
    from fastserve_edge.cluster.protocol import peer_pb2
    from fastserve_edge.cluster.wire import WireError
    key = Slices.split(open_model(smollm2_path()).config, [1, 1]).key(1)
    assert part_from_pb(part_to_pb(f"layer.3@{key}")) == f"layer.3@{key}"
    assert part_from_pb(part_to_pb(f"head@{key}")) == f"head@{key}"
    with pytest.raises(WireError, match="16 lowercase hex"):
        part_from_pb(peer_pb2.Part(kind=peer_pb2.PART_KIND_LAYER, layer=1, slice="../../etc"))


RACE = """
import os, socket, threading
from fastserve_edge.engine import kernels
k = kernels.load()
errors = []
def open_one():
    a, b = socket.socketpair()
    try:
        kernels.Mesh(k, 0, [-1, a.fileno()], [(bytes(32), bytes(32)), (os.urandom(32), os.urandom(32))]).close()
    except Exception as err:
        errors.append(err)
threads = [threading.Thread(target=open_one) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(len(errors))
"""


def test_machines_opening_their_meshes_at_once_all_find_libcrypto():
    """The first meshes of a process, opened by 8 threads at once (an in-process group's machines):
    libcrypto is looked up once for all of them (CI once saw the second thread find it missing)."""
    import subprocess
    import sys
    for _ in range(3):
        run = subprocess.run([sys.executable, "-c", RACE], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == "0"


def test_a_machine_without_heads_is_sent_no_attention(tmp_path):
    """More machines than KV heads: the one without heads holds (and is sent) no q/k/v rows,
    rather than empty tensors a peer would refuse; it still holds its rows of wo."""
    source = open_model(write_tiny_gguf(tmp_path / "m.gguf", "llama", tensor_type="Q4_0", dim=128, ffn_dim=256,
                                        n_heads=4, n_kv_heads=2, n_layers=2))
    slices = Slices.split(source.config, [3, 2, 1])
    empty = next(r for r in range(3) if slices.kv_at[r + 1] == slices.kv_at[r])
    cfg = source.config
    assert not any(slices.holds(cfg, f"blk.0.attn_{x}.weight", empty) for x in ("q", "k", "v"))
    assert slices.holds(cfg, "blk.0.attn_output.weight", empty) and slices.holds(cfg, "blk.0.ffn_up.weight", empty)
    assert all(slices.holds(cfg, "blk.0.attn_k.weight", r) for r in range(3) if r != empty)
