"""Per-session key/value cache for the layers one stage holds."""

from __future__ import annotations

import torch

INITIAL_TOKENS = 256  # first allocation; doubles as the session grows (amortised, rare)


class KVCache:
    """k, v: [n_layers, B, n_kv_heads, capacity, head_dim]; positions are the caller's.

    Memory follows use: the cache starts at INITIAL_TOKENS positions and doubles up to
    `max_tokens`, so a short chat on a 8k-context model does not hold 8k positions of KV.
    Decode steps within the capacity allocate nothing.
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_tokens: int,
                 *, batch: int = 1, dtype: torch.dtype = torch.float32):
        self.max_tokens = max_tokens
        self._shape = (n_layers, batch, n_kv_heads, head_dim)
        self.dtype = dtype
        self.k = self.v = torch.empty(0)
        self._grow(min(INITIAL_TOKENS, max_tokens))

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def _grow(self, capacity: int) -> None:
        n_layers, batch, heads, hd = self._shape
        k = torch.zeros((n_layers, batch, heads, capacity, hd), dtype=self.dtype)
        v = torch.zeros_like(k)
        if self.k.numel():
            k[:, :, :, : self.capacity] = self.k
            v[:, :, :, : self.capacity] = self.v
        self.k, self.v = k, v

    def layer(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's whole k and v [Hkv, capacity, hd] (batch 1), with room for `end` positions:
        the one-token decode kernel writes and reads them in place."""
        if end > self.max_tokens:
            raise IndexError(f"KV cache holds {self.max_tokens} positions, asked for {end}")
        if end > self.capacity:
            self._grow(min(self.max_tokens, max(end, 2 * self.capacity)))
        return self.k[layer, 0], self.v[layer, 0]

    def update(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, Hkv, S, hd] at positions [pos, pos+S); return all keys/values so far."""
        end = pos + k.shape[2]
        if end > self.max_tokens:
            raise IndexError(f"KV cache holds {self.max_tokens} positions, asked for {end}")
        if end > self.capacity:
            self._grow(min(self.max_tokens, max(end, 2 * self.capacity)))
        self.k[layer, :, :, pos:end] = k
        self.v[layer, :, :, pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
