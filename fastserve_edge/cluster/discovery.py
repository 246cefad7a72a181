"""Finding fastserve machines on the LAN: mDNS / DNS-SD with python-zeroconf.

Every machine announces one `_fastserve._tcp.local.` service: its gRPC port in the SRV
record, its LAN addresses in A records, and the rest in TXT (`NodeInfo.to_properties`).
`avahi-browse -r _fastserve._tcp` shows the same records.

Following python-zeroconf's own examples: one `AsyncZeroconf` per process (pass the
announcer's `zeroconf` to `browse` in a process that does both); registration awaited to the
end of its announcements; a synchronous state-change handler that only spawns resolution
tasks, kept in a set; `decoded_properties`; unregister (goodbye packets) and `async_close()`
on shutdown, so other machines drop us at once instead of after the record TTL.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import math
import os
import re
import secrets
import socket
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Self

from zeroconf import IPVersion, NonUniqueNameException, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from fastserve_edge.errors import FastServeError

if TYPE_CHECKING:
    from fastserve_edge.cluster.profile import Profile

log = logging.getLogger(__name__)

SERVICE_TYPE = "_fastserve._tcp.local."
PROTOCOL_VERSION = 2  # bumped when the peer protocol or these TXT keys change incompatibly
RESOLVE_TIMEOUT_MS = 3000
# Lifetime of our records in other machines' caches when no goodbye comes (crash, cable pulled).
# RFC 6762 suggests 75 min for SRV/TXT/PTR; a home-lab LAN of a few nodes can afford the
# refresh queries of 2 min, and `fastserve status` then forgets a dead machine in minutes.
RECORD_TTL = 120
NODE_ID_FILE = "node-id"
ROLES = ("peer", "host")
# All a machine says of its work on the LAN: no model, no layers, no host name (anyone can listen).
STATES = ("idle", "loading", "ready", "serving")
# Virtual links that are not the LAN: containers, VMs and their bridges. Loopback, interfaces
# that are down, have no IPv4 address or cannot multicast are skipped as well.
VIRTUAL_PREFIXES = ("docker", "veth", "virbr", "br-")
MAX_NAME_CHARS = 63  # a DNS label

_NODE_ID = re.compile(r"[0-9a-f]{8,64}")
_CLUSTER_ID = re.compile(r"(?:[0-9a-f]{16})?")


class DiscoveryError(FastServeError):
    """No usable network interface, or the LAN could not be joined for mDNS."""


def load_node_id(config_dir: Path) -> str:
    """This machine's id: random, created once in `config_dir/node-id`, then reused.

    Random per configuration folder, so two machines (or two namespaces with their own
    folders) never share one, unlike ids derived from a hostname or copied with an image."""
    path = Path(config_dir) / NODE_ID_FILE
    try:
        text = path.read_text(encoding="ascii").strip()
        if _NODE_ID.fullmatch(text):
            return text
        log.warning("replacing malformed node id in %s", path)
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as err:
        log.warning("replacing unreadable node id in %s (%s)", path, err)
    path.parent.mkdir(parents=True, exist_ok=True)
    node_id = secrets.token_hex(8)
    tmp = path.with_name(f".{NODE_ID_FILE}.{os.getpid()}")
    tmp.write_text(node_id + "\n", encoding="ascii")
    os.replace(tmp, path)
    return node_id


# --- interfaces --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Interface:
    name: str
    ipv4: str | None     # primary IPv4 address
    up: bool
    loopback: bool
    multicast: bool


_SIOCGIFFLAGS, _SIOCGIFADDR = 0x8913, 0x8915
_IFF_UP, _IFF_LOOPBACK, _IFF_MULTICAST = 0x1, 0x8, 0x1000


def read_interfaces() -> list[Interface]:
    """Every network interface of this machine (Linux ioctls: no `ip`, no extra package)."""
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            req = struct.pack("256s", name.encode()[:15])
            try:
                flags = struct.unpack_from("H", fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS, req), 16)[0]
            except OSError:
                continue  # vanished since the listing
            try:
                ipv4 = socket.inet_ntoa(fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, req)[20:24])
            except OSError as err:
                if err.errno not in (errno.EADDRNOTAVAIL, errno.ENODEV):
                    raise
                ipv4 = None
            out.append(Interface(name, ipv4, up=bool(flags & _IFF_UP), loopback=bool(flags & _IFF_LOOPBACK),
                                 multicast=bool(flags & _IFF_MULTICAST)))
    return out


def _describe(ifaces: Iterable[Interface]) -> str:
    listed = [f"{i.name} ({i.ipv4 or 'no IPv4'}{'' if i.up else ', down'})" for i in ifaces if not i.loopback]
    return ", ".join(listed) or "none"


def select_interfaces(ifaces: Sequence[Interface], named: str | None = None) -> list[tuple[str, str]]:
    """(name, IPv4) of the interfaces to announce and browse on.

    Without `named`: the real LAN ones (see VIRTUAL_PREFIXES). With it: that interface
    alone, whatever its kind, or a DiscoveryError saying why it cannot be used."""
    if named is not None:
        match = next((i for i in ifaces if i.name == named), None)
        if match is None:
            raise DiscoveryError(f"there is no network interface named {named!r}; this machine has: {_describe(ifaces)}")
        if match.ipv4 is None or not match.up:
            raise DiscoveryError(f"interface {named} is {'down' if not match.up else 'without an IPv4 address'}; "
                                 f"bring it up with an address or choose another: {_describe(ifaces)}")
        return [(match.name, match.ipv4)]
    chosen = [(i.name, i.ipv4) for i in ifaces
              if i.ipv4 is not None and i.up and i.multicast and not i.loopback
              and not i.name.startswith(VIRTUAL_PREFIXES)]
    if not chosen:
        raise DiscoveryError(
            "no LAN interface found (an interface that is up, has an IPv4 address and multicast, skipping "
            f"loopback and {', '.join(p + '*' for p in VIRTUAL_PREFIXES)}); interfaces here: {_describe(ifaces)}; "
            "pass --interface NAME to use one of them")
    return chosen


def lan_interfaces(named: str | None = None) -> list[tuple[str, str]]:
    """(name, IPv4) of this machine's LAN interfaces, or only `named` (see select_interfaces)."""
    return select_interfaces(read_interfaces(), named)


