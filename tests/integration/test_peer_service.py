"""A peer and a host in one process on loopback: LoadStage through FetchLayer, Forward,
and what a peer does with bad input (refuses the call, keeps serving)."""

from __future__ import annotations

import grpc
import pytest
import torch

from fastserve_edge.cluster.auth import serve
from fastserve_edge.cluster.coordinator import ClusterOptions, Coordinator
from fastserve_edge.cluster.peer import PeerNode, PeerService
from fastserve_edge.cluster.profile import Profile
from fastserve_edge.cluster.protocol import peer_pb2
from fastserve_edge.cluster.remote import PeerClient, PeerLost, RemoteStage, SessionLost
from fastserve_edge.cluster.shard_cache import ShardCache
from fastserve_edge.engine.generate import Pipeline, local_stages
from fastserve_edge.engine.sampling import Sampler, SamplingParams
from fastserve_edge.models import open_model
from fastserve_edge.settings import Paths
from tests.models_fixtures import write_tiny_gguf

TOKEN = "peer-service-test-token-0001"
PROFILE = Profile(memory_bytes=1 << 30, total_memory_bytes=2 << 30, decode_gflops=10.0, prefill_gflops=20.0,
                  bandwidth_gbs=5.0, threads=1, cpu="test")


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", arch="llama", tensor_type="Q4_0", n_layers=4)
    source = open_model(path)
    node = PeerNode(node_id="aa" * 8, name="peer", profile=PROFILE, cache=ShardCache(tmp_path / "peer" / "shards"),
                    token=TOKEN)
    server, port = serve(PeerService(node), TOKEN)
    monkeypatch.setattr("fastserve_edge.cluster.coordinator.load_profile", lambda *a, **k: PROFILE)
    coordinator = Coordinator(paths=Paths(cache=tmp_path / "host" / "cache", config=tmp_path / "host" / "config"),
                              source=source, model_path=path, model_name="tiny", ctx=32,
                              options=ClusterOptions(token=TOKEN, static_peers=(f"127.0.0.1:{port}",), min_stages=2))
    coordinator.discover()
    yield source, node, coordinator, port
    coordinator.close()
    server.stop(None)


def test_a_two_stage_plan_over_loopback_generates_what_one_machine_does(cluster):
    source, node, coordinator, _ = cluster
    plan = coordinator.make_plan()
    assert len(plan.stages) == 2
    pipeline = coordinator.apply(plan)
    assert node.holding is not None and node.holding.end == source.config.n_layers
    greedy = SamplingParams(temperature=0, repeat_penalty=1.0)
    alone = Pipeline(source.config, local_stages(source, max_tokens=32), 32)
    ids = [1, 4, 9, 3, 7]
    assert list(pipeline.generate("s", ids, Sampler(greedy), max_tokens=12)) == \
        list(alone.generate("s", ids, Sampler(greedy), max_tokens=12))
    seeded = SamplingParams(temperature=0.9, seed=7)
    assert list(pipeline.generate("t", ids, Sampler(seeded), max_tokens=12)) == \
        list(alone.generate("t", ids, Sampler(seeded), max_tokens=12))


def test_garbage_and_unknown_sessions_are_refused_and_the_peer_keeps_serving(cluster):
    source, node, coordinator, port = cluster
    coordinator.apply(coordinator.make_plan())
    client = PeerClient(f"127.0.0.1:{port}", TOKEN)
    stage = node.holding
    remote = RemoteStage(client, stage.start, stage.end, is_last=True, max_elements=10**6, vocab_size=10**6)
    hidden = torch.zeros(1, 1, source.config.dim)
    with pytest.raises(SessionLost):  # position 5 of a session it never saw
        remote.forward_sample("new", hidden, 5, Sampler(SamplingParams(temperature=0)), [0] * 6)
    stub = client.stub
    replies = stub.Forward(iter([peer_pb2.ForwardRequest(session="g", pos=0, hidden=b"\x00garbage")]))
    with pytest.raises(grpc.RpcError) as err:
        list(replies)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    wrong_width = torch.zeros(1, 2, source.config.dim + 1)
    with pytest.raises(PeerLost, match="do not fit"):
        RemoteStage(client, stage.start, stage.end, is_last=True, max_elements=10**6, vocab_size=10**6).forward("w", wrong_width, 0)
    token = remote.forward_sample("ok", hidden, 0, Sampler(SamplingParams(temperature=0)), [3])
    assert 0 <= token < source.config.vocab_size
    assert client.health().sessions >= 1
    client.close()


