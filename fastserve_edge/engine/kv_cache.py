"""Per-session key/value cache for the layers one stage holds."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastserve_edge.models.config import ModelConfig

INITIAL_TOKENS = 256  # first allocation; doubles as the session grows (amortised, rare)
KV_DTYPE = torch.float16  # as llama.cpp's default cache: half the memory of fp32, and the
                          # attention over it reads half the bytes; math stays fp32
KV_BYTES = torch.finfo(KV_DTYPE).bits // 8


def kv_bytes_per_token(n_kv_heads: int, head_dim: int) -> int:
    """K and V of one token in one layer, as the cache holds them."""
    return 2 * n_kv_heads * head_dim * KV_BYTES


def reusable_prefix(cfg: ModelConfig, held: int, shared: int) -> int:
    """Of a session whose KV holds `held` positions, the first `shared` of which start a new
    prompt: how many the new prompt may reuse. A sliding-window layer keeps only its last
    window, which a rewind of more than one position would need from before it: start over."""
    return shared if not cfg.sliding_window or shared >= held - 1 else 0


class KVCache:
    """Per layer k, v: [B, n_kv_heads, capacity, head_dim] in KV_DTYPE; positions are the caller's.

    Memory follows use: each layer starts at INITIAL_TOKENS positions and doubles up to
    `max_tokens`, so a short chat on a 8k-context model does not hold 8k positions of KV.
    Layers grow one at a time, so growing never holds a second copy of the whole cache.
    Decode steps within the capacity allocate nothing.

    A layer with a sliding window W (windows[i] > 0, Gemma 3's local layers) holds at most W
    positions, as a ring: position p in slot p % W. Its update() returns only the keys a new
    token can see (the W - 1 before the first new one, then the new ones).
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_tokens: int,
                 *, batch: int = 1, dtype: torch.dtype = KV_DTYPE, windows: Sequence[int] | None = None):
        self.max_tokens = max_tokens
        self.dtype = dtype
        self.windows = list(windows) if windows is not None else [0] * n_layers
        assert len(self.windows) == n_layers and min(self.windows, default=0) >= 0, self.windows
        # positions a layer ever holds: a ring of its window, or all of max_tokens
        self.caps = [min(w, max_tokens) if w else max_tokens for w in self.windows]
        self.written = [0] * n_layers  # highest end written since position 0: a ring holds [written - cap, ..)
        self.k = [torch.zeros((batch, n_kv_heads, min(INITIAL_TOKENS, cap), head_dim), dtype=dtype)
                  for cap in self.caps]
        self.v = [torch.zeros_like(k) for k in self.k]

    @property
    def capacity(self) -> int:
        """Positions every layer can hold without growing."""
        return min((k.shape[2] for k in self.k), default=self.max_tokens)

    @property
    def nbytes(self) -> int:
        return sum(2 * k.numel() * k.element_size() for k in self.k)

    def copy(self) -> KVCache:
        """An independent cache holding the same positions (n answers forked from one prefill)."""
        twin = object.__new__(KVCache)
        twin.max_tokens, twin.dtype, twin.windows, twin.caps = self.max_tokens, self.dtype, self.windows, self.caps
        twin.written = list(self.written)
        twin.k = [k.clone() for k in self.k]
        twin.v = [v.clone() for v in self.v]
        return twin

    def _room(self, layer: int, end: int) -> None:
        if end > self.max_tokens:
            raise IndexError(f"KV cache holds {self.max_tokens} positions, asked for {end}")
        have, cap = self.k[layer].shape[2], self.caps[layer]
        end = min(end, cap)  # a ring: slot p % cap is p itself until it is full
        if end <= have:
            return
        grown = min(cap, max(end, 2 * have))
        for side in (self.k, self.v):
            old = side[layer]
            new = torch.zeros((*old.shape[:2], grown, old.shape[3]), dtype=self.dtype)
            new[:, :, :have] = old
            side[layer] = new

    def layer(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's whole k and v [Hkv, capacity, hd] (batch 1), with room for `end` positions:
        the one-token decode kernel writes and reads them in place (never a ring: the kernel
        indexes positions)."""
        assert not self.windows[layer], "a sliding-window layer's ring is read through update()"
        self._room(layer, end)
        return self.k[layer][0], self.v[layer][0]

    def update(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, Hkv, S, hd] at positions [pos, pos+S); return all keys/values so far
        as float32 [B, Hkv, pos+S, hd] (a copy: attention runs in fp32)."""
        end = pos + k.shape[2]
        if self.windows[layer]:
            return self._update_ring(layer, pos, k, v)
        self._room(layer, end)
        self.k[layer][:, :, pos:end] = k
        self.v[layer][:, :, pos:end] = v
        return self.k[layer][:, :, :end].float(), self.v[layer][:, :, :end].float()

    def _update_ring(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """update() of a sliding-window layer: returns keys/values of positions
        [max(0, pos - W + 1), pos + S), in order; stores the last cap of them."""
        S, W, cap = k.shape[2], self.windows[layer], self.caps[layer]
        end = pos + S
        self._room(layer, end)
        first = max(0, pos - W + 1)
        if pos == 0:
            self.written[layer] = 0  # a new sequence: nothing before it is needed
        if first < self.written[layer] - cap:
            raise IndexError(f"a sliding-window layer holds positions from {self.written[layer] - cap}, asked for "
                             f"{first}: a rewind of more than one position must start over (kv_cache.reusable_prefix)")
        slots = torch.arange(first, pos) % cap
        # the new ones rounded as if read back, as a full layer's are
        keys = torch.cat([self.k[layer][:, :, slots].float(), k.to(self.dtype).float()], dim=2)
        values = torch.cat([self.v[layer][:, :, slots].float(), v.to(self.dtype).float()], dim=2)
        keep = min(S, cap)  # the ring keeps the newest
        slots = torch.arange(end - keep, end) % cap
        self.k[layer][:, :, slots] = k[:, :, S - keep:].to(self.dtype)
        self.v[layer][:, :, slots] = v[:, :, S - keep:].to(self.dtype)
        self.written[layer] = max(self.written[layer], end)
        return keys, values
