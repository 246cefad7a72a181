"""`fastserve join --token T`: offer this machine to a cluster and wait for a host.

Measures the machine, serves the peer protocol, announces itself over mDNS, and shows a
live panel (or, without a terminal, one log line per change) until Ctrl-C, when it says
goodbye on the LAN so hosts stop counting on it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from dataclasses import replace
from typing import Annotated

import typer
from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from cli.common import Activations, err_console, freeze_imports, user_errors
from fastserve_edge.errors import ConfigError

DEFAULT_PORT = 7411


def command(
    token: Annotated[str | None, typer.Option(help="the cluster token printed by `fastserve token` on the host",
                                              envvar="FASTSERVE_TOKEN")] = None,
    max_memory: Annotated[str | None, typer.Option(help="memory this machine may give (e.g. 4G); default: what is free")] = None,
    interface: Annotated[str | None, typer.Option(help="network interface to announce on (default: every LAN interface)")] = None,
    port: Annotated[int, typer.Option(help="TCP port of the peer service (0 = any free port)")] = DEFAULT_PORT,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: physical cores)", envvar="FASTSERVE_THREADS")] = None,
    activations: Activations = "int16",
    reprofile: Annotated[bool, typer.Option(help="measure this machine again instead of using the cached profile")] = False,
    announce: Annotated[bool, typer.Option(help="announce over mDNS (--no-announce: reachable only with `chat --peer`)")] = True,
    bind: Annotated[str | None, typer.Option(help="address to listen on (default: the announced interface's)")] = None,
    max_sessions: Annotated[int, typer.Option(min=1, max=48, help="sessions a host may keep on this machine at "
                                                                  "once (their KV must also fit in --max-memory)")] = 48,
) -> None:
    """Offer this machine to a cluster: a host running `fastserve chat` will use it."""
    from fastserve_edge.cluster.auth import check_token, cluster_id, load_or_create_token
    from fastserve_edge.cluster.profile import parse_size
    from fastserve_edge.engine.local import set_threads
    from fastserve_edge.engine.quant import set_activations
    from fastserve_edge.settings import Paths, load_settings

    freeze_imports()
    with user_errors():
        if not 0 <= port < 65536:
            raise ConfigError(f"--port must be between 0 and 65535, got {port}")
        paths = Paths.from_env()
        if token is None:
            stored = paths.config / "cluster-token"
            if not stored.is_file():
                raise ConfigError("no cluster token: run `fastserve token` on the host and pass what it prints "
                                  "with `fastserve join --token ...`")
            token, _ = load_or_create_token(paths.config)
        token = check_token(token)
        cap = parse_size(max_memory) if max_memory is not None else None
        n_threads = set_threads(threads)
        set_activations(activations)  # the layers this machine runs
        quota = load_settings().cluster.shard_cache_bytes
        asyncio.run(_run(paths=paths, token=token, cluster=cluster_id(token), max_memory=cap, interface=interface,
                         port=port, threads=n_threads, reprofile=reprofile, announce=announce, bind=bind,
                         max_sessions=max_sessions, cache_quota=quota))


async def _run(*, paths, token: str, cluster: str, max_memory, interface, port, threads, reprofile, announce, bind,
               max_sessions: int, cache_quota: int):
    from fastserve_edge.cluster import discovery
    from fastserve_edge.cluster.auth import serve
    from fastserve_edge.cluster.peer import PeerNode, PeerService
    from fastserve_edge.cluster.profile import load_profile
    from fastserve_edge.cluster.shard_cache import ShardCache

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    interfaces = discovery.lan_interfaces(interface) if announce or bind is None else []
    with err_console.status("measuring this machine…"):
        profile = load_profile(paths.cache, threads=threads, max_memory=max_memory, reprofile=reprofile)
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()
    ip = bind or interfaces[0][1]
    from fastserve_edge.cluster import datapath
    data_listener = datapath.listen(ip, 0)  # the tensor-parallel data path: a port per machine, told in Hello
    node = PeerNode(node_id=discovery.load_node_id(paths.config), name=socket.gethostname(), profile=profile,
                    cache=ShardCache(paths.cache / "shards", quota_bytes=cache_quota), token=token, max_sessions=max_sessions,
                    on_change=lambda: loop.call_soon_threadsafe(changed.set), data_listener=data_listener)
    server, bound = serve(PeerService(node), token, bind=f"{ip}:{port}")
    info = discovery.NodeInfo.from_profile(profile, node_id=node.node_id, name=node.name, port=bound,
                                           cluster_id=cluster, state=_announced_state(node), role="peer",
                                           addresses=(ip,) if bind else ())
    announcer = discovery.Announcer() if announce else None
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if announcer is not None:
            info = await announcer.start(info, interfaces)
        print(f"fastserve join: {node.name} listening on {ip}:{bound} (cluster {cluster})", file=sys.stderr, flush=True)
        await _show(node, info, announcer, changed, stop)
    finally:
        if announcer is not None:
            await announcer.close()  # goodbye packets: hosts forget us at once
        server.stop(1.0)
        print("fastserve join: left the cluster", file=sys.stderr, flush=True)


def _announced_state(node) -> str:
    """The one word mDNS carries (discovery.STATES): the panel says more, the LAN does not."""
    from fastserve_edge.cluster.protocol import peer_pb2

    return {peer_pb2.PEER_STATE_LOADING: "loading", peer_pb2.PEER_STATE_READY: "ready",
            peer_pb2.PEER_STATE_SERVING: "serving"}.get(node.state, "idle")


def _panel(node, info) -> Panel:
    from fastserve_edge.cluster.planner import describe_bytes

    p = node.profile
    grid = Table.grid(padding=(0, 2))
    grid.add_row("machine", f"{node.name} ({node.node_id[:8]})")
    grid.add_row("address", ", ".join(f"{a}:{info.port}" for a in info.addresses))
    grid.add_row("memory offered", describe_bytes(p.memory_bytes))
    grid.add_row("speed", f"{p.decode_gflops:.1f} GFLOP/s decode · {p.prefill_gflops:.1f} GFLOP/s prefill · "
                          f"{p.bandwidth_gbs:.1f} GB/s memory")
    grid.add_row("state", node.describe())
    return Panel(Group(grid), title="fastserve join", border_style="green")


async def _show(node, info, announcer, changed: asyncio.Event, stop: asyncio.Event) -> None:
    """Keep the panel (or the log) and the mDNS state in step with the node until stopped."""
    live = Live(_panel(node, info), console=err_console, refresh_per_second=2) if err_console.is_terminal else None
    last = None
    if live is not None:
        live.start()
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(changed.wait(), timeout=1.0)
            except TimeoutError:
                pass
            changed.clear()
            state = node.describe(rate=False)
            if state != last:
                info = replace(info, state=_announced_state(node))
                if announcer is not None and announcer.info is not None and announcer.info.state != info.state:
                    await announcer.update(info)
                if live is None:
                    print(f"fastserve join: {state}", file=sys.stderr, flush=True)
                last = state
            if live is not None:
                live.update(_panel(node, info))
    finally:
        if live is not None:
            live.stop()
