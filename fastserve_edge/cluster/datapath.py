"""The tensor-parallel data path: one TCP connection between every pair of machines of a
group, opened once per plan, sealed by engine/kernels/mesh.c.

Keys: the host makes a fresh 32-byte plan secret for every plan and sends it to each machine
inside the plan, over the mutually authenticated TLS control channel (cluster/auth.py); a
machine without the cluster token never sees it. Each direction of each pair gets its own
AES-256-GCM key, HKDF(plan secret, "a->b"), so no nonce (the frame's sequence number on that
direction) is ever used twice under one key. A connection opens with a hello that names the
caller's rank and proves the plan secret (HMAC over the plan id and both ranks); anything else
that connects to the data port is closed unanswered and the wait goes on.

Who connects: machine r connects to every machine below it and accepts every machine above it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fastserve_edge.engine.kernels import Kernels, Mesh
from fastserve_edge.errors import FastServeError

MAGIC = b"FSTP"
HELLO = struct.Struct("!4s16sII32s")  # magic, plan id, from rank, to rank, HMAC
SALT = b"fastserve tensor-parallel links v1"


class DataPathError(FastServeError):
    """The data path between the machines of a group could not be opened."""


def new_plan_secret() -> bytes:
    return os.urandom(32)


def plan_id(secret: bytes) -> bytes:
    return hashlib.sha256(b"plan id|" + secret).digest()[:16]


def link_key(secret: bytes, src: int, dst: int) -> bytes:
    """The key of frames from machine src to machine dst."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=SALT, info=f"{src}->{dst}".encode()).derive(secret)


def _hello(secret: bytes, src: int, dst: int) -> bytes:
    pid = plan_id(secret)
    mac = hmac.new(link_key(secret, src, dst), MAGIC + pid + struct.pack("!II", src, dst), hashlib.sha256).digest()
    return HELLO.pack(MAGIC, pid, src, dst, mac)


def listen(address: str = "0.0.0.0", port: int = 0) -> socket.socket:
    """The data port: bound and listening (the caller announces its port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen(64)
    return sock


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)


def _read_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    data = b""
    while len(data) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


@dataclass
class Links:
    """An open mesh and the sockets under it (closed together)."""

    mesh: Mesh
    sockets: list[socket.socket] = field(default_factory=list)

    def close(self) -> None:
        self.mesh.close()
        for s in self.sockets:
            try:
                s.close()
            except OSError:
                pass


def connect(kernels: Kernels, rank: int, addresses: list[tuple[str, int]], listener: socket.socket, secret: bytes,
            *, timeout_s: float = 10.0, sealed: bool = True, cancel: threading.Event | None = None) -> Links:
    """Open this machine's connections to every other of the group (addresses[p]: machine p's
    data port; its own entry is ignored) and the mesh over them. sealed=False only measures
    what the encryption costs. cancel: set to give up waiting (a new plan). DataPathError
    naming the machine that did not answer."""
    n = len(addresses)
    deadline = time.monotonic() + timeout_s
    socks: dict[int, socket.socket] = {}
    try:
        for p in range(rank):  # below: we call
            host, port = addresses[p]
            while True:  # it may still be loading its slice: refused until it listens
                try:
                    s = socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic()))
                    break
                except OSError as err:
                    if time.monotonic() + 0.05 >= deadline or (cancel is not None and cancel.is_set()):
                        raise DataPathError(f"cannot reach machine {p} of the group at {host}:{port} ({err}); "
                                            "it left or a firewall blocks its data port") from None
                    time.sleep(0.05)
            _tune(s)
            s.sendall(_hello(secret, rank, p))
            socks[p] = s
        expected = {_hello(secret, p, rank): p for p in range(rank + 1, n)}
        while len(socks) < n - 1:  # above: they call; strangers are closed unanswered
            left = deadline - time.monotonic()
            if cancel is not None and cancel.is_set():
                raise DataPathError("a new plan replaced this group before it connected")
            if left > 0 and not select.select([listener], [], [], min(left, 0.5))[0]:
                continue
            if left <= 0:
                missing = sorted(set(range(rank + 1, n)) - set(socks))
                raise DataPathError(f"machines {missing} of the group did not connect within {timeout_s:.0f} s")
            s, _ = listener.accept()
            try:
                p = expected.get(_read_exact(s, HELLO.size, min(deadline, time.monotonic() + 2.0)))
            except (OSError, TimeoutError, ConnectionError):
                p = None
            if p is None or p in socks:
                s.close()
                continue
            _tune(s)
            socks[p] = s
        fds = [socks[p].fileno() if p in socks else -1 for p in range(n)]
        keys = [(link_key(secret, rank, p), link_key(secret, p, rank)) if p != rank else (bytes(32), bytes(32))
                for p in range(n)] if sealed else None
        mesh = Mesh(kernels, rank, fds, keys)
    except BaseException:
        for s in socks.values():
            s.close()
        raise
    return Links(mesh, [socks[p] for p in sorted(socks)])
