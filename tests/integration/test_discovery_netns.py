"""Discovery for real: mDNS between processes in three network namespaces on a bridge
(tests/netns.py)."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time

import pytest

from fastserve_edge.cluster.auth import cluster_id
from fastserve_edge.cluster.discovery import PROTOCOL_VERSION
from tests import netns

# --- real mDNS between namespaces --------------------------------------------------------------

# A `fastserve join` stand-in: announce, then obey "state TEXT" / "quit" lines on stdin.
ANNOUNCE = r"""
import asyncio, json, sys
from dataclasses import replace
from pathlib import Path
from fastserve_edge.cluster.discovery import Announcer, DiscoveryError, NodeInfo, lan_interfaces, load_node_id
from zeroconf.asyncio import AsyncServiceInfo

config, name, cluster, malformed = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"

async def main():
    ifaces = lan_interfaces()
    info = NodeInfo(node_id=load_node_id(Path(config)), name=name, port=50051, cluster_id=cluster,
                    memory_bytes=4_000_000_000, decode_gflops=12.5, prefill_gflops=30.25, bandwidth_gbs=8.5)
    async with Announcer() as announcer:
        try:
            info = await announcer.start(info, ifaces)
        except DiscoveryError as err:
            print(json.dumps({"error": str(err)}), flush=True)
            return
        if malformed:  # a broken or foreign record on the same LAN must not disturb anyone
            bad = AsyncServiceInfo("_fastserve._tcp.local.", "broken._fastserve._tcp.local.", port=1,
                                   properties={"id": "zz", "pv": "1"}, server="broken.local.",
                                   parsed_addresses=[ifaces[0][1]])
            await (await announcer.zeroconf.async_register_service(bad))
        print(json.dumps({"started": info.node_id, "interfaces": ifaces}), flush=True)
        loop = asyncio.get_running_loop()
        while (line := await loop.run_in_executor(None, sys.stdin.readline)).strip() not in ("quit", ""):
            info = replace(info, state=line.strip().removeprefix("state "))
            await announcer.update(info)
            print(json.dumps({"updated": info.state}), flush=True)
    print(json.dumps({"closed": True}), flush=True)

asyncio.run(main())
"""

# `fastserve status` stand-in: a live Browser printing the nodes it knows after each change.
WATCH = r"""
import asyncio, json, logging
from dataclasses import asdict
from fastserve_edge.cluster.discovery import Browser, open_zeroconf

logging.basicConfig(level=logging.WARNING)

async def main():
    zc = open_zeroconf()
    browser = Browser(zc)
    browser.on_change = lambda: print(json.dumps([asdict(n) for n in browser.matching()]), flush=True)
    async with browser:
        print(json.dumps("watching"), flush=True)
        await asyncio.sleep(60)

asyncio.run(main())
"""

BROWSE = r"""
import json, logging, sys, time
from dataclasses import asdict
from fastserve_edge.cluster.discovery import browse_sync

logging.basicConfig(level=logging.WARNING)
want = int(sys.argv[2]) if sys.argv[2] != "-" else None
start = time.monotonic()
nodes = browse_sync(timeout=float(sys.argv[1]), want=want, cluster_id=sys.argv[3] if sys.argv[3] != "-" else None)
print(json.dumps({"seconds": time.monotonic() - start, "nodes": [asdict(n) for n in nodes]}))
"""


class Lines:
    """A process's stdout, one JSON value per line, read with a deadline."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.queue = proc, queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self.queue.put(line)

    def next(self, timeout: float = 10):
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no output within {timeout} s (exit code {self.proc.poll()})") from None
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue  # not ours

    def until(self, predicate, timeout: float = 10):
        deadline = time.monotonic() + timeout
        while True:
            value = self.next(max(0.01, deadline - time.monotonic()))
            if predicate(value):
                return value


def python(machine, script, *args, **kw):
    return machine.popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=kw.pop("stderr", subprocess.DEVNULL), text=True, bufsize=1, **kw)


def browse_in(machine, timeout, want=None, cluster=None):
    result = machine.run([sys.executable, "-c", BROWSE, str(timeout), str(want or "-"), cluster or "-"])
    return json.loads(result.stdout.splitlines()[-1]), result.stderr


@pytest.fixture(scope="module")
def machines():
    with netns.lan(3) as the_lan:
        yield the_lan


