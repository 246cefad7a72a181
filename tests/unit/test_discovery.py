"""Discovery's pure parts: which interfaces are the LAN, TXT records, node ids."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from fastserve_edge.cluster import discovery
from fastserve_edge.cluster.auth import cluster_id
from fastserve_edge.cluster.discovery import (
    DiscoveryError,
    Interface,
    MalformedRecord,
    NodeInfo,
    load_node_id,
    select_interfaces,
)


# --- interfaces --------------------------------------------------------------------------------

def iface(name, ipv4="192.168.1.5", *, up=True, loopback=False, multicast=True):
    return Interface(name, ipv4, up=up, loopback=loopback, multicast=multicast)


HOME_PC = [
    iface("lo", "127.0.0.1", loopback=True, multicast=False),
    iface("enp3s0", "192.168.1.20"),
    iface("wlp2s0", "10.0.0.7"),
    iface("docker0", "172.17.0.1"),
    iface("veth1a2b3c", "169.254.3.3"),
    iface("virbr0", "192.168.122.1"),
    iface("br-5f2e9a", "172.18.0.1"),
    iface("eno2", None),                         # cable in, no address
    iface("eno3", "192.168.9.9", up=False),      # down
    iface("tun0", "10.8.0.2", multicast=False),  # VPN: no multicast, mDNS cannot work
]


def test_lan_interfaces_are_the_real_lan_ones():
    assert select_interfaces(HOME_PC) == [("enp3s0", "192.168.1.20"), ("wlp2s0", "10.0.0.7")]


def test_a_named_interface_is_used_whatever_its_kind():
    assert select_interfaces(HOME_PC, "docker0") == [("docker0", "172.17.0.1")]
    assert select_interfaces(HOME_PC, "lo") == [("lo", "127.0.0.1")]


@pytest.mark.parametrize("named, says", [("eth7", "no network interface named 'eth7'"),
                                          ("eno2", "without an IPv4 address"), ("eno3", "is down")])
def test_a_named_interface_that_cannot_be_used_is_explained(named, says):
    with pytest.raises(DiscoveryError, match=says) as err:
        select_interfaces(HOME_PC, named)
    assert "enp3s0 (192.168.1.20)" in str(err.value)  # lists what there is


def test_no_lan_interface_says_to_pass_interface():
    with pytest.raises(DiscoveryError, match="no LAN interface") as err:
        select_interfaces([HOME_PC[0], HOME_PC[3], HOME_PC[4]])
    assert "--interface" in str(err.value) and "docker0 (172.17.0.1)" in str(err.value)


def test_this_machines_interfaces_are_read_without_ip():
    found = {i.name: i for i in discovery.read_interfaces()}
    assert found["lo"].loopback and found["lo"].ipv4 == "127.0.0.1"


# --- TXT records and node ids ------------------------------------------------------------------

TOKEN = "5f0c2a9e71d84b3a96e0c4f2b18d7a65"
NODE = NodeInfo(node_id="0123456789abcdef", name="old-thinkpad", port=50051, cluster_id=cluster_id(TOKEN),
                state="serving", role="peer", memory_bytes=7_500_000_000,
                decode_gflops=41.25, prefill_gflops=97.5, bandwidth_gbs=11.3, addresses=("10.0.0.7",))


def test_node_info_round_trips_through_txt_strings():
    props = NODE.to_properties()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in props.items())
    assert sum(len(k) + len(v) + 2 for k, v in props.items()) < 400  # one small mDNS packet
    assert NodeInfo.from_properties(props, addresses=["10.0.0.7"], port=50051) == NODE


def test_the_cluster_id_is_derived_never_the_token():
    props = NODE.to_properties()
    assert TOKEN not in json.dumps(props)
    assert cluster_id(TOKEN) == cluster_id(TOKEN) != cluster_id(TOKEN.upper())


def test_the_txt_record_says_nothing_of_the_model_the_layers_or_the_host():
    assert set(discovery.STATES) == {"idle", "loading", "ready", "serving"}
    with pytest.raises(ValueError):
        replace(NODE, state="holding layers 0-11 of smollm2 for host").to_properties()
    assert set(NODE.to_properties()) == {"id", "pv", "cl", "hn", "st", "ro", "mem", "dg", "pg", "bw"}


@pytest.mark.parametrize("change", [
    {"id": None}, {"id": "not-hex"}, {"mem": "lots"}, {"dg": "nan"}, {"bw": "-1"}, {"ro": "boss"},
    {"pv": "1.5"}, {"hn": None}, {"st": "holding layers 0-11 of [bold red]x[/] for host"}, {"hn": "x" * 64},
    {"hn": "bad\x1b[2Jname"}, {"cl": "not-a-cluster-id"}, {"st": None},
])
def test_malformed_txt_records_are_refused_with_a_reason(change):
    props = NODE.to_properties() | change
    with pytest.raises(MalformedRecord):
        NodeInfo.from_properties(props, port=50051)


def test_unknown_txt_keys_from_newer_versions_are_ignored():
    assert NodeInfo.from_properties(NODE.to_properties() | {"new": "x"}, addresses=["10.0.0.7"], port=50051) == NODE


def test_node_id_is_created_once_and_random_per_configuration_folder(tmp_path):
    first = load_node_id(tmp_path / "a")
    assert load_node_id(tmp_path / "a") == first
    assert (tmp_path / "a" / "node-id").read_text().strip() == first
    assert load_node_id(tmp_path / "b") != first
    (tmp_path / "a" / "node-id").write_text("garbage\n")
    assert load_node_id(tmp_path / "a") not in ("garbage", first)
