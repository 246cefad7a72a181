"""The host's side of one peer: a gRPC client, and a RemoteStage with the same interface
as a LocalStage (`forward`, `drop`, and `forward_sample` for a last stage).

Each session keeps one Forward stream open for the whole conversation; a step is one
request and one reply on it (about a tenth of a millisecond on a LAN, no connection set-up).
Any failure of the stream (the peer was killed, or its cable pulled: keepalive notices within
about 4 s) becomes PeerLost naming the machine, which the coordinator turns into a re-plan.
A peer whose connection lives but whose reply does not come (frozen by SIGSTOP, stuck, or
swapping) is lost too: every step has a deadline (`step_deadline_s`). bench/soak.py saw
keepalive miss a SIGSTOPped peer: its stops of 9-10 s only slowed the answers in flight.

Every channel is mutually authenticated TLS (cluster/auth.py): a machine that cannot prove
the token fails the handshake, and `hello` says so as PeerRefused, never as a usable peer.
"""

from __future__ import annotations

import heapq
import itertools
import queue
import threading
import time
from collections.abc import Callable, Sequence

import grpc
import torch

from fastserve_edge.cluster.auth import is_handshake_failure, open_channel
from fastserve_edge.cluster.protocol import PROTOCOL_VERSION, peer_pb2, peer_pb2_grpc
from fastserve_edge.cluster.wire import WireError, pack_hidden, sampling_to_pb, unpack_hidden
from fastserve_edge.engine.sampling import Sampler
from fastserve_edge.errors import FastServeError

HELLO_TIMEOUT_S = 3.0   # a LAN answers in milliseconds; fake or dead announcements cost no more than this
LOAD_TIMEOUT_S = 3600.0  # a large stage over a slow link; a dead peer is noticed sooner by keepalive
STEP_BASE_S = 10.0       # a decode step's deadline: 10 s is ~1000x a token of a 1B on an old PC ...
STEP_PER_ROW_S = 0.05    # ... plus this per prompt row (a 2048-token prefill: 112 s)
_END = object()


def step_deadline_s(rows: int) -> float:
    """Seconds a peer may take for a step of `rows` rows before it counts as lost."""
    return STEP_BASE_S + STEP_PER_ROW_S * rows


class PeerLost(FastServeError):
    """A peer stopped answering in the middle of the work."""

    def __init__(self, name: str, node_id: str, detail: str):
        super().__init__(f"{name} stopped answering ({detail})")
        self.name, self.node_id = name, node_id


class SessionLost(FastServeError):
    """A peer no longer holds a session's KV (it was restarted or re-planned): re-prefill."""


class PeerRefused(FastServeError):
    """A peer answered but refused: wrong token, another protocol version, not enough memory."""


class PeerClient:
    """One open channel to a peer (every call carries proof of the cluster token)."""

    def __init__(self, address: str, token: str, *, name: str = "", node_id: str = ""):
        self.address = address
        self.name = name or address
        self.node_id = node_id
        self.channel = open_channel(address, token)
        self.stub = peer_pb2_grpc.PeerStub(self.channel)

    def _refused(self, err: grpc.RpcError, what: str) -> FastServeError:
        code = err.code()
        if is_handshake_failure(err):
            return PeerRefused(f"{self.name} ({self.address}) cannot prove the cluster token (TLS handshake refused): "
                               "it runs with another --token, an older fastserve, or is not a fastserve peer")
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return PeerRefused(f"{self.name} ({self.address}) refused our {what}: {err.details()}")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
            return PeerLost(self.name, self.node_id, f"{what}: {err.details()}")
        return PeerRefused(f"{self.name} ({self.address}) failed {what}: {err.details()}")

    def hello(self, node_id: str, name: str) -> peer_pb2.HelloReply:
        try:
            reply = self.stub.Hello(peer_pb2.HelloRequest(protocol_version=PROTOCOL_VERSION, node_id=node_id, name=name),
                                    timeout=HELLO_TIMEOUT_S)
        except grpc.RpcError as err:
            raise self._refused(err, "hello") from None
        if reply.protocol_version != PROTOCOL_VERSION:
            raise PeerRefused(f"{reply.name} speaks protocol {reply.protocol_version}, we speak {PROTOCOL_VERSION}: "
                              "run the same fastserve version on every machine")
        self.name, self.node_id = reply.name or self.name, reply.node_id
        return reply

    def load_stage(self, request: peer_pb2.LoadStageRequest) -> peer_pb2.LoadStageReply:
        try:
            return self.stub.LoadStage(request, timeout=LOAD_TIMEOUT_S)
        except grpc.RpcError as err:
            raise self._refused(err, "the stage") from None

    def health(self, timeout: float = 2.0) -> peer_pb2.HealthReply:
        try:
            return self.stub.Health(peer_pb2.HealthRequest(), timeout=timeout)
        except grpc.RpcError as err:
            raise self._refused(err, "health") from None

    def measure_link(self, *, probe_bytes: int = 1 << 20) -> tuple[float, float]:
        """(round trip ms, Gbit/s) to this peer: the best of three empty Health calls, and of two
        that bring back probe_bytes (their extra time over the round trip is the transfer)."""
        def timed(n: int) -> float:
            t0 = time.perf_counter()
            try:
                self.stub.Health(peer_pb2.HealthRequest(echo_bytes=n), timeout=5.0)
            except grpc.RpcError as err:
                raise self._refused(err, "health") from None
            return (time.perf_counter() - t0) * 1e3
        rtt = min(timed(0) for _ in range(3))
        transfer = max(1e-3, min(timed(probe_bytes) for _ in range(2)) - rtt)
        return rtt, probe_bytes * 8 / (transfer * 1e6)

    def close(self) -> None:
        self.channel.close()


