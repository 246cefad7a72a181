"""A peer's limits (issue 21): what a token holder, or a bug on a host, cannot make it do.

One real PeerService on loopback holding the last two layers of a tiny 4-layer model, loaded
through LoadStage from a real WeightServer; every refusal is a clean gRPC status, and the
peer answers a valid step afterwards.
"""

from __future__ import annotations

import json
import math
import os
import queue
import time
from dataclasses import dataclass

import grpc
import pytest
import torch

from fastserve_edge.cluster import peer
from fastserve_edge.cluster.auth import open_channel, serve
from fastserve_edge.cluster.peer import (
    MAX_PART_BYTES, MIN_CHUNK_BYTES, ModelProvider, PeerNode, PeerService, WeightServer, _Pending, part_to_pb,
)
from fastserve_edge.cluster.profile import Profile
from fastserve_edge.cluster.protocol import peer_pb2, peer_pb2_grpc
from fastserve_edge.cluster.shard_cache import Manifest, ShardCache, build_manifest, part_blob, parts_for_stage
from fastserve_edge.cluster.wire import WireError, pack_hidden, sampling_to_pb, unpack_hidden
from fastserve_edge.engine.kv_cache import kv_bytes_per_token
from fastserve_edge.engine.sampling import SamplingParams
from fastserve_edge.errors import ConfigError
from fastserve_edge.models import open_model
from tests.models_fixtures import write_tiny_gguf

TOKEN = "peer-limits-test-token-0001-abcdef"
N_LAYERS, START, CTX = 4, 2, 32
GREEDY = sampling_to_pb(SamplingParams(temperature=0, repeat_penalty=1.0))


def profile(memory_bytes: int) -> Profile:
    return Profile(memory_bytes=memory_bytes, total_memory_bytes=memory_bytes, decode_gflops=10.0,
                   prefill_gflops=20.0, bandwidth_gbs=5.0, threads=1, cpu="test")


@dataclass
class Host:
    """The model's owner: a WeightServer over the tiny model file, and what it sent."""
    source: object
    manifest: Manifest
    address: str
    sent: list[int]

    @property
    def config(self):
        return self.source.config

    def load_request(self, **override) -> peer_pb2.LoadStageRequest:
        """The LoadStage a host sends for layers [START, N_LAYERS), every size declared."""
        manifest = [peer_pb2.TensorEntry(name=name, sha256=sha, nbytes=self.source.tensor(name).nbytes,
                                         part=part_to_pb(part))
                    for part in parts_for_stage(self.config, START, N_LAYERS)
                    for name, sha in sorted(self.manifest.parts.get(part, {}).items())]
        fields = dict(model_digest=self.manifest.digest, model_name="tiny",
                      model_config_json=json.dumps(self.config.to_dict()),
                      layer_start=START, layer_end=N_LAYERS, manifest=manifest, source_address=self.address,
                      ctx=CTX, host_name="test host")
        fields.update(override)
        return peer_pb2.LoadStageRequest(**fields)

    def stage_bytes(self) -> int:
        """What the stage takes once loaded besides KV: its weights and rope tables."""
        parts = parts_for_stage(self.config, START, N_LAYERS)
        return sum(self.manifest.runtime_bytes[p] for p in parts) + 2 * CTX * self.config.head_dim * 4

    def kv_per_position(self) -> int:
        return kv_bytes_per_token(self.config.n_kv_heads, self.config.head_dim) * (N_LAYERS - START)


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    folder = tmp_path_factory.mktemp("host")
    path = write_tiny_gguf(folder / "tiny.gguf", arch="llama", tensor_type="Q4_0", n_layers=N_LAYERS)
    source = open_model(path)
    manifest = build_manifest(source, path, folder / "cache")
    sent: list[int] = []
    provider = ModelProvider(source, manifest, on_sent=lambda who, nbytes: sent.append(nbytes))
    server, port = serve(WeightServer(provider), TOKEN)
    yield Host(source, manifest, f"127.0.0.1:{port}", sent)
    server.stop(None)


@dataclass
class Peer:
    node: PeerNode
    service: PeerService
    stub: peer_pb2_grpc.PeerStub


@pytest.fixture
def start_peer(tmp_path):
    """start_peer(memory_bytes=..., max_sessions=..., cache=...) -> a Peer on loopback (not loaded)."""
    servers, channels = [], []

    def start(*, memory_bytes: int = 1 << 30, cache: ShardCache | None = None, **node_args) -> Peer:
        node = PeerNode(node_id="bb" * 8, name="peer", profile=profile(memory_bytes),
                        cache=cache or ShardCache(tmp_path / f"peer{len(servers)}"), token=TOKEN, **node_args)
        service = PeerService(node)
        server, port = serve(service, TOKEN)
        channel = open_channel(f"127.0.0.1:{port}", TOKEN)
        servers.append(server)
        channels.append(channel)
        return Peer(node, service, peer_pb2_grpc.PeerStub(channel))

    yield start
    for channel in channels:
        channel.close()
    for server in servers:
        server.stop(None)