def test_many_sessions_at_once_are_batched_on_the_peer_and_each_gets_its_own_answer(cluster, monkeypatch):
    """The serving loop's decode step sends every session's row to the peer at once; the peer
    runs the rows that wait for it as one batched forward, and each session's tokens stay
    those of a single machine."""
    source, node, coordinator, _ = cluster
    pipeline = coordinator.apply(coordinator.make_plan())
    alone = Pipeline(source.config, local_stages(source, max_tokens=32), 32)
    greedy = SamplingParams(temperature=0, repeat_penalty=1.0)
    prompts = {f"s{i}": [1 + i, 4, 9, 3 + 2 * i][: 2 + i % 3] for i in range(6)}
    batch_sizes: list[int] = []
    forward_batch = type(node.holding.stage).forward_batch

    def counting(stage, sessions, x, positions):
        batch_sizes.append(len(sessions))
        return forward_batch(stage, sessions, x, positions)

    monkeypatch.setattr(type(node.holding.stage), "forward_batch", counting)
    from fastserve_edge.engine.generate import DecodeStep
    want: dict[str, list[int]] = {}
    got: dict[str, list[int]] = {}
    last: dict[str, int] = {}
    for sid, ids in prompts.items():
        want[sid] = list(alone.generate(sid, ids, Sampler(greedy), max_tokens=8))
        last[sid] = pipeline.next_token(sid, ids, 0, Sampler(greedy), ids)
        got[sid] = [last[sid]]
    samplers = {sid: Sampler(greedy) for sid in prompts}
    for _ in range(7):
        steps = [DecodeStep(sid, got[sid][-1], len(prompts[sid]) + len(got[sid]) - 1, samplers[sid],
                            prompts[sid] + got[sid]) for sid in prompts]
        for sid, token in zip(prompts, pipeline.next_tokens(steps)):
            got[sid].append(token)
    assert got == want
    assert max(batch_sizes) > 1, batch_sizes  # rows that waited for the stage ran together


def test_the_serving_loops_prompt_cache_rewinds_a_session_on_the_peer(cluster):
    """`serve`'s prompt cache over a cluster: an ended session's KV stays on the peer, and a
    prompt that shares its start takes it over: the peer rewinds the session to the shared
    position and goes on from there, and the answer is still one machine's."""
    import asyncio

    from fastserve_edge.serving.engine_loop import PROMPT_CACHE_MIN, EngineLoop, Finished, Token

    source, node, coordinator, _ = cluster
    pipeline = coordinator.apply(coordinator.make_plan())
    alone = Pipeline(source.config, local_stages(source, max_tokens=32), 32)
    greedy = SamplingParams(temperature=0, repeat_penalty=1.0)
    first = [(3 * i) % 50 + 1 for i in range(PROMPT_CACHE_MIN + 4)]
    second = first[:PROMPT_CACHE_MIN + 2] + [7, 8, 9]

    async def answer(engine, ids):
        s = engine.submit(ids, Sampler(greedy), max_tokens=5, stop_ids=frozenset())
        tokens = []
        while not isinstance(event := await s.events.get(), Finished):
            assert isinstance(event, Token)
            tokens.append(event.id)
        return s, tokens

    async def main():
        engine = EngineLoop(pipeline, max_sessions=2)
        engine.start()
        try:
            s1, _ = await answer(engine, first)
            s2, tokens = await answer(engine, second)
            return s1, s2, tokens
        finally:
            await engine.close()

    s1, s2, tokens = asyncio.run(main())
    assert s2.kv == s1.kv and s2.cached == PROMPT_CACHE_MIN + 2
    assert tokens == list(alone.generate("x", second, Sampler(greedy), max_tokens=5))
