"""GGUF files: metadata -> ModelConfig, tensors still in their file format (memory-mapped)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf

from fastserve_edge.errors import ModelFormatError, ModelNotFound


def open_reader(path: Path) -> gguf.GGUFReader:
    """A memory-mapped reader; a truncated or foreign file becomes a ModelFormatError."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFound(f"no such model file: {path}")
    try:
        return gguf.GGUFReader(path, "r")
    except (ValueError, KeyError, IndexError, OSError, EOFError) as err:
        raise ModelFormatError(
            f"{path} is not a readable GGUF file ({err}); it may be truncated or corrupt: "
            "download it again (`fastserve pull`)"
        ) from None


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """All key/value fields as plain Python values (strings, numbers, lists)."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = field.contents()
    return out
