"""One weight as it lies in a model file, before the engine turns it into a runtime weight.

A RawTensor is the boundary between "file format" and "runtime weight": the readers
(gguf.py, hf.py) produce them, `engine/quant.py` alone decides what they become in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf.quants import dequantize

from fastserve_edge.engine.config import ModelConfig

SUPPORTED_TYPES = (
    QType.F32, QType.F16, QType.BF16,
    QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1,
    QType.Q4_K, QType.Q5_K, QType.Q6_K,
)


@dataclass(frozen=True)
class RawTensor:
    name: str                  # canonical (GGUF) name, e.g. "blk.3.attn_q.weight"
    qtype: QType               # storage format; never guessed from a file name
    shape: tuple[int, ...]     # logical shape, torch order: [out, in] for a matrix
    data: np.ndarray | torch.Tensor  # GGUF: memmapped bytes [out, bytes_per_row] (or floats); HF: torch tensor

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes) if isinstance(self.data, np.ndarray) else self.data.numel() * self.data.element_size()

    def take_rows(self, index: np.ndarray) -> RawTensor:
        """Rows in a new order. Exact for quantized data too: GGUF blocks never cross rows."""
        if isinstance(self.data, torch.Tensor):
            return RawTensor(self.name, self.qtype, self.shape, self.data[torch.from_numpy(index)])
        return RawTensor(self.name, self.qtype, self.shape, np.take(self.data, index, axis=0))

    def to_float(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantize the whole tensor (copy) into `dtype`, shaped `self.shape`."""
        if isinstance(self.data, torch.Tensor):
            return self.data.to(dtype).reshape(self.shape).clone()
        if self.qtype == QType.BF16:
            raw = torch.from_numpy(np.array(self.data).view(np.int16))  # copy: the map is read-only
            return raw.view(torch.bfloat16).to(dtype).reshape(self.shape)
        values = dequantize(np.asarray(self.data), self.qtype)
        if not values.flags.writeable:  # a view of the read-only memory map: copy it
            values = values.copy()
        return torch.from_numpy(np.ascontiguousarray(values)).to(dtype).reshape(self.shape)


class ModelSource(Protocol):
    """A model on disk: its config, its tensors by canonical name, its tokenizer."""

    config: ModelConfig

    def tensor(self, name: str) -> RawTensor: ...

    def has(self, name: str) -> bool: ...

    def names(self) -> list[str]: ...

    def tokenizer(self): ...  # -> fastserve_edge.models.tokenizer.Tokenizer