def open_zeroconf(interfaces: Sequence[tuple[str, str]] | None = None) -> AsyncZeroconf:
    """The process's one AsyncZeroconf, bound to `interfaces` (default: lan_interfaces()).
    Call it from inside the running event loop."""
    chosen = list(interfaces) if interfaces is not None else lan_interfaces()
    if not chosen:
        raise DiscoveryError("no interface to use for discovery; pass --interface NAME")
    try:
        return AsyncZeroconf(interfaces=[ip for _, ip in chosen], ip_version=IPVersion.V4Only)
    except OSError as err:
        names = ", ".join(f"{n} ({ip})" for n, ip in chosen)
        raise DiscoveryError(f"could not open mDNS (UDP port 5353) on {names}: {err}; "
                             "is the interface up, and is a firewall blocking multicast?") from None


# --- what a machine says about itself ----------------------------------------------------------

class MalformedRecord(ValueError):
    """A TXT record that is not a fastserve node description (logged and skipped, never fatal)."""


@dataclass(frozen=True, kw_only=True)
class NodeInfo:
    node_id: str                 # load_node_id(): 16 hex digits, stable per configuration folder
    name: str                    # hostname, for people
    port: int                    # gRPC port of the peer service
    cluster_id: str              # auth.cluster_id(token); "" when not in a cluster
    state: str = "idle"          # one of STATES
    role: str = "peer"           # "peer" (fastserve join) or "host" (chat/serve)
    memory_bytes: int = 0        # profile summary: offered memory
    decode_gflops: float = 0.0
    prefill_gflops: float = 0.0
    bandwidth_gbs: float = 0.0
    addresses: tuple[str, ...] = ()  # IPv4, from the A records (filled by the announcer)
    version: int = PROTOCOL_VERSION

    @classmethod
    def from_profile(cls, profile: Profile, **fields) -> NodeInfo:
        """NodeInfo(**fields) with the profile summary of a cluster.profile.Profile."""
        return cls(memory_bytes=profile.memory_bytes, decode_gflops=profile.decode_gflops,
                   prefill_gflops=profile.prefill_gflops, bandwidth_gbs=profile.bandwidth_gbs, **fields)

    @property
    def instance_name(self) -> str:
        """The DNS-SD instance, named by node id alone: a second machine with the same id (a
        copied configuration folder) fails to register instead of passing for the first."""
        return f"fastserve-{self.node_id}.{SERVICE_TYPE}"

    @property
    def server(self) -> str:
        # Not the hostname: two machines (or namespaces) may share one, and their A records would merge.
        return f"fastserve-{self.node_id}.local."

    def to_properties(self) -> dict[str, str]:
        if self.state not in STATES:
            raise ValueError(f"state {self.state!r} is not one of {STATES}")
        return {
            "id": self.node_id, "pv": str(self.version), "cl": self.cluster_id, "hn": self.name[:MAX_NAME_CHARS],
            "st": self.state, "ro": self.role, "mem": str(self.memory_bytes),
            "dg": repr(float(self.decode_gflops)), "pg": repr(float(self.prefill_gflops)),
            "bw": repr(float(self.bandwidth_gbs)),
        }

    @classmethod
    def from_properties(cls, props: Mapping[str, str | None], *, addresses: Sequence[str] = (),
                        port: int) -> NodeInfo:
        """Inverse of to_properties (+ SRV port and A addresses). MalformedRecord if it is not one of ours."""
        def text(key: str) -> str:
            value = props.get(key)
            if value is None:
                raise MalformedRecord(f"TXT key {key!r} missing")
            return value

        def number(key: str, kind: type) -> float:
            try:
                value = kind(text(key))
            except ValueError:
                raise MalformedRecord(f"TXT {key}={props.get(key)!r} is not a number") from None
            if not math.isfinite(value) or value < 0:
                raise MalformedRecord(f"TXT {key}={props.get(key)!r} out of range")
            return value

        node_id, role, state, name = text("id"), text("ro"), text("st"), text("hn")
        if not _NODE_ID.fullmatch(node_id):
            raise MalformedRecord(f"node id {node_id!r} is not 8-64 hex digits")
        if role not in ROLES:
            raise MalformedRecord(f"role {role!r} is not one of {ROLES}")
        if state not in STATES:
            raise MalformedRecord(f"state {state[:40]!r} is not one of {STATES}")
        if not name.isprintable() or len(name) > MAX_NAME_CHARS:
            raise MalformedRecord(f"machine name {name[:40]!r} is not printable or longer than {MAX_NAME_CHARS}")
        if not _CLUSTER_ID.fullmatch(text("cl")):
            raise MalformedRecord(f"cluster id {text('cl')[:40]!r} is not 16 hex digits (or empty)")
        if not 0 < port < 65536:
            raise MalformedRecord(f"port {port} out of range")
        return cls(node_id=node_id, name=name, port=port, cluster_id=text("cl"), state=state,
                   role=role, memory_bytes=int(number("mem", int)), decode_gflops=number("dg", float),
                   prefill_gflops=number("pg", float), bandwidth_gbs=number("bw", float),
                   addresses=tuple(addresses), version=int(number("pv", int)))

    def service_info(self) -> AsyncServiceInfo:
        return AsyncServiceInfo(SERVICE_TYPE, self.instance_name, port=self.port, properties=self.to_properties(),
                                server=self.server, parsed_addresses=list(self.addresses),
                                host_ttl=RECORD_TTL, other_ttl=RECORD_TTL)

    @classmethod
    def from_service_info(cls, info: AsyncServiceInfo) -> NodeInfo:
        return cls.from_properties(info.decoded_properties, addresses=info.parsed_addresses(IPVersion.V4Only),
                                   port=info.port or 0)