def test_two_announcers_seen_from_a_third_machine_then_updated_then_gone(machines, tmp_path):
    a, b, c = machines
    cluster, other = cluster_id("secret-token-of-ours-4d1f"), cluster_id("secret-token-of-theirs-9b2e")
    watcher = Lines(python(c, WATCH))
    assert watcher.next() == "watching"
    procs = {m.name: python(m, ANNOUNCE, str(tmp_path / m.name), f"box-{m.name}", cluster if m is a else other,
                            "1" if m is b else "0")
             for m in (a, b)}
    out = {name: Lines(p) for name, p in procs.items()}
    started = {name: out[name].next(15) for name in procs}

    # Each namespace announces on its eth0 only: lo is never a LAN interface.
    assert started["m0"]["interfaces"] == [["eth0", a.ip]]
    assert started["m1"]["interfaces"] == [["eth0", b.ip]]
    ids = {name: s["started"] for name, s in started.items()}
    assert ids["m0"] != ids["m1"]

    # A fresh browse from the third machine sees both, with what they announced.
    found, log = browse_in(c, timeout=8, want=2)
    nodes = {n["name"]: n for n in found["nodes"]}
    assert set(nodes) == {"box-m0", "box-m1"}, found
    assert found["seconds"] < 6  # returned as soon as both answered
    for m in (a, b):
        n = nodes[f"box-{m.name}"]
        assert (n["node_id"], n["addresses"], n["port"], n["version"]) == (ids[m.name], [m.ip], 50051, PROTOCOL_VERSION)
        assert (n["memory_bytes"], n["decode_gflops"], n["prefill_gflops"], n["bandwidth_gbs"]) == \
               (4_000_000_000, 12.5, 30.25, 8.5)
        assert (n["state"], n["role"]) == ("idle", "peer")
    assert nodes["box-m0"]["cluster_id"] == cluster and nodes["box-m1"]["cluster_id"] == other
    assert "ignoring broken._fastserve._tcp.local." in log  # the malformed record: logged, skipped

    # want counts only our cluster: one of ours is enough to stop early.
    found, _ = browse_in(c, timeout=8, want=1, cluster=cluster)
    assert found["seconds"] < 6 and cluster in [n["cluster_id"] for n in found["nodes"]]

    # A state change reaches the live browser.
    watcher.until(lambda nodes: len(nodes) == 2)
    procs["m0"].stdin.write("state serving\n")
    assert out["m0"].next() == {"updated": "serving"}
    watcher.until(lambda nodes: any(n["state"] == "serving" for n in nodes), timeout=5)

    # A clean exit says goodbye: the live browser drops it at once (not after the 120 s record TTL).
    procs["m0"].stdin.write("quit\n")
    procs["m0"].stdin.flush()
    assert out["m0"].until(lambda v: "closed" in v) == {"closed": True}
    assert procs["m0"].wait(timeout=10) == 0
    left = watcher.until(lambda nodes: [n["name"] for n in nodes] == ["box-m1"], timeout=5)
    assert left[0]["node_id"] == ids["m1"]
    found, _ = browse_in(c, timeout=2)
    assert [n["name"] for n in found["nodes"]] == ["box-m1"]

    procs["m1"].stdin.write("quit\n")
    procs["m1"].stdin.flush()
    assert procs["m1"].wait(timeout=10) == 0
    watcher.until(lambda nodes: nodes == [], timeout=5)
    watcher.proc.terminate()


def test_a_copied_configuration_folder_is_refused_not_announced_twice(machines, tmp_path):
    a, b, _ = machines
    first = Lines(python(a, ANNOUNCE, str(tmp_path), "original", "", "0"))
    assert "started" in first.next(15)
    copy = python(b, ANNOUNCE, str(tmp_path), "clone", "", "0")
    refused = Lines(copy).next(15)
    assert "already announces node id" in refused["error"] and "configuration folder" in refused["error"]
    assert copy.wait(timeout=10) == 0
    first.proc.stdin.write("quit\n")
    assert first.proc.wait(timeout=10) == 0


def test_browse_on_an_empty_lan_finds_nobody_after_the_timeout(machines):
    found, _ = browse_in(machines[2], timeout=1)
    assert found["nodes"] == [] and 1 <= found["seconds"] < 3


def test_the_namespace_lan_is_torn_down(tmp_path):
    netns.require_netns()
    with netns.lan(1) as the_lan:
        ns, bridge = the_lan[0].ns, the_lan.bridge
        the_lan[0].popen(["sleep", "60"])
    assert ns not in subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True).stdout
    assert subprocess.run(["ip", "link", "show", bridge], check=False, capture_output=True).returncode != 0


def test_a_failing_test_still_tears_down():
    netns.require_netns()
    with pytest.raises(RuntimeError), netns.lan(1) as the_lan:
        ns = the_lan[0].ns
        raise RuntimeError("test failed")
    assert ns not in subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True).stdout


def test_links_can_be_limited_for_benchmarks():
    netns.require_netns()
    with netns.lan(1) as the_lan:
        netns.limit_link(the_lan[0], rate="100mbit")
        assert "tbf" in the_lan[0].run(["tc", "qdisc", "show", "dev", "eth0"]).stdout
