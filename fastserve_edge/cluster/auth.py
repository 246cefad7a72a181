"""Who may talk to a peer: the cluster token, a proof of it on every call, and the settings
every gRPC channel and server of the cluster uses.

The token is a shared secret, created once on the host (`<config>/cluster-token`, mode 0600)
and given to each peer (`fastserve join --token T`). It never travels: mDNS carries
`cluster_id(token)`, a hash of it, and every call carries the metadata

    x-fastserve-auth: v1:<unix ms>:<nonce hex>:<HMAC-SHA256(key, "<method>\\n<unix ms>\\n<nonce>") hex>

with key = HMAC-SHA256(token, "fastserve peer call key v1"). A server runs the call only if
the MAC is right, the timestamp is within CLOCK_WINDOW_S of its own clock, and the nonce
has not been seen before (a recorded call replayed is refused). Everything else gets
PERMISSION_DENIED before it reaches a servicer, and a warning is logged once per
(address, reason).

What this does not do: encrypt, or protect message bodies from someone on the path who can
rewrite packets; that needs TLS. It keeps strangers, and a second cluster on the same LAN, out.

Sync gRPC (`grpc.server` + ThreadPoolExecutor, `grpc.insecure_channel`); `serve` and
`open_channel` wire it all up so the peer and host code stay short.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import logging
import os
import secrets
import tempfile
import threading
import time
from collections import OrderedDict, namedtuple
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

from fastserve_edge.cluster.protocol import MAX_MESSAGE_BYTES, peer_pb2_grpc
from fastserve_edge.errors import ConfigError, FastServeError

log = logging.getLogger(__name__)

AUTH_METADATA_KEY = "x-fastserve-auth"
TOKEN_FILE = "cluster-token"
MIN_TOKEN_CHARS = 16      # cluster_id is public: a short token could be guessed from it offline
CLOCK_WINDOW_S = 60.0     # machines of a home lab without NTP drift; more than this is a replay risk
MAX_NONCES = 100_000      # replay cache bound (~800 calls/s over the window; a call is a stream, not a token)
KEEPALIVE_TIME_MS = 2000  # ping an idle or busy connection every 2 s ...
KEEPALIVE_TIMEOUT_MS = 2000  # ... and call the peer dead 2 s after an unanswered ping
DEFAULT_MAX_WORKERS = 64  # sync server: each open Forward stream holds one worker thread

_PROOF_VERSION = "v1"
_KEY_LABEL = b"fastserve peer call key v1"
_CLUSTER_ID_LABEL = b"fastserve cluster id v1\0"
_HOW_TO_FIX_TOKEN = "use the token printed by `fastserve token` on the host (`fastserve join --token ...`)"


# -- the token ---------------------------------------------------------------------------


def new_token() -> str:
    """128 random bits as 32 hex characters: easy to type, never starts with '-'."""
    return secrets.token_hex(16)


def check_token(token: str) -> str:
    """The token without surrounding whitespace, or ConfigError if it cannot be a cluster token."""
    token = token.strip()
    if not token:
        raise ConfigError(f"the cluster token is empty; {_HOW_TO_FIX_TOKEN}")
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"the cluster token is {len(token)} characters; it needs at least {MIN_TOKEN_CHARS}. "
                          f"{_HOW_TO_FIX_TOKEN[0].upper()}{_HOW_TO_FIX_TOKEN[1:]}")
    if not (token.isascii() and token.isprintable()) or any(c.isspace() for c in token):
        raise ConfigError(f"the cluster token must be printable ASCII without spaces; {_HOW_TO_FIX_TOKEN}")
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


def cluster_id(token: str) -> str:
    """16 hex characters naming the cluster in mDNS; reveals nothing usable about the token."""
    return hashlib.sha256(_CLUSTER_ID_LABEL + token.encode("utf-8")).hexdigest()[:16]


# -- proofs ------------------------------------------------------------------------------


def _call_key(token: str) -> bytes:
    return hmac.new(token.encode("utf-8"), _KEY_LABEL, hashlib.sha256).digest()


def _mac(key: bytes, method: str, stamp: str, nonce: str) -> str:
    return hmac.new(key, f"{method}\n{stamp}\n{nonce}".encode(), hashlib.sha256).hexdigest()


def _proof(key: bytes, method: str, now: float, nonce: str | None = None) -> str:
    stamp = str(int(now * 1000))
    nonce = nonce if nonce is not None else secrets.token_hex(16)
    return f"{_PROOF_VERSION}:{stamp}:{nonce}:{_mac(key, method, stamp, nonce)}"


def make_proof(token: str, method: str, *, now: float | None = None, nonce: str | None = None) -> str:
    """The `x-fastserve-auth` value for one call of `method` ("/fastserve.peer.v1.Peer/Hello")."""
    return _proof(_call_key(token), method, time.time() if now is None else now, nonce)


@dataclass(frozen=True)
class Denial:
    kind: str     # short and stable: the log-once key ("missing", "malformed", "token", "clock", "replay")
    message: str  # what the caller sees in the status details, and what to do about it


class ProofVerifier:
    """Checks `x-fastserve-auth` values; remembers nonces for the clock window (thread-safe)."""

    def __init__(self, token: str, *, window_s: float = CLOCK_WINDOW_S, max_nonces: int = MAX_NONCES,
                 clock: Callable[[], float] = time.time):
        self._key = _call_key(token)
        self._window_ms = int(window_s * 1000)
        self._max_nonces = max_nonces
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._by_time: list[tuple[int, str]] = []  # heap of (stamp ms, nonce) for the nonces in _seen
        self._floor_ms = -1  # stamps at or below this were forgotten: refused as replays

    def check(self, method: str, proof: str | None) -> Denial | None:
        """None if the call may run, else why not."""
        if not proof:
            return Denial("missing", f"no proof of the cluster token on this call; {_HOW_TO_FIX_TOKEN}")
        parts = proof.split(":")
        if (not proof.isascii() or len(parts) != 4 or parts[0] != _PROOF_VERSION
                or not parts[1].isdigit() or len(parts[1]) > 16):
            return Denial("malformed", f"malformed {AUTH_METADATA_KEY} metadata; is the other machine running "
                                       "the same fastserve version?")
        _, stamp, nonce, mac = parts
        if not hmac.compare_digest(_mac(self._key, method, stamp, nonce), mac):
            return Denial("token", f"wrong cluster token: this machine belongs to another cluster; {_HOW_TO_FIX_TOKEN}")
        stamp_ms = int(stamp)
        now_ms = int(self._clock() * 1000)
        skew_s = (stamp_ms - now_ms) / 1000
        if abs(stamp_ms - now_ms) > self._window_ms:
            return Denial("clock", f"the caller's clock differs from this machine's by {skew_s:+.0f} s "
                                   f"(limit {self._window_ms / 1000:.0f} s); sync the clocks (NTP)")
        with self._lock:
            self._forget(now_ms - self._window_ms)
            if nonce in self._seen or stamp_ms <= self._floor_ms:
                return Denial("replay", "replayed call (this proof was already used); refused")
            self._seen.add(nonce)
            heapq.heappush(self._by_time, (stamp_ms, nonce))
            while len(self._seen) > self._max_nonces:
                self._forget_oldest()
        return None

    def _forget(self, before_ms: int) -> None:
        while self._by_time and self._by_time[0][0] < before_ms:
            self._forget_oldest()

    def _forget_oldest(self) -> None:
        stamp_ms, nonce = heapq.heappop(self._by_time)
        self._seen.discard(nonce)
        self._floor_ms = max(self._floor_ms, stamp_ms)

    def __len__(self) -> int:
        return len(self._seen)


# -- interceptors ------------------------------------------------------------------------


class _CallDetails(
    namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
    grpc.ClientCallDetails,
):
    pass


class AuthClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds a fresh `x-fastserve-auth` proof to every call of the channel it wraps."""

    def __init__(self, token: str, *, clock: Callable[[], float] = time.time):
        self._key = _call_key(token)
        self._clock = clock

    def _with_proof(self, details: grpc.ClientCallDetails) -> _CallDetails:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        metadata = [(k, v) for k, v in (details.metadata or ()) if k != AUTH_METADATA_KEY]
        metadata.append((AUTH_METADATA_KEY, _proof(self._key, method, self._clock())))
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._with_proof(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._with_proof(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._with_proof(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._with_proof(client_call_details), request_iterator)


def _peer_host(peer: str) -> str:
    """"ipv4:10.0.0.7:51234" -> "10.0.0.7"; "ipv6:[::1]:5" -> "::1": the port changes per connection."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]") or rest
    return peer


class AuthServerInterceptor(grpc.ServerInterceptor):
    """Refuses, with PERMISSION_DENIED, every call without a valid fresh proof of the token.

    A refused call never reaches the servicer and its request bytes are never parsed. The
    warning is logged once per (caller address, reason), so a misconfigured peer that
    retries does not flood the log.
    """

    _MAX_LOGGED = 1024

    def __init__(self, token: str, *, window_s: float = CLOCK_WINDOW_S, max_nonces: int = MAX_NONCES,
                 clock: Callable[[], float] = time.time):
        self.verifier = ProofVerifier(token, window_s=window_s, max_nonces=max_nonces, clock=clock)
        self._logged: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._lock = threading.Lock()

    def intercept_service(self, continuation, handler_call_details):
        proof = next((v for k, v in handler_call_details.invocation_metadata or () if k == AUTH_METADATA_KEY), None)
        if isinstance(proof, bytes):
            proof = proof.decode("ascii", errors="replace")
        method = handler_call_details.method
        denial = self.verifier.check(method, proof)
        handler = continuation(handler_call_details)
        if denial is None:
            return handler

        def deny(_request_or_iterator, context):
            self._log_once(_peer_host(context.peer()), method, denial)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, denial.message)

        # No (de)serializers: nothing from an unauthenticated caller is parsed.
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return grpc.unary_unary_rpc_method_handler(deny)
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        return grpc.unary_stream_rpc_method_handler(deny)

    def _log_once(self, host: str, method: str, denial: Denial) -> None:
        key = (host, denial.kind)
        with self._lock:
            if key in self._logged:
                self._logged.move_to_end(key)
                return
            self._logged[key] = None
            if len(self._logged) > self._MAX_LOGGED:
                self._logged.popitem(last=False)
        log.warning("refused %s from %s: %s (logged once per address and reason)", method, host, denial.message)


# -- channels and servers ----------------------------------------------------------------


def _both_ends(max_message_bytes: int) -> list[tuple[str, int]]:
    """Message size limits, and keepalive that notices a dead other end in ~4 s."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),  # keep pinging a connection that is only waiting
    ]


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Client side: the limits and keepalive, and quick reconnects."""
    return _both_ends(max_message_bytes) + [
        ("grpc.initial_reconnect_backoff_ms", 500),  # a peer that comes back is used again soon ...
        ("grpc.max_reconnect_backoff_ms", 5000),     # ... not after gRPC's default 2 minutes
    ]


def server_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Server side: the same limits, keepalive towards the clients, and a ping policy that
    accepts the clients' 2 s keepalive (gRPC's default would answer it with GOAWAY)."""
    return _both_ends(max_message_bytes) + [
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.so_reuseport", 0),  # a port in use is an error, not a second silent listener
    ]


def open_channel(address: str, token: str, *, max_message_bytes: int = MAX_MESSAGE_BYTES) -> grpc.Channel:
    """A channel to "host:port" whose every call proves the token. Close it when done."""
    channel = grpc.insecure_channel(address, options=channel_options(max_message_bytes))
    return grpc.intercept_channel(channel, AuthClientInterceptor(token))


def serve(servicer, token: str, *, bind: str = "127.0.0.1:0", max_message_bytes: int = MAX_MESSAGE_BYTES,
          max_workers: int = DEFAULT_MAX_WORKERS,
          extra_interceptors: Sequence[grpc.ServerInterceptor] = ()) -> tuple[grpc.Server, int]:
    """Start a Peer server (a `peer_pb2_grpc.PeerServicer`) on `bind` that only the token's
    holders can call. Returns (server, port): port 0 in `bind` picks a free one.
    Stop it with `server.stop(grace)`."""
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="fastserve-peer"),
        interceptors=[AuthServerInterceptor(token), *extra_interceptors],
        options=server_options(max_message_bytes),
    )
    peer_pb2_grpc.add_PeerServicer_to_server(servicer, server)
    try:
        port = server.add_insecure_port(bind)
    except RuntimeError:
        port = 0
    if port == 0:
        server.stop(None)
        raise FastServeError(f"cannot listen on {bind}: the port is in use or the address is not on this "
                             "machine; choose another port (--port) or interface")
    server.start()
    return server, port
