"""The cluster token and the proof every call carries: token file, cluster id, the verifier
(with a fake clock), and the interceptors on a real gRPC server on loopback."""

from __future__ import annotations

import logging
import queue
import stat

import grpc
import pytest

from fastserve_edge.cluster import auth
from fastserve_edge.cluster.protocol import peer_pb2, peer_pb2_grpc
from fastserve_edge.errors import ConfigError

TOKEN = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"
HEALTH = "/fastserve.peer.v1.Peer/Health"
NOW = 1_700_000_000.0


# -- the token --------------------------------------------------------------------------------


def test_token_file_created_0600_and_reused(tmp_path):
    config = tmp_path / "config"  # does not exist yet
    token, created = auth.load_or_create_token(config)
    path = config / auth.TOKEN_FILE
    assert created and path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert auth.check_token(token) == token and len(token) >= auth.MIN_TOKEN_CHARS
    assert path.read_text().strip() == token
    assert auth.load_or_create_token(config) == (token, False)
    assert [p.name for p in config.iterdir()] == [auth.TOKEN_FILE]  # no temp file left behind


def test_tokens_differ_between_clusters(tmp_path):
    assert auth.load_or_create_token(tmp_path / "a")[0] != auth.load_or_create_token(tmp_path / "b")[0]


def test_token_file_readable_by_others_is_tightened(tmp_path):
    path = tmp_path / auth.TOKEN_FILE
    path.write_text(TOKEN + "\n")
    path.chmod(0o644)
    assert auth.load_or_create_token(tmp_path) == (TOKEN, False)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_broken_token_file_says_what_to_do(tmp_path):
    (tmp_path / auth.TOKEN_FILE).write_text("short\n")
    with pytest.raises(ConfigError, match="delete it"):
        auth.load_or_create_token(tmp_path)


@pytest.mark.parametrize("bad", ["", "   ", "tooshort", "0123456789abcdef 0123", "0123456789abcdéf0123"])
def test_check_token_refuses(bad):
    with pytest.raises(ConfigError, match="token"):
        auth.check_token(bad)


def test_check_token_strips():
    assert auth.check_token(f"  {TOKEN}\n") == TOKEN


def test_cluster_id_stable_short_and_not_the_token():
    cid = auth.cluster_id(TOKEN)
    assert cid == auth.cluster_id(TOKEN) and cid != auth.cluster_id(OTHER)
    assert len(cid) == 16 and int(cid, 16) >= 0
    assert cid not in TOKEN and TOKEN not in cid


# -- the verifier, on a fake clock ---------------------------------------------------------------


def verifier(**kwargs) -> auth.ProofVerifier:
    return auth.ProofVerifier(TOKEN, clock=lambda: NOW, **kwargs)


def test_right_proof_passes():
    assert verifier().check(HEALTH, auth.make_proof(TOKEN, HEALTH, now=NOW)) is None


@pytest.mark.parametrize("proof,kind", [
    (None, "missing"),
    ("", "missing"),
    ("hello", "malformed"),
    ("v1:123:abc", "malformed"),
    ("v2:1700000000000:abc:def", "malformed"),
    ("v1:-5:abc:def", "malformed"),
    ("v1:1700000000000:abc:dé", "malformed"),  # hmac.compare_digest would raise on non-ASCII
    ("v1:²:abc:def", "malformed"),
    (auth.make_proof(OTHER, HEALTH, now=NOW), "token"),
    (auth.make_proof(TOKEN, "/fastserve.peer.v1.Peer/Hello", now=NOW), "token"),  # proof for another method
    (auth.make_proof(TOKEN, HEALTH, now=NOW - 61), "clock"),
    (auth.make_proof(TOKEN, HEALTH, now=NOW + 61), "clock"),
])
def test_bad_proofs_are_denied(proof, kind):
    denial = verifier().check(HEALTH, proof)
    assert denial is not None and denial.kind == kind and denial.message


