"""The wire contract: every verb over a real gRPC server on loopback, message size limits,
the tensor codecs of wire.py, and the committed stubs being what peer.proto generates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import safetensors.torch
import torch
from gguf import GGMLQuantizationType as QType

from fastserve_edge.cluster import auth
from fastserve_edge.cluster.protocol import PROTOCOL_VERSION, peer_pb2, peer_pb2_grpc
from fastserve_edge.cluster.wire import (
    WireError,
    iter_chunks,
    join_chunks,
    pack_hidden,
    pack_tensors,
    sampling_from_pb,
    sampling_to_pb,
    sha256_of,
    unpack_hidden,
    unpack_tensors,
)
from fastserve_edge.engine.sampling import SamplingParams
from fastserve_edge.errors import FastServeError
from fastserve_edge.models.tensors import RawTensor

REPO = Path(__file__).resolve().parents[2]
PROTO = "fastserve_edge/cluster/protocol/peer.proto"
STUBS = ["peer_pb2.py", "peer_pb2.pyi", "peer_pb2_grpc.py"]
TOKEN = "0123456789abcdef0123456789abcdef"
MAX_ELEMENTS = 1 << 20


def rng_bytes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8)


def gguf_raw(name: str, qtype: QType, shape: tuple[int, ...], seed: int = 0) -> RawTensor:
    """Like gguf.py: uint8 rows [out, bytes_per_row] of (here random) block data."""
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    nbytes = int(np.prod(shape)) // block * size
    rows = int(np.prod(shape)) // shape[-1]
    return RawTensor(name, qtype, shape, rng_bytes(nbytes, seed).reshape(rows, -1))


def layer_raws() -> list[RawTensor]:
    return [
        gguf_raw("blk.0.attn_norm.weight", QType.F32, (64,), 1),
        gguf_raw("blk.0.attn_q.weight", QType.Q4_0, (8, 64), 2),
        gguf_raw("blk.0.ffn_down.weight", QType.Q6_K, (4, 256), 3),
        gguf_raw("blk.0.attn_k.weight", QType.F16, (8, 32), 4),
    ]


# -- a trivial servicer over a real server --------------------------------------------------


class EchoPeer(peer_pb2_grpc.PeerServicer):
    """Every verb answers something checkable; Forward doubles hidden states or samples pos+len(tokens)."""

    def __init__(self):
        self.blob = pack_tensors(layer_raws())
        self.dropped: list[str] = []

    def Hello(self, request, context):
        return peer_pb2.HelloReply(
            protocol_version=PROTOCOL_VERSION, node_id="node-1", name=f"peer for {request.name}",
            profile=peer_pb2.Profile(memory_bytes=8 << 30, decode_gflops=12.5, prefill_gflops=80.0,
                                     bandwidth_gbs=9.5, threads=4),
            state=peer_pb2.PEER_STATE_IDLE,
            cached=[peer_pb2.CachedModel(model_digest="abc", parts=[
                peer_pb2.Part(kind=peer_pb2.PART_KIND_LAYER, layer=3),
                peer_pb2.Part(kind=peer_pb2.PART_KIND_HEAD)])],
        )

    def LoadStage(self, request, context):
        return peer_pb2.LoadStageReply(tensors_cached=sum(1 for t in request.manifest if t.name.endswith("norm.weight")),
                                       tensors_fetched=len(request.manifest), bytes_fetched=sum(t.nbytes for t in request.manifest),
                                       load_seconds=0.25)

    def FetchLayer(self, request, context):
        if request.part.kind != peer_pb2.PART_KIND_LAYER or request.part.layer != 0:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such part")
        yield from iter_chunks(self.blob, request.chunk_bytes or 1000)

    def Forward(self, request_iterator, context):
        for req in request_iterator:
            if req.sample:
                params = sampling_from_pb(req.sampling)
                yield peer_pb2.ForwardReply(session=req.session, seq=req.seq, token=req.pos + len(req.tokens),
                                            logprob=-params.temperature, seconds=0.001)
            elif req.reset:
                yield peer_pb2.ForwardReply(session=req.session, seq=req.seq, kv_lost=True)
            else:
                x = unpack_hidden(req.hidden, max_elements=MAX_ELEMENTS)
                yield peer_pb2.ForwardReply(session=req.session, seq=req.seq, hidden=pack_hidden(x * 2))

    def DropSession(self, request, context):
        self.dropped.append(request.session)
        return peer_pb2.DropSessionReply(existed=request.session == "s1")

    def Health(self, request, context):
        return peer_pb2.HealthReply(state=peer_pb2.PEER_STATE_SERVING, sessions=2, tokens_per_second=31.5,
                                    stage=peer_pb2.StageInfo(model_digest="abc", layer_start=4, layer_end=9,
                                                             has_head=True))


@pytest.fixture(scope="module")
def peer():
    servicer = EchoPeer()
    server, port = auth.serve(servicer, TOKEN, bind="127.0.0.1:0", max_workers=4)
    yield servicer, port
    server.stop(None)


@pytest.fixture(scope="module")
def stub(peer):
    _, port = peer
    channel = auth.open_channel(f"127.0.0.1:{port}", TOKEN)
    yield peer_pb2_grpc.PeerStub(channel)
    channel.close()


def test_hello(stub):
    reply = stub.Hello(peer_pb2.HelloRequest(protocol_version=PROTOCOL_VERSION, node_id="host", name="desk"), timeout=10)
    assert reply.protocol_version == PROTOCOL_VERSION and reply.name == "peer for desk"
    assert reply.profile.memory_bytes == 8 << 30 and reply.profile.decode_gflops == 12.5 and reply.profile.threads == 4
    assert reply.state == peer_pb2.PEER_STATE_IDLE
    assert not reply.HasField("stage")
    assert [(p.kind, p.layer) for p in reply.cached[0].parts] == [(peer_pb2.PART_KIND_LAYER, 3), (peer_pb2.PART_KIND_HEAD, 0)]


def test_load_stage(stub):
    raws = layer_raws()
    manifest = [peer_pb2.TensorEntry(name=r.name, sha256=sha256_of(r), nbytes=r.nbytes,
                                     part=peer_pb2.Part(kind=peer_pb2.PART_KIND_LAYER, layer=0)) for r in raws]
    reply = stub.LoadStage(peer_pb2.LoadStageRequest(
        model_digest="abc", model_config_json="{}", layer_start=0, layer_end=1, has_embedding=False, has_head=False,
        manifest=manifest, source_address="127.0.0.1:1", ctx=2048, threads=2), timeout=10)
    assert reply.tensors_fetched == 4 and reply.tensors_cached == 1
    assert reply.bytes_fetched == sum(r.nbytes for r in raws) and reply.load_seconds == 0.25


def test_fetch_layer_streams_the_blob(stub):
    chunks = stub.FetchLayer(peer_pb2.FetchLayerRequest(
        model_digest="abc", part=peer_pb2.Part(kind=peer_pb2.PART_KIND_LAYER, layer=0), chunk_bytes=700), timeout=10)
    raws = unpack_tensors(join_chunks(chunks, max_bytes=1 << 20))
    assert [sha256_of(r) for r in raws] == [sha256_of(r) for r in layer_raws()]


def test_fetch_layer_error_status(stub):
    with pytest.raises(grpc.RpcError) as err:
        list(stub.FetchLayer(peer_pb2.FetchLayerRequest(model_digest="abc", part=peer_pb2.Part(
            kind=peer_pb2.PART_KIND_EMBEDDING)), timeout=10))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_forward_bidirectional_stream(stub):
    """Replies arrive one per request, in order, while the request stream is still open."""
    import queue

    requests: queue.Queue = queue.Queue()

    def feed():
        while (item := requests.get()) is not None:
            yield item

    replies = stub.Forward(feed(), timeout=20)
    x = torch.randn(1, 5, 16)
    requests.put(peer_pb2.ForwardRequest(session="s1", seq=1, pos=0, hidden=pack_hidden(x), tokens=[1, 2, 3, 4, 5]))
    first = next(replies)  # answered before the next request is even sent
    assert first.seq == 1 and first.WhichOneof("output") == "hidden"
    assert torch.equal(unpack_hidden(first.hidden, max_elements=MAX_ELEMENTS), x * 2)

    sampling = sampling_to_pb(SamplingParams(temperature=0.7, seed=42))
    requests.put(peer_pb2.ForwardRequest(session="s1", seq=2, pos=5, tokens=[9], sample=True, sampling=sampling))
    second = next(replies)
    assert second.seq == 2 and second.WhichOneof("output") == "token" and second.token == 6
    assert second.logprob == -0.7  # doubles: the peer samples with exactly the host's values

    requests.put(peer_pb2.ForwardRequest(session="s1", seq=3, pos=6, reset=True))
    third = next(replies)
    assert third.kv_lost and third.WhichOneof("output") is None
    requests.put(None)
    assert list(replies) == []


def test_drop_session_and_health(stub, peer):
    assert stub.DropSession(peer_pb2.DropSessionRequest(session="s1"), timeout=10).existed
    assert not stub.DropSession(peer_pb2.DropSessionRequest(session="nope"), timeout=10).existed
    assert peer[0].dropped[-2:] == ["s1", "nope"]
    health = stub.Health(peer_pb2.HealthRequest(), timeout=10)
    assert health.state == peer_pb2.PEER_STATE_SERVING and health.sessions == 2
    assert (health.stage.layer_start, health.stage.layer_end, health.stage.has_head) == (4, 9, True)


def test_oversized_message_refused_by_client_limit(peer):
    _, port = peer
    with (auth.open_channel(f"127.0.0.1:{port}", TOKEN, max_message_bytes=1024) as channel,
          pytest.raises(grpc.RpcError) as err):
        peer_pb2_grpc.PeerStub(channel).DropSession(peer_pb2.DropSessionRequest(session="s" * 4096), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_oversized_message_refused_by_server_limit():
    server, port = auth.serve(EchoPeer(), TOKEN, max_message_bytes=4096, max_workers=2)
    try:
        with auth.open_channel(f"127.0.0.1:{port}", TOKEN) as channel:
            stub = peer_pb2_grpc.PeerStub(channel)
            assert not stub.DropSession(peer_pb2.DropSessionRequest(session="small"), timeout=10).existed
            with pytest.raises(grpc.RpcError) as err:
                stub.DropSession(peer_pb2.DropSessionRequest(session="s" * 8192), timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        server.stop(None)


def test_serve_refuses_a_port_in_use(peer):
    _, port = peer
    with pytest.raises(FastServeError, match="cannot listen"):
        auth.serve(EchoPeer(), TOKEN, bind=f"127.0.0.1:{port}")


def test_options_carry_limits_and_keepalive():
    client, server = dict(auth.channel_options(1234)), dict(auth.server_options(1234))
    for options in (client, server):
        assert options["grpc.max_send_message_length"] == options["grpc.max_receive_message_length"] == 1234
        assert options["grpc.keepalive_time_ms"] <= 3000 and options["grpc.keepalive_timeout_ms"] <= 3000
        assert options["grpc.keepalive_permit_without_calls"] == 1
    # the server must tolerate the clients' keepalive rate, or it would GOAWAY them
    assert server["grpc.http2.min_ping_interval_without_data_ms"] <= client["grpc.keepalive_time_ms"]


# -- the committed stubs are what peer.proto generates -----------------------------------------


def test_stubs_are_fresh(tmp_path):
    pytest.importorskip("grpc_tools")
    from importlib.metadata import version

    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I", str(REPO),
           f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", str(REPO / PROTO)]
    subprocess.run(cmd, check=True, capture_output=True)
    for name in STUBS:
        fresh = (tmp_path / Path(PROTO).parent / name).read_bytes()
        committed = (REPO / Path(PROTO).parent / name).read_bytes()
        assert fresh == committed, (
            f"{name} is stale (or was generated by another grpcio-tools than the {version('grpcio-tools')} "
            "installed here): run scripts/gen_proto.sh with the grpcio-tools pinned in pyproject.toml")


def test_every_rpc_is_documented_in_the_proto():
    text = (REPO / PROTO).read_text()
    service = peer_pb2.DESCRIPTOR.services_by_name["Peer"]
    assert sorted(m.name for m in service.methods) == ["DropSession", "FetchLayer", "Forward", "Health", "Hello",
                                                      "LoadStage"]
    lines = text.splitlines()
    for method in service.methods:
        at = next(i for i, line in enumerate(lines) if line.strip().startswith(f"rpc {method.name}("))
        assert lines[at - 1].strip().startswith("//"), f"rpc {method.name} has no comment above it"


# -- wire: hidden states ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 7, 16), (2, 32)])
def test_hidden_round_trip_is_exact(dtype, shape):
    x = torch.randn(shape).to(dtype)
    y = unpack_hidden(pack_hidden(x), max_elements=MAX_ELEMENTS)
    assert y.dtype == dtype and y.shape == x.shape and torch.equal(y, x)
    y += 1  # writable, owns its memory


def test_hidden_of_a_view_is_its_own_data():
    h = torch.randn(1, 6, 8)
    last = h[:, -1]  # a non-contiguous-origin view, as Stage.forward returns before the head
    assert torch.equal(unpack_hidden(pack_hidden(last), max_elements=MAX_ELEMENTS), last)


@pytest.mark.parametrize("blob", [b"", b"garbage", b"\xff" * 64, bytes(rng_bytes(1000)),
                                  b"\x08\x00\x00\x00\x00\x00\x00\x00not json",
                                  b"\x02\x00\x00\x00\x00\x00\x00\x00[]"])
def test_hidden_garbage_is_a_wire_error(blob):
    with pytest.raises(WireError):
        unpack_hidden(blob, max_elements=MAX_ELEMENTS)


def test_hidden_truncated_is_a_wire_error():
    blob = pack_hidden(torch.randn(1, 4, 8))
    with pytest.raises(WireError):
        unpack_hidden(blob[:-3], max_elements=MAX_ELEMENTS)


@pytest.mark.parametrize("tensors", [
    {"y": torch.randn(1, 2, 4)},                              # wrong name
    {"x": torch.randn(1, 2, 4), "z": torch.randn(1)},         # extra tensor
    {"x": torch.arange(8, dtype=torch.int64).reshape(2, 4)},  # not float
    {"x": torch.randn(1, 2, 4).double()},                     # float64 is not a hidden dtype
    {"x": torch.randn(8)},                                    # 1 dim
    {"x": torch.randn(1, 1, 2, 4)},                           # 4 dims
])
def test_hidden_wrong_tensor_is_a_wire_error(tensors):
    with pytest.raises(WireError):
        unpack_hidden(safetensors.torch.save(tensors), max_elements=MAX_ELEMENTS)


def test_hidden_larger_than_allowed_is_a_wire_error():
    with pytest.raises(WireError, match="elements"):
        unpack_hidden(pack_hidden(torch.randn(1, 10, 10)), max_elements=99)


def test_pack_hidden_refuses_non_float():
    with pytest.raises(ValueError):
        pack_hidden(torch.ones(2, 3, dtype=torch.long))


# -- wire: a layer's tensors ------------------------------------------------------------------


def assert_same_raws(got: list[RawTensor], want: list[RawTensor]) -> None:
    assert [(r.name, r.qtype, r.shape) for r in got] == [(r.name, r.qtype, r.shape) for r in want]
    for g, w in zip(got, want):
        assert type(g.data) is type(w.data) or (isinstance(g.data, np.ndarray) and isinstance(w.data, np.ndarray))
        assert g.data.dtype == w.data.dtype and tuple(g.data.shape) == tuple(w.data.shape)
        if isinstance(w.data, torch.Tensor):
            assert torch.equal(g.data, w.data)
        else:
            assert np.array_equal(g.data, w.data) and g.data.tobytes() == np.asarray(w.data).tobytes()
        assert sha256_of(g) == sha256_of(w)


def test_tensors_round_trip_gguf_blocks():
    raws = layer_raws()
    assert_same_raws(unpack_tensors(pack_tensors(raws)), raws)


def test_tensors_round_trip_from_a_read_only_memmap(tmp_path):
    raw = gguf_raw("blk.1.attn_v.weight", QType.Q4_0, (16, 64), 7)
    path = tmp_path / "model.bin"
    path.write_bytes(b"\0" * 13 + raw.data.tobytes())
    mapped = np.memmap(path, dtype=np.uint8, mode="r")[13:13 + raw.data.nbytes].reshape(raw.data.shape)
    mraw = RawTensor(raw.name, raw.qtype, raw.shape, mapped)
    (back,) = unpack_tensors(pack_tensors([mraw]))
    assert_same_raws([back], [raw])
    # the engine reads it the same way (random block bytes: some fp16 scales are NaN)
    torch.testing.assert_close(back.to_float(), raw.to_float(), rtol=0, atol=0, equal_nan=True)


def test_tensors_round_trip_hf_torch():
    raws = [
        RawTensor("blk.0.attn_q.weight", QType.BF16, (8, 16), torch.randn(8, 16).bfloat16()),
        RawTensor("blk.0.attn_k.weight", QType.F16, (4, 16), torch.randn(4, 16).half()),
        RawTensor("blk.0.attn_norm.weight", QType.F32, (16,), torch.randn(16)),
    ]
    back = unpack_tensors(pack_tensors(raws))
    assert_same_raws(back, raws)
    assert all(isinstance(r.data, torch.Tensor) for r in back)
    back[0].data.add_(1)  # writable


def test_tensors_keep_the_packed_order():
    raws = list(reversed(layer_raws()))
    assert [r.name for r in unpack_tensors(pack_tensors(raws))] == [r.name for r in raws]


def test_pack_tensors_refuses_inconsistent_data():
    good = gguf_raw("blk.0.attn_q.weight", QType.Q4_0, (8, 64))
    with pytest.raises(ValueError):
        pack_tensors([RawTensor(good.name, QType.Q6_K, good.shape, good.data)])
    with pytest.raises(ValueError):
        pack_tensors([good, good])


@pytest.mark.parametrize("blob", [b"", b"garbage", bytes(rng_bytes(4096, 3))])
def test_tensors_garbage_is_a_wire_error(blob):
    with pytest.raises(WireError):
        unpack_tensors(blob)


def test_tensors_foreign_safetensors_is_a_wire_error():
    with pytest.raises(WireError, match="metadata"):
        unpack_tensors(pack_hidden(torch.randn(1, 2, 4)))


def _retag(blob: bytes, old: bytes, new: bytes) -> bytes:
    """Rewrite the JSON header in place (same length keeps the offsets valid)."""
    assert len(old) == len(new) and old in blob[:int.from_bytes(blob[:8], "little") + 8]
    return blob.replace(old, new, 1)


@pytest.mark.parametrize("old,new", [
    (b'\\"qtype\\": \\"Q4_0\\"', b'\\"qtype\\": \\"Q8_0\\"'),   # bytes no longer match the qtype
    (b'\\"qtype\\": \\"Q4_0\\"', b'\\"qtype\\": \\"QQQQ\\"'),   # not a qtype
    (b'\\"shape\\": [8, 64]', b'\\"shape\\": [8, 32]'),         # logical shape does not match bytes
    (b'\\"array\\": \\"numpy\\"', b'\\"array\\": \\"pickl\\"'),  # unknown array kind
])
def test_tensors_tampered_metadata_is_a_wire_error(old, new):
    blob = pack_tensors([gguf_raw("blk.0.attn_q.weight", QType.Q4_0, (8, 64))])
    with pytest.raises(WireError):
        unpack_tensors(_retag(blob, old, new))


def test_sha256_covers_bytes_qtype_and_shape():
    raw = gguf_raw("blk.0.attn_q.weight", QType.Q4_0, (8, 64))
    digest = sha256_of(raw)
    assert digest == sha256_of(RawTensor("other.name", raw.qtype, raw.shape, raw.data.copy()))
    assert digest != sha256_of(RawTensor(raw.name, QType.Q4_1, raw.shape, raw.data))
    assert digest != sha256_of(RawTensor(raw.name, raw.qtype, (16, 32), raw.data))
    flipped = raw.data.copy()
    flipped[3, 5] ^= 1
    assert digest != sha256_of(RawTensor(raw.name, raw.qtype, raw.shape, flipped))


# -- wire: chunks and sampling parameters ----------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 5000])
def test_chunks_round_trip(size):
    blob = bytes(rng_bytes(size))
    chunks = list(iter_chunks(blob, 1000))
    assert chunks[-1].last and not any(c.last for c in chunks[:-1])
    assert join_chunks(chunks, max_bytes=size) == blob


def test_chunks_out_of_order_missing_or_too_big_are_wire_errors():
    chunks = list(iter_chunks(bytes(rng_bytes(3500)), 1000))
    with pytest.raises(WireError, match="out of order"):
        join_chunks([chunks[0], chunks[2], chunks[1], chunks[3]], max_bytes=1 << 20)
    with pytest.raises(WireError, match="ended"):
        join_chunks(chunks[:-1], max_bytes=1 << 20)
    with pytest.raises(WireError, match="larger"):
        join_chunks(chunks, max_bytes=3499)


def test_sampling_round_trip_is_exact():
    for params in (SamplingParams(), SamplingParams(temperature=0.0, seed=0),
                   SamplingParams(temperature=0.3, top_k=7, top_p=0.9, min_p=0.01, repeat_penalty=1.3,
                                  repeat_last_n=32, seed=2**40 + 3)):
        msg = peer_pb2.Sampling.FromString(sampling_to_pb(params).SerializeToString())
        assert sampling_from_pb(msg) == params


def test_unset_sampling_is_a_wire_error():
    with pytest.raises(WireError, match="sampling"):
        sampling_from_pb(peer_pb2.Sampling())