@pytest.fixture
def loaded(host, start_peer):
    p = start_peer()
    p.stub.LoadStage(host.load_request(), timeout=60)
    return p


def hidden(dim: int, rows: int = 1, value: float = 0.1) -> bytes:
    return pack_hidden(torch.full((1, rows, dim), value))


def sample_step(host: Host, session: str, *, pos: int = 0, rows: int = 1, seq: int = 0, **override):
    fields = dict(session=session, seq=seq, pos=pos, hidden=hidden(host.config.dim, rows),
                  tokens=list(range(1, rows + 1)), sample=True, sampling=GREEDY, new_sampler=True)
    fields.update(override)
    return peer_pb2.ForwardRequest(**fields)


class Stream:
    """One Forward stream that sends a request at a time and waits for its reply."""

    def __init__(self, stub: peer_pb2_grpc.PeerStub):
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._replies = stub.Forward(iter(self._requests.get, None), timeout=60)

    def call(self, request: peer_pb2.ForwardRequest) -> peer_pb2.ForwardReply:
        self._requests.put(request)
        return next(self._replies)

    def close(self) -> None:
        self._requests.put(None)
        self._replies.cancel()


def refused(stub, *requests: peer_pb2.ForwardRequest) -> grpc.RpcError:
    """Send the requests on a fresh stream; the RpcError that ended it."""
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Forward(iter(requests), timeout=60))
    return err.value


def still_serves(host: Host, p: Peer) -> None:
    reply = next(p.stub.Forward(iter([sample_step(host, "probe")]), timeout=60))
    assert 0 <= reply.token < host.config.vocab_size


# -- sessions and KV -------------------------------------------------------------------------

def test_a_new_session_beyond_max_sessions_is_refused_and_one_more_fits_after_a_drop(host, start_peer):
    p = start_peer(max_sessions=2)
    p.stub.LoadStage(host.load_request(), timeout=60)
    streams = [Stream(p.stub) for _ in range(3)]
    for i, stream in enumerate(streams[:2]):
        assert stream.call(sample_step(host, f"s{i}")).token >= 0
    with pytest.raises(grpc.RpcError) as err:
        streams[2].call(sample_step(host, "s2"))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-sessions" in err.value.details() and "DropSession" in err.value.details()
    assert set(p.node.sessions) == {"s0", "s1"}
    assert p.stub.DropSession(peer_pb2.DropSessionRequest(session="s0"), timeout=10).existed
    third = Stream(p.stub)
    assert third.call(sample_step(host, "s2")).token >= 0
    for stream in (*streams, third):
        stream.close()


def test_max_sessions_is_between_one_and_the_fixed_cap(tmp_path):
    for bad in (0, peer.MAX_SESSIONS + 1):
        with pytest.raises(ConfigError, match="--max-sessions"):
            PeerNode(node_id="cc" * 8, name="p", profile=profile(1 << 30), cache=ShardCache(tmp_path), token=TOKEN,
                     max_sessions=bad)


def test_sessions_whose_kv_would_not_fit_the_memory_left_by_the_weights_are_refused(host, start_peer):
    """The cap counts positions held, as the host's budget does (planner.kv_room_tokens): room
    for 2.5 full-context sessions after the weights takes two, refuses a third, and takes it
    once one ends."""
    rope = 2 * CTX * host.config.head_dim * 4
    weights = host.stage_bytes() - rope
    memory = weights + int(2.5 * CTX * host.kv_per_position())
    assert memory >= host.stage_bytes() + CTX * host.kv_per_position()  # LoadStage's own check passes
    p = start_peer(memory_bytes=memory)
    p.stub.LoadStage(host.load_request(), timeout=60)
    streams = [Stream(p.stub) for _ in range(3)]
    for i, stream in enumerate(streams[:2]):
        assert stream.call(sample_step(host, f"s{i}", rows=CTX, tokens=[1] * CTX)).token >= 0
    with pytest.raises(grpc.RpcError) as err:
        streams[2].call(sample_step(host, "s2", rows=CTX, tokens=[1] * CTX))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-memory" in err.value.details()
    streams[0].close()  # its sessions' KV goes with the stream
    assert Stream(p.stub).call(sample_step(host, "s3", rows=CTX, tokens=[1] * CTX)).token >= 0
    for stream in streams[1:]:
        stream.close()


