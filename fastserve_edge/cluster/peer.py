"""The `fastserve join` daemon: a gRPC Peer servicer that holds one stage for a host.

A peer starts empty. `LoadStage` makes it a stage: every part (layer, head, common
tensors) comes from the on-disk shard cache when its hashes match the host's manifest, and
otherwise from the host's FetchLayer, verified, then cached. `Forward` streams run hidden
states through the stage's layers, one stream per session; a last stage samples and only
the token id goes back. The host runs `WeightServer` (FetchLayer only) over its model file,
so that peers can fetch from it.

A token holder, or a bug on a host, must not be able to exhaust or wedge a peer (issue 21):
every request is checked against the stage before it reaches an allocation or a kernel, a
peer holds at most `max_sessions` sessions, `MAX_FORWARD_STREAMS` open streams and the KV its
memory has room for (RESOURCE_EXHAUSTED beyond), LoadStage checks the manifest's declared
sizes against the peer's memory before it fetches a byte, and any failure of a load leaves
the peer IDLE, not LOADING.

Converting to and from the wire happens here and in remote.py only (STYLE #6).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import torch

from fastserve_edge.cluster.auth import open_channel
from fastserve_edge.cluster.profile import Profile
from fastserve_edge.cluster.protocol import CHUNK_BYTES, MAX_MESSAGE_BYTES, PROTOCOL_VERSION, peer_pb2, peer_pb2_grpc
from fastserve_edge.cluster.shard_cache import (
    Manifest, ShardCache, ShardError, ShardSource, part_blob, parts_for_stage,
)
from fastserve_edge.cluster import datapath
from fastserve_edge.cluster.wire import (
    WireError, iter_chunks, join_chunks, pack_hidden, pack_tensors, sampling_from_pb, sha256_of, unpack_hidden,
)
from fastserve_edge.models.config import ModelConfig
from fastserve_edge.engine.generate import LocalStage
from fastserve_edge.engine.kv_cache import kv_bytes_per_token
from fastserve_edge.engine.model import Stage
from fastserve_edge.engine.quant import RuntimeWeights, runtime_nbytes
from fastserve_edge.engine.sampling import Sampler, SamplingParams
from fastserve_edge.engine.tensor import Slices, SliceWeights, TensorSlice, TensorWorker
from fastserve_edge.errors import ConfigError, FastServeError
from fastserve_edge.models.tensors import ModelSource, RawTensor

log = logging.getLogger("fastserve.peer")

MAX_PART_BYTES = 16 << 30        # one layer's blob; a corrupt header must not make us allocate more
FETCH_STREAMS = 3               # parts fetched at once
FETCH_TIMEOUT_S = 600.0          # a whole part; a dead host is noticed sooner through keepalive
TOKENS_PER_S_WINDOW_S = 5.0      # the tokens/s shown by `join` and Health
MIN_CHUNK_BYTES = 64 << 10       # FetchLayer: a smaller ask gets this (1-byte chunks: a message per byte)
MAX_CHUNK_BYTES = MAX_MESSAGE_BYTES - (64 << 10)  # the TensorChunk's other fields fit beside the data
# auth.serve runs 64 worker threads and an open Forward stream holds one until it ends: 16 stay
# free for Hello, Health, DropSession and LoadStage. The host opens one stream per session and
# at most this many (coordinator.ClusterPipeline.max_open_sessions), so it never meets the cap.
MAX_FORWARD_STREAMS = 48
MAX_SESSIONS = 48                # sessions with KV on one peer (default and most of --max-sessions)
MAX_SESSION_CHARS = 128          # a session id; hosts send uuid4 hex (32)
PART_HEADER_BYTES = 4096         # a part blob's safetensors header, besides ...
TENSOR_HEADER_BYTES = 512        # ... each tensor's two JSON entries (+ twice its name, escaped)


# -- parts on the wire ---------------------------------------------------------------------

_KIND_OF = {"embed": peer_pb2.PART_KIND_EMBEDDING, "head": peer_pb2.PART_KIND_HEAD, "common": peer_pb2.PART_KIND_COMMON}
_NAME_OF = {kind: name for name, kind in _KIND_OF.items()}


def part_to_pb(part: str) -> peer_pb2.Part:
    """"layer.3", "head", ...; "layer.3@KEY": a tensor-parallel machine's rows of it (KEY: Slices.key)."""
    part, _, key = part.partition("@")
    if part.startswith("layer."):
        return peer_pb2.Part(kind=peer_pb2.PART_KIND_LAYER, layer=int(part.split(".", 1)[1]), slice=key)
    return peer_pb2.Part(kind=_KIND_OF[part], slice=key)


def part_from_pb(msg: peer_pb2.Part) -> str:
    if msg.slice and (len(msg.slice) != 16 or not all(c in "0123456789abcdef" for c in msg.slice)):
        raise WireError(f"slice key {msg.slice[:40]!r} is not 16 lowercase hex digits")
    suffix = f"@{msg.slice}" if msg.slice else ""
    if msg.kind == peer_pb2.PART_KIND_LAYER:
        return f"layer.{msg.layer}{suffix}"
    if msg.kind not in _NAME_OF:
        raise WireError(f"unknown part kind {msg.kind}")
    return _NAME_OF[msg.kind] + suffix


def profile_to_pb(p: Profile) -> peer_pb2.Profile:
    return peer_pb2.Profile(memory_bytes=p.memory_bytes, decode_gflops=p.decode_gflops,
                            prefill_gflops=p.prefill_gflops, bandwidth_gbs=p.bandwidth_gbs, threads=p.threads)