# --- announcing --------------------------------------------------------------------------------

class Announcer:
    """Keeps this machine's service announced while it runs: start, update on state changes, close.

    Owns its AsyncZeroconf unless given one; `zeroconf` is the one to browse with in this process."""

    def __init__(self, aiozc: AsyncZeroconf | None = None):
        self.zeroconf = aiozc
        self._owns = aiozc is None
        self._service: AsyncServiceInfo | None = None
        self.info: NodeInfo | None = None

    async def start(self, info: NodeInfo, interfaces: Sequence[tuple[str, str]] | None = None) -> NodeInfo:
        """Probe, register and announce; returns the info as announced (addresses filled in)."""
        chosen = list(interfaces) if interfaces is not None else lan_interfaces()
        if self.zeroconf is None:
            self.zeroconf = open_zeroconf(chosen)
        if not info.addresses:
            info = replace(info, addresses=tuple(ip for _, ip in chosen))
        service = info.service_info()
        try:
            await (await self.zeroconf.async_register_service(service))
        except BaseException as err:
            await self.close()
            if isinstance(err, NonUniqueNameException):
                raise DiscoveryError(
                    f"another machine on this LAN already announces node id {info.node_id}; is `fastserve join` "
                    "already running with this configuration folder (or a copy of it)?") from None
            raise
        self._service, self.info = service, info
        return info

    async def update(self, info: NodeInfo) -> None:
        """Announce changed TXT (state, profile); the node id, and so the service name, stay."""
        if self._service is None or self.info is None:
            raise RuntimeError("Announcer.update() before start()")
        if info.node_id != self.info.node_id:
            raise ValueError("a running announcer cannot change its node id")
        if not info.addresses:
            info = replace(info, addresses=self.info.addresses)
        service = info.service_info()
        await (await self.zeroconf.async_update_service(service))
        self._service, self.info = service, info

    async def close(self) -> None:
        """Goodbye packets, then the sockets (when ours). Safe to call twice."""
        if self._service is not None and self.zeroconf is not None:
            service, self._service = self._service, None
            await (await self.zeroconf.async_unregister_service(service))
        if self._owns and self.zeroconf is not None:
            zc, self.zeroconf = self.zeroconf, None
            await zc.async_close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# --- browsing ----------------------------------------------------------------------------------