class Watchdog:
    """Cancels what is late: one thread for the process, a heap of (deadline, cancel) entries.
    Arming and disarming cost a lock and a heap push, not a thread per step."""

    def __init__(self):
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._armed: set[int] = set()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float, cancel: Callable[[], None]) -> int:
        with self._cond:
            key = next(self._ids)
            heapq.heappush(self._heap, (time.monotonic() + seconds, key, cancel))
            self._armed.add(key)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fastserve-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()
            return key

    def disarm(self, key: int) -> None:
        with self._cond:
            self._armed.discard(key)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._heap and self._heap[0][1] not in self._armed:
                    heapq.heappop(self._heap)  # disarmed: forget it
                if not self._heap:
                    self._cond.wait()
                    continue
                due, key, cancel = self._heap[0]
                left = due - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                heapq.heappop(self._heap)
                self._armed.discard(key)
            cancel()


WATCHDOG = Watchdog()


class StepTimeout(Exception):
    """A peer did not answer a step within its deadline."""


class _Stream:
    """One session's Forward stream: requests go in through a queue, replies come back in order."""

    def __init__(self, stub: peer_pb2_grpc.PeerStub):
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._replies = stub.Forward(iter(self._requests.get, _END))
        self._seq = itertools.count()
        self._late = False

    def _cancel_late(self) -> None:
        self._late = True
        self._replies.cancel()

    def call(self, request: peer_pb2.ForwardRequest, rows: int) -> peer_pb2.ForwardReply:
        request.seq = next(self._seq)
        self._requests.put(request)
        seconds = step_deadline_s(rows)
        key = WATCHDOG.arm(seconds, self._cancel_late)
        try:
            return next(self._replies)
        except grpc.RpcError:
            if self._late:
                raise StepTimeout(f"no answer to a step within {seconds:.0f} s") from None
            raise
        finally:
            WATCHDOG.disarm(key)

    def close(self) -> None:
        self._requests.put(_END)
        self._replies.cancel()


class RemoteStage:
    """Layers [start, end) on a peer; the host's token loop cannot tell it from a LocalStage."""

    def __init__(self, client: PeerClient, start: int, end: int, *, is_last: bool, max_elements: int,
                 vocab_size: int):
        self.client = client
        self.start, self.end, self.is_last = start, end, is_last
        self.max_elements = max_elements  # largest hidden/logits reply we accept
        self.vocab_size = vocab_size      # a sampled token id must lie below it
        self._streams: dict[str, _Stream] = {}
        self._sampler_of: dict[str, Sampler] = {}
        self._lock = threading.Lock()
        self._closed = False

    def _call(self, request: peer_pb2.ForwardRequest, rows: int) -> peer_pb2.ForwardReply:
        with self._lock:
            if self._closed:  # the pipeline was closed (a re-plan): no new stream on this peer
                raise PeerLost(self.client.name, self.client.node_id, "the pipeline was closed for a re-plan")
            stream = self._streams.get(request.session)
            if stream is None:
                stream = self._streams[request.session] = _Stream(self.client.stub)
        try:
            reply = stream.call(request, rows)
        except (grpc.RpcError, StopIteration, StepTimeout) as err:
            self._forget(request.session)
            if isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                # the peer is alive and at a limit (sessions, KV): a re-plan would meet it again
                raise PeerRefused(f"{self.client.name} refused a step: {err.details()}") from None
            detail = err.details() if isinstance(err, grpc.RpcError) else str(err) or "the stream ended"
            raise PeerLost(self.client.name, self.client.node_id, detail) from None
        if reply.kv_lost:
            raise SessionLost(f"{self.client.name} no longer holds session {request.session[:8]}")
        return reply

    def forward(self, session: str, x: torch.Tensor, pos: int, *, all_logits: bool = False) -> torch.Tensor:
        reply = self._call(peer_pb2.ForwardRequest(session=session, pos=pos, hidden=pack_hidden(x),
                                                   all_logits=all_logits), rows=x.shape[-2])
        try:
            return unpack_hidden(reply.hidden, max_elements=self.max_elements)
        except WireError as err:
            raise PeerLost(self.client.name, self.client.node_id, f"sent garbage: {err}") from None

    def forward_sample(self, session: str, x: torch.Tensor, pos: int, sampler: Sampler,
                       context: Sequence[int]) -> int:
        """Run the last layers on the peer and let it sample; `context[pos:]` are the ids fed."""
        new = self._sampler_of.get(session) is not sampler
        self._sampler_of[session] = sampler
        reply = self._call(peer_pb2.ForwardRequest(
            session=session, pos=pos, hidden=pack_hidden(x), tokens=list(context[pos:]), sample=True,
            sampling=sampling_to_pb(sampler.params), new_sampler=new), rows=x.shape[-2])
        if reply.WhichOneof("output") != "token":
            raise PeerLost(self.client.name, self.client.node_id, "answered a sampling step without a token")
        if not 0 <= reply.token < self.vocab_size:
            raise PeerLost(self.client.name, self.client.node_id,
                           f"sent token id {reply.token}, outside the vocabulary of {self.vocab_size}")
        return reply.token

    def _forget(self, session: str) -> None:
        with self._lock:
            stream = self._streams.pop(session, None)
        self._sampler_of.pop(session, None)
        if stream is not None:
            stream.close()

    def drop(self, session: str) -> None:
        self._forget(session)  # closing the stream frees the session on the peer
        try:
            self.client.stub.DropSession(peer_pb2.DropSessionRequest(session=session), timeout=2.0)
        except grpc.RpcError:
            pass  # a peer that is gone holds nothing

    def close(self) -> None:
        with self._lock:
            self._closed = True
        for session in list(self._streams):
            self._forget(session)