def test_tampered_timestamp_breaks_the_mac():
    proof = auth.make_proof(TOKEN, HEALTH, now=NOW - 120)
    version, _stamp, nonce, mac = proof.split(":")
    assert verifier().check(HEALTH, f"{version}:{int(NOW * 1000)}:{nonce}:{mac}").kind == "token"


def test_clock_denial_says_by_how_much():
    denial = verifier().check(HEALTH, auth.make_proof(TOKEN, HEALTH, now=NOW - 95))
    assert "-95 s" in denial.message and "NTP" in denial.message


def test_replay_is_denied():
    v = verifier()
    proof = auth.make_proof(TOKEN, HEALTH, now=NOW - 30)
    assert v.check(HEALTH, proof) is None
    assert v.check(HEALTH, proof).kind == "replay"
    assert v.check(HEALTH, auth.make_proof(TOKEN, HEALTH, now=NOW - 30)) is None  # a new nonce is fine


def test_replay_cache_is_bounded_and_stays_safe():
    clock = [NOW]
    v = auth.ProofVerifier(TOKEN, max_nonces=10, clock=lambda: clock[0])
    proofs = [auth.make_proof(TOKEN, HEALTH, now=NOW + i / 1000) for i in range(50)]
    assert all(v.check(HEALTH, p) is None for p in proofs)
    assert len(v) == 10
    # forgotten nonces are still refused: their stamps are below the floor
    assert all(v.check(HEALTH, p).kind == "replay" for p in proofs)
    # and nonces leave the cache once their stamp leaves the window
    clock[0] = NOW + 200
    assert v.check(HEALTH, auth.make_proof(TOKEN, HEALTH, now=clock[0])) is None
    assert len(v) == 1


# -- interceptors on a real server --------------------------------------------------------------


class CountingPeer(peer_pb2_grpc.PeerServicer):
    def __init__(self):
        self.calls = 0

    def Health(self, request, context):
        self.calls += 1
        return peer_pb2.HealthReply(sessions=7)

    def Forward(self, request_iterator, context):
        self.calls += 1
        for req in request_iterator:
            yield peer_pb2.ForwardReply(session=req.session, seq=req.seq)

    def FetchLayer(self, request, context):
        self.calls += 1
        yield peer_pb2.TensorChunk(last=True)


@pytest.fixture(scope="module")
def server():
    servicer = CountingPeer()
    srv, port = auth.serve(servicer, TOKEN, max_workers=4)
    yield servicer, f"127.0.0.1:{port}"
    srv.stop(None)


