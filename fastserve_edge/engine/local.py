"""One machine running a whole model: open it, build its stages, size its context."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fastserve_edge.models.config import ModelConfig
from fastserve_edge.engine.generate import Pipeline, local_stages
from fastserve_edge.errors import ConfigError
from fastserve_edge.models import open_model

MIN_CTX = 32  # below this no chat template fits


def physical_cores() -> int:
    """Cores, not hyper-threads: a second thread on the same core slows matmuls down."""
    pairs: set[tuple[str, str]] = set()
    physical = core = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("physical id"):
                    physical = line.split(":", 1)[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":", 1)[1].strip()
                    pairs.add((physical, core))
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(len(pairs) or usable, usable))


def set_threads(threads: int | None) -> int:
    n = threads if threads is not None else physical_cores()
    if n < 1:
        raise ConfigError(f"--threads must be at least 1, got {n}")
    torch.set_num_threads(n)
    return n


def choose_ctx(config: ModelConfig, requested: int | None, cap: int) -> int:
    """--ctx, or the model's own context capped at `cap` (the KV cache is preallocated)."""
    if requested is None:
        return max(MIN_CTX, min(config.context_length, cap))
    if not MIN_CTX <= requested <= config.context_length:
        raise ConfigError(
            f"--ctx {requested} is out of range: this model supports {MIN_CTX} to {config.context_length} tokens"
        )
    return requested


@dataclass
class LocalModel:
    path: Path
    source: object        # GGUFModel | HFModel
    config: ModelConfig
    tokenizer: object     # models.tokenizer.Tokenizer
    pipeline: Pipeline


def load_local_model(path: Path, *, ctx: int | None = None, max_ctx: int = 4096) -> LocalModel:
    source = open_model(path)
    tokenizer = source.tokenizer()
    n_ctx = choose_ctx(source.config, ctx, max_ctx)
    pipeline = Pipeline(source.config, local_stages(source, max_tokens=n_ctx), n_ctx)
    return LocalModel(Path(path), source, source.config, tokenizer, pipeline)