# -- who can serve weights -----------------------------------------------------------------

class LayerProvider(Protocol):
    def blob(self, digest: str, part: str) -> bytes: ...

    def sent(self, peer: str, nbytes: int) -> None: ...  # progress of one transfer, chunk by chunk


class ModelProvider:
    """The host: parts cut from its own model file."""

    def __init__(self, source: ModelSource, manifest: Manifest, on_sent: Callable[[str, int], None] | None = None):
        self.source, self.manifest = source, manifest
        self.sent = on_sent or (lambda peer, nbytes: None)

        self._slices: dict[str, tuple[Slices, int]] = {}  # slice key -> (spans, rank): what "part@key" means
        self._slice_manifests: dict[str, dict[str, dict[str, tuple[str, int]]]] = {}

    def blob(self, digest: str, part: str) -> bytes:
        if digest != self.manifest.digest:
            raise ShardError(f"this host serves model {self.manifest.digest[:12]}, not {digest[:12]}")
        base, _, key = part.partition("@")
        if not key:
            return part_blob(self.source, self.manifest, part)
        if key not in self._slices or base not in self.manifest.parts:
            raise ShardError(f"this host plans no slice {key} of part {base!r}")
        return pack_tensors(self._cut(base, key))

    def _cut(self, base: str, key: str) -> list[RawTensor]:
        slices, rank = self._slices[key]
        cfg = self.source.config
        return [slices.cut(cfg, self.source.tensor(name), rank, head=base == "head")
                for name in sorted(self.manifest.parts[base]) if slices.holds(cfg, name, rank)]

    def slice_manifest(self, slices: Slices, rank: int, parts: list[str]) -> dict[str, dict[str, tuple[str, int]]]:
        """part@key -> tensor name -> (sha256, data bytes) of machine `rank`'s rows of it (hashed
        once per plan shape; a peer's shard cache keeps the slice under these names: a warm start
        sends nothing)."""
        key = slices.key(rank)
        self._slices[key] = (slices, rank)
        if key not in self._slice_manifests:
            self._slice_manifests[key] = {
                f"{base}@{key}": {t.name: (sha256_of(t), t.nbytes) for t in self._cut(base, key)}
                for base in parts if base in self.manifest.parts}
        return self._slice_manifests[key]


class CacheProvider:
    """A peer: parts it keeps in its shard cache (peers can feed each other)."""

    def __init__(self, cache: ShardCache):
        self.cache = cache

    def blob(self, digest: str, part: str) -> bytes:
        try:
            return self.cache.path(digest, part).read_bytes()
        except OSError:
            raise ShardError(f"part {part} of model {digest[:12]} is not in this peer's cache") from None

    def sent(self, peer: str, nbytes: int) -> None:
        pass


def fetch_part(address: str, token: str, digest: str, part: str, *, max_bytes: int = MAX_PART_BYTES) -> bytes:
    """One part from another machine's FetchLayer, as one blob of at most max_bytes."""
    channel = open_channel(address, token)
    try:
        stub = peer_pb2_grpc.PeerStub(channel)
        chunks = stub.FetchLayer(peer_pb2.FetchLayerRequest(model_digest=digest, part=part_to_pb(part)),
                                 timeout=FETCH_TIMEOUT_S)
        return join_chunks(chunks, max_bytes=max_bytes)
    finally:
        channel.close()


def _digest_from_pb(digest: str) -> str:
    if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
        raise WireError(f"model digest {digest[:80]!r} is not a sha256 in lowercase hex")
    return digest


def _stream_part(provider: LayerProvider, request: peer_pb2.FetchLayerRequest,
                 context: grpc.ServicerContext) -> Iterator[peer_pb2.TensorChunk]:
    """FetchLayer, as PeerService and WeightServer both serve it."""
    try:
        digest, part = _digest_from_pb(request.model_digest), part_from_pb(request.part)
    except WireError as err:
        _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))
    try:
        blob = provider.blob(digest, part)
    except FastServeError as err:
        _abort(context, grpc.StatusCode.NOT_FOUND, str(err))
    # 0 = ours; tiny chunks cost a message per few bytes, huge ones break the message limit
    chunk_bytes = min(max(request.chunk_bytes or CHUNK_BYTES, MIN_CHUNK_BYTES), MAX_CHUNK_BYTES)
    for piece in iter_chunks(blob, chunk_bytes):
        yield piece
        provider.sent(context.peer(), len(piece.data))


class WeightServer(peer_pb2_grpc.PeerServicer):
    """The host's Peer service: FetchLayer from `provider` (its model file) and nothing else.
    Every other verb is the generated base class's UNIMPLEMENTED, so no LoadStage or Forward
    ever runs inside the host's process."""

    def __init__(self, provider: LayerProvider):
        self.provider = provider

    def FetchLayer(self, request, context):
        yield from _stream_part(self.provider, request, context)


# -- what a peer refuses, and with which status ------------------------------------------------

class PeerFull(FastServeError):
    """The peer is at a limit (Forward streams, sessions, KV memory, memory for a stage):
    RESOURCE_EXHAUSTED. End sessions, use another peer, or re-plan."""


class NoStage(FastServeError):
    """A Forward step reached a peer that holds no stage (restarted or re-planned): FAILED_PRECONDITION."""


