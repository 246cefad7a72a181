"""One weight as it lies in a model file, before the engine turns it into a runtime weight.

A RawTensor is the boundary between "file format" and "runtime weight": the readers
(gguf.py, hf.py) produce them, `engine/quant.py` alone decides what they become in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QType
from gguf.quants import dequantize

from fastserve_edge.models.config import ModelConfig

SUPPORTED_TYPES = (
    QType.F32, QType.F16, QType.BF16,
    QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1,
    QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K, QType.IQ4_XS,
)

MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ELEMENTS = 1 << 40  # far above any tensor a machine of ours holds; keeps the arithmetic small
_TORCH_DTYPE_OF = {QType.F32: torch.float32, QType.F16: torch.float16, QType.BF16: torch.bfloat16}


def block_rows(qtype: QType, shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, bytes per row) of a tensor's data in its format, from its logical shape alone:
    rows = the product of the outer dims, a row = the last dim in whole blocks of qtype.
    ValueError for a shape no data of that type can have (zero or negative dims, too many,
    a row that is no whole number of blocks)."""
    if not (isinstance(shape, tuple) and 1 <= len(shape) <= MAX_DIMS
            and all(type(n) is int and n > 0 for n in shape)):
        raise ValueError(f"shape {list(shape) if isinstance(shape, tuple) else shape!r} is not 1 to {MAX_DIMS} "
                         "positive dimensions")
    if math.prod(shape) > MAX_ELEMENTS:
        raise ValueError(f"shape {list(shape)} has more than 2^40 elements")
    block, type_size = GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        raise ValueError(f"rows of {shape[-1]} are not a whole number of {qtype.name} blocks of {block}")
    return math.prod(shape[:-1]), shape[-1] // block * type_size


def check_layout(raw: RawTensor) -> None:
    """ValueError unless raw's data is exactly what its qtype and logical shape say: numpy
    data [rows, bytes per row] (block_rows; any item type of that many bytes), torch data of
    the shape's element count in the qtype's float dtype. What the kernels take a row stride
    and a row count from must be this, not whatever array arrived."""
    rows, row_bytes = block_rows(raw.qtype, tuple(raw.shape))
    data = raw.data
    if isinstance(data, torch.Tensor):
        want = _TORCH_DTYPE_OF.get(raw.qtype)
        if want is None or data.dtype != want or data.numel() != math.prod(raw.shape):
            raise ValueError(f"a {data.dtype} tensor of {tuple(data.shape)} holds no {raw.qtype.name} {list(raw.shape)}")
        return
    if not isinstance(data, np.ndarray):
        raise ValueError(f"data of type {type(data).__name__}")
    if data.ndim != 2 or data.shape[0] != rows or data.shape[1] * data.itemsize != row_bytes:
        raise ValueError(f"data {data.dtype} {list(data.shape)} is not {rows} rows of {row_bytes} bytes, "
                         f"what {raw.qtype.name} {list(raw.shape)} takes")
    if data.strides[1] != data.itemsize or (rows > 1 and data.strides[0] < row_bytes):
        raise ValueError(f"data rows overlap or are not contiguous (strides {data.strides})")


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
