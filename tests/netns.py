"""A LAN of "machines" for tests: Linux network namespaces joined by a bridge.

    with lan(3) as machines:              # or the `make_lan` fixture: make_lan(3)
        a, b, c = machines
        a.popen([sys.executable, "-m", "cli.main", "join", ...])
        c.run(["ping", "-c1", a.ip])

Each machine is a namespace with `lo` and an `eth0` (one end of a veth pair whose other end
is a port of the bridge) holding 10.77.<k>.<i>/24, where k is unique to the run. mDNS works
between them: the bridge does no multicast snooping and does not pass frames through the
host's iptables (br_netfilter), and each namespace routes 224.0.0.0/4 out of eth0. The host
itself has no address on the bridge, so nothing a test starts in a namespace is reachable
from outside it.

Teardown always runs, even when the test fails: processes started through `popen` (their
whole session), then any process still inside the namespaces, then the namespaces, the host
ends of the veths and the bridge. Leftovers of a run that was killed outright are removed by
the next run (names carry the creating pid; only dead, old runs are swept).

Needs root and iproute2 (`ip`; `tc` for `limit_link`); otherwise the test is skipped.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

IFACE = "eth0"
SUBNET_PREFIX = "10.77"
NETNS_DIR = Path("/run/netns")
STALE_SECONDS = 3600  # a dead run's namespaces are swept once this old (pids of other pid namespaces look dead)
_counter = itertools.count()


def unavailable_reason() -> str | None:
    """Why namespace LANs cannot be built here, or None when they can."""
    if os.geteuid() != 0:
        return "network-namespace LAN tests need root (ip netns, veth, bridge)"
    if shutil.which("ip") is None:
        return "network-namespace LAN tests need iproute2's `ip`"
    return None


def require_netns() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], check=False, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def _no_ipv6(ifname: str) -> None:
    """The host ends carry only frames; no IPv6 link-local address for the host's own daemons to use."""
    with contextlib.suppress(OSError):
        Path(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6").write_text("1")


@dataclass
class Machine:
    name: str   # "m0", "m1", ...
    ns: str     # namespace name, for `ip netns exec`
    ip: str     # IPv4 of its eth0
    iface: str = IFACE
    _procs: list[subprocess.Popen] = field(default_factory=list, repr=False)

    def cmd(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *map(str, argv)]

    def popen(self, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start argv in this machine, in its own session; stopped at teardown."""
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.cmd(argv), **kw)
        self._procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        """Run argv to completion in this machine (checked, text output captured, unless overridden)."""
        check = kw.pop("check", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 120)
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        return subprocess.run(self.cmd(argv), check=check, **kw)


@dataclass
class Lan:
    bridge: str
    subnet: str                 # "10.77.k.0/24"
    machines: list[Machine]

    def __iter__(self) -> Iterator[Machine]:
        return iter(self.machines)

    def __getitem__(self, i: int) -> Machine:
        return self.machines[i]

    def __len__(self) -> int:
        return len(self.machines)


def limit_link(machine: Machine, *, rate: str = "1gbit", burst: str = "256kb", latency: str = "5ms") -> None:
    """Shape what `machine` sends on eth0 with a token bucket (tc tbf); every link of the LAN
    limited this way is a `rate` link in both directions. burst must cover rate / HZ."""
    if shutil.which("tc") is None:
        pytest.skip("limiting links needs iproute2's `tc`")
    machine.run(["tc", "qdisc", "replace", "dev", machine.iface, "root", "tbf",
                 "rate", rate, "burst", burst, "latency", latency])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ns_pids(ns: str) -> list[int]:
    out = _ip("netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _kill_ns_processes(ns: str) -> None:
    for pid in _ns_pids(ns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def sweep_stale() -> None:
    """Remove namespaces and links left by runs that died without tearing down."""
    now = time.time()
    live_runs = set()
    for entry in NETNS_DIR.glob("fsns-*") if NETNS_DIR.is_dir() else ():
        m = re.fullmatch(r"fsns-(\d+)-\d+-\d+", entry.name)
        if m is None:
            continue
        pid = int(m.group(1))
        try:
            old = now - entry.stat().st_mtime > STALE_SECONDS
        except OSError:
            continue
        if _alive(pid) or not old:
            live_runs.add(pid)
            continue
        _kill_ns_processes(entry.name)
        _ip("netns", "del", entry.name, check=False)
    links = json.loads(_ip("-j", "link", "show", check=False).stdout or "[]")
    for link in links:
        m = re.fullmatch(r"fs(?:br|v)([0-9a-f]+)-.*", link.get("ifname", ""))
        if m is not None and int(m.group(1), 16) not in live_runs and not _alive(int(m.group(1), 16)):
            _ip("link", "del", link["ifname"], check=False)


def _teardown(lan: Lan, veths: list[str]) -> None:
    problems = []
    procs = [p for m in lan.machines for p in m._procs]
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 3
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
    for m in lan.machines:
        _kill_ns_processes(m.ns)
        if NETNS_DIR.joinpath(m.ns).exists():
            result = _ip("netns", "del", m.ns, check=False)
            if result.returncode != 0:
                problems.append(f"netns del {m.ns}: {result.stderr.strip()}")
    for name in [*veths, lan.bridge]:  # a veth usually went with its namespace (asynchronously)
        result = _ip("link", "del", name, check=False)
        if result.returncode != 0 and "Cannot find device" not in result.stderr:
            problems.append(f"link del {name}: {result.stderr.strip()}")
    if problems:
        warnings.warn("namespace LAN teardown: " + "; ".join(problems), stacklevel=3)


@contextlib.contextmanager
def lan(n: int) -> Iterator[Lan]:
    """n machines on one bridge; everything is removed on exit, whatever happened."""
    require_netns()
    if not 1 <= n <= 200:
        raise ValueError(f"a namespace LAN has 1 to 200 machines, not {n}")
    sweep_stale()
    pid, run = os.getpid(), next(_counter)
    k = 1 + (pid * 7 + run) % 250
    the_lan = Lan(bridge=f"fsbr{pid:x}-{run:x}", subnet=f"{SUBNET_PREFIX}.{k}.0/24", machines=[])
    veths: list[str] = []
    try:
        # No multicast snooping: mDNS frames reach every port without IGMP bookkeeping.
        # nf_call_iptables 0: bridged frames skip the host's iptables (br_netfilter, docker's FORWARD DROP).
        _ip("link", "add", the_lan.bridge, "type", "bridge", "mcast_snooping", "0", "nf_call_iptables", "0")
        _no_ipv6(the_lan.bridge)
        _ip("link", "set", the_lan.bridge, "up")
        for i in range(n):
            machine = Machine(name=f"m{i}", ns=f"fsns-{pid}-{run}-{i}", ip=f"{SUBNET_PREFIX}.{k}.{i + 1}")
            the_lan.machines.append(machine)
            host_end = f"fsv{pid:x}-{run:x}-{i}"
            _ip("netns", "add", machine.ns)
            veths.append(host_end)
            _ip("link", "add", host_end, "type", "veth", "peer", "name", IFACE, "netns", machine.ns)
            _no_ipv6(host_end)
            _ip("link", "set", host_end, "master", the_lan.bridge, "up")
            _ip("-n", machine.ns, "link", "set", "lo", "up")
            _ip("-n", machine.ns, "addr", "add", f"{machine.ip}/24", "dev", IFACE)
            _ip("-n", machine.ns, "link", "set", IFACE, "up")
            # Multicast needs a route even on a link: the namespace has no default route.
            _ip("-n", machine.ns, "route", "add", "224.0.0.0/4", "dev", IFACE)
        yield the_lan
    finally:
        _teardown(the_lan, veths)


@pytest.fixture
def make_lan():
    """make_lan(n) -> Lan, torn down at the end of the test (import this fixture into a test module)."""
    with contextlib.ExitStack() as stack:
        yield lambda n: stack.enter_context(lan(n))
