"""Weights by the layer: manifest, per-part cache on a peer, and the source a stage reads."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fastserve_edge.cluster import shard_cache
from fastserve_edge.cluster.shard_cache import (
    ShardCache, ShardError, ShardSource, build_manifest, part_blob, parts_for_stage,
)
from fastserve_edge.engine.generate import LocalStage
from fastserve_edge.engine.model import Stage
from fastserve_edge.engine.quant import RuntimeWeights
from fastserve_edge.models import open_model, registry
from tests.models_fixtures import write_tiny_gguf

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_gguf(tmp_path_factory.mktemp("m") / "tiny.gguf", arch="llama", tensor_type="Q4_0", n_layers=3)
    return path, open_model(path)


def test_manifest_covers_every_tensor_once_per_part_and_is_cached(tiny, tmp_path):
    path, source = tiny
    m = build_manifest(source, path, tmp_path)
    n = source.config.n_layers
    assert {f"layer.{i}" for i in range(n)} <= set(m.parts)
    layered = {name for part, names in m.parts.items() if part.startswith("layer.") for name in names}
    assert layered == {name for name in source.names() if name.startswith("blk.")}
    assert "token_embd.weight" in m.parts["embed"]
    assert parts_for_stage(source.config, 1, n)[-1] == "head"
    assert all(m.runtime_bytes[p] >= 0 for p in m.parts)
    again = build_manifest(source, path, tmp_path)
    assert again == m and len(list((tmp_path / "manifests").iterdir())) == 1


def test_a_part_round_trips_through_the_cache_and_a_stage_built_from_it_matches(tiny, tmp_path):
    path, source = tiny
    m = build_manifest(source, path, tmp_path)
    cache = ShardCache(tmp_path / "shards")
    cfg = source.config
    tensors = []
    for part in parts_for_stage(cfg, 1, cfg.n_layers):
        assert cache.load(m.digest, part, m.parts[part]) is None
        cache.store(m.digest, part, part_blob(source, m, part), m.parts[part])
        tensors += cache.load(m.digest, part, m.parts[part])
    remote = LocalStage(Stage(cfg, RuntimeWeights(ShardSource(cfg, tensors)), 1, cfg.n_layers, max_tokens=16,
                              embeds=False))
    weights = RuntimeWeights(source)
    first = LocalStage(Stage(cfg, weights, 0, 1, max_tokens=16))
    whole = LocalStage(Stage(cfg, weights, 0, cfg.n_layers, max_tokens=16))
    ids = torch.tensor([[1, 5, 7, 2]])
    split = remote.forward("s", first.forward("s", ids, 0), 0)
    torch.testing.assert_close(split, whole.forward("s", ids, 0), rtol=0, atol=0)


def test_a_peer_gets_its_tensors_as_read_only_maps_of_the_part_file(tiny, tmp_path):
    """As a host's come from its GGUF map: the engine's x8 copy then replaces the file's
    pages instead of adding to memory, and the part's bytes stay intact for other peers."""
    from fastserve_edge.engine.quant import _read_only_file_map

    path, source = tiny
    m = build_manifest(source, path, tmp_path)
    cache = ShardCache(tmp_path / "shards")
    stored = cache.store(m.digest, "layer.0", part_blob(source, m, "layer.0"), m.parts["layer.0"])
    loaded = cache.load(m.digest, "layer.0", m.parts["layer.0"])
    for t in stored + loaded:
        assert _read_only_file_map(t.data), t.name
        assert np.array_equal(np.asarray(t.data), np.asarray(source.tensor(t.name).data)), t.name
    RuntimeWeights(ShardSource(source.config, loaded)).linear("blk.0.attn_q")  # repacks, drops the pages
    assert part_blob(ShardSource(source.config, loaded), m, "layer.0") == part_blob(source, m, "layer.0")


def test_corrupt_or_mismatched_parts_are_refused_and_a_bad_cache_file_is_dropped(tiny, tmp_path):
    path, source = tiny
    m = build_manifest(source, path, tmp_path)
    cache = ShardCache(tmp_path / "shards")
    blob = part_blob(source, m, "layer.0")
    flipped = bytearray(blob)
    flipped[-1] ^= 0xFF
    with pytest.raises(ShardError, match="manifest hash"):
        cache.store(m.digest, "layer.0", bytes(flipped), m.parts["layer.0"])
    with pytest.raises(ShardError, match="manifest lists"):
        cache.store(m.digest, "layer.1", blob, m.parts["layer.1"])  # layer 0's tensors for layer 1
    assert not cache.path(m.digest, "layer.0").exists()
    cache.store(m.digest, "layer.0", blob, m.parts["layer.0"])
    cache.path(m.digest, "layer.0").write_bytes(b"garbage")  # the disk lost it
    assert cache.load(m.digest, "layer.0", m.parts["layer.0"]) is None
    assert not cache.path(m.digest, "layer.0").exists()
    with pytest.raises(ShardError):
        cache.path("../../etc", "passwd")


