import pytest
import torch

from fastserve_edge.engine.kv_cache import INITIAL_TOKENS, KVCache


def test_grows_on_demand_and_keeps_what_it_held():
    cache = KVCache(2, 3, 4, max_tokens=4 * INITIAL_TOKENS)
    assert cache.capacity == INITIAL_TOKENS
    first = torch.randn(1, 3, 10, 4)
    cache.update(1, 0, first, -first)
    keys, values = cache.update(1, INITIAL_TOKENS + 5, torch.ones(1, 3, 1, 4), torch.ones(1, 3, 1, 4))
    assert cache.capacity == 2 * INITIAL_TOKENS
    assert torch.equal(keys[:, :, :10], first) and torch.equal(values[:, :, :10], -first)
    assert keys.shape[2] == INITIAL_TOKENS + 6


def test_never_beyond_max_tokens():
    cache = KVCache(1, 1, 2, max_tokens=300)
    cache.update(0, 290, torch.zeros(1, 1, 10, 2), torch.zeros(1, 1, 10, 2))
    assert cache.capacity == 300
    with pytest.raises(IndexError, match="holds 300 positions"):
        cache.update(0, 300, torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