def _code_of(err: Exception) -> grpc.StatusCode:
    if isinstance(err, PeerFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(err, NoStage):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(err, WireError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


# -- the node's state ------------------------------------------------------------------------

@dataclass
class Session:
    tokens: list[int] = field(default_factory=list)  # ids whose KV this stage holds, by position
    sampler: Sampler | None = None
    kv_positions: int = 0  # positions of KV it holds after its last step


# The KV cap counts positions held, the unit the host's serving loop budgets in
# (planner.kv_room_tokens over the same memory less weights). Counting what the cache has
# allocated instead (it starts at kv_cache.INITIAL_TOKENS and doubles) refused sessions a
# correct host sent: bench/soak.py lost every answer at 100 MiB caps that way. The cap is the
# guard against a host that ignores its budget, not a second, stricter budget.


@dataclass(frozen=True)
class TensorWant:
    sha256: str
    nbytes: int  # data bytes, as the host's manifest declares them


MAX_ECHO_BYTES = 1 << 20  # Health's echo: what the host times a link with

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_MAX_NAME_CHARS = 256  # GGUF allows 64


@dataclass(frozen=True)
class TensorOrder:
    """A LoadStage request's tensor-parallel part, checked: this machine's place in the group."""
    slices: Slices
    rank: int
    addresses: list[tuple[str, int]]   # every machine's data port, by rank
    secret: bytes

    @classmethod
    def from_pb(cls, msg: peer_pb2.TensorPlan, config: ModelConfig) -> TensorOrder:
        try:
            slices = Slices.checked(config, msg.kv_at, msg.dim_at, msg.ffn_at, msg.vocab_at)
        except ValueError as err:
            raise WireError(f"bad tensor-parallel plan: {err}") from None
        if not 1 <= msg.rank < slices.ranks or len(msg.data_addresses) != slices.ranks or len(msg.secret) != 32:
            raise WireError(f"bad tensor-parallel plan: rank {msg.rank} of {slices.ranks} (the host is 0), "
                            f"{len(msg.data_addresses)} data addresses, a {len(msg.secret)}-byte secret (32)")
        addresses = []
        for text in msg.data_addresses:
            host, _, port = text.rpartition(":")
            if not host or len(host) > 64 or not port.isdigit() or not 0 < int(port) < 65536:
                raise WireError(f"data address {text[:80]!r} is not ip:port")
            addresses.append((host, int(port)))
        return cls(slices, msg.rank, addresses, bytes(msg.secret))


@dataclass(frozen=True)
class StageOrder:
    """A LoadStage request, checked: which layers to hold, and every tensor they take."""
    digest: str
    model_name: str
    config: ModelConfig
    start: int
    end: int                                    # exclusive
    ctx: int
    threads: int                                # 0: keep this peer's
    parts: dict[str, dict[str, TensorWant]]     # part -> tensor name -> what the manifest declares
    source_address: str
    host_name: str
    tensor: TensorOrder | None = None           # a slice of every layer, not a range

    @property
    def kv_per_position(self) -> int:
        """K and V of one position in every layer of the stage (of this machine's KV heads)."""
        t = self.tensor
        heads = t.slices.kv_at[t.rank + 1] - t.slices.kv_at[t.rank] if t is not None else self.config.n_kv_heads
        return kv_bytes_per_token(heads, self.config.head_dim) * (self.end - self.start)

    def declared_bytes(self) -> int:
        """The weights' data bytes: a lower bound of what they take once loaded."""
        return sum(w.nbytes for want in self.parts.values() for w in want.values())

    def fixed_bytes(self) -> int:
        """Besides the weights: one session's KV for ctx, and the rope tables (cos, sin: [ctx, head_dim] fp32)."""
        return self.kv_per_position * self.ctx + 2 * self.ctx * self.config.head_dim * 4

    @classmethod
    def from_pb(cls, req: peer_pb2.LoadStageRequest) -> StageOrder:
        """WireError unless every field is in range; nothing here allocates by what it reads."""
        digest = _digest_from_pb(req.model_digest)
        try:
            config = ModelConfig.from_dict(json.loads(req.model_config_json))
        except (ValueError, TypeError, RecursionError) as err:  # not JSON, not an object, fields out of range
            raise WireError(f"bad model config: {err}") from None
        start, end = req.layer_start, req.layer_end
        if not 0 <= start < end <= config.n_layers or req.has_embedding or not 1 <= req.ctx <= config.context_length:
            raise WireError(f"bad stage: layers [{start}, {end}) of {config.n_layers}, ctx {req.ctx} of the model's "
                            f"{config.context_length}, embedding {req.has_embedding} (a peer never embeds)")
        cpus = os.cpu_count() or 1
        if req.threads > cpus:
            raise WireError(f"{req.threads} threads asked, this machine has {cpus} CPUs: send 0 to let the peer choose")
        tensor = TensorOrder.from_pb(req.tensor, config) if req.HasField("tensor") else None
        allowed = parts_for_stage(config, start, end)
        if tensor is not None:
            if (start, end) != (0, config.n_layers):
                raise WireError("a tensor-parallel slice covers every layer: send layers [0, n_layers)")
            key = tensor.slices.key(tensor.rank)
            allowed = [f"{p}@{key}" for p in allowed]
        parts: dict[str, dict[str, TensorWant]] = {}
        names: set[str] = set()
        for entry in req.manifest:
            part = part_from_pb(entry.part)
            if part not in allowed:
                raise WireError(f"manifest entry {entry.name[:80]!r} is in part {part}, which layers [{start}, {end}) "
                                f"do not take ({', '.join(allowed)})")
            name_ok = 0 < len(entry.name) <= _MAX_NAME_CHARS and set(entry.name) <= _NAME_CHARS
            if not name_ok or entry.name in names:
                raise WireError(f"manifest entry {entry.name[:80]!r}: a tensor name is 1-{_MAX_NAME_CHARS} characters "
                                "of [A-Za-z0-9_.-], listed once")
            if len(entry.sha256) != 64 or not all(c in "0123456789abcdef" for c in entry.sha256):
                raise WireError(f"manifest entry {entry.name}: sha256 {entry.sha256[:80]!r} is not lowercase hex")
            if not 0 < entry.nbytes <= MAX_PART_BYTES:
                raise WireError(f"manifest entry {entry.name} declares {entry.nbytes:,} bytes (1 to "
                                f"{MAX_PART_BYTES:,}): the host must declare every tensor's size; run the same "
                                "fastserve version everywhere")
            names.add(entry.name)
            parts.setdefault(part, {})[entry.name] = TensorWant(entry.sha256, entry.nbytes)
        absent = [p for p in allowed if not p.startswith("common") and p not in parts]  # common: empty for most
        if absent:
            raise WireError(f"the manifest has no tensors for {', '.join(absent)}")
        for part, want in parts.items():
            if sum(w.nbytes for w in want.values()) > MAX_PART_BYTES:
                raise WireError(f"part {part} declares more than {MAX_PART_BYTES:,} bytes")
        return cls(digest, req.model_name or config.name, config, start, end, req.ctx, req.threads, parts,
                   req.source_address, req.host_name or "a host", tensor)


def _blob_limit(want: dict[str, TensorWant]) -> int:
    """Largest blob a part may arrive as: its declared data and the safetensors header around it."""
    return PART_HEADER_BYTES + sum(w.nbytes + TENSOR_HEADER_BYTES + 2 * len(name) for name, w in want.items())


def _check_sizes(part: str, tensors: list[RawTensor], want: dict[str, TensorWant]) -> None:
    """The tensors' hashes matched already; the sizes the memory check counted must be theirs too."""
    for t in tensors:
        if t.nbytes != want[t.name].nbytes:
            raise ShardError(f"part {part}: tensor {t.name} holds {t.nbytes:,} bytes, the manifest declared "
                             f"{want[t.name].nbytes:,}: the host's manifest is wrong (another fastserve version?)")


class TensorGroupMember:
    """This machine's place in a tensor-parallel group: its slice, and the thread that opens the
    data path to the others and runs the host's steps until the host says stop or a link fails."""

    CONNECT_S = 60.0  # the host connects once every machine has loaded its slice

    def __init__(self, part: TensorSlice, order: TensorOrder, listener, on_end: Callable[[TensorGroupMember], None]):
        self.part, self.order, self.listener, self.on_end = part, order, listener, on_end
        self.links: datapath.Links | None = None
        self.error: Exception | None = None
        self.cancel = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="fastserve-tensor")

    @property
    def share(self) -> float:
        s, r = self.order.slices, self.order.rank
        return (s.ffn_at[r + 1] - s.ffn_at[r]) / s.ffn_at[-1]

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        o = self.order
        try:
            self.links = datapath.connect(self.part.kernels, o.rank, o.addresses, self.listener, o.secret,
                                          timeout_s=self.CONNECT_S, cancel=self.cancel)
            worker = TensorWorker(self.part, self.links.mesh)
            worker.serve()
            self.error = worker.error
        except Exception as err:  # noqa: BLE001 - logged; the host re-plans
            self.error = err
        finally:
            if self.error is not None:
                log.warning("left the tensor-parallel group: %s", self.error)
            if self.links is not None:
                self.links.close()
            self.on_end(self)

    def stop(self) -> None:
        """A new plan: end the thread (its sockets are shut so that a wait returns at once)."""
        self.cancel.set()
        links = self.links
        if links is not None:
            for sock in links.sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(10)


@dataclass
class Holding:
    digest: str
    model_name: str
    start: int
    end: int
    has_head: bool
    host_name: str
    stage: LocalStage | None          # None: a tensor-parallel slice (`group`)
    dim: int
    ctx: int
    vocab_size: int
    kv_per_position: int   # bytes: K and V of one position in every layer held
    kv_room: int           # bytes the KV of all sessions together may take (memory less weights, as the host counts)
    group: TensorGroupMember | None = None


class PeerNode:
    """What one machine is and holds; the servicer and the `join` panel both read it."""

    def __init__(self, *, node_id: str, name: str, profile: Profile, cache: ShardCache, token: str,
                 max_sessions: int = MAX_SESSIONS, on_change: Callable[[], None] = lambda: None,
                 data_listener: socket.socket | None = None):
        if not 1 <= max_sessions <= MAX_SESSIONS:
            raise ConfigError(f"--max-sessions must be between 1 and {MAX_SESSIONS}, got {max_sessions}")
        self.node_id, self.name, self.profile = node_id, name, profile
        self.cache, self.token = cache, token
        self.max_sessions = max_sessions
        self.on_change = on_change
        self.data_listener = data_listener  # the tensor-parallel data port (cluster/datapath.py), or None
        self.data_port = data_listener.getsockname()[1] if data_listener is not None else 0
        self.state = peer_pb2.PEER_STATE_IDLE
        self.holding: Holding | None = None
        self.sessions: dict[str, Session] = {}
        self.lock = threading.RLock()          # one computation at a time: torch uses every core
        self.started = time.monotonic()
        self.bytes_fetched = 0
        self._decode_steps: deque[float] = deque()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        while self._decode_steps and self._decode_steps[0] < now - TOKENS_PER_S_WINDOW_S:
            self._decode_steps.popleft()
        return len(self._decode_steps) / TOKENS_PER_S_WINDOW_S

    def stage_info(self) -> peer_pb2.StageInfo | None:
        h = self.holding
        if h is None:
            return None
        return peer_pb2.StageInfo(model_digest=h.digest, model_name=h.model_name, layer_start=h.start,
                                  layer_end=h.end, has_embedding=False, has_head=h.has_head, host_name=h.host_name)

    def describe(self, *, rate: bool = True) -> str:
        """The state in words, for the panel and (without the rate) the mDNS TXT record."""
        h = self.holding
        if self.state == peer_pb2.PEER_STATE_LOADING:
            return "loading layers"
        if h is None:
            return "idle"
        held = (f"holding {100 * h.group.share:.0f}% of every layer of {h.model_name} for {h.host_name}"
                if h.group is not None else f"holding layers {h.start}-{h.end - 1} of {h.model_name} for {h.host_name}")
        if self.state == peer_pb2.PEER_STATE_SERVING:
            return f"serving: {held}" + (f", {self.tokens_per_second():.1f} tok/s" if rate else "")
        return held

    def _set_state(self, state: int) -> None:
        self.state = state
        self.on_change()


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str):
    log.warning("refused a call: %s", message)
    context.abort(code, message)


