"""What a model IS: resolve a reference, read its files. No math, no network serving."""

from __future__ import annotations

from pathlib import Path

from fastserve_edge.errors import ModelNotFound


def open_model(path: Path):
    """A GGUF file or an HF folder, opened in place (GGUFModel | HFModel).

    Turning a reference such as "smollm2-135m" or "ollama:llama3" into a path is
    registry.py's job; this only opens what is already on disk.
    """
    from fastserve_edge.models.gguf import GGUFModel
    from fastserve_edge.models.hf import HFModel

    path = Path(path)
    if path.is_dir():
        return HFModel(path)
    if not path.exists():
        raise ModelNotFound(f"no such model file or folder: {path}")
    return GGUFModel(path)
