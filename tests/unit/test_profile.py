"""The machine profile: sizes, the measurement itself, and its cache."""

from __future__ import annotations

import json
import time

import pytest

from fastserve_edge.cluster import profile
from fastserve_edge.cluster.profile import Profile, load_profile, parse_size
from fastserve_edge.errors import ConfigError

GiB = 1 << 30


@pytest.mark.parametrize("text, size", [
    ("8G", 8 * GiB), ("8g", 8 * GiB), ("512M", 512 << 20), ("1.5GiB", 3 * GiB // 2), ("2000000000", 2_000_000_000),
    ("8GB", 8_000_000_000), (" 4 gib ", 4 * GiB), ("100K", 102_400), ("1T", 1 << 40), ("0.5G", GiB // 2),
    ("4096B", 4096),
])
def test_sizes_people_write(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "abc", "8X", "-1G", "0", "0G", "1.5", "1.2.3G", "8 G B", "1e9"])
def test_bad_sizes_name_the_accepted_forms(text):
    with pytest.raises(ConfigError, match="512M, 8G, 1.5GiB"):
        parse_size(text)


def test_measure_is_quick_and_measures_something():
    start = time.monotonic()
    p = profile.measure(1)
    assert time.monotonic() - start < 3
    assert p.threads == 1 and p.cpu
    assert p.decode_gflops > 0.1 and p.prefill_gflops > 0.1 and p.bandwidth_gbs > 0.1
    assert 0 < p.memory_bytes <= p.total_memory_bytes


# --- the cache, with a fake measurement and fake /proc/meminfo ---------------------------------

class FakeMachine:
    def __init__(self, monkeypatch):
        self.measured: list[int] = []
        self.available, self.total = 6 * GiB, 8 * GiB
        self.speed = 10.0
        monkeypatch.setattr(profile, "measure", self.measure)
        monkeypatch.setattr(profile, "_meminfo", lambda: {"MemTotal": self.total, "MemAvailable": self.available})
        monkeypatch.setattr(profile, "_cgroup_room", lambda: None)
        monkeypatch.setattr(profile, "cpu_name", lambda: "Old Core i5")
        monkeypatch.setattr(profile, "kernel_variant", lambda: "native-abc")

    def measure(self, threads: int) -> Profile:
        self.measured.append(threads)
        return Profile(memory_bytes=self.available, total_memory_bytes=self.total, decode_gflops=self.speed,
                       prefill_gflops=2 * self.speed, bandwidth_gbs=self.speed / 2, threads=threads, cpu="Old Core i5")


@pytest.fixture
def machine(monkeypatch):
    return FakeMachine(monkeypatch)


def test_speeds_are_measured_once_then_read_from_the_cache(machine, tmp_path):
    first = load_profile(tmp_path, threads=4)
    assert machine.measured == [4] and (tmp_path / "profile.json").is_file()
    machine.speed = 99.0  # a new measurement would differ: the cached one is used
    assert load_profile(tmp_path, threads=4) == first
    assert machine.measured == [4]
    assert (first.decode_gflops, first.prefill_gflops, first.bandwidth_gbs) == (10.0, 20.0, 5.0)


def test_reprofile_measures_again_and_replaces_the_cached_numbers(machine, tmp_path):
    load_profile(tmp_path, threads=2)
    machine.speed = 30.0
    assert load_profile(tmp_path, threads=2, reprofile=True).decode_gflops == 30.0
    assert load_profile(tmp_path, threads=2).decode_gflops == 30.0
    assert machine.measured == [2, 2]


def test_each_thread_count_and_kernel_build_has_its_own_entry(machine, tmp_path, monkeypatch):
    load_profile(tmp_path, threads=2)
    load_profile(tmp_path, threads=1)
    load_profile(tmp_path, threads=2)
    assert machine.measured == [2, 1]
    monkeypatch.setattr(profile, "kernel_variant", lambda: "native-def")  # the kernels were rebuilt
    load_profile(tmp_path, threads=2)
    assert machine.measured == [2, 1, 2]
    assert len(json.loads((tmp_path / "profile.json").read_text())["entries"]) == 3


V = profile.CACHE_VERSION


@pytest.mark.parametrize("content", [
    "{not json", "", "[]", f'{{"version": {V}, "entries": []}}', '{"version": 0, "entries": {}}',
    f'{{"version": {V}, "entries": {{"Old Core i5|threads=2|native-abc": {{"decode_gflops": "fast"}}}}}}',
    (f'{{"version": {V}, "entries": {{"Old Core i5|threads=2|native-abc": '
     '{"decode_gflops": -1, "prefill_gflops": 1, "bandwidth_gbs": 1}}}'),
])
def test_a_corrupt_cache_is_measured_again_and_rewritten(machine, tmp_path, content):
    (tmp_path / "profile.json").write_text(content)
    assert load_profile(tmp_path, threads=2).decode_gflops == 10.0
    assert machine.measured == [2]
    load_profile(tmp_path, threads=2)
    assert machine.measured == [2]


def offered(available: int) -> int:
    """What is offered without --max-memory: room is left for the OS and the runtime."""
    return int(available * (1 - profile.FREE_MEMORY_MARGIN)) - profile.FREE_MEMORY_RESERVE


def test_memory_is_read_fresh_not_cached(machine, tmp_path):
    assert load_profile(tmp_path, threads=2).memory_bytes == offered(6 * GiB)
    machine.available = 3 * GiB  # a browser opened since
    p = load_profile(tmp_path, threads=2)
    assert (p.memory_bytes, p.total_memory_bytes) == (offered(3 * GiB), 8 * GiB)
    assert machine.measured == [2]


def test_max_memory_caps_what_is_offered(machine, tmp_path):
    assert load_profile(tmp_path, threads=2, max_memory=parse_size("2G")).memory_bytes == 2 * GiB
    assert load_profile(tmp_path, threads=2, max_memory=parse_size("64G")).memory_bytes == 6 * GiB
    with pytest.raises(ConfigError, match="--max-memory"):
        load_profile(tmp_path, threads=2, max_memory=0)


def test_a_container_memory_limit_caps_what_is_offered(machine, tmp_path, monkeypatch):
    monkeypatch.setattr(profile, "_cgroup_room", lambda: GiB)
    assert load_profile(tmp_path, threads=2).memory_bytes == offered(GiB)


def test_an_unwritable_cache_still_gives_a_profile(machine, tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the folder should be")
    assert load_profile(blocker, threads=2).decode_gflops == 10.0


def test_the_real_cache_round_trip_measures_once(tmp_path):
    first = load_profile(tmp_path, threads=1)
    start = time.monotonic()
    again = load_profile(tmp_path, threads=1)
    assert time.monotonic() - start < 0.5
    assert (again.decode_gflops, again.prefill_gflops, again.bandwidth_gbs) == \
           (first.decode_gflops, first.prefill_gflops, first.bandwidth_gbs)
