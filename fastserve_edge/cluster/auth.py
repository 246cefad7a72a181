"""Who may talk to whom in a cluster: the token, the identity every machine derives from it,
and the TLS settings of every gRPC channel and server between machines.

The token is the cluster's one secret, created once on the host (`<config>/cluster-token`,
mode 0600, 128 random bits) and given to each peer (`fastserve join --token T`). It never
travels. Everything else is derived from it, with the `cryptography` package only:

    master     = scrypt(token, salt=SCRYPT_SALT, n=2**15, r=8, p=1)   memory-hard: each guess
                                                                      costs 32 MiB and ~0.1 s
    CA key     = P-256 key from HKDF-SHA256(master, "cluster CA key")  the same on every holder
    cluster_id = HKDF-SHA256(master, "cluster id")[:8], as hex        the public name in mDNS

Each process makes a fresh P-256 key and a certificate for it signed by the CA key, named
TLS_NAME. Every link between machines is TLS (BoringSSL inside gRPC negotiates TLS 1.3)
with both ends presenting their certificate and trusting only the cluster's CA certificate:

- a machine without the token cannot finish a handshake, so it can neither call a peer nor
  pose as one to the host (the host's Hello fails, and the peer is left out of the plan);
- a refused handshake costs no Python thread: it never becomes a call;
- session keys are per connection, so nothing recorded on the LAN can be read or replayed,
  to the same machine or another.

A user-chosen token must carry enough entropy (`check_token`): `cluster_id` is public, and
a guess checked against it offline costs only one scrypt.

Any other link between machines (a data path of its own, outside gRPC) must take its TLS
settings from `identity()` the same way: both ends present `cert_pem`, trust only `ca_pem`.
gRPC's Python API cannot raise the minimum to TLS 1.3; fastserve machines negotiate 1.3, and
a 1.2 client still needs a certificate from the cluster's CA (ECDHE-ECDSA with AES-GCM).
"""

from __future__ import annotations

import datetime
import functools
import logging
import math
import os
import secrets
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fastserve_edge.cluster.protocol import MAX_MESSAGE_BYTES, peer_pb2_grpc
from fastserve_edge.errors import ConfigError, FastServeError

log = logging.getLogger(__name__)

TOKEN_FILE = "cluster-token"
MIN_TOKEN_CHARS = 16
MIN_TOKEN_BITS = 72       # estimated; with scrypt a guess costs ~0.1 s, so 2**71 guesses on average
TLS_NAME = "fastserve-peer"  # the name in every machine's certificate; channels expect it, not an IP
KEEPALIVE_TIME_MS = 2000  # ping an idle or busy connection every 2 s ...
KEEPALIVE_TIMEOUT_MS = 2000  # ... and call the peer dead 2 s after an unanswered ping
HANDSHAKE_TIMEOUT_MS = 5000  # a connection that has not finished TLS by then is closed
DEFAULT_MAX_WORKERS = 64  # sync server: each open Forward stream holds one worker thread
MAX_STREAMS_PER_CONNECTION = 128  # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS a peer advertises

_SCRYPT_SALT = b"fastserve cluster v2"
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**15, 8, 1
_CA_KEY_INFO = b"fastserve cluster CA key v2"
_CLUSTER_ID_INFO = b"fastserve cluster id v2"
_HOW_TO_FIX_TOKEN = "use the token printed by `fastserve token` on the host (`fastserve join --token ...`)"


# -- the token ---------------------------------------------------------------------------


def new_token() -> str:
    """128 random bits as 32 hex characters: easy to type, never starts with '-'."""
    return secrets.token_hex(16)


def token_bits(token: str) -> float:
    """A conservative estimate of a token's entropy in bits: log2 of the pool of the character
    classes it uses per character, except that a character repeating the one before, or
    continuing a run (abc, 123, cba), counts 1 bit. 32 hex digits from `new_token`: ~128."""
    pool = sum(size for present, size in (
        (any(c.islower() for c in token), 26), (any(c.isupper() for c in token), 26),
        (any(c.isdigit() for c in token), 10), (any(not c.isalnum() for c in token), 33)) if present)
    if pool == 0:
        return 0.0
    per_char = math.log2(pool)
    bits, before, step = 0.0, None, None
    for c in token:
        delta = ord(c) - ord(before) if before is not None else None
        predictable = delta is not None and (delta == 0 or (abs(delta) == 1 and delta == step))
        bits += 1.0 if predictable else per_char
        before, step = c, delta
    return bits


