"""File format -> runtime weight. The only place that decides how a weight lives in memory.

The decoder (model.py) asks a `RuntimeWeights` for "the linear called blk.3.attn_q" and
gets an nn.Module with `forward(x: [..., in]) -> [..., out]`; it never sees a file format.
Today every matrix is dequantized once at load into `dtype` (fp32 by default); keeping
weights quantized in memory swaps these modules, not the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastserve_edge.models.tensors import ModelSource, RawTensor


class DenseLinear(nn.Module):
    """y = x @ W.T (+ b), W dequantized at load: [out, in]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


class DenseEmbedding(nn.Module):
    """Rows of the token table [vocab, D]."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).float()

    def as_linear(self) -> DenseLinear:
        """Tied head: the same table used as the LM head (shared storage, no copy)."""
        return DenseLinear(self.weight)


class RuntimeWeights:
    """Hands the decoder its weights by canonical name, converted once, cached for tying."""

    def __init__(self, source: ModelSource, dtype: torch.dtype = torch.float32):
        self.source = source
        self.dtype = dtype
        self._embedding: DenseEmbedding | None = None

    def has(self, name: str) -> bool:
        return self.source.has(name)

    def _matrix(self, raw: RawTensor) -> torch.Tensor:
        return raw.to_float(self.dtype)

    def vector(self, name: str) -> torch.Tensor:
        """Norm weights and biases: always fp32, they are tiny and sensitive."""
        return self.source.tensor(name).to_float(torch.float32)

    def linear(self, name: str, *, bias: bool = False) -> nn.Module:
        weight = self._matrix(self.source.tensor(f"{name}.weight"))
        b = self.vector(f"{name}.bias") if bias else None
        return DenseLinear(weight, b)

    def embedding(self, name: str = "token_embd") -> DenseEmbedding:
        if self._embedding is None:
            self._embedding = DenseEmbedding(self._matrix(self.source.tensor(f"{name}.weight")))
        return self._embedding

    def head(self, tied: bool) -> nn.Module:
        return self.embedding().as_linear() if tied else self.linear("output")