def test_forward_streams_beyond_the_cap_are_refused_and_the_peer_keeps_answering(host, loaded, monkeypatch):
    monkeypatch.setattr(peer, "MAX_FORWARD_STREAMS", 2)
    open_streams = [Stream(loaded.stub) for _ in range(2)]
    for i, stream in enumerate(open_streams):
        stream.call(sample_step(host, f"s{i}"))
    err = refused(loaded.stub, sample_step(host, "s2"))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "Forward streams" in err.details()
    assert loaded.stub.Health(peer_pb2.HealthRequest(), timeout=10).sessions == 2  # Health still answers
    open_streams[0].close()
    for _ in range(100):  # the server notices the cancelled stream
        if loaded.service._streams < 2:
            break
        time.sleep(0.05)
    still_serves(host, loaded)
    open_streams[1].close()


# -- Forward requests ------------------------------------------------------------------------

@pytest.mark.parametrize("override, words", [
    (dict(rows=3, tokens=[1, 2]), "2 token ids for 3 rows"),
    (dict(tokens=[-1]), "vocabulary"),
    (dict(tokens="the vocabulary's size"), "vocabulary"),
    (dict(session="x" * 129), "session id"),
    (dict(hidden=pack_hidden(torch.full((1, 1, 64), float("nan")))), "inf or NaN"),
    (dict(hidden=pack_hidden(torch.full((1, 1, 64), float("inf")))), "inf or NaN"),
    (dict(sampling=peer_pb2.Sampling(temperature=math.inf, top_k=5, top_p=1.0, repeat_penalty=1.0)), "not finite"),
    (dict(sampling=peer_pb2.Sampling(temperature=1.0, top_p=1.0, repeat_penalty=math.inf)), "not finite"),
])
def test_bad_forward_steps_are_refused_with_invalid_argument(host, loaded, override, words):
    rows = override.pop("rows", 1)
    if override.get("tokens") == "the vocabulary's size":
        override["tokens"] = [host.config.vocab_size]
    session = override.pop("session", "bad")
    err = refused(loaded.stub, sample_step(host, session, rows=rows, **override))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert words in err.details()
    assert session not in loaded.node.sessions
    still_serves(host, loaded)


def test_seq_goes_upward_on_a_stream(host, loaded):
    err = refused(loaded.stub, sample_step(host, "s", seq=5),
                  sample_step(host, "s", pos=1, seq=5, new_sampler=False))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "seq 5 after 5" in err.details()
    still_serves(host, loaded)


def test_a_refused_step_fails_alone_in_its_batch(host, loaded):
    """Steps of several streams run as one batch; one that is refused, or that cannot be
    sampled, must not take the others' replies with it."""
    bad_sampling = sample_step(host, "b", sampling=peer_pb2.Sampling(temperature=math.nan, top_p=1.0,
                                                                      repeat_penalty=1.0))
    items = [_Pending(bad_sampling), _Pending(sample_step(host, "g1")),
             _Pending(sample_step(host, "oops", tokens=[5, 6])), _Pending(sample_step(host, "g2"))]
    with loaded.node.lock:
        loaded.service._run(items)
    assert [item.done for item in items] == [True] * 4
    assert isinstance(items[0].error, WireError) and isinstance(items[2].error, WireError)
    assert items[1].error is None and 0 <= items[1].reply.token < host.config.vocab_size
    assert items[3].error is None and 0 <= items[3].reply.token < host.config.vocab_size
    assert set(loaded.node.sessions) == {"g1", "g2"}  # the failed steps left nothing behind