class Browser:
    """A live view of the fastserve machines on the LAN: `nodes` by service name, kept current
    from mDNS (added, updated, and removed on goodbye or expiry). `on_change` is called, in the
    event loop, after each change."""

    def __init__(self, aiozc: AsyncZeroconf, on_change: Callable[[], None] | None = None):
        self.aiozc, self.on_change = aiozc, on_change
        self.nodes: dict[str, NodeInfo] = {}
        self.gone: dict[str, NodeInfo] = {}       # seen, then said goodbye (or expired): maybe spoofed
        self._present: set[str] = set()           # names announced and not yet removed
        self._tasks: set[asyncio.Task] = set()    # resolutions in flight
        self._logged: set[tuple[str, str]] = set()  # malformed records already reported
        self._changed = asyncio.Event()
        self._browser: AsyncServiceBrowser | None = None

    async def start(self) -> Self:
        self._browser = AsyncServiceBrowser(self.aiozc.zeroconf, [SERVICE_TYPE], handlers=[self._on_state_change])
        return self

    async def close(self) -> None:
        if self._browser is not None:
            browser, self._browser = self._browser, None
            await browser.async_cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _on_state_change(self, zeroconf: Zeroconf, service_type: str, name: str,
                         state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            self._present.discard(name)
            node = self.nodes.pop(name, None)
            if node is not None:
                self.gone[name] = node
                self._notify()
            return
        self._present.add(name)
        task = asyncio.ensure_future(self._resolve(zeroconf, service_type, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, zeroconf: Zeroconf, service_type: str, name: str) -> None:
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(zeroconf, RESOLVE_TIMEOUT_MS):
            log.debug("no answer resolving %s", name)
            return
        if name not in self._present:  # removed while we asked
            return
        try:
            node = NodeInfo.from_service_info(info)
        except MalformedRecord as err:
            if (name, str(err)) not in self._logged:
                self._logged.add((name, str(err)))
                log.warning("ignoring %s: %s", name, err)
            return
        self.gone.pop(name, None)
        if self.nodes.get(name) != node:
            self.nodes[name] = node
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        if self.on_change is not None:
            self.on_change()

    def matching(self, cluster_id: str | None = None, role: str | None = None, *,
                 keep_gone: bool = False) -> list[NodeInfo]:
        """The nodes seen (of one cluster, of one role, when given), by name then node id; with
        `keep_gone`, also those that said goodbye since (anyone can send a goodbye: a host asks
        the machine itself, over TLS, whether it is still there)."""
        nodes = {**self.gone, **self.nodes} if keep_gone else self.nodes
        found = [n for n in nodes.values()
                 if (cluster_id is None or n.cluster_id == cluster_id) and (role is None or n.role == role)]
        return sorted(found, key=lambda n: (n.name, n.node_id))

    async def wait(self, *, timeout: float, want: int | None = None, cluster_id: str | None = None,
                   keep_gone: bool = False) -> list[NodeInfo]:
        """All nodes seen after `timeout` seconds, or as soon as `want` peers (role "peer": a
        host does not count) of `cluster_id` (any cluster when None) are seen (see `matching`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while want is None or len(self.matching(cluster_id, "peer", keep_gone=keep_gone)) < want:
            left = deadline - loop.time()
            if left <= 0:
                break
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                break
        return self.matching(keep_gone=keep_gone)


async def browse(*, timeout: float, interfaces: Sequence[tuple[str, str]] | None = None, want: int | None = None,
                 cluster_id: str | None = None, aiozc: AsyncZeroconf | None = None,
                 keep_gone: bool = False) -> list[NodeInfo]:
    """The fastserve machines that answer within `timeout` seconds (every cluster and role:
    compare `cluster_id` yourself); returns early once `want` peers of `cluster_id` have answered. Uses
    `aiozc` when given (the process's one instance), else opens and closes its own."""
    own = aiozc is None
    zc = open_zeroconf(interfaces) if own else aiozc
    try:
        async with Browser(zc) as browser:
            return await browser.wait(timeout=timeout, want=want, cluster_id=cluster_id, keep_gone=keep_gone)
    finally:
        if own:
            await zc.async_close()


def browse_sync(*, timeout: float, interfaces: Sequence[tuple[str, str]] | None = None, want: int | None = None,
                cluster_id: str | None = None, keep_gone: bool = False) -> list[NodeInfo]:
    """browse() for code without an event loop (e.g. `fastserve status`)."""
    return asyncio.run(browse(timeout=timeout, interfaces=interfaces, want=want, cluster_id=cluster_id,
                              keep_gone=keep_gone))
