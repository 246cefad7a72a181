"""Fuzz the peer's Forward stream: random and mutated ForwardRequests from a token holder.

A real PeerService on loopback holds the last two layers of a tiny model. Every example
sends one stream of a few requests (sessions, positions, seq, hidden bytes mutated from a
valid pack_hidden, token lists, sampling values with NaN, inf and huge numbers) and checks
that each reply is a valid one for its request, or that the stream ends with a clean
INVALID_ARGUMENT, RESOURCE_EXHAUSTED or FAILED_PRECONDITION (never UNKNOWN or INTERNAL:
those are the peer's bugs); and that the peer answers a valid step afterwards.

FASTSERVE_FUZZ_EXAMPLES=N runs N examples (default 200, well under 40 s on 2 cores).
"""

from __future__ import annotations

import math
import os
import time

import grpc
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fastserve_edge.cluster.auth import open_channel, serve
from fastserve_edge.cluster.peer import PeerNode, PeerService
from fastserve_edge.cluster.protocol import peer_pb2, peer_pb2_grpc
from fastserve_edge.cluster.shard_cache import ShardCache
from fastserve_edge.cluster.wire import pack_hidden, unpack_hidden
from tests.unit.test_peer_limits import CTX, TOKEN, host, profile, sample_step  # noqa: F401 (host: the fixture)

EXAMPLES = int(os.environ.get("FASTSERVE_FUZZ_EXAMPLES", "200"))
CLEAN = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION}
MAX_SESSIONS = 3  # low, so that a stream's sessions reach it


@pytest.fixture(scope="module")
def target(host, tmp_path_factory):
    """(host, node, service, stub): a loaded peer on loopback, shared by every example."""
    node = PeerNode(node_id="ee" * 8, name="fuzzed", profile=profile(1 << 30),
                    cache=ShardCache(tmp_path_factory.mktemp("fuzzed")), token=TOKEN, max_sessions=MAX_SESSIONS)
    service = PeerService(node)
    server, port = serve(service, TOKEN)
    channel = open_channel(f"127.0.0.1:{port}", TOKEN)
    stub = peer_pb2_grpc.PeerStub(channel)
    stub.LoadStage(host.load_request(), timeout=60)
    yield host, node, service, stub
    channel.close()
    server.stop(None)


odd_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                       st.sampled_from([0.0, 1.0, 0.5, -1.0, 1e308, 5e-324, math.nan, math.inf, -math.inf]))
wild_samplings = st.builds(
    peer_pb2.Sampling, temperature=odd_floats, top_k=st.integers(0, 2**32 - 1), top_p=odd_floats,
    min_p=odd_floats, repeat_penalty=odd_floats, repeat_last_n=st.integers(0, 2**32 - 1),
    seed=st.integers(-2**63, 2**63 - 1), has_seed=st.booleans())
sane_samplings = st.builds(
    peer_pb2.Sampling, temperature=st.floats(0, 2), top_k=st.integers(0, 100), top_p=st.floats(0.01, 1),
    min_p=st.floats(0, 0.99), repeat_penalty=st.floats(0.5, 2), repeat_last_n=st.integers(0, 64),
    seed=st.integers(-2**63, 2**63 - 1), has_seed=st.booleans())


FIELDS = ("session", "seq", "pos", "shape", "dtype", "values", "bytes", "tokens", "sampling")


def pick(draw, wild: frozenset[str], field: str, usual, odd):
    return draw(odd if field in wild else usual)


@st.composite
def hidden_bytes(draw, dim: int, rows: int, wild: frozenset[str]) -> bytes:
    """A valid pack_hidden [1, rows, dim], or one of another shape, dtype or values, or mutated bytes."""
    shape = pick(draw, wild, "shape", st.just((1, rows, dim)),
                 st.sampled_from([(1, rows, dim + 1), (2, rows, dim), (1, dim)]))
    dtype = pick(draw, wild, "dtype", st.just(torch.float32), st.sampled_from([torch.float16, torch.bfloat16]))
    fill = pick(draw, wild, "values", st.none(), st.sampled_from([0.0, 1e4, -1e30, math.nan, math.inf]))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))))
    x = (x if fill is None else x.fill_(fill)).to(dtype)
    blob = bytearray(pack_hidden(x))
    mutation = pick(draw, wild, "bytes", st.just("none"), st.sampled_from(["flip", "truncate", "random", "empty"]))
    if mutation == "flip":
        for _ in range(draw(st.integers(1, 8))):
            blob[draw(st.integers(0, len(blob) - 1))] = draw(st.integers(0, 255))
    elif mutation == "truncate":
        del blob[draw(st.integers(0, len(blob) - 1)):]
    elif mutation == "random":
        blob = bytearray(draw(st.binary(max_size=512)))
    elif mutation == "empty":
        blob = bytearray()
    return bytes(blob)