def denied(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value
    return err.value


def test_right_token_passes_every_call_kind(server):
    _, address = server
    with auth.open_channel(address, TOKEN) as channel:
        stub = peer_pb2_grpc.PeerStub(channel)
        assert stub.Health(peer_pb2.HealthRequest(), timeout=10).sessions == 7
        assert stub.Health(peer_pb2.HealthRequest(), timeout=10).sessions == 7  # fresh nonce each call
        assert [c.last for c in stub.FetchLayer(peer_pb2.FetchLayerRequest(), timeout=10)] == [True]
        replies = stub.Forward(iter([peer_pb2.ForwardRequest(session="a", seq=1),
                                     peer_pb2.ForwardRequest(session="a", seq=2)]), timeout=10)
        assert [r.seq for r in replies] == [1, 2]
        # unimplemented verbs still say so to a caller with the token
        with pytest.raises(grpc.RpcError) as err:
            stub.Hello(peer_pb2.HelloRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_wrong_token_denied_on_every_call_kind_before_the_servicer(server):
    servicer, address = server
    before = servicer.calls
    with auth.open_channel(address, OTHER) as channel:
        stub = peer_pb2_grpc.PeerStub(channel)
        err = denied(lambda: stub.Health(peer_pb2.HealthRequest(), timeout=10))
        assert "cluster token" in err.details()
        denied(lambda: list(stub.FetchLayer(peer_pb2.FetchLayerRequest(), timeout=10)))
        denied(lambda: list(stub.Forward(iter([peer_pb2.ForwardRequest(session="a")]), timeout=10)))
        denied(lambda: stub.Hello(peer_pb2.HelloRequest(), timeout=10))  # unimplemented, still denied
    assert servicer.calls == before


def test_missing_metadata_denied(server):
    _, address = server
    with grpc.insecure_channel(address) as channel:
        err = denied(lambda: peer_pb2_grpc.PeerStub(channel).Health(peer_pb2.HealthRequest(), timeout=10))
    assert "no proof" in err.details()


def test_replayed_metadata_denied(server):
    _, address = server
    proof = auth.make_proof(TOKEN, HEALTH)
    with grpc.insecure_channel(address) as channel:
        stub = peer_pb2_grpc.PeerStub(channel)
        assert stub.Health(peer_pb2.HealthRequest(), metadata=[(auth.AUTH_METADATA_KEY, proof)], timeout=10).sessions == 7
        err = denied(lambda: stub.Health(peer_pb2.HealthRequest(), metadata=[(auth.AUTH_METADATA_KEY, proof)],
                                         timeout=10))
    assert "replayed" in err.details()


def test_stale_timestamp_denied(server):
    import time

    _, address = server
    proof = auth.make_proof(TOKEN, HEALTH, now=time.time() - 120)
    with grpc.insecure_channel(address) as channel:
        err = denied(lambda: peer_pb2_grpc.PeerStub(channel).Health(
            peer_pb2.HealthRequest(), metadata=[(auth.AUTH_METADATA_KEY, proof)], timeout=10))
    assert "clock" in err.details()


def test_denials_logged_once_per_address_and_reason(caplog):
    caplog.set_level(logging.WARNING, logger=auth.__name__)
    srv, port = auth.serve(CountingPeer(), TOKEN, max_workers=2)  # its own log-once memory
    try:
        with auth.open_channel(f"127.0.0.1:{port}", OTHER) as channel:
            stub = peer_pb2_grpc.PeerStub(channel)
            for _ in range(3):
                denied(lambda: stub.Health(peer_pb2.HealthRequest(), timeout=10))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:  # a new connection: another port
            for _ in range(2):
                denied(lambda: peer_pb2_grpc.PeerStub(channel).Health(peer_pb2.HealthRequest(), timeout=10))
    finally:
        srv.stop(None)
    lines = [r.getMessage() for r in caplog.records if r.name == auth.__name__]
    assert len(lines) == 2, lines
    assert "from 127.0.0.1: wrong cluster token" in lines[0] and "from 127.0.0.1: no proof" in lines[1]


def test_first_denial_of_a_kind_is_logged():
    interceptor = auth.AuthServerInterceptor(TOKEN)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(auth.__name__)
    logger.addHandler(handler)
    try:
        denial = auth.Denial("token", "wrong cluster token")
        for _ in range(3):
            interceptor._log_once("10.0.0.7", HEALTH, denial)
        interceptor._log_once("10.0.0.8", HEALTH, denial)
        interceptor._log_once("10.0.0.7", HEALTH, auth.Denial("replay", "replayed call"))
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage().split(":")[0] for r in records] == [
        f"refused {HEALTH} from 10.0.0.7", f"refused {HEALTH} from 10.0.0.8", f"refused {HEALTH} from 10.0.0.7"]


def test_forward_stream_authenticated_once_then_streams(server):
    """The proof is checked at stream start; the open stream then carries many steps."""
    _, address = server
    requests: queue.Queue = queue.Queue()

    def feed():
        while (item := requests.get()) is not None:
            yield item

    with auth.open_channel(address, TOKEN) as channel:
        replies = peer_pb2_grpc.PeerStub(channel).Forward(feed(), timeout=20)
        for seq in range(1, 6):
            requests.put(peer_pb2.ForwardRequest(session="s", seq=seq))
            assert next(replies).seq == seq
        requests.put(None)
        assert list(replies) == []


@pytest.mark.parametrize("peer,host", [("ipv4:10.0.0.7:51234", "10.0.0.7"), ("ipv6:[::1]:5555", "::1"),
                                       ("unix:/tmp/sock", "unix:/tmp/sock")])
def test_peer_host_drops_the_port(peer, host):
    assert auth._peer_host(peer) == host