def test_a_shard_source_says_which_tensor_a_peer_was_not_sent(tiny):
    _, source = tiny
    with pytest.raises(ShardError, match="was not sent"):
        ShardSource(source.config, []).tensor("blk.0.attn_q.weight")
    assert np.asarray(source.tensor("blk.0.attn_q.weight").data).dtype == np.uint8


# ---------------------------------------------------------------- crash safety


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    return int(child.stdout)


def test_a_failed_write_leaves_no_part_and_no_temporary(tiny, tmp_path, monkeypatch):
    path, source = tiny
    m = build_manifest(source, path, tmp_path)
    cache = ShardCache(tmp_path / "shards")
    blob = part_blob(source, m, "layer.0")

    def failing_rename(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", failing_rename)  # fails after every byte is in the temporary file
        with pytest.raises(OSError):
            cache.store(m.digest, "layer.0", blob, m.parts["layer.0"])
    assert list((tmp_path / "shards").rglob("*.safetensors*")) == []
    assert cache.load(m.digest, "layer.0", m.parts["layer.0"]) is None

    calls = []

    class FillingDisk(io.FileIO):
        def write(self, data):
            calls.append(len(data))
            if len(calls) == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    with monkeypatch.context() as patch:
        patch.setattr(registry, "WRITE_CHUNK", 1024)
        patch.setattr(registry, "open", lambda path, mode: FillingDisk(path, mode), raising=False)  # the disk fills mid-part
        with pytest.raises(ShardError, match="the disk is full.*free disk space or lower .cluster. shard_cache_bytes"):
            cache.store(m.digest, "layer.0", blob, m.parts["layer.0"])
    assert len(calls) == 3
    assert list((tmp_path / "shards").rglob("*.safetensors*")) == []
    assert cache.load(m.digest, "layer.0", m.parts["layer.0"]) is None


CRASHING_WRITER = """
import json, os, sys
from pathlib import Path
from fastserve_edge.cluster.shard_cache import ShardCache
root, digest, part, blob, expected = sys.argv[1:]
os.replace = lambda *args: os._exit(9)  # killed after writing, before the rename
ShardCache(Path(root)).store(digest, part, Path(blob).read_bytes(), json.loads(expected))
"""


def test_a_writer_killed_mid_store_leaves_a_miss_and_the_next_start_sweeps_its_file(tiny, tmp_path):
    path, source = tiny
    m = build_manifest(source, path, tmp_path)
    (tmp_path / "blob").write_bytes(part_blob(source, m, "layer.0"))
    root = tmp_path / "shards"
    done = subprocess.run([sys.executable, "-c", CRASHING_WRITER, str(root), m.digest, "layer.0",
                           str(tmp_path / "blob"), json.dumps(m.parts["layer.0"])],
                          cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 9, done.stderr
    (left,) = (root / m.digest).iterdir()  # the whole part, under its temporary name
    assert left.name.startswith(".layer.0.safetensors.pid") and left.stat().st_size == len(
        (tmp_path / "blob").read_bytes())

    cache = ShardCache(root)  # a start sweeps what the dead writer left

    assert not left.exists()
    assert cache.load(m.digest, "layer.0", m.parts["layer.0"]) is None


def test_sweep_takes_dead_or_abandoned_temporaries_and_keeps_a_live_writers(tmp_path):
    cache = ShardCache(tmp_path / "shards")
    folder = tmp_path / "shards" / ("ab" * 32)
    folder.mkdir(parents=True)
    dead = folder / f".layer.0.safetensors.pid{dead_pid()}.1a2b3c4d.tmp"
    live = folder / f".layer.1.safetensors.pid{os.getpid()}.1a2b3c4d.tmp"
    abandoned = folder / f".layer.2.safetensors.pid{os.getpid()}.5e6f7a8b.tmp"  # our pid, reused
    unnamed = folder / ".layer.3.safetensors.tmp"  # an older version's name: the age decides
    for f in (dead, live, abandoned, unnamed):
        f.write_bytes(b"x" * 10)
    old = time.time() - registry.STALE_AFTER_S - 60
    os.utime(abandoned, (old, old))

    removed = cache.sweep()

    assert sorted(removed) == sorted([dead, abandoned])
    assert live.exists() and unnamed.exists()
    os.utime(unnamed, (old, old))
    ShardCache(tmp_path / "shards")  # the constructor sweeps
    assert not unnamed.exists() and live.exists()


# ---------------------------------------------------------------- quota


def test_quota_evicts_least_recently_used_parts_other_models_first_and_keeps_protected_ones(tiny, tmp_path):
    path, source = tiny
    m = build_manifest(source, path, tmp_path)
    blobs = {p: part_blob(source, m, p) for p in ("layer.0", "layer.1", "layer.2")}
    size = len(blobs["layer.0"])
    assert {len(b) for b in blobs.values()} == {size}
    cache = ShardCache(tmp_path / "shards", quota_bytes=3 * size)
    a, b = "a" * 64, "b" * 64  # two models (the cache keys by digest; the bytes may repeat)

    def store(digest, part, **kwargs):
        cache.store(digest, part, blobs[part], m.parts[part], **kwargs)

    def held():
        return sorted(f"{p.parent.name[0]}:{p.stem}" for p in (tmp_path / "shards").glob("*/*.safetensors"))

    for i, part in enumerate(blobs):
        store(a, part)
        os.utime(cache.path(a, part), ns=(i + 1, i + 1))  # stored long ago, in this order
    assert cache.load(a, "layer.0", m.parts["layer.0"]) is not None  # used again: now the newest

    store(b, "layer.0")
    assert held() == ["a:layer.0", "a:layer.2", "b:layer.0"]  # a's layer.1 was the least recently used

    os.utime(cache.path(b, "layer.0"), ns=(1, 1))  # older than anything of a's ...
    store(b, "layer.1", protect={"layer.0", "layer.1"})
    assert held() == ["a:layer.0", "b:layer.0", "b:layer.1"]  # ... but a is the other model: a goes first

    store(b, "layer.2")  # b's own unprotected part goes only when no other model's is left
    assert held() == ["b:layer.0", "b:layer.1", "b:layer.2"]
    store(a, "layer.0", protect={"layer.0"})
    assert held() == ["a:layer.0", "b:layer.1", "b:layer.2"]  # b's layer.0: the oldest of b's

    cache = ShardCache(tmp_path / "shards", quota_bytes=2 * size)  # the quota lowered: b's stage no longer fits
    with pytest.raises(ShardError, match=r"cannot hold part layer.0 .*raise \[cluster\] shard_cache_bytes"):
        store(b, "layer.0", protect={"layer.1", "layer.2"})
    assert held() == ["a:layer.0", "b:layer.1", "b:layer.2"]  # nothing evicted for a store that failed
    store(b, "layer.0", protect={"layer.1"})
    assert held() == ["b:layer.0", "b:layer.1"]
    assert not list((tmp_path / "shards").rglob(".*.tmp"))
    assert sum(p.stat().st_size for p in (tmp_path / "shards").glob("*/*")) <= 2 * size


def test_a_part_larger_than_the_quota_is_refused_before_it_is_unpacked(tiny, tmp_path, monkeypatch):
    path, source = tiny
    m = build_manifest(source, path, tmp_path)
    blob = part_blob(source, m, "layer.0")
    cache = ShardCache(tmp_path / "shards", quota_bytes=len(blob) - 1)
    monkeypatch.setattr(shard_cache, "unpack_tensors", lambda blob: pytest.fail("unpacked a blob it must refuse"))

    with pytest.raises(ShardError, match=r"more than the whole shard cache quota.*raise \[cluster\] shard_cache_bytes"):
        cache.store(m.digest, "layer.0", blob, m.parts["layer.0"])
    with pytest.raises(ShardError, match="shard_cache_bytes"):
        cache.check_size("layer.0", len(blob))  # what a receiver asks with the announced size
    cache.check_size("layer.0", len(blob) - 1)
    assert not (tmp_path / "shards" / m.digest).exists()


def test_the_quota_is_a_setting(tmp_path):
    from fastserve_edge.errors import ConfigError
    from fastserve_edge.settings import load_settings

    env = {"FASTSERVE_HOME": str(tmp_path)}
    assert load_settings(env).cluster.shard_cache_bytes == shard_cache.DEFAULT_QUOTA_BYTES == 32 << 30
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.toml").write_text('[cluster]\nshard_cache_bytes = "2GiB"\n')
    assert load_settings(env).cluster.shard_cache_bytes == 2 << 30
    assert load_settings({**env, "FASTSERVE_SHARD_CACHE_BYTES": "512M"}).cluster.shard_cache_bytes == 512 << 20
    with pytest.raises(ConfigError, match=r"\[cluster\].shard_cache_bytes .* not a size"):
        load_settings({**env, "FASTSERVE_SHARD_CACHE_BYTES": "lots"})