@st.composite
def forward_requests(draw, index: int, dim: int, vocab: int) -> peer_pb2.ForwardRequest:
    """The index-th request of a stream: a plausible step (half the time) or one with a few wild fields."""
    wild = frozenset(draw(st.one_of(st.just(set()), st.sets(st.sampled_from(FIELDS), min_size=1, max_size=3))))
    rows = draw(st.integers(1, 4))
    return peer_pb2.ForwardRequest(
        session=pick(draw, wild, "session", st.sampled_from(["a", "b", "c", "d"]), st.text(max_size=200)),
        seq=pick(draw, wild, "seq", st.just(index), st.integers(0, 2**64 - 1)),
        pos=pick(draw, wild, "pos", st.integers(0, 6), st.integers(0, 2**32 - 1)),
        hidden=draw(hidden_bytes(dim, rows, wild)),
        tokens=pick(draw, wild, "tokens", st.one_of(st.lists(st.integers(0, vocab - 1), min_size=rows, max_size=rows),
                                                     st.just([])),
                    st.lists(st.integers(-2**31, 2**31 - 1), max_size=5)),
        sampling=pick(draw, wild, "sampling", sane_samplings, wild_samplings),
        all_logits=draw(st.booleans()), sample=draw(st.booleans()), reset=draw(st.booleans()),
        logprob=draw(st.booleans()), new_sampler=draw(st.booleans()))


@st.composite
def streams(draw, dim: int, vocab: int) -> list[peer_pb2.ForwardRequest]:
    return [draw(forward_requests(i, dim, vocab)) for i in range(draw(st.integers(1, 5)))]


def check_reply(req: peer_pb2.ForwardRequest, reply: peer_pb2.ForwardReply, dim: int, vocab: int) -> None:
    assert (reply.session, reply.seq) == (req.session, req.seq)
    output = reply.WhichOneof("output")
    if reply.kv_lost:
        assert output is None
    elif req.sample:
        assert output == "token" and 0 <= reply.token < vocab
    else:
        assert output == "hidden"
        out = unpack_hidden(reply.hidden, max_elements=CTX * vocab)
        assert out.shape[0] == 1 and out.shape[-1] in (dim, vocab)


def probe(host, stub) -> None:
    """The peer still answers a valid step."""
    reply = next(stub.Forward(iter([sample_step(host, "probe")]), timeout=30))
    assert 0 <= reply.token < host.config.vocab_size


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(data=st.data())
def test_random_forward_streams_get_valid_replies_or_clean_refusals(target, data):
    host, node, service, stub = target
    dim, vocab = host.config.dim, host.config.vocab_size
    requests = data.draw(streams(dim, vocab), label="stream")
    replies = []
    try:
        for reply in stub.Forward(iter(requests), timeout=30):
            replies.append(reply)
    except grpc.RpcError as err:
        assert err.code() in CLEAN, f"{err.code()}: {err.details()}"
        event(f"refused: {err.code().name}")
    else:
        assert len(replies) == len(requests)
    for req, reply in zip(requests, replies):
        check_reply(req, reply, dim, vocab)
        event("a kv_lost reply" if reply.kv_lost else f"a {reply.WhichOneof('output')} reply")
    probe(host, stub)


def test_after_the_fuzzing_every_stream_and_session_is_gone(target):
    """Runs after the fuzz test (file order): what the streams opened, their ends freed."""
    host, node, service, stub = target
    for _ in range(100):
        if service._streams == 0 and not node.sessions:
            break
        time.sleep(0.05)
    assert service._streams == 0 and node.sessions == {}
    probe(host, stub)

