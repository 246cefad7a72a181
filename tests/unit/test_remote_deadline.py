"""The host's side of a peer that is connected but does not answer: every Forward step has a
deadline (remote.step_deadline_s), after which the peer is lost and the coordinator re-plans.
Keepalive cannot see this case: the stuck peer's gRPC core still answers pings."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch

from fastserve_edge.cluster import auth, remote
from fastserve_edge.cluster.protocol import peer_pb2, peer_pb2_grpc
from fastserve_edge.cluster.wire import pack_hidden

TOKEN = "5f0c2a9e71d84b3a96e0c4f2b18d7a65"


class StuckPeer(peer_pb2_grpc.PeerServicer):
    """Answers the first step of a stream, then hangs (a deadlock, a swapping machine)."""

    def __init__(self):
        self.release = threading.Event()

    def Forward(self, request_iterator, context):
        for i, req in enumerate(request_iterator):
            if i > 0:
                self.release.wait(30)
            yield peer_pb2.ForwardReply(session=req.session, seq=req.seq, hidden=pack_hidden(torch.zeros(1, 1, 8)))


@pytest.fixture
def stuck():
    servicer = StuckPeer()
    server, port = auth.serve(servicer, TOKEN, max_workers=4)
    client = remote.PeerClient(f"127.0.0.1:{port}", TOKEN, name="stuck-pc", node_id="ab" * 8)
    yield servicer, remote.RemoteStage(client, 0, 2, is_last=False, max_elements=1024, vocab_size=32)
    servicer.release.set()
    client.close()
    server.stop(None)


def test_a_connected_peer_that_stops_answering_is_lost_within_the_deadline(stuck, monkeypatch):
    servicer, stage = stuck
    monkeypatch.setattr(remote, "STEP_BASE_S", 0.5)
    x = torch.zeros(1, 1, 8)
    assert stage.forward("s", x, 0).shape == (1, 1, 8)  # the first step is answered
    started = time.monotonic()
    with pytest.raises(remote.PeerLost, match="stuck-pc stopped answering .*no answer to a step within") as err:
        stage.forward("s", x, 1)
    assert time.monotonic() - started < 3.0
    assert err.value.node_id == "ab" * 8


def test_the_deadline_grows_with_the_rows_of_a_step():
    assert remote.step_deadline_s(1) < remote.step_deadline_s(2048)
    assert remote.step_deadline_s(2048) == pytest.approx(remote.STEP_BASE_S + 2048 * remote.STEP_PER_ROW_S)


def test_a_step_answered_in_time_disarms_its_deadline():
    fired = []
    key = remote.WATCHDOG.arm(0.2, lambda: fired.append(1))
    remote.WATCHDOG.disarm(key)
    remote.WATCHDOG.arm(0.1, lambda: fired.append(2))
    time.sleep(0.5)
    assert fired == [2]


class FullPeer(peer_pb2_grpc.PeerServicer):
    def Forward(self, request_iterator, context):
        for _ in request_iterator:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the KV of 2 sessions fills the 14 MiB full-pc has")
        yield from ()


def test_a_peer_at_its_limit_is_a_refusal_not_a_lost_peer():
    """A re-plan would meet the same limit again: the request fails with the peer's reason."""
    server, port = auth.serve(FullPeer(), TOKEN, max_workers=2)
    client = remote.PeerClient(f"127.0.0.1:{port}", TOKEN, name="full-pc")
    try:
        stage = remote.RemoteStage(client, 0, 2, is_last=False, max_elements=1024, vocab_size=32)
        with pytest.raises(remote.PeerRefused, match="full-pc refused a step: the KV of 2 sessions"):
            stage.forward("s", torch.zeros(1, 1, 8), 0)
    finally:
        client.close()
        server.stop(None)
