"""The host's side of one peer: a gRPC client, and a RemoteStage with the same interface
as a LocalStage (`forward`, `drop`, and `forward_sample` for a last stage).

Each session keeps one Forward stream open for the whole conversation; a step is one
request and one reply on it (about a tenth of a millisecond on a LAN, no connection set-up).
Any failure of the stream (the peer was killed, its cable pulled: keepalive notices within
about 4 s) becomes PeerLost naming the machine, which the coordinator turns into a re-plan.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Sequence

import grpc
import torch

from fastserve_edge.cluster.auth import open_channel
from fastserve_edge.cluster.protocol import PROTOCOL_VERSION, peer_pb2, peer_pb2_grpc
from fastserve_edge.cluster.wire import WireError, pack_hidden, sampling_to_pb, unpack_hidden
from fastserve_edge.engine.sampling import Sampler
from fastserve_edge.errors import FastServeError

HELLO_TIMEOUT_S = 5.0
LOAD_TIMEOUT_S = 3600.0  # a large stage over a slow link; a dead peer is noticed sooner by keepalive
_END = object()


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

    def close(self) -> None:
        self.channel.close()


class _Stream:
    """One session's Forward stream: requests go in through a queue, replies come back in order."""

    def __init__(self, stub: peer_pb2_grpc.PeerStub):
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._replies = stub.Forward(iter(self._requests.get, _END))
        self._seq = itertools.count()

    def call(self, request: peer_pb2.ForwardRequest) -> peer_pb2.ForwardReply:
        request.seq = next(self._seq)
        self._requests.put(request)
        return next(self._replies)

    def close(self) -> None:
        self._requests.put(_END)
        self._replies.cancel()


class RemoteStage:
    """Layers [start, end) on a peer; the host's token loop cannot tell it from a LocalStage."""

    def __init__(self, client: PeerClient, start: int, end: int, *, is_last: bool, max_elements: int):
        self.client = client
        self.start, self.end, self.is_last = start, end, is_last
        self.max_elements = max_elements  # largest hidden/logits reply we accept
        self._streams: dict[str, _Stream] = {}
        self._sampler_of: dict[str, Sampler] = {}
        self._lock = threading.Lock()
        self._closed = False

    def _call(self, request: peer_pb2.ForwardRequest) -> peer_pb2.ForwardReply:
        with self._lock:
            if self._closed:  # the pipeline was closed (a re-plan): no new stream on this peer
                raise PeerLost(self.client.name, self.client.node_id, "the pipeline was closed for a re-plan")
            stream = self._streams.get(request.session)
            if stream is None:
                stream = self._streams[request.session] = _Stream(self.client.stub)
        try:
            reply = stream.call(request)
        except (grpc.RpcError, StopIteration) as err:
            self._forget(request.session)
            detail = err.details() if isinstance(err, grpc.RpcError) else "the stream ended"
            raise PeerLost(self.client.name, self.client.node_id, detail) from None
        if reply.kv_lost:
            raise SessionLost(f"{self.client.name} no longer holds session {request.session[:8]}")
        return reply

    def forward(self, session: str, x: torch.Tensor, pos: int, *, all_logits: bool = False) -> torch.Tensor:
        reply = self._call(peer_pb2.ForwardRequest(session=session, pos=pos, hidden=pack_hidden(x),
                                                   all_logits=all_logits))
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
            sampling=sampling_to_pb(sampler.params), new_sampler=new))
        if reply.WhichOneof("output") != "token":
            raise PeerLost(self.client.name, self.client.node_id, "answered a sampling step without a token")
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
