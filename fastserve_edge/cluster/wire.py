"""Tensors <-> bytes on the wire: safetensors only, never pickle.

A peer takes bytes from other machines and must fail cleanly on anything unexpected:
every unpack reads the safetensors header first, checks names, dtypes, shapes and sizes
against what the protocol allows, and raises WireError before building a tensor.

Two payloads:
    hidden states   one float tensor "x" [B, S, D] (or logits [B, V] / [B, S, V]); dtype kept
                    as given (fp32 by default: a cluster's greedy output equals one machine's)
    a model part    a layer's RawTensors in runtime (GGUF block) format, bytes untouched; each
                    tensor's qtype and logical shape ride in the safetensors __metadata__
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QType
from safetensors import SafetensorError

from fastserve_edge.cluster.protocol import CHUNK_BYTES, peer_pb2
from fastserve_edge.engine.sampling import SamplingParams
from fastserve_edge.errors import FastServeError
from fastserve_edge.models.tensors import RawTensor, block_rows, check_layout


class WireError(FastServeError):
    """Bytes from another machine that are not what the protocol says: a fastserve version
    mismatch between the machines, or something that is not a fastserve peer."""


HIDDEN_NAME = "x"
HIDDEN_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
TENSORS_KEY = "fastserve.tensors"  # __metadata__ key: JSON list of {name, qtype, shape, array, dtype}

# Array dtypes a RawTensor may carry, by safetensors dtype name. GGUF data is uint8 rows;
# HF data is a float torch tensor. bfloat16 travels as I16 (numpy has no bfloat16).
_NUMPY_DTYPES = {"U8": np.uint8, "I8": np.int8, "I16": np.int16, "U16": np.uint16, "F16": np.float16, "F32": np.float32}
_TORCH_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "F16": torch.float16, "F32": torch.float32,
                 "BF16": torch.bfloat16}
_ITEMSIZE = {"U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "F32": 4}
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own cap on the JSON header


# -- reading a safetensors header without trusting it ------------------------------------


def _header(blob: bytes, what: str) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """(tensors, metadata) from a safetensors header; WireError unless it is well formed and
    every tensor's bytes lie inside the blob."""
    if not isinstance(blob, (bytes, bytearray)):
        raise WireError(f"{what}: expected bytes, got {type(blob).__name__}")
    if len(blob) < 8:
        raise WireError(f"{what}: {len(blob)} bytes is too short for safetensors")
    size = int.from_bytes(blob[:8], "little")
    if size > min(len(blob) - 8, _HEADER_LIMIT):
        raise WireError(f"{what}: not safetensors (header of {size:,} bytes in a {len(blob):,}-byte message)")
    try:
        header = json.loads(bytes(blob[8:8 + size]))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise WireError(f"{what}: not safetensors (the header is not JSON)") from None
    if not isinstance(header, dict):
        raise WireError(f"{what}: not safetensors (the header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WireError(f"{what}: malformed safetensors __metadata__")
    data_len = len(blob) - 8 - size
    for name, info in header.items():
        if not (isinstance(info, dict) and isinstance(info.get("dtype"), str)
                and _int_list(info.get("shape")) and _int_list(info.get("data_offsets"))
                and len(info["data_offsets"]) == 2 and 0 <= info["data_offsets"][0] <= info["data_offsets"][1] <= data_len):
            raise WireError(f"{what}: malformed safetensors entry for tensor {name!r}")
    return header, metadata


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


# -- hidden states -----------------------------------------------------------------------


def pack_hidden(x: torch.Tensor) -> bytes:
    """x: float [B, S, D] hidden states (or [B, V] / [B, S, V] logits) -> safetensors bytes."""
    if x.dtype not in HIDDEN_DTYPES.values() or x.dim() not in (2, 3):
        raise ValueError(f"hidden states must be a 2-3 dim float tensor, got {x.dtype} {tuple(x.shape)}")
    return safetensors.torch.save({HIDDEN_NAME: x.detach().contiguous()})


def unpack_hidden(blob: bytes, *, max_elements: int) -> torch.Tensor:
    """Inverse of pack_hidden: a writable tensor, same dtype and shape. WireError unless the
    bytes hold exactly one float tensor "x" of 2-3 dims with at most max_elements elements."""
    what = "hidden states"
    header, _ = _header(blob, what)
    if list(header) != [HIDDEN_NAME]:
        raise WireError(f"{what}: expected one tensor named {HIDDEN_NAME!r}, got {sorted(header)[:5]}")
    info = header[HIDDEN_NAME]
    if info["dtype"] not in HIDDEN_DTYPES:
        raise WireError(f"{what}: dtype {info['dtype']} (allowed: {', '.join(HIDDEN_DTYPES)})")
    shape = info["shape"]
    if len(shape) not in (2, 3) or not all(shape):
        raise WireError(f"{what}: shape {shape} (expected [B, S, D] or [B, D], none of them 0)")
    if math.prod(shape) > max_elements:
        raise WireError(f"{what}: {math.prod(shape):,} elements, more than the {max_elements:,} allowed")
    try:
        return safetensors.torch.load(bytes(blob))[HIDDEN_NAME]
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise WireError(f"{what}: invalid safetensors ({err})") from None


# -- model parts (RawTensors in runtime format) ------------------------------------------


def _expected_nbytes(qtype: QType, shape: Sequence[int]) -> int:
    block, type_size = GGML_QUANT_SIZES[qtype]
    elements = math.prod(shape)
    if elements % block:
        raise ValueError(f"{elements} elements is not a whole number of {qtype.name} blocks of {block}")
    return elements // block * type_size


def _as_numpy(raw: RawTensor) -> tuple[np.ndarray, str, str]:
    """(C-contiguous little-endian array over the data, "numpy" | "torch", safetensors dtype of the original)."""
    if isinstance(raw.data, torch.Tensor):
        t = raw.data.detach().cpu().contiguous()
        dtype = next((k for k, v in _TORCH_DTYPES.items() if v == t.dtype), None)
        if dtype is None:
            raise ValueError(f"{raw.name}: cannot send a {t.dtype} tensor")
        arr = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
        return arr, "torch", dtype
    arr = np.ascontiguousarray(raw.data)
    dtype = next((k for k, v in _NUMPY_DTYPES.items() if np.dtype(v) == arr.dtype.newbyteorder("=")), None)
    if dtype is None:
        raise ValueError(f"{raw.name}: cannot send a numpy {arr.dtype} array")
    return arr, "numpy", dtype


def pack_tensors(raws: Sequence[RawTensor]) -> bytes:
    """RawTensors -> one safetensors blob; data bytes untouched, array kind (numpy/torch),
    array dtype and shape, qtype and logical shape all restored by unpack_tensors."""
    arrays: dict[str, np.ndarray] = {}
    entries = []
    for raw in raws:
        if raw.name in arrays:
            raise ValueError(f"tensor {raw.name} given twice")
        arr, kind, dtype = _as_numpy(raw)
        if arr.nbytes != _expected_nbytes(raw.qtype, raw.shape):
            raise ValueError(f"{raw.name}: {arr.nbytes} data bytes for {raw.qtype.name} {raw.shape}")
        arrays[raw.name] = arr
        entries.append({"name": raw.name, "qtype": raw.qtype.name, "shape": list(raw.shape),
                        "array": kind, "dtype": dtype})
    return safetensors.numpy.save(arrays, metadata={TENSORS_KEY: json.dumps(entries)})


def unpack_tensors(blob: bytes) -> list[RawTensor]:
    """Inverse of pack_tensors, in the packed order. WireError on anything else."""
    what = "layer tensors"
    header, metadata = _header(blob, what)
    try:
        entries = json.loads(metadata[TENSORS_KEY])
    except (KeyError, ValueError, RecursionError):
        raise WireError(f"{what}: no {TENSORS_KEY} metadata: not sent by fastserve pack_tensors") from None
    if not (isinstance(entries, list) and all(isinstance(e, dict) and isinstance(e.get("name"), str) for e in entries)
            and sorted(e["name"] for e in entries) == sorted(header)):
        raise WireError(f"{what}: the metadata does not list exactly the tensors in the blob")
    for entry in entries:
        _check_entry(entry, header[entry["name"]], what)
    try:
        arrays = safetensors.numpy.load(bytes(blob))
    except (SafetensorError, ValueError, TypeError) as err:
        raise WireError(f"{what}: invalid safetensors ({err})") from None
    out = []
    for entry in entries:
        arr = arrays[entry["name"]]
        data: np.ndarray | torch.Tensor = arr
        if entry["array"] == "torch":
            t = torch.from_numpy(np.array(arr))  # own, writable memory
            data = t.view(torch.bfloat16) if entry["dtype"] == "BF16" else t
        raw = RawTensor(entry["name"], QType[entry["qtype"]], tuple(entry["shape"]), data)
        try:
            check_layout(raw)  # what quant.py takes the row stride and count from
        except ValueError as err:
            raise WireError(f"{what}: {raw.name}: {err}") from None
        out.append(raw)
    return out


def _check_entry(entry: dict, info: dict, what: str) -> None:
    name = entry["name"]
    qtype = entry.get("qtype")
    if not isinstance(qtype, str) or qtype not in QType.__members__ or QType[qtype] not in GGML_QUANT_SIZES:
        raise WireError(f"{what}: {name}: unknown qtype {qtype!r}")
    shape = entry.get("shape")
    if not _int_list(shape) or not shape:
        raise WireError(f"{what}: {name}: bad logical shape {shape!r}")
    try:  # the data's rows and row bytes follow from qtype and shape alone
        rows, row_bytes = block_rows(QType[qtype], tuple(shape))
    except ValueError as err:
        raise WireError(f"{what}: {name}: {err}") from None
    kind, dtype = entry.get("array"), entry.get("dtype")
    if not isinstance(dtype, str):
        raise WireError(f"{what}: {name}: array dtype {dtype!r}")
    allowed = _NUMPY_DTYPES if kind == "numpy" else _TORCH_DTYPES if kind == "torch" else {}
    wire_dtype = "I16" if dtype == "BF16" else dtype
    if dtype not in allowed or info["dtype"] != wire_dtype:
        raise WireError(f"{what}: {name}: array {kind!r} of dtype {dtype!r} stored as {info['dtype']}")
    try:
        expected = _expected_nbytes(QType[qtype], shape)
    except ValueError as err:
        raise WireError(f"{what}: {name}: {err}") from None
    stored = info["data_offsets"][1] - info["data_offsets"][0]
    if stored != expected or math.prod(info["shape"]) * _ITEMSIZE[dtype] != expected:
        raise WireError(f"{what}: {name}: {stored} bytes stored, {qtype} {shape} needs {expected}")
    # a block array must be [rows, row bytes]: [1, nbytes] has the right byte count and a
    # row stride that would have the kernels read past it
    if kind == "numpy" and info["shape"] != [rows, row_bytes // _ITEMSIZE[dtype]]:
        raise WireError(f"{what}: {name}: array {info['shape']} of {dtype}, where {qtype} {shape} is "
                        f"{rows} rows of {row_bytes} bytes")


def sha256_of(raw: RawTensor) -> str:
    """Hex SHA-256 over qtype, logical shape and data bytes: the manifest entry of a tensor."""
    h = hashlib.sha256(f"{raw.qtype.name}|{','.join(map(str, raw.shape))}|".encode())
    if isinstance(raw.data, torch.Tensor):
        h.update(raw.data.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    else:
        h.update(np.ascontiguousarray(raw.data).reshape(-1).view(np.uint8))
    return h.hexdigest()


# -- chunked transfer (FetchLayer) -------------------------------------------------------


def iter_chunks(blob: bytes, chunk_bytes: int = CHUNK_BYTES) -> Iterator[peer_pb2.TensorChunk]:
    """Cut a blob into TensorChunk messages, in order; the last one has `last` set."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    total, view = len(blob), memoryview(blob)
    for index, offset in enumerate(range(0, max(total, 1), chunk_bytes)):
        end = min(offset + chunk_bytes, total)
        yield peer_pb2.TensorChunk(index=index, offset=offset, total_bytes=total,
                                   data=bytes(view[offset:end]), last=end >= total)


def join_chunks(chunks: Iterable[peer_pb2.TensorChunk], *, max_bytes: int) -> bytes:
    """Inverse of iter_chunks; WireError if chunks are missing, out of order, inconsistent,
    larger than max_bytes, or the stream ends before the last chunk."""
    buf = bytearray()
    total = None
    for expected_index, chunk in enumerate(chunks):
        if total is None:
            total = chunk.total_bytes
            if total > max_bytes:
                raise WireError(f"layer blob of {total:,} bytes is larger than the {max_bytes:,} allowed")
        if chunk.index != expected_index or chunk.offset != len(buf) or chunk.total_bytes != total:
            raise WireError(f"chunk {chunk.index} at offset {chunk.offset:,} out of order "
                            f"(expected chunk {expected_index} at {len(buf):,} of {total:,})")
        if len(buf) + len(chunk.data) > total:
            raise WireError(f"chunks add up to more than the announced {total:,} bytes")
        buf += chunk.data
        if chunk.last:
            if len(buf) != total:
                raise WireError(f"last chunk at {len(buf):,} of {total:,} bytes")
            return bytes(buf)
    raise WireError(f"the stream ended after {len(buf):,} of {total or 0:,} bytes, before the last chunk "
                    "(did the sender stop?)")


# -- sampling parameters ------------------------------------------------------------------


def sampling_to_pb(params: SamplingParams) -> peer_pb2.Sampling:
    return peer_pb2.Sampling(
        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p,
        repeat_penalty=params.repeat_penalty, repeat_last_n=params.repeat_last_n,
        seed=params.seed or 0, has_seed=params.seed is not None,
    )


def sampling_from_pb(msg: peer_pb2.Sampling) -> SamplingParams:
    """WireError when the values are out of range (an unset Sampling message is: top_p = 0)."""
    try:
        return SamplingParams(
            temperature=msg.temperature, top_k=msg.top_k, top_p=msg.top_p, min_p=msg.min_p,
            repeat_penalty=msg.repeat_penalty, repeat_last_n=msg.repeat_last_n,
            seed=msg.seed if msg.has_seed else None,
        )
    except FastServeError as err:
        raise WireError(f"sampling parameters out of range: {err}") from None
