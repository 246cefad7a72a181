"""The `fastserve join` daemon: a gRPC Peer servicer that holds one stage for a host.

A peer starts empty. `LoadStage` makes it a stage: every part (layer, head, common
tensors) comes from the on-disk shard cache when its hashes match the host's manifest, and
otherwise from the host's FetchLayer, verified, then cached. `Forward` streams run hidden
states through the stage's layers, one stream per session; a last stage samples and only
the token id goes back. The host also runs this servicer, with the model file as its
`LayerProvider`, so that peers can fetch from it.

Converting to and from the wire happens here and in remote.py only (STYLE #6).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import torch

from fastserve_edge.cluster.auth import open_channel
from fastserve_edge.cluster.profile import Profile
from fastserve_edge.cluster.protocol import PROTOCOL_VERSION, peer_pb2, peer_pb2_grpc
from fastserve_edge.cluster.shard_cache import Manifest, ShardCache, ShardError, ShardSource, part_blob
from fastserve_edge.cluster.wire import (
    WireError, iter_chunks, join_chunks, pack_hidden, sampling_from_pb, unpack_hidden,
)
from fastserve_edge.engine.config import ModelConfig
from fastserve_edge.engine.generate import LocalStage
from fastserve_edge.engine.kv_cache import kv_bytes_per_token
from fastserve_edge.engine.model import Stage
from fastserve_edge.engine.quant import RuntimeWeights, runtime_nbytes
from fastserve_edge.engine.sampling import Sampler
from fastserve_edge.errors import FastServeError
from fastserve_edge.models.tensors import ModelSource

log = logging.getLogger("fastserve.peer")

MAX_PART_BYTES = 16 << 30        # one layer's blob; a corrupt header must not make us allocate more
FETCH_STREAMS = 3               # parts fetched at once
FETCH_TIMEOUT_S = 600.0          # a whole part; a dead host is noticed sooner through keepalive
TOKENS_PER_S_WINDOW_S = 5.0      # the tokens/s shown by `join` and Health


# -- parts on the wire ---------------------------------------------------------------------

_KIND_OF = {"embed": peer_pb2.PART_KIND_EMBEDDING, "head": peer_pb2.PART_KIND_HEAD, "common": peer_pb2.PART_KIND_COMMON}
_NAME_OF = {kind: name for name, kind in _KIND_OF.items()}


def part_to_pb(part: str) -> peer_pb2.Part:
    if part.startswith("layer."):
        return peer_pb2.Part(kind=peer_pb2.PART_KIND_LAYER, layer=int(part.split(".", 1)[1]))
    return peer_pb2.Part(kind=_KIND_OF[part])


def part_from_pb(msg: peer_pb2.Part) -> str:
    if msg.kind == peer_pb2.PART_KIND_LAYER:
        return f"layer.{msg.layer}"
    if msg.kind not in _NAME_OF:
        raise WireError(f"unknown part kind {msg.kind}")
    return _NAME_OF[msg.kind]


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

    def blob(self, digest: str, part: str) -> bytes:
        if digest != self.manifest.digest:
            raise ShardError(f"this host serves model {self.manifest.digest[:12]}, not {digest[:12]}")
        return part_blob(self.source, self.manifest, part)


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


def fetch_part(address: str, token: str, digest: str, part: str) -> bytes:
    """One part from another machine's FetchLayer, as one blob."""
    channel = open_channel(address, token)
    try:
        stub = peer_pb2_grpc.PeerStub(channel)
        chunks = stub.FetchLayer(peer_pb2.FetchLayerRequest(model_digest=digest, part=part_to_pb(part)),
                                 timeout=FETCH_TIMEOUT_S)
        return join_chunks(chunks, max_bytes=MAX_PART_BYTES)
    finally:
        channel.close()


# -- the node's state ------------------------------------------------------------------------

@dataclass
class Session:
    tokens: list[int] = field(default_factory=list)  # ids whose KV this stage holds, by position
    sampler: Sampler | None = None


@dataclass
class Holding:
    digest: str
    model_name: str
    start: int
    end: int
    has_head: bool
    host_name: str
    stage: LocalStage
    dim: int
    ctx: int


class PeerNode:
    """What one machine is and holds; the servicer and the `join` panel both read it."""

    def __init__(self, *, node_id: str, name: str, profile: Profile, cache: ShardCache, token: str,
                 on_change: Callable[[], None] = lambda: None):
        self.node_id, self.name, self.profile = node_id, name, profile
        self.cache, self.token = cache, token
        self.on_change = on_change
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
        held = f"holding layers {h.start}-{h.end - 1} of {h.model_name} for {h.host_name}"
        if self.state == peer_pb2.PEER_STATE_SERVING:
            return f"serving: {held}" + (f", {self.tokens_per_second():.1f} tok/s" if rate else "")
        return held

    def _set_state(self, state: int) -> None:
        self.state = state
        self.on_change()


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str):
    log.warning("refused a call: %s", message)
    context.abort(code, message)


