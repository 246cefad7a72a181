import pytest
import torch

from fastserve_edge.engine.kv_cache import INITIAL_TOKENS, KV_DTYPE, KVCache


def test_grows_on_demand_and_keeps_what_it_held():
    cache = KVCache(2, 3, 4, max_tokens=4 * INITIAL_TOKENS)
    assert cache.capacity == INITIAL_TOKENS
    first = torch.randn(1, 3, 10, 4)
    cache.update(1, 0, first, -first)
    keys, values = cache.update(1, INITIAL_TOKENS + 5, torch.ones(1, 3, 1, 4), torch.ones(1, 3, 1, 4))
    assert cache.k[1].shape[2] == 2 * INITIAL_TOKENS
    assert cache.capacity == INITIAL_TOKENS  # layer 0 has not needed more yet: layers grow one at a time
    stored = first.to(KV_DTYPE).float()
    assert torch.equal(keys[:, :, :10], stored) and torch.equal(values[:, :, :10], -stored)
    assert keys.dtype == torch.float32 and keys.shape[2] == INITIAL_TOKENS + 6


def test_holds_half_floats_and_keeps_them_within_fp16_rounding():
    cache = KVCache(1, 2, 64, max_tokens=8)
    assert cache.nbytes == 2 * 2 * 8 * 64 * 2  # K and V, 2 heads, 8 positions, 64 dims, 2 bytes each
    k = torch.randn(1, 2, 3, 64)
    keys, _ = cache.update(0, 0, k, k)
    torch.testing.assert_close(keys, k, rtol=1e-3, atol=1e-3)


def test_decode_layer_view_is_the_stored_cache():
    cache = KVCache(2, 1, 4, max_tokens=600)
    k, v = cache.layer(1, 300)
    assert k.shape == (1, 512, 4) and k.dtype == KV_DTYPE and k.is_contiguous()
    k[0, 299] = 2.0
    keys, _ = cache.update(1, 300, torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4))
    assert torch.equal(keys[0, 0, 299], torch.full((4,), 2.0))


def test_never_beyond_max_tokens():
    cache = KVCache(1, 1, 2, max_tokens=300)
    cache.update(0, 290, torch.zeros(1, 1, 10, 2), torch.zeros(1, 1, 10, 2))
    assert cache.capacity == 300
    with pytest.raises(IndexError, match="holds 300 positions"):
        cache.update(0, 300, torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))


def test_a_sliding_window_layer_is_a_ring_of_its_window():
    cache = KVCache(2, 1, 2, max_tokens=100, windows=[3, 0])
    seq = torch.arange(20, dtype=torch.float32).view(1, 1, 20, 1).expand(1, 1, 20, 2)
    keys, _ = cache.update(0, 0, seq[:, :, :7], seq[:, :, :7])  # a prompt longer than the window
    assert torch.equal(keys[0, 0, :, 0], torch.arange(7.0))  # all of its own, for its queries
    assert cache.k[0].shape[2] == 3 and cache.k[1].shape[2] == min(INITIAL_TOKENS, 100)
    keys, _ = cache.update(0, 7, seq[:, :, 7:8], seq[:, :, 7:8])  # one token: the window before it and itself
    assert keys[0, 0, :, 0].tolist() == [5.0, 6.0, 7.0]
    keys, _ = cache.update(0, 7, seq[:, :, 7:9], seq[:, :, 7:9])  # a rewind of one position: still held
    assert keys[0, 0, :, 0].tolist() == [5.0, 6.0, 7.0, 8.0]
    with pytest.raises(IndexError, match="must start over"):
        cache.update(0, 5, seq[:, :, 5:6], seq[:, :, 5:6])
    keys, _ = cache.update(0, 0, seq[:, :, :1], seq[:, :, :1])  # starting over is always possible
    assert keys.shape[2] == 1


def test_a_copy_holds_the_same_positions_and_goes_its_own_way():
    cache = KVCache(2, 2, 4, 64, windows=[0, 4])
    for layer in range(2):
        cache.update(layer, 0, torch.ones(1, 2, 6, 4), torch.ones(1, 2, 6, 4))
    twin = cache.copy()
    assert twin.written == cache.written and all(torch.equal(a, b) for a, b in zip(twin.k, cache.k))
    twin.update(0, 5, torch.full((1, 2, 1, 4), 7.0), torch.full((1, 2, 1, 4), 7.0))
    assert cache.k[0][0, 0, 5, 0] == 1 and twin.k[0][0, 0, 5, 0] == 7  # no storage shared