def check_token(token: str) -> str:
    """The token without surrounding whitespace, or ConfigError if it cannot be a cluster token."""
    token = token.strip()
    if not token:
        raise ConfigError(f"the cluster token is empty; {_HOW_TO_FIX_TOKEN}")
    if not (token.isascii() and token.isprintable()) or any(c.isspace() for c in token):
        raise ConfigError(f"the cluster token must be printable ASCII without spaces; {_HOW_TO_FIX_TOKEN}")
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"the cluster token is {len(token)} characters; it needs at least {MIN_TOKEN_CHARS}. "
                          f"{_HOW_TO_FIX_TOKEN[0].upper()}{_HOW_TO_FIX_TOKEN[1:]}")
    bits = token_bits(token)
    if bits < MIN_TOKEN_BITS:
        raise ConfigError(
            f"the cluster token is too easy to guess (about {bits:.0f} bits; at least {MIN_TOKEN_BITS} needed): "
            "anyone on the LAN sees the cluster id derived from it and can test guesses offline. "
            f"{_HOW_TO_FIX_TOKEN[0].upper()}{_HOW_TO_FIX_TOKEN[1:]}, or a longer random one")
    return token


def _read_token(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read the cluster token {path} ({err}); fix its permissions or delete it") from None
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("%s was readable by others (mode %o); restricting it to 0600", path, mode)
        os.chmod(path, 0o600)
    try:
        return check_token(text)
    except ConfigError as err:
        raise ConfigError(f"{path} does not hold a valid cluster token ({err}); delete it to create a new one "
                          "(the peers then need the new `fastserve join --token ...` line)") from None


def load_or_create_token(config_dir: Path) -> tuple[str, bool]:
    """(token, created): the cluster token in `config_dir/cluster-token`, created (0600) if missing.

    Safe against two commands starting at once: the file appears complete or not at all
    (written beside it, then hard-linked into place), and the loser reads the winner's token.
    """
    path = Path(config_dir) / TOKEN_FILE
    token = _read_token(path)
    if token is not None:
        return token, False
    path.parent.mkdir(parents=True, exist_ok=True)
    token = new_token()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".cluster-token.")  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return _read_token(path) or token, False
        except OSError:  # a filesystem without hard links
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return _read_token(path) or token, False
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(token + "\n")
    finally:
        os.unlink(tmp)
    return token, True


# -- the identity derived from it ---------------------------------------------------------


@dataclass(frozen=True)
class ClusterIdentity:
    """What a process proves and trusts; see the module docstring."""
    cluster_id: str
    ca_pem: bytes    # the cluster's CA certificate: the only one trusted
    cert_pem: bytes  # this process's certificate, signed by the CA key
    key_pem: bytes   # this process's private key (never leaves the process)


def _master(token: str) -> bytes:
    return Scrypt(salt=_SCRYPT_SALT, length=32, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P).derive(token.encode("utf-8"))


def _hkdf(master: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(master)


def _ca_key(master: bytes) -> ec.EllipticCurvePrivateKey:
    # 48 bytes reduced modulo the group order: a bias below 2**-128 (FIPS 186-5 A.2.1's method)
    order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    secret = int.from_bytes(_hkdf(master, _CA_KEY_INFO, 48), "big") % (order - 1) + 1
    return ec.derive_private_key(secret, ec.SECP256R1())


def _certificate(subject: str, key, issuer: str, issuer_key, *, ca: bool, not_before: datetime.datetime,
                 not_after: datetime.datetime) -> x509.Certificate:
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(not_before).not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=False, encipher_only=False, decipher_only=False),
            critical=True)
    else:
        builder = (builder
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName(TLS_NAME)]), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                         ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    return builder.sign(issuer_key, hashes.SHA256())


