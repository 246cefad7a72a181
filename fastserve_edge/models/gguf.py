"""GGUF files: metadata -> ModelConfig, tensors still in their file format (memory-mapped).

Conventions of llama.cpp that matter here:
- tensor shapes are stored innermost-first (ne0 = input features); we expose torch order.
- for arch "llama", convert_hf_to_gguf permutes the rows of attn_q/attn_k so that rope can
  rotate adjacent pairs; our decoder rotates halves (as Hugging Face does), so those rows
  are put back here, once, at the file-format boundary. qwen2/qwen3 are stored unpermuted.
- Llama 3.1/3.2 rope scaling is stored as a `rope_freqs.weight` tensor of per-frequency
  divisors (and sometimes `rope.scaling.*` keys).
"""

from __future__ import annotations

import math
import mmap
import struct
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType

from fastserve_edge.models.config import SUPPORTED_ARCHS, ModelConfig, RopeScaling
from fastserve_edge.errors import ModelFormatError, ModelNotFound
from fastserve_edge.models.tensors import MAX_DIMS, SUPPORTED_TYPES, RawTensor, block_rows

_SUPPORTED_TYPE_NAMES = ", ".join(t.name for t in SUPPORTED_TYPES)


class GGUFTensorInfo(NamedTuple):
    name: str
    tensor_type: QType
    shape: tuple[int, ...]      # ggml order: ne0 (innermost, input features) first
    n_elements: int
    n_bytes: int
    data_offset: int            # absolute position in the file
    data: np.ndarray            # memory-mapped uint8 [rows, bytes_per_row]


