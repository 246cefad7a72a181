"""Per-session key/value cache for the layers one stage holds, preallocated once."""

from __future__ import annotations

import torch


class KVCache:
    """k, v: [n_layers, B, n_kv_heads, max_tokens, head_dim]; positions are the caller's.

    Allocated once for the whole context so decode never allocates. `tokens` is how
    many positions hold valid entries (the pipeline's view of this session).
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_tokens: int,
                 *, batch: int = 1, dtype: torch.dtype = torch.float32):
        shape = (n_layers, batch, n_kv_heads, max_tokens, head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.max_tokens = max_tokens
        self.tokens = 0

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def update(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, Hkv, S, hd] at positions [pos, pos+S); return all keys/values so far."""
        end = pos + k.shape[2]
        if end > self.max_tokens:
            raise IndexError(f"KV cache holds {self.max_tokens} positions, asked for {end}")
        self.k[layer, :, :, pos:end] = k
        self.v[layer, :, :, pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
