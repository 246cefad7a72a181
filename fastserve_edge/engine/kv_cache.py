"""Per-session key/value cache for the layers one stage holds."""

from __future__ import annotations

import torch

INITIAL_TOKENS = 256  # first allocation; doubles as the session grows (amortised, rare)
KV_DTYPE = torch.float16  # as llama.cpp's default cache: half the memory of fp32, and the
                          # attention over it reads half the bytes; math stays fp32
KV_BYTES = torch.finfo(KV_DTYPE).bits // 8


def kv_bytes_per_token(n_kv_heads: int, head_dim: int) -> int:
    """K and V of one token in one layer, as the cache holds them."""
    return 2 * n_kv_heads * head_dim * KV_BYTES


class KVCache:
    """Per layer k, v: [B, n_kv_heads, capacity, head_dim] in KV_DTYPE; positions are the caller's.

    Memory follows use: each layer starts at INITIAL_TOKENS positions and doubles up to
    `max_tokens`, so a short chat on a 8k-context model does not hold 8k positions of KV.
    Layers grow one at a time, so growing never holds a second copy of the whole cache.
    Decode steps within the capacity allocate nothing.
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_tokens: int,
                 *, batch: int = 1, dtype: torch.dtype = KV_DTYPE):
        self.max_tokens = max_tokens
        self.dtype = dtype
        first = min(INITIAL_TOKENS, max_tokens)
        self.k = [torch.zeros((batch, n_kv_heads, first, head_dim), dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros_like(k) for k in self.k]

    @property
    def capacity(self) -> int:
        """Positions every layer can hold without growing."""
        return min((k.shape[2] for k in self.k), default=self.max_tokens)

    @property
    def nbytes(self) -> int:
        return sum(2 * k.numel() * k.element_size() for k in self.k)

    def _room(self, layer: int, end: int) -> None:
        if end > self.max_tokens:
            raise IndexError(f"KV cache holds {self.max_tokens} positions, asked for {end}")
        have = self.k[layer].shape[2]
        if end <= have:
            return
        grown = min(self.max_tokens, max(end, 2 * have))
        for side in (self.k, self.v):
            old = side[layer]
            new = torch.zeros((*old.shape[:2], grown, old.shape[3]), dtype=self.dtype)
            new[:, :, :have] = old
            side[layer] = new

    def layer(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's whole k and v [Hkv, capacity, hd] (batch 1), with room for `end` positions:
        the one-token decode kernel writes and reads them in place."""
        self._room(layer, end)
        return self.k[layer][0], self.v[layer][0]

    def update(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, Hkv, S, hd] at positions [pos, pos+S); return all keys/values so far
        as float32 [B, Hkv, pos+S, hd] (a copy: attention runs in fp32)."""
        end = pos + k.shape[2]
        self._room(layer, end)
        self.k[layer][:, :, pos:end] = k
        self.v[layer][:, :, pos:end] = v
        return self.k[layer][:, :, :end].float(), self.v[layer][:, :, :end].float()
