"""Weights by the layer: manifest, per-part cache on a peer, and the source a stage reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastserve_edge.cluster.shard_cache import (
    ShardCache, ShardError, ShardSource, build_manifest, part_blob, parts_for_stage,
)
from fastserve_edge.engine.generate import LocalStage
from fastserve_edge.engine.model import Stage
from fastserve_edge.engine.quant import RuntimeWeights
from fastserve_edge.models import open_model
from tests.models_fixtures import write_tiny_gguf


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