def _sampling_from_pb(msg: peer_pb2.Sampling) -> SamplingParams:
    """wire.sampling_from_pb, and finite: an inf temperature or penalty turns every logit into NaN."""
    values = {"temperature": msg.temperature, "top_p": msg.top_p, "min_p": msg.min_p,
              "repeat_penalty": msg.repeat_penalty}
    bad = [name for name, value in values.items() if not math.isfinite(value)]
    if bad:
        raise WireError(f"sampling parameters out of range: {', '.join(bad)} not finite")
    return sampling_from_pb(msg)


class _Pending:
    """One Forward request waiting for the stage, and what it got."""

    def __init__(self, req: peer_pb2.ForwardRequest):
        self.req = req
        self.reply: peer_pb2.ForwardReply | None = None
        self.error: Exception | None = None  # FastServeError: refused (see _code_of); else a bug
        self.done = False
        self.wake = threading.Event()  # its reply is ready, or it is to lead the next batch

    def finish(self, *, reply: peer_pb2.ForwardReply | None = None, error: Exception | None = None) -> None:
        self.reply, self.error, self.done = reply, error, True


class PeerService(peer_pb2_grpc.PeerServicer):
    """A `fastserve join` peer: every verb; FetchLayer serves the parts in its shard cache."""

    def __init__(self, node: PeerNode):
        self.node = node
        self._pending: list[_Pending] = []  # Forward requests that wait for the stage (see _step)
        self._leader: _Pending | None = None  # the request whose stream runs the next batch
        self._streams = 0  # Forward streams open (MAX_FORWARD_STREAMS)
        self._pending_lock = threading.Lock()
        self.provider = CacheProvider(node.cache)

    # Hello / Health ---------------------------------------------------------------------
    def Hello(self, request, context):
        n = self.node
        return peer_pb2.HelloReply(protocol_version=PROTOCOL_VERSION, node_id=n.node_id, name=n.name,
                                   profile=profile_to_pb(n.profile), state=n.state, stage=n.stage_info(),
                                   data_port=n.data_port)

    def Health(self, request, context):
        n = self.node
        if request.echo_bytes > MAX_ECHO_BYTES:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"echo of {request.echo_bytes} bytes: at most {MAX_ECHO_BYTES}")
        return peer_pb2.HealthReply(state=n.state, sessions=len(n.sessions), tokens_per_second=n.tokens_per_second(),
                                    stage=n.stage_info(), uptime_seconds=time.monotonic() - n.started,
                                    echo=bytes(request.echo_bytes))

    # weights ----------------------------------------------------------------------------
    def FetchLayer(self, request, context):
        yield from _stream_part(self.provider, request, context)

    def LoadStage(self, request, context):
        n = self.node
        started = time.perf_counter()
        try:
            order = StageOrder.from_pb(request)
            need = order.declared_bytes() + order.fixed_bytes()
            if need > n.profile.memory_bytes:  # before a byte is fetched
                raise PeerFull(f"this stage needs at least {need / 2**20:.0f} MiB (weights as its manifest declares "
                               f"them, KV and rope for {order.ctx} tokens) but {n.name} offers "
                               f"{n.profile.memory_bytes / 2**20:.0f} MiB (--max-memory); re-plan")
        except FastServeError as err:
            _abort(context, _code_of(err), str(err))
        failure: tuple[grpc.StatusCode, str] | None = None
        if order.tensor is not None and n.data_listener is None:
            _abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                   f"{n.name} has no data port for the tensor-parallel layout: restart `fastserve join`")
        old = n.holding
        if old is not None and old.group is not None:
            old.group.stop()
        with n.lock:
            n.holding, n.sessions = None, {}
            n._set_state(peer_pb2.PEER_STATE_LOADING)
            try:
                n.holding, counts = self._load(order)
            except Exception as err:  # whatever it was, the peer is IDLE again and the caller hears why
                failure = self._load_failure(order, err)
                n._set_state(peer_pb2.PEER_STATE_IDLE)
            else:
                n._set_state(peer_pb2.PEER_STATE_SERVING if order.tensor is not None else peer_pb2.PEER_STATE_READY)
                if n.holding.group is not None:
                    n.holding.group.start()
        if failure is not None:
            context.abort(*failure)
        cached, fetched, nbytes = counts
        log.info("holding layers %d-%d of %s (%d tensors cached, %d fetched, %.1f MB)",
                 order.start, order.end - 1, order.model_name, cached, fetched, nbytes / 1e6)
        return peer_pb2.LoadStageReply(tensors_cached=cached, tensors_fetched=fetched, bytes_fetched=nbytes,
                                       load_seconds=time.perf_counter() - started)

    def _load(self, order: StageOrder) -> tuple[Holding, tuple[int, int, int]]:
        """Under the node lock: every part from the cache or the host, checked, then the stage.
        -> (what the node now holds, (tensors cached, tensors fetched, bytes fetched))."""
        n = self.node
        tensors: list[RawTensor] = []
        cached = fetched = nbytes = 0
        missing = []
        for part, want in sorted(order.parts.items()):
            got = n.cache.load(order.digest, part, {name: w.sha256 for name, w in want.items()})
            if got is None:
                missing.append(part)
            else:
                _check_sizes(part, got, want)
                cached += len(got)
                tensors.extend(got)

        for part in missing:  # the cache's quota, before any transfer
            n.cache.check_size(part, _blob_limit(order.parts[part]))

        def fetch(part: str) -> tuple[list[RawTensor], int]:
            want = order.parts[part]
            blob = fetch_part(order.source_address, n.token, order.digest, part, max_bytes=_blob_limit(want))
            got = n.cache.store(order.digest, part, blob, {name: w.sha256 for name, w in want.items()},
                                protect=order.parts.keys())
            _check_sizes(part, got, want)
            return got, len(blob)

        # a few parts in flight at once: one stream alone leaves the link idle while we verify
        pool = ThreadPoolExecutor(max_workers=FETCH_STREAMS)
        try:
            for got, size in pool.map(fetch, missing):
                fetched, nbytes = fetched + len(got), nbytes + size
                n.bytes_fetched += size
                tensors.extend(got)
        finally:
            pool.shutdown(cancel_futures=True)  # a failed part: do not start the rest
        weights = sum(runtime_nbytes(t) for t in tensors)
        if weights + order.fixed_bytes() > n.profile.memory_bytes:
            raise PeerFull(f"this stage needs {(weights + order.fixed_bytes()) / 2**20:.0f} MiB once loaded but "
                           f"{n.name} offers {n.profile.memory_bytes / 2**20:.0f} MiB (--max-memory); re-plan")
        if order.threads:
            torch.set_num_threads(order.threads)
        cfg = order.config
        if order.tensor is not None:
            t = order.tensor
            part = TensorSlice(SliceWeights(ShardSource(cfg, tensors), t.slices, t.rank, sliced=True),
                               max_tokens=order.ctx)
            member = TensorGroupMember(part, t, n.data_listener, self._group_ended)
            holding = Holding(order.digest, order.model_name, 0, cfg.n_layers, True, order.host_name, None, cfg.dim,
                              order.ctx, cfg.vocab_size, order.kv_per_position, n.profile.memory_bytes - weights,
                              member)
            return holding, (cached, fetched, nbytes)
        stage = Stage(cfg, RuntimeWeights(ShardSource(cfg, tensors)), order.start, order.end, max_tokens=order.ctx,
                      embeds=False)
        holding = Holding(order.digest, order.model_name, order.start, order.end, order.end == cfg.n_layers,
                          order.host_name, LocalStage(stage), cfg.dim, order.ctx, cfg.vocab_size,
                          order.kv_per_position, n.profile.memory_bytes - weights)
        return holding, (cached, fetched, nbytes)

    def _group_ended(self, member: TensorGroupMember) -> None:
        """The host stopped the group or a link failed: back to idle (the slice stays cached on disk)."""
        n = self.node
        with n.lock:
            if n.holding is not None and n.holding.group is member:
                n.holding = None
                n._set_state(peer_pb2.PEER_STATE_IDLE)

    def _load_failure(self, order: StageOrder, err: Exception) -> tuple[grpc.StatusCode, str]:
        """A failed load in a status and a message that says what to do; logged here."""
        what = f"layers {order.start}-{order.end - 1} of {order.model_name}"
        if isinstance(err, grpc.RpcError):
            detail = err.details() if isinstance(err, grpc.Call) else str(err)
            code, message = grpc.StatusCode.UNAVAILABLE, f"could not fetch layers from {order.source_address}: {detail}"
        elif isinstance(err, PeerFull):
            code, message = grpc.StatusCode.RESOURCE_EXHAUSTED, str(err)
        elif isinstance(err, FastServeError):  # the bytes did not match the manifest
            code, message = grpc.StatusCode.FAILED_PRECONDITION, str(err)
        elif isinstance(err, OSError):
            code, message = grpc.StatusCode.INTERNAL, (f"{self.node.name} could not read or write its shard cache "
                                                       f"({err}); check the free space and permissions of "
                                                       f"{self.node.cache.root}")
        else:
            log.error("loading %s failed", what, exc_info=err)
            code, message = grpc.StatusCode.INTERNAL, (
                f"{self.node.name} failed to build {what} ({type(err).__name__}: {err}): a model config that "
                "does not match its tensors, or a bug (the peer's log has the traceback)")
        log.error("could not load %s, back to idle: %s", what, message)
        return code, message

    # the pipeline -----------------------------------------------------------------------
    def Forward(self, request_iterator, context) -> Iterator[peer_pb2.ForwardReply]:
        n = self.node
        with self._pending_lock:
            full = self._streams >= MAX_FORWARD_STREAMS
            if not full:
                self._streams += 1
        if full:
            _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                   f"{n.name} has {MAX_FORWARD_STREAMS} Forward streams open, its limit: close idle ones "
                   "(one stream per session) or plan with more peers")
        opened: set[str] = set()
        last_seq: int | None = None
        try:
            for req in request_iterator:
                try:
                    if last_seq is not None and req.seq <= last_seq:
                        raise WireError(f"seq {req.seq} after {last_seq}: a stream numbers its steps upward")
                    reply = self._step(req)
                except Exception as err:  # refused, or a bug: this stream ends, the peer serves on
                    detail = str(err) if isinstance(err, FastServeError) else \
                        f"{n.name} failed on this step ({type(err).__name__}; its log has the traceback): re-prefill"
                    _abort(context, _code_of(err), detail)
                last_seq = req.seq
                if not reply.kv_lost:
                    opened.add(req.session)
                yield reply
        finally:
            with self._pending_lock:
                self._streams -= 1
            with n.lock:  # the host went away or closed the stream: free the KV it held
                for session in opened:
                    self._forget(session)
                if n.state == peer_pb2.PEER_STATE_SERVING and not n.sessions:
                    n._set_state(peer_pb2.PEER_STATE_READY)

    def _step(self, req: peer_pb2.ForwardRequest) -> peer_pb2.ForwardReply:
        """One request of one stream. Requests of other streams that arrive while the stage
        computes wait in a list; one stream at a time leads: it takes everything that waits,
        runs it (the decode steps among it as ONE batched forward, every session's row with
        the bits of a step of its own), wakes each stream as its reply is ready, and hands the
        lead to the first request that came in meanwhile. So a host that sends many sessions'
        rows at once gets them back in one pass, and no finished reply waits for a later one."""
        item = _Pending(req)
        with self._pending_lock:
            self._pending.append(item)
            if self._leader is None:
                self._leader = item
                item.wake.set()
        item.wake.wait()
        if not item.done:  # woken to lead
            self._lead()
        if item.error is not None:
            raise item.error
        return item.reply

    def _lead(self) -> None:
        with self._pending_lock:
            batch, self._pending = self._pending, []
        try:
            with self.node.lock:
                self._run(batch)
        except Exception as err:  # a bug outside any one step: every stream of the batch hears of it
            log.exception("a batch of %d Forward steps failed", len(batch))
            for other in batch:
                if not other.done:
                    other.finish(error=err)
        finally:
            for other in batch:
                other.wake.set()
            with self._pending_lock:
                self._leader = self._pending[0] if self._pending else None
                if self._leader is not None:
                    self._leader.wake.set()

    def _run(self, batch: list[_Pending]) -> None:
        """Under the node lock: check every request, then one batched forward for the plain
        decode steps and one forward each for the rest (prefills, all_logits). A step that is
        refused or fails fails alone: the others of the batch go on."""
        n = self.node
        decode: list[tuple[_Pending, torch.Tensor]] = []
        seen: set[str] = set()
        for item in batch:
            admitted = False
            try:
                if item.req.session in seen:  # two streams stepping one session: the KV would be written twice
                    raise WireError(f"session {item.req.session[:40]!r} has another step running (from another "
                                    "stream): send a session's steps on one stream, one at a time")
                seen.add(item.req.session)
                x = self._admit(item.req)
                admitted = x is not None
                if x is None:
                    item.finish(reply=peer_pb2.ForwardReply(session=item.req.session, seq=item.req.seq, kv_lost=True))
                elif x.shape[1] == 1 and not item.req.all_logits:
                    decode.append((item, x))
                else:
                    started = time.perf_counter()
                    out = n.holding.stage.forward(item.req.session, x, item.req.pos, all_logits=item.req.all_logits)
                    item.finish(reply=self._reply(item.req, out, time.perf_counter() - started))
            except Exception as err:
                self._fail(item, err, forget=admitted)
        if not decode:
            return
        started = time.perf_counter()
        sessions = [item.req.session for item, _ in decode]
        rows = torch.cat([x.reshape(1, -1) for _, x in decode])
        try:
            out = n.holding.stage.forward_batch(sessions, rows, [item.req.pos for item, _ in decode])
        except Exception as err:
            for item, _ in decode:
                self._fail(item, err, forget=True)
            return
        seconds = time.perf_counter() - started
        for r, (item, _) in enumerate(decode):
            n._decode_steps.append(time.monotonic())
            try:
                item.finish(reply=self._reply(item.req, out[r:r + 1], seconds))
            except Exception as err:
                self._fail(item, err, forget=True)

    def _fail(self, item: _Pending, err: Exception, *, forget: bool) -> None:
        """A step refused or failed; forget: it had been admitted, so its KV may be half written
        (the host re-prefills it after kv_lost)."""
        if not isinstance(err, FastServeError):
            log.error("a Forward step of session %.40r failed", item.req.session, exc_info=err)
        if forget:
            self._forget(item.req.session)
        item.finish(error=err)

    def _forget(self, session: str) -> None:
        n = self.node
        if n.holding is not None and n.holding.stage is not None:
            n.holding.stage.drop(session)
        n.sessions.pop(session, None)

    def _admit(self, req: peer_pb2.ForwardRequest) -> torch.Tensor | None:
        """Check a request against the stage, the session and the peer's limits, then record the
        tokens it feeds; nothing changes unless every check passes.
        -> its hidden states [1, S, D] fp32, or None when the session's KV is gone (kv_lost)."""
        n = self.node
        h = n.holding
        if h is None or h.stage is None:
            raise NoStage(f"{n.name} holds no stage (it was restarted or re-planned, or holds a tensor-parallel "
                          "slice): send LoadStage first")
        if len(req.session) > MAX_SESSION_CHARS:
            raise WireError(f"a session id of {len(req.session)} characters (at most {MAX_SESSION_CHARS})")
        x = unpack_hidden(req.hidden, max_elements=h.ctx * h.dim)
        if x.dim() != 3 or x.shape[0] != 1 or x.shape[2] != h.dim or not 1 <= x.shape[1] <= h.ctx - req.pos:
            raise WireError(f"hidden states of shape {tuple(x.shape)} at position {req.pos} do not fit "
                            f"this stage ([1, S, {h.dim}], S >= 1, within a context of {h.ctx})")
        rows = x.shape[1]
        if not torch.isfinite(x).all():
            raise WireError("hidden states hold inf or NaN: the stage before this one diverged or sent garbage")
        if req.tokens and len(req.tokens) != rows:
            raise WireError(f"{len(req.tokens)} token ids for {rows} rows of hidden states: one id per row, or none")
        if req.tokens and not 0 <= min(req.tokens) <= max(req.tokens) < h.vocab_size:
            raise WireError(f"a token id outside the vocabulary [0, {h.vocab_size})")
        if req.sample and not h.has_head:
            raise WireError("asked to sample, but this stage does not hold the head")
        if not req.sample:  # a hidden or logits reply must fit in one message
            width = h.vocab_size if h.has_head else h.dim
            reply_bytes = (rows if req.all_logits or not h.has_head else 1) * width * 4
            if reply_bytes > MAX_CHUNK_BYTES:
                raise WireError(f"the reply would be {reply_bytes / 2**20:.0f} MiB, more than a message may carry: "
                                "send fewer rows at once")
        session = None if req.reset else n.sessions.get(req.session)
        sampler = None
        if req.sample and (req.new_sampler or session is None or session.sampler is None):
            sampler = Sampler(_sampling_from_pb(req.sampling))
        if req.pos > (len(session.tokens) if session is not None else 0):  # we never saw the positions before it
            self._forget(req.session)
            return None
        if req.session not in n.sessions and len(n.sessions) >= n.max_sessions:
            raise PeerFull(f"{n.name} holds {len(n.sessions)} sessions, its limit (--max-sessions): end one "
                           "(DropSession) or use another peer")
        positions = req.pos + rows  # the session's KV beyond pos is discarded by this step
        others = sum(s.kv_positions for sid, s in n.sessions.items() if sid != req.session)
        if (others + positions) * h.kv_per_position > h.kv_room:
            raise PeerFull(f"the KV of {len(n.sessions)} sessions fills the {h.kv_room / 2**20:.0f} MiB {n.name} has "
                           f"for it: end sessions (DropSession) or give this peer more memory (--max-memory)")
        if req.reset:
            self._forget(req.session)
        if session is None:
            session = n.sessions[req.session] = Session()
        session.kv_positions = positions
        if sampler is not None:
            session.sampler = sampler
        if n.state != peer_pb2.PEER_STATE_SERVING:
            n._set_state(peer_pb2.PEER_STATE_SERVING)
        del session.tokens[req.pos:]
        session.tokens.extend(req.tokens if req.tokens else [0] * rows)
        return x.float()

    def _reply(self, req: peer_pb2.ForwardRequest, out: torch.Tensor, seconds: float) -> peer_pb2.ForwardReply:
        """out: this request's hidden [1, S, D] or logits ([1, V], [1, S, V])."""
        if req.sample:
            session = self.node.sessions[req.session]
            logits = out.reshape(-1, out.shape[-1])[-1]
            if not torch.isfinite(logits).all():
                raise WireError("these hidden states give inf or NaN logits: the stages before this one sent "
                                "values out of range")
            try:
                token = session.sampler(logits, session.tokens)
            except RuntimeError as err:  # torch.multinomial: the parameters left no distribution to draw from
                raise WireError(f"sampling parameters out of range: they leave nothing to draw from ({err})") from None
            return peer_pb2.ForwardReply(session=req.session, seq=req.seq, token=token, seconds=seconds)
        if out.dim() == 2 and not self.node.holding.has_head:
            out = out.unsqueeze(1)  # a batched decode row [1, D] -> [1, 1, D], as forward gives it
        return peer_pb2.ForwardReply(session=req.session, seq=req.seq, hidden=pack_hidden(out), seconds=seconds)

    def DropSession(self, request, context):
        n = self.node
        with n.lock:
            existed = n.sessions.get(request.session) is not None
            self._forget(request.session)
        return peer_pb2.DropSessionReply(existed=existed)
