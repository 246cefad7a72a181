"""A stranger on the LAN, for the hostile cluster tests: run inside a test namespace with

    python -m tests.rogue peer IP CLUSTER_ID         announce our cluster's public id and accept every call
    python -m tests.rogue goodbye IP NODE_ID SECONDS  spoof goodbye packets for a real peer
    python -m tests.rogue flood IP:PORT N SECONDS     hold N connections that never finish a handshake

None of these knows the token: they use only what anyone sees on the LAN (the TXT records).
Each prints one JSON line when ready, and `peer` one line per call that reached it.
"""

from __future__ import annotations

import json
import socket
import ssl
import sys
import threading
import time
from concurrent import futures


def _say(**fields) -> None:
    print(json.dumps(fields), flush=True)


def rogue_peer(ip: str, cluster: str) -> None:
    """A `join` patched to claim the cluster and to accept everything: plaintext gRPC, a huge
    profile, LoadStage always fine, Forward answers every step. It logs every call it gets."""
    import asyncio

    import grpc

    from fastserve_edge.cluster import discovery
    from fastserve_edge.cluster.protocol import PROTOCOL_VERSION, peer_pb2, peer_pb2_grpc

    class AcceptEverything(peer_pb2_grpc.PeerServicer):
        def Hello(self, request, context):
            _say(call="Hello")
            return peer_pb2.HelloReply(protocol_version=PROTOCOL_VERSION, node_id="ba5eba11ba5eba11", name="rogue",
                                       profile=peer_pb2.Profile(memory_bytes=1 << 40, decode_gflops=1e6,
                                                                prefill_gflops=1e6, bandwidth_gbs=1e3, threads=64))

        def LoadStage(self, request, context):
            _say(call="LoadStage")
            return peer_pb2.LoadStageReply()

        def Forward(self, request_iterator, context):
            for req in request_iterator:
                _say(call="Forward", hidden_bytes=len(req.hidden))
                yield peer_pb2.ForwardReply(session=req.session, seq=req.seq, token=0)

        def Health(self, request, context):
            _say(call="Health")
            return peer_pb2.HealthReply()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    peer_pb2_grpc.add_PeerServicer_to_server(AcceptEverything(), server)
    port = server.add_insecure_port(f"{ip}:0")
    server.start()

    async def announce() -> None:
        info = discovery.NodeInfo(node_id="ba5eba11ba5eba11", name="rogue", port=port, cluster_id=cluster,
                                  memory_bytes=1 << 40, decode_gflops=1e6, prefill_gflops=1e6, bandwidth_gbs=1e3)
        async with discovery.Announcer() as announcer:
            await announcer.start(info, [("eth0", ip)])
            _say(ready=f"{ip}:{port}")
            await asyncio.Event().wait()

    asyncio.run(announce())


def spoof_goodbyes(ip: str, node_id: str, seconds: float) -> None:
    """Goodbye packets (TTL 0) for a real peer's service, as often as a stranger likes."""
    from zeroconf import DNSOutgoing, DNSPointer, IPVersion, Zeroconf, const

    from fastserve_edge.cluster.discovery import SERVICE_TYPE

    zc = Zeroconf(interfaces=[ip], ip_version=IPVersion.V4Only)
    name = f"fastserve-{node_id}.{SERVICE_TYPE}"
    _say(ready=name)
    sent = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        out = DNSOutgoing(const._FLAGS_QR_RESPONSE | const._FLAGS_AA)
        out.add_answer_at_time(DNSPointer(SERVICE_TYPE, const._TYPE_PTR, const._CLASS_IN, 0, name), 0)
        zc.send(out)
        sent += 1
        time.sleep(0.05)
    zc.close()
    _say(sent=sent)


def _client_hello() -> bytes:
    """The first bytes of a real TLS ClientHello (without a certificate nobody gets further)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="fastserve-peer")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


H2_HEADERS = (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"                      # the client preface ...
              + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"               # ... an empty SETTINGS ...
              + b"\x00\x00\x05\x01\x04\x00\x00\x00\x01" + b"\x82\x86\x84\x41\x8a")  # ... a HEADERS frame, no data


def flood(address: str, n: int, seconds: float) -> None:
    """Keep `n` connections open that send headers and never finish: half a TLS handshake
    (ClientHello cut short), or plaintext HTTP/2 headers with no data. Reopen what the server closes."""
    host, port = address.rsplit(":", 1)
    hello = _client_hello()
    payloads = [hello[: len(hello) // 2], H2_HEADERS]
    opened = closed = 0
    end = time.monotonic() + seconds
    conns: list[socket.socket] = []
    lock = threading.Lock()

    def open_one(i: int) -> None:
        nonlocal opened
        try:
            s = socket.create_connection((host, int(port)), timeout=2)
            s.sendall(payloads[i % 2])
            s.setblocking(False)
        except OSError:
            return
        with lock:
            conns.append(s)
            opened += 1

    for i in range(n):
        open_one(i)
    _say(ready=opened)
    while time.monotonic() < end:
        time.sleep(0.2)
        with lock:
            alive = []
            for s in conns:
                try:
                    if s.recv(65536) == b"":
                        raise ConnectionResetError
                    alive.append(s)
                except BlockingIOError:
                    alive.append(s)
                except OSError:
                    s.close()
                    closed += 1
            conns[:] = alive
            missing = n - len(conns)
        for i in range(missing):
            open_one(i)
    _say(opened=opened, closed_by_server=closed)


if __name__ == "__main__":
    verb, *args = sys.argv[1:]
    if verb == "peer":
        rogue_peer(args[0], args[1])
    elif verb == "goodbye":
        spoof_goodbyes(args[0], args[1], float(args[2]))
    elif verb == "flood":
        flood(args[0], int(args[1]), float(args[2]))
    else:
        sys.exit(f"unknown verb {verb}")