@functools.lru_cache(maxsize=4)
def identity(token: str) -> ClusterIdentity:
    """This process's identity in the cluster of `token` (derived once per process: ~0.1 s)."""
    master = _master(token)
    ca_key = _ca_key(master)
    ca_name = "fastserve cluster CA"
    # Validity wide of the clock: machines of a home lab without NTP may be days apart, and the
    # CA key, not the dates, is what a certificate proves.
    now = datetime.datetime.now(datetime.timezone.utc)
    ca = _certificate(ca_name, ca_key, ca_name, ca_key, ca=True,
                      not_before=datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc),
                      not_after=datetime.datetime(9999, 12, 31, tzinfo=datetime.timezone.utc))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(TLS_NAME, key, ca_name, ca_key, ca=False, not_before=now - datetime.timedelta(days=30),
                        not_after=now + datetime.timedelta(days=3650))
    return ClusterIdentity(
        cluster_id=_hkdf(master, _CLUSTER_ID_INFO, 8).hex(),
        ca_pem=ca.public_bytes(serialization.Encoding.PEM),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()),
    )


def cluster_id(token: str) -> str:
    """16 hex characters naming the cluster in mDNS; reveals nothing usable about the token."""
    return identity(token).cluster_id


# -- channels and servers ----------------------------------------------------------------


def _both_ends(max_message_bytes: int) -> list[tuple[str, int]]:
    """Message size limits, and keepalive that notices a dead or frozen other end in ~4 s."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),  # keep pinging a connection that is only waiting
    ]


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int | str]]:
    """Client side: the limits and keepalive, quick reconnects, and the certificate name to expect."""
    return _both_ends(max_message_bytes) + [
        ("grpc.initial_reconnect_backoff_ms", 500),  # a peer that comes back is used again soon ...
        ("grpc.max_reconnect_backoff_ms", 5000),     # ... not after gRPC's default 2 minutes
        ("grpc.ssl_target_name_override", TLS_NAME),  # peers are reached by IP; they prove the cluster's name
        ("grpc.default_authority", TLS_NAME),
    ]


def server_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Server side: the same limits, keepalive towards the clients, a ping policy that accepts
    the clients' 2 s keepalive (gRPC's default would answer it with GOAWAY), and bounds on what
    one connection may hold open."""
    return _both_ends(max_message_bytes) + [
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
        ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
        ("grpc.so_reuseport", 0),  # a port in use is an error, not a second silent listener
    ]


def open_channel(address: str, token: str, *, max_message_bytes: int = MAX_MESSAGE_BYTES) -> grpc.Channel:
    """A TLS channel to "host:port" that proves the token and accepts only a peer that proves
    it too. Close it when done."""
    me = identity(token)
    credentials = grpc.ssl_channel_credentials(root_certificates=me.ca_pem, private_key=me.key_pem,
                                               certificate_chain=me.cert_pem)
    return grpc.secure_channel(address, credentials, options=channel_options(max_message_bytes))


def serve(servicer, token: str, *, bind: str = "127.0.0.1:0", max_message_bytes: int = MAX_MESSAGE_BYTES,
          max_workers: int = DEFAULT_MAX_WORKERS) -> tuple[grpc.Server, int]:
    """Start a Peer server (a `peer_pb2_grpc.PeerServicer`) on `bind` that only the token's
    holders can reach. Returns (server, port): port 0 in `bind` picks a free one.
    Stop it with `server.stop(grace)`.

    Calls beyond `max_workers` at once are refused with RESOURCE_EXHAUSTED instead of
    queueing behind the open Forward streams."""
    me = identity(token)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="fastserve-peer"),
        options=server_options(max_message_bytes),
        maximum_concurrent_rpcs=max_workers,
    )
    peer_pb2_grpc.add_PeerServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials([(me.key_pem, me.cert_pem)], root_certificates=me.ca_pem,
                                              require_client_auth=True)
    try:
        port = server.add_secure_port(bind, credentials)
    except RuntimeError:
        port = 0
    if port == 0:
        server.stop(None)
        raise FastServeError(f"cannot listen on {bind}: the port is in use or the address is not on this "
                             "machine; choose another port (--port) or interface")
    server.start()
    return server, port


def is_handshake_failure(err: grpc.RpcError) -> bool:
    """True when a call failed because the other end could not prove the token (or we could not
    prove it to them): TLS refused, as opposed to a machine that is down."""
    details = (err.details() or "").lower()
    return err.code() == grpc.StatusCode.UNAVAILABLE and any(
        word in details for word in ("handshake", "ssl", "certificate", "tsi_"))