class _Pending:
    """One Forward request waiting for the stage, and what it got."""

    def __init__(self, req: peer_pb2.ForwardRequest):
        self.req = req
        self.reply: peer_pb2.ForwardReply | None = None
        self.error: Exception | None = None  # WireError: the request was wrong; else a bug
        self.done = False
        self.wake = threading.Event()  # its reply is ready, or it is to lead the next batch

    def finish(self, *, reply: peer_pb2.ForwardReply | None = None, error: Exception | None = None) -> None:
        self.reply, self.error, self.done = reply, error, True


class PeerService(peer_pb2_grpc.PeerServicer):
    def __init__(self, node: PeerNode, provider: LayerProvider | None = None):
        self.node = node
        self._pending: list[_Pending] = []  # Forward requests that wait for the stage (see _step)
        self._leader: _Pending | None = None  # the request whose stream runs the next batch
        self._pending_lock = threading.Lock()
        self.provider = provider or CacheProvider(node.cache)

    # Hello / Health ---------------------------------------------------------------------
    def Hello(self, request, context):
        n = self.node
        return peer_pb2.HelloReply(protocol_version=PROTOCOL_VERSION, node_id=n.node_id, name=n.name,
                                   profile=profile_to_pb(n.profile), state=n.state, stage=n.stage_info())

    def Health(self, request, context):
        n = self.node
        return peer_pb2.HealthReply(state=n.state, sessions=len(n.sessions), tokens_per_second=n.tokens_per_second(),
                                    stage=n.stage_info(), uptime_seconds=time.monotonic() - n.started)

    # weights ----------------------------------------------------------------------------
    def FetchLayer(self, request, context):
        try:
            blob = self.provider.blob(request.model_digest, part_from_pb(request.part))
        except FastServeError as err:
            _abort(context, grpc.StatusCode.NOT_FOUND, str(err))
        pieces = iter_chunks(blob, request.chunk_bytes) if request.chunk_bytes else iter_chunks(blob)
        for piece in pieces:
            yield piece
            self.provider.sent(context.peer(), len(piece.data))

    def LoadStage(self, request, context):
        n = self.node
        started = time.perf_counter()
        try:
            config = ModelConfig.from_dict(json.loads(request.model_config_json))
        except (ValueError, TypeError, KeyError, AssertionError) as err:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"bad model config: {err}")
        start, end = request.layer_start, request.layer_end
        if not 0 <= start < end <= config.n_layers or request.has_embedding or request.ctx < 1:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                   f"bad stage: layers [{start}, {end}) of {config.n_layers}, ctx {request.ctx}, "
                   f"embedding {request.has_embedding} (a peer never embeds)")
        wanted: dict[str, dict[str, str]] = {}
        try:
            for entry in request.manifest:
                wanted.setdefault(part_from_pb(entry.part), {})[entry.name] = entry.sha256
        except WireError as err:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))
        with n.lock:
            n.holding, n.sessions = None, {}
            n._set_state(peer_pb2.PEER_STATE_LOADING)
            try:
                tensors, cached, fetched, nbytes = [], 0, 0, 0
                missing = []
                for part, expected in sorted(wanted.items()):
                    got = n.cache.load(request.model_digest, part, expected)
                    if got is None:
                        missing.append(part)
                    else:
                        cached += len(got)
                        tensors.extend(got)

                def fetch(part: str) -> tuple[list, int]:
                    blob = fetch_part(request.source_address, n.token, request.model_digest, part)
                    return n.cache.store(request.model_digest, part, blob, wanted[part]), len(blob)

                # a few parts in flight at once: one stream alone leaves the link idle while we verify
                with ThreadPoolExecutor(max_workers=FETCH_STREAMS) as pool:
                    for got, size in pool.map(fetch, missing):
                        fetched, nbytes = fetched + len(got), nbytes + size
                        n.bytes_fetched += size
                        tensors.extend(got)
                need = sum(runtime_nbytes(t) for t in tensors)
                need += kv_bytes_per_token(config.n_kv_heads, config.head_dim) * (end - start) * request.ctx
                if need > n.profile.memory_bytes:
                    raise ShardError(f"this stage needs {need / 2**20:.0f} MiB but {n.name} offers "
                                     f"{n.profile.memory_bytes / 2**20:.0f} MiB (--max-memory); re-plan")
                if request.threads:
                    torch.set_num_threads(request.threads)
                source = ShardSource(config, tensors)
                stage = Stage(config, RuntimeWeights(source), start, end, max_tokens=request.ctx, embeds=False)
            except grpc.RpcError as err:
                n._set_state(peer_pb2.PEER_STATE_IDLE)
                _abort(context, grpc.StatusCode.UNAVAILABLE,
                       f"could not fetch layers from {request.source_address}: {err.details()}")
            except FastServeError as err:
                n._set_state(peer_pb2.PEER_STATE_IDLE)
                _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(err))
            n.holding = Holding(request.model_digest, request.model_name or config.name, start, end,
                                end == config.n_layers, request.host_name or "a host", LocalStage(stage),
                                config.dim, request.ctx)
            n._set_state(peer_pb2.PEER_STATE_READY)
        log.info("holding layers %d-%d of %s (%d tensors cached, %d fetched, %.1f MB)",
                 start, end - 1, request.model_name, cached, fetched, nbytes / 1e6)
        return peer_pb2.LoadStageReply(tensors_cached=cached, tensors_fetched=fetched, bytes_fetched=nbytes,
                                       load_seconds=time.perf_counter() - started)

    # the pipeline -----------------------------------------------------------------------
    def Forward(self, request_iterator, context) -> Iterator[peer_pb2.ForwardReply]:
        n = self.node
        opened: set[str] = set()
        try:
            for req in request_iterator:
                opened.add(req.session)
                try:
                    yield self._step(req)
                except WireError as err:
                    _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))
        finally:
            with n.lock:  # the host went away or closed the stream: free the KV it held
                for session in opened:
                    if n.holding is not None:
                        n.holding.stage.drop(session)
                    n.sessions.pop(session, None)
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
        except Exception as err:  # a bug: every stream of the batch hears of it, not only this one
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
        decode steps and one forward each for the rest (prefills, all_logits)."""
        n = self.node
        decode: list[tuple[_Pending, torch.Tensor]] = []
        for item in batch:
            try:
                x = self._admit(item.req)
            except WireError as err:
                item.finish(error=err)
                continue
            if x is None:
                item.finish(reply=peer_pb2.ForwardReply(session=item.req.session, seq=item.req.seq, kv_lost=True))
            elif x.shape[1] == 1 and not item.req.all_logits:
                decode.append((item, x))
            else:
                started = time.perf_counter()
                out = n.holding.stage.forward(item.req.session, x, item.req.pos, all_logits=item.req.all_logits)
                item.finish(reply=self._reply(item.req, out, time.perf_counter() - started))
        if not decode:
            return
        started = time.perf_counter()
        sessions = [item.req.session for item, _ in decode]
        rows = torch.cat([x.reshape(1, -1) for _, x in decode])
        out = n.holding.stage.forward_batch(sessions, rows, [item.req.pos for item, _ in decode])
        seconds = time.perf_counter() - started
        for r, (item, _) in enumerate(decode):
            n._decode_steps.append(time.monotonic())
            item.finish(reply=self._reply(item.req, out[r:r + 1], seconds))

    def _admit(self, req: peer_pb2.ForwardRequest) -> torch.Tensor | None:
        """Check a request against the stage and the session; record the tokens it feeds.
        -> its hidden states [1, S, D], or None when the session's KV is gone (kv_lost)."""
        n = self.node
        h = n.holding
        if h is None:
            raise WireError("this peer holds no stage (it was restarted or re-planned): send LoadStage first")
        if req.reset:
            h.stage.drop(req.session)
            n.sessions.pop(req.session, None)
        session = n.sessions.get(req.session)
        if session is None:
            session = n.sessions[req.session] = Session()
        if req.pos > len(session.tokens):  # we never saw the positions before this step
            h.stage.drop(req.session)
            del n.sessions[req.session]
            return None
        x = unpack_hidden(req.hidden, max_elements=h.ctx * h.dim)
        if x.dim() != 3 or x.shape[0] != 1 or x.shape[2] != h.dim or req.pos + x.shape[1] > h.ctx:
            raise WireError(f"hidden states of shape {tuple(x.shape)} at position {req.pos} do not fit "
                            f"this stage ([1, S, {h.dim}] within a context of {h.ctx})")
        if req.sample and not h.has_head:
            raise WireError("asked to sample, but this stage does not hold the head")
        if n.state != peer_pb2.PEER_STATE_SERVING:
            n._set_state(peer_pb2.PEER_STATE_SERVING)
        del session.tokens[req.pos:]
        session.tokens.extend(req.tokens if req.tokens else [0] * x.shape[1])
        return x

    def _reply(self, req: peer_pb2.ForwardRequest, out: torch.Tensor, seconds: float) -> peer_pb2.ForwardReply:
        """out: this request's hidden [1, S, D] or logits ([1, V], [1, S, V])."""
        if req.sample:
            session = self.node.sessions[req.session]
            if req.new_sampler or session.sampler is None:
                session.sampler = Sampler(sampling_from_pb(req.sampling))
            token = session.sampler(out.reshape(-1, out.shape[-1])[-1], session.tokens)
            return peer_pb2.ForwardReply(session=req.session, seq=req.seq, token=token, seconds=seconds)
        if out.dim() == 2 and not self.node.holding.has_head:
            out = out.unsqueeze(1)  # a batched decode row [1, D] -> [1, 1, D], as forward gives it
        return peer_pb2.ForwardReply(session=req.session, seq=req.seq, hidden=pack_hidden(out), seconds=seconds)

    def DropSession(self, request, context):
        n = self.node
        with n.lock:
            existed = n.sessions.pop(request.session, None) is not None
            if n.holding is not None:
                n.holding.stage.drop(request.session)
        return peer_pb2.DropSessionReply(existed=existed)