class GGUFFile:
    """The header of a GGUF file (metadata + tensor table) over one read-only memory map.

    gguf-py's GGUFReader builds a numpy view per string, which costs seconds on a
    128k-token vocabulary; this reads the same format with struct in a fraction of that.
    Layout: magic "GGUF", u32 version (2, 3), u64 n_tensors, u64 n_kv, the key/values,
    the tensor infos, then tensor data at an `general.alignment` boundary (default 32).

    Nothing in the header is trusted: every count is checked against the bytes left before
    anything is allocated or looped over, so a corrupt or hostile file is a ValueError
    (open_reader: ModelFormatError), never a crash or an allocation the file cannot back.
    """

    _SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    _NUMPY = {0: np.uint8, 1: np.int8, 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: np.bool_, 10: "<u8", 11: "<i8", 12: "<f8"}
    STRING, ARRAY = 8, 9
    MAX_NESTING = 4  # arrays of arrays: gguf-py writes them; no model we read has any

    def __init__(self, path: Path):
        self.path = path
        self.size = path.stat().st_size
        self.map = np.memmap(path, dtype=np.uint8, mode="r")  # the tensors' views
        with open(path, "rb") as f:  # the header's: its slices are bytes, no view object each
            self.buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._read_header()
        finally:
            self.buf.close()

    def _read_header(self) -> None:
        self.pos = 0
        if self._bytes(4) != b"GGUF":
            raise ValueError("no GGUF magic at the start")
        version = self._scalar(4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (supported: 2, 3)")
        n_tensors, n_kv = self._scalar(10), self._scalar(10)
        self._room(n_kv, 12, "metadata keys")  # each: a string length (8) and a type (4) at least
        self._room(n_tensors, 24, "tensor infos")  # name length, dim count, type, offset
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._scalar(4))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._scalar(4)
            if not 1 <= n_dims <= MAX_DIMS:
                raise ValueError(f"tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
            dims = tuple(self._scalar(10) for _ in range(n_dims))
            infos.append((name, dims, self._scalar(4), self._scalar(10)))
        align = self.metadata.get("general.alignment", 32)
        if type(align) is not int or not (8 <= align <= 1 << 20 and align % 8 == 0):
            raise ValueError(f"general.alignment is {align!r} (a multiple of 8 up to 1 MiB expected)")
        self.align = align
        self.data_offset = -(-self.pos // align) * align
        self.tensors = [self._tensor(*info) for info in infos]

    def _room(self, count: int, each: int, what: str) -> None:
        """ValueError unless `count` items of at least `each` bytes can follow in the file."""
        if count * each > self.size - self.pos:
            raise ValueError(f"{count:,} {what} cannot fit the {self.size - self.pos:,} bytes left at byte {self.pos:,}")

    def _bytes(self, n: int) -> bytes:
        if self.pos + n > self.size:
            raise ValueError(f"header runs past the end of the file at byte {self.pos:,}")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def _scalar(self, vtype: int) -> Any:
        fmt = self._SCALARS.get(vtype)
        if fmt is None:
            raise ValueError(f"unknown metadata value type {vtype}")
        (value,) = struct.unpack(fmt, self._bytes(struct.calcsize(fmt)))
        return value

    def _string(self) -> str:
        return self._strings(1)[0]

    _LENGTH = struct.Struct("<Q")

    def _strings(self, count: int) -> list[str]:
        """An array of strings in one loop: a 128k vocabulary with its merges is ~180k of
        them, and a call chain per string (_string) took 0.35 s of a 1B model's load."""
        self._room(count, 8, "strings")
        buf, pos, size, out = self.buf, self.pos, self.size, []
        length = self._LENGTH.unpack_from
        for _ in range(count):
            (n,) = length(buf, pos)  # struct.error past the end of the file
            pos += 8
            if pos + n > size:
                raise ValueError(f"header runs past the end of the file at byte {pos:,}")
            out.append(buf[pos:pos + n].decode("utf-8", errors="replace"))
            pos += n
        self.pos = pos
        return out

    def _value(self, vtype: int, depth: int = 0) -> Any:
        if vtype == self.STRING:
            return self._string()
        if vtype != self.ARRAY:
            return self._scalar(vtype)
        item, count = self._scalar(4), self._scalar(10)
        if item == self.STRING:
            return self._strings(count)
        if item == self.ARRAY:
            if depth >= self.MAX_NESTING:
                raise ValueError(f"metadata arrays nested deeper than {self.MAX_NESTING} at byte {self.pos:,}")
            self._room(count, 12, "nested arrays")  # each: item type (4) and count (8)
            return [self._value(self.ARRAY, depth + 1) for _ in range(count)]
        dtype = np.dtype(self._NUMPY.get(item) or _unknown(item))
        return np.frombuffer(self._bytes(count * dtype.itemsize), dtype=dtype).tolist()

    def _tensor(self, name: str, dims: tuple[int, ...], type_id: int, offset: int) -> GGUFTensorInfo:
        try:
            qtype = QType(type_id)
        except ValueError:
            raise ModelFormatError(f"{self.path.name}: tensor {name} has unknown type id {type_id}; "
                                   f"supported types: {_SUPPORTED_TYPE_NAMES}") from None
        try:  # dims in ggml order: the row (ne0) first; Python ints (np.prod wraps)
            rows, row_bytes = block_rows(qtype, tuple(reversed(dims)))
        except ValueError as err:
            raise ValueError(f"tensor {name} of {qtype.name} {list(dims)}: {err}") from None
        n_elements, n_bytes = math.prod(dims), rows * row_bytes
        if offset % self.align:
            raise ValueError(f"tensor {name} at offset {offset:,}, not a multiple of the alignment {self.align}")
        start = self.data_offset + offset
        if start + n_bytes > self.size:
            raise ModelFormatError(
                f"{self.path} is truncated: tensor {name} ends at byte {start + n_bytes:,} "
                f"but the file has {self.size:,} bytes; download it again (`fastserve pull`)"
            )
        data = self.map[start:start + n_bytes].reshape(rows, row_bytes)
        return GGUFTensorInfo(name, qtype, dims, n_elements, n_bytes, start, data)


def _unknown(item: int) -> str:
    raise ValueError(f"unknown metadata array type {item}")


def open_reader(path: Path) -> GGUFFile:
    """The file's header over a memory map; a truncated or foreign file is a ModelFormatError."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFound(f"no such model file: {path}")
    try:
        return GGUFFile(path)
    except (ValueError, struct.error, UnicodeDecodeError, OSError, OverflowError, MemoryError) as err:
        raise ModelFormatError(
            f"{path} is not a readable GGUF file ({err}); it may be truncated or corrupt: "
            "download it again (`fastserve pull`)"
        ) from None


def read_metadata(reader: GGUFFile) -> dict[str, Any]:
    """All key/value fields as plain Python values (strings, numbers, lists)."""
    return dict(reader.metadata)


def parameter_count(reader: GGUFFile) -> int:
    return sum(int(t.n_elements) for t in reader.tensors)


def quantization_label(reader: GGUFFile) -> str | None:
    """"Q4_1", "Q4_K_M"...: general.file_type when it names one, else the type holding most weights."""
    file_type = reader.metadata.get("general.file_type")
    if file_type is not None:
        try:
            return gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except (ValueError, TypeError, OverflowError):
            pass
    by_type: dict[str, int] = {}
    for t in reader.tensors:
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + int(t.n_elements)
    return max(by_type, key=by_type.__getitem__) if by_type else None


def config_from_metadata(meta: dict[str, Any], tensor_names: set[str], path: Path) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ModelFormatError(
            f"{path.name}: architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHS)}"
        )

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ModelFormatError(f"{path.name}: metadata key {arch}.{name} is missing; the file is incomplete")
        return value

    try:
        return _config(meta, tensor_names, path, arch, key)
    except (ValueError, TypeError, OverflowError, ZeroDivisionError) as err:
        raise ModelFormatError(f"{path.name}: its metadata describes no model we can run ({err}); "
                               "the file is corrupt or was converted wrongly: download or convert it again") from None


def _number(value: Any, kind: type) -> Any:
    """int or float of a metadata scalar; TypeError for a string, an array, a bool (a float for an int)."""
    if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
        raise TypeError(f"{value!r} where {'an integer' if kind is int else 'a number'} belongs")
    return kind(value)


def _config(meta: dict[str, Any], tensor_names: set[str], path: Path, arch: str, key) -> ModelConfig:
    n_heads = _number(key("attention.head_count"), int)
    dim = _number(key("embedding_length"), int)
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = meta.get(f"{arch}.vocab_size") or (len(tokens) if isinstance(tokens, list) else 0)
    if not vocab:
        raise ModelFormatError(f"{path.name}: no vocabulary size (neither {arch}.vocab_size nor tokenizer tokens)")
    scaling = None
    if str(meta.get(f"{arch}.rope.scaling.type", "")).lower() == "llama3" or "rope_freqs.weight" in tensor_names:
        scaling = RopeScaling(
            factor=_number(meta.get(f"{arch}.rope.scaling.factor", 8.0), float),
            original_context_length=_number(meta.get(f"{arch}.rope.scaling.original_context_length", 8192), int),
        )
    if n_heads <= 0:
        raise ValueError(f"{n_heads} attention heads")
    n_experts = _number(meta.get(f"{arch}.expert_count", 0), int)
    moe = {}
    if n_experts:  # qwen3moe; llama with experts (Mixtral): expert_feed_forward_length or the FFN's own
        moe = dict(n_experts=n_experts, n_experts_used=_number(key("expert_used_count"), int),
                   expert_ffn_dim=_number(meta.get(f"{arch}.expert_feed_forward_length")
                                          or key("feed_forward_length"), int),
                   norm_topk=bool(meta.get(f"{arch}.expert_weights_norm", True)))
    n_layers = _number(key("block_count"), int)
    head_dim = _number(key("attention.key_length", dim // n_heads), int)
    extra = _gemma3_fields(meta, path, n_layers, dim, n_heads, head_dim) if arch == "gemma3" else {}
    return ModelConfig(
        arch=arch,
        n_layers=n_layers,
        dim=dim,
        n_heads=n_heads,
        n_kv_heads=_number(key("attention.head_count_kv", n_heads), int),
        head_dim=head_dim,
        ffn_dim=_number(key("feed_forward_length"), int),
        vocab_size=_number(vocab, int),
        context_length=_number(key("context_length", 2048), int),
        norm_eps=_number(key("attention.layer_norm_rms_epsilon", 1e-5), float),
        rope_theta=_number(key("rope.freq_base", 10000.0), float),
        rope_scaling=scaling,
        tie_embeddings="output.weight" not in tensor_names,
        attn_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        name=str(meta.get("general.name", path.stem)),
        **moe,  # norm_topk: llama.cpp renormalizes the chosen experts' weights for both families
        **extra,
    )


GEMMA3_27B_LAYERS = 62  # llama.cpp's LLM_TYPE_27B for gemma3


def _gemma3_fields(meta: dict[str, Any], path: Path, n_layers: int, dim: int, n_heads: int,
                   head_dim: int) -> dict[str, Any]:
    """What a gemma3 GGUF says beyond a llama one, read as llama.cpp's loader does (llama-model.cpp):
    a sliding window only when `attention.sliding_window` is there, every 6th layer global
    (or `attention.sliding_window_pattern`), local rope base 10000 (or `rope.freq_base_swa`),
    linear rope scaling on the global layers, and no query_pre_attn_scalar key: 27B scales by
    dim / n_heads, the others by head_dim. The norm weights are stored with Gemma's +1 in them
    (convert_hf_to_gguf adds it), so they are plain RMSNorm weights here."""
    for cap in ("final_logit_softcapping", "attn_logit_softcapping"):
        if meta.get(f"gemma3.{cap}"):
            raise ModelFormatError(f"{path.name}: gemma3.{cap} is set; logit soft-capping is not supported "
                                   "(Gemma 3 has none: this file is not a Gemma 3 conversion we can run)")
    window = _number(meta.get("gemma3.attention.sliding_window", 0), int)
    pattern = meta.get("gemma3.attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):  # per layer, true: sliding (gguf-py's add_sliding_window_pattern)
        pattern = _period(pattern, path)
    scaling = str(meta.get("gemma3.rope.scaling.type", "none")).lower()
    if scaling not in ("none", "linear"):
        raise ModelFormatError(f"{path.name}: gemma3 rope scaling {scaling!r} is not supported; supported: linear")
    return dict(
        post_norms=True, gelu_ffn=True, scale_embeddings=True,  # qk_norm: from its tensors, as qwen3
        query_pre_attn_scalar=float(dim // n_heads if n_layers == GEMMA3_27B_LAYERS else head_dim),
        sliding_window=window, sliding_pattern=_number(pattern, int) if window else 0,
        rope_local_theta=_number(meta.get("gemma3.rope.freq_base_swa", 10000.0), float),
        rope_linear_factor=_number(meta.get("gemma3.rope.scaling.factor", 1.0), float) if scaling == "linear" else 1.0,
    )


def _period(sliding: list, path: Path) -> int:
    """The pattern p of per-layer sliding flags that say: layer i is global iff (i + 1) % p == 0."""
    for p in range(1, len(sliding) + 2):
        if [bool((i + 1) % p) for i in range(len(sliding))] == [bool(v) for v in sliding]:
            return p
    raise ModelFormatError(f"{path.name}: its sliding-window layers {sliding} follow no 'every n-th layer "
                           "global' pattern; only that layout is supported")


def _unpermute_rows(n_out: int, n_head: int) -> np.ndarray:
    """Row index that undoes llama.cpp's q/k permute (pairs -> halves within each head)."""
    half = n_out // n_head // 2
    # permute(w) = w.reshape(n_head, 2, half, ...).swapaxes(1, 2): row (h, i, j) came from (h, j, i)
    return np.arange(n_out).reshape(n_head, half, 2).swapaxes(1, 2).reshape(-1)


EXPERT_TENSORS = {"ffn_gate_exps": "ffn_gate", "ffn_up_exps": "ffn_up", "ffn_down_exps": "ffn_down"}


def _split_experts(tensors: dict[str, GGUFTensorInfo], config: ModelConfig) -> dict[str, tuple[GGUFTensorInfo, int]]:
    """Every expert of a block's `ffn_*_exps` tensor [experts, rows, cols] as a matrix of its own,
    `blk.N.ffn_gate.E.weight` (the name older Mixtral files use): E's rows of the 3-D tensor,
    so a peer is sent, and a token reads, only the experts it needs. -> name: (tensor, expert)."""
    out: dict[str, tuple[GGUFTensorInfo, int]] = {}
    for name, t in tensors.items():
        parts = name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in EXPERT_TENSORS and parts[3] == "weight":
            if len(t.shape) != 3 or t.shape[2] != config.n_experts:
                raise ModelFormatError(f"tensor {name} has shape {list(reversed(t.shape))}, not {config.n_experts} "
                                       "experts: the file is corrupt or was converted wrongly; download it again")
            for e in range(config.n_experts):
                out[f"blk.{parts[1]}.{EXPERT_TENSORS[parts[2]]}.{e}.weight"] = (t, e)
    return out


VOCABULARY_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.scores")


class GGUFModel:
    """A GGUF file opened in place: config, tokenizer metadata, tensors by canonical name."""

    kind = "gguf"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.reader = open_reader(self.path)
        self.metadata = read_metadata(self.reader)
        self._tensors = {t.name: t for t in self.reader.tensors}
        self.config = config_from_metadata(self.metadata, set(self._tensors), self.path)
        self._experts = _split_experts(self._tensors, self.config) if self.config.moe else {}
        self._tokenizer = None
        for t in self.reader.tensors:
            if t.tensor_type not in SUPPORTED_TYPES:
                raise ModelFormatError(
                    f"{self.path.name}: tensor {t.name} has type {t.tensor_type.name}, which is not "
                    f"supported; supported types: {_SUPPORTED_TYPE_NAMES}. Re-quantize the model "
                    "to one of them (e.g. llama-quantize ... Q4_K_M)"
                )
            want, got = self.config.weight_shape(t.name), tuple(reversed(t.shape))
            if want is not None and got != want:
                c = self.config
                raise ModelFormatError(
                    f"{self.path.name}: tensor {t.name} has shape {list(got)}, but the file's metadata (dim {c.dim}, "
                    f"{c.n_heads} heads of {c.head_dim}, {c.n_kv_heads} kv heads, ffn {c.ffn_dim}, vocabulary "
                    f"{c.vocab_size}) gives it {list(want)}: the file is corrupt or was converted wrongly; "
                    "download or convert it again")

    def has(self, name: str) -> bool:
        return name in self._experts or (name in self._tensors and not self._is_experts(name))

    def names(self) -> list[str]:
        return sorted([n for n in self._tensors if not self._is_experts(n)] + list(self._experts))

    def _is_experts(self, name: str) -> bool:
        return self.config.moe and name.split(".")[2:3] in ([k] for k in EXPERT_TENSORS)

    def tensor(self, name: str) -> RawTensor:
        if name in self._experts:
            t, e = self._experts[name]
            rows = t.data.shape[0] // self.config.n_experts
            shape = tuple(int(n) for n in reversed(t.shape[:2]))
            return RawTensor(name, t.tensor_type, shape, t.data[e * rows:(e + 1) * rows])
        t = self._tensors.get(name) if not self._is_experts(name) else None
        if t is None:
            raise ModelFormatError(f"{self.path.name}: tensor {name} is missing; the file is incomplete or not a {self.config.arch} model")
        shape = tuple(int(n) for n in reversed(t.shape))
        if self.config.arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = self.config.n_heads if "attn_q" in name else self.config.n_kv_heads
            # read, not mapped: the file's row order is used once, for this copy, and its pages
            # would otherwise stay resident beside it (47 MiB of a 1B model's q and k)
            return RawTensor(name, t.tensor_type, shape, self._read(t)).take_rows(_unpermute_rows(shape[0], heads))
        return RawTensor(name, t.tensor_type, shape, t.data)

    def _read(self, t: GGUFTensorInfo) -> np.ndarray:
        """A tensor's bytes read into memory of its own, shaped like its mapped view."""
        with open(self.path, "rb") as f:
            f.seek(t.data_offset)
            data = np.fromfile(f, dtype=np.uint8, count=t.n_bytes)
        if data.size != t.n_bytes:
            raise ModelFormatError(f"{self.path} is truncated inside tensor {t.name}; download it again (`fastserve pull`)")
        return data.reshape(t.data.shape)

    def tokenizer(self):
        """Built once; then the vocabulary's Python lists (~5 MiB on SmolLM2, more on a 128k
        vocabulary) are dropped: the tokenizer holds its own copy."""
        from fastserve_edge.models.tokenizer import Tokenizer

        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_gguf_metadata(self.metadata)
            for key in VOCABULARY_ARRAYS:
                self.metadata.pop(key, None)
                self.reader.metadata.pop(key, None)
        return self._tokenizer

    @cached_property
    def quantization(self) -> str | None:
        return quantization_label(self.reader)

    @cached_property
    def n_params(self) -> int:
        return parameter_count(self.reader)
