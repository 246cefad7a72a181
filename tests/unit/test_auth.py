"""The cluster token and the identity derived from it: token file and entropy, cluster id, and
mutual TLS on a real gRPC server on loopback: a machine without the token can neither call a
peer nor pose as one, and bytes recorded on the wire open nothing when sent again."""

from __future__ import annotations

import socket
import stat
import threading
import time

import grpc
import pytest

from fastserve_edge.cluster import auth
from fastserve_edge.cluster.protocol import peer_pb2, peer_pb2_grpc
from fastserve_edge.errors import ConfigError

TOKEN = "5f0c2a9e71d84b3a96e0c4f2b18d7a65"
OTHER = "c3e91b07a4f25d8e6b1f0a9c72d45e38"


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



@pytest.mark.parametrize("guessable", [
    "aaaaaaaaaaaaaaaaaaaaaaaa",            # one character
    "abcdefghijklmnopqrstuvwxyz",          # a run
    "0123456789abcdef0123456789abcdef",    # runs, twice
    "passwordpassword",                    # 16 lowercase letters, a doubled one
])
def test_a_guessable_token_is_refused_and_the_error_says_why(guessable):
    with pytest.raises(ConfigError, match="too easy to guess .*offline"):
        auth.check_token(guessable)


def test_new_tokens_carry_128_random_bits_and_pass():
    token = auth.new_token()
    assert len(token) == 32 and int(token, 16) >= 0
    assert auth.token_bits(token) >= 128 and auth.check_token(token) == token


def test_the_cluster_id_is_stretched_not_one_hash_of_the_token():
    import hashlib

    cid = auth.cluster_id(TOKEN)
    for label in (b"", b"fastserve cluster id v1\0"):
        assert hashlib.sha256(label + TOKEN.encode()).hexdigest()[:16] != cid
    started = time.perf_counter()
    auth._master(OTHER)  # what one offline guess costs: scrypt with 32 MiB
    assert time.perf_counter() - started > 0.005


def test_every_holder_derives_the_same_ca_and_a_certificate_of_its_own():
    from cryptography import x509

    a = auth.identity(TOKEN)
    ca_key = auth._ca_key(auth._master(TOKEN))
    ca = x509.load_pem_x509_certificate(a.ca_pem)
    assert ca.public_key().public_numbers() == ca_key.public_key().public_numbers()
    leaf = x509.load_pem_x509_certificate(a.cert_pem)
    leaf.verify_directly_issued_by(ca)  # raises if not signed by the cluster CA
    other_ca = x509.load_pem_x509_certificate(auth.identity(OTHER).ca_pem)
    with pytest.raises(Exception):
        leaf.verify_directly_issued_by(other_ca)
    assert b"PRIVATE KEY" in a.key_pem and str(ca_key.private_numbers().private_value) not in a.key_pem.decode()


# -- mutual TLS on a real server ---------------------------------------------------------------


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


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert auth.is_handshake_failure(err.value), err.value
    return err.value


def test_right_token_passes_every_call_kind(server):
    _, address = server
    with auth.open_channel(address, TOKEN) as channel:
        stub = peer_pb2_grpc.PeerStub(channel)
        assert stub.Health(peer_pb2.HealthRequest(), timeout=10).sessions == 7
        assert [c.last for c in stub.FetchLayer(peer_pb2.FetchLayerRequest(), timeout=10)] == [True]
        replies = stub.Forward(iter([peer_pb2.ForwardRequest(session="a", seq=1),
                                     peer_pb2.ForwardRequest(session="a", seq=2)]), timeout=10)
        assert [r.seq for r in replies] == [1, 2]
        with pytest.raises(grpc.RpcError) as err:  # unimplemented verbs still say so to a caller with the token
            stub.Hello(peer_pb2.HelloRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_client_without_the_token_never_reaches_the_servicer(server):
    servicer, address = server
    before = servicer.calls
    with auth.open_channel(address, OTHER) as channel:
        stub = peer_pb2_grpc.PeerStub(channel)
        refused(lambda: stub.Health(peer_pb2.HealthRequest(), timeout=10))
        refused(lambda: list(stub.FetchLayer(peer_pb2.FetchLayerRequest(), timeout=10)))
        refused(lambda: list(stub.Forward(iter([peer_pb2.ForwardRequest(session="a")]), timeout=10)))
    # TLS with the right CA but no certificate of ours, and plaintext: refused as well
    me = auth.identity(TOKEN)
    anonymous = grpc.ssl_channel_credentials(root_certificates=me.ca_pem)
    with grpc.secure_channel(address, anonymous, options=auth.channel_options()) as channel:
        with pytest.raises(grpc.RpcError):
            peer_pb2_grpc.PeerStub(channel).Health(peer_pb2.HealthRequest(), timeout=10)
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError):
            peer_pb2_grpc.PeerStub(channel).Health(peer_pb2.HealthRequest(), timeout=10)
    assert servicer.calls == before


def test_a_server_without_the_token_is_refused_by_the_client():
    """The host checks the peer too: a stranger that answers every call gets nothing."""
    stranger = CountingPeer()
    srv, port = auth.serve(stranger, OTHER, max_workers=2)
    try:
        with auth.open_channel(f"127.0.0.1:{port}", TOKEN) as channel:
            refused(lambda: peer_pb2_grpc.PeerStub(channel).Health(peer_pb2.HealthRequest(), timeout=10))
    finally:
        srv.stop(None)
    assert stranger.calls == 0


class RecordingProxy:
    """A TCP relay on loopback that keeps every byte the client sent (what a sniffer on the LAN sees)."""

    def __init__(self, target: int):
        self.sent = bytearray()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._target = target
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        client, _ = self._listener.accept()
        upstream = socket.create_connection(("127.0.0.1", self._target))

        def pump(src, dst, record):
            try:
                while data := src.recv(65536):
                    if record:
                        self.sent.extend(data)
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pump, args=(client, upstream, True), daemon=True).start()
        threading.Thread(target=pump, args=(upstream, client, False), daemon=True).start()


def test_recorded_bytes_replayed_to_the_same_or_another_peer_open_nothing(server):
    servicer, address = server
    second = CountingPeer()
    srv2, port2 = auth.serve(second, TOKEN, max_workers=2)  # another peer of the same cluster
    try:
        proxy = RecordingProxy(int(address.rsplit(":", 1)[1]))
        with auth.open_channel(f"127.0.0.1:{proxy.port}", TOKEN) as channel:
            stub = peer_pb2_grpc.PeerStub(channel)
            assert stub.Health(peer_pb2.HealthRequest(), timeout=10).sessions == 7
            assert [r.seq for r in stub.Forward(iter([peer_pb2.ForwardRequest(session="s", seq=5)]), timeout=10)] == [5]
        assert len(proxy.sent) > 1000
        # the method, the session and the values are not readable on the wire (only the TLS name, in SNI)
        assert b"Health" not in proxy.sent and b"fastserve.peer.v1" not in proxy.sent
        before = servicer.calls, second.calls
        for port in (int(address.rsplit(":", 1)[1]), port2):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as replay:
                replay.sendall(bytes(proxy.sent))
                replay.settimeout(5)
                try:
                    while replay.recv(65536):
                        pass
                except OSError:
                    pass
        time.sleep(0.2)
        assert (servicer.calls, second.calls) == before
    finally:
        srv2.stop(None)