def test_a_forward_to_a_peer_without_a_stage_is_a_failed_precondition(host, start_peer):
    p = start_peer()
    err = refused(p.stub, sample_step(host, "s"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "LoadStage" in err.details()


# -- LoadStage -------------------------------------------------------------------------------

@pytest.mark.parametrize("nbytes, code", [
    (MAX_PART_BYTES + 1, grpc.StatusCode.INVALID_ARGUMENT),     # one absurd tensor
    (2 << 30, grpc.StatusCode.RESOURCE_EXHAUSTED),              # more than the peer offers (1 GiB)
    (0, grpc.StatusCode.INVALID_ARGUMENT),                      # a host that declares nothing
])
def test_load_stage_refuses_declared_sizes_before_fetching_anything(host, start_peer, nbytes, code):
    p = start_peer()
    host.sent.clear()
    request = host.load_request()
    request.manifest[0].nbytes = nbytes
    with pytest.raises(grpc.RpcError) as err:
        p.stub.LoadStage(request, timeout=60)
    assert err.value.code() == code, err.value.details()
    assert host.sent == []  # not one chunk
    assert p.node.state == peer_pb2.PEER_STATE_IDLE and p.node.holding is None


def test_load_stage_refuses_a_part_whose_size_is_not_the_declared_one(host, start_peer):
    p = start_peer()
    request = host.load_request()
    request.manifest[0].nbytes -= 1
    with pytest.raises(grpc.RpcError) as err:
        p.stub.LoadStage(request, timeout=60)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "declared" in err.value.details()
    assert p.node.state == peer_pb2.PEER_STATE_IDLE
    p.stub.LoadStage(host.load_request(), timeout=60)  # and loads the right one afterwards
    assert p.node.state == peer_pb2.PEER_STATE_READY


def test_load_stage_refuses_threads_beyond_the_cpus(host, start_peer):
    p = start_peer()
    with pytest.raises(grpc.RpcError) as err:
        p.stub.LoadStage(host.load_request(threads=(os.cpu_count() or 1) + 1), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "CPUs" in err.value.details()
    assert p.node.state == peer_pb2.PEER_STATE_IDLE


def test_a_disk_error_during_load_stage_leaves_the_peer_idle_with_a_clean_error(host, start_peer, tmp_path):
    (tmp_path / "not-a-folder").write_text("")
    p = start_peer(cache=ShardCache(tmp_path / "not-a-folder" / "shards"))
    with pytest.raises(grpc.RpcError) as err:
        p.stub.LoadStage(host.load_request(), timeout=60)
    assert err.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.FAILED_PRECONDITION)
    assert "shard cache" in err.value.details() or "disk" in err.value.details()
    assert p.node.state == peer_pb2.PEER_STATE_IDLE and p.node.holding is None
    assert p.stub.Health(peer_pb2.HealthRequest(), timeout=10).state == peer_pb2.PEER_STATE_IDLE


# -- FetchLayer and the host's WeightServer ----------------------------------------------------

def test_fetch_layer_chunks_are_never_smaller_than_the_minimum(host):
    channel = open_channel(host.address, TOKEN)
    part = f"layer.{START}"
    chunks = list(peer_pb2_grpc.PeerStub(channel).FetchLayer(
        peer_pb2.FetchLayerRequest(model_digest=host.manifest.digest, part=part_to_pb(part), chunk_bytes=1),
        timeout=60))
    channel.close()
    total = len(part_blob(host.source, host.manifest, part))
    assert len(chunks) == math.ceil(total / MIN_CHUNK_BYTES)
    assert b"".join(c.data for c in chunks) == part_blob(host.source, host.manifest, part)


def test_the_weight_server_serves_fetch_layer_and_nothing_else(host):
    channel = open_channel(host.address, TOKEN)
    stub = peer_pb2_grpc.PeerStub(channel)
    calls = [
        lambda: stub.Hello(peer_pb2.HelloRequest(), timeout=10),
        lambda: stub.Health(peer_pb2.HealthRequest(), timeout=10),
        lambda: stub.LoadStage(host.load_request(), timeout=10),
        lambda: list(stub.Forward(iter([sample_step(host, "s")]), timeout=10)),
        lambda: stub.DropSession(peer_pb2.DropSessionRequest(session="s"), timeout=10),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(grpc.RpcError) as err:
        list(stub.FetchLayer(peer_pb2.FetchLayerRequest(model_digest="not hex", part=part_to_pb("head")), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    chunks = list(stub.FetchLayer(peer_pb2.FetchLayerRequest(model_digest=host.manifest.digest,
                                                             part=part_to_pb("head")), timeout=60))
    assert b"".join(c.data for c in chunks) == part_blob(host.source, host.manifest, "head")
    channel.close()


def test_the_host_times_the_link_and_an_oversized_echo_is_refused(start_peer):
    """The planner's link measurement: Health round trips, and 1 MiB echoed back; more is refused."""
    from fastserve_edge.cluster.remote import PeerClient
    p = start_peer()
    reply = p.stub.Health(peer_pb2.HealthRequest(echo_bytes=1 << 20), timeout=10)
    assert len(reply.echo) == 1 << 20
    assert refused_health(p.stub, (1 << 20) + 1).code() == grpc.StatusCode.INVALID_ARGUMENT
    server, bound = serve(peer.PeerService(p.node), TOKEN)
    try:
        rtt, gbps = PeerClient(f"127.0.0.1:{bound}", TOKEN).measure_link()
    finally:
        server.stop(None)
    assert 0 < rtt < 1000 and gbps > 0.01


def refused_health(stub, n: int) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        stub.Health(peer_pb2.HealthRequest(echo_bytes=n), timeout=10)
    return err.value
