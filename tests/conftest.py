"""Shared fixtures. The real SmolLM2 model is pulled once per machine by the project's own
`pull` into a test home outside the repo, and reused by every later run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# `fastserve chat` looks for peers on the LAN by default; tests must not send multicast onto
# a real network. Cluster tests clear this inside the namespaces they build (tests/netns.py).
os.environ["FASTSERVE_LOCAL_ONLY"] = "1"

from tests.models_fixtures import TEST_HOME, smollm2_path as _smollm2_path  # noqa: F401


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return _smollm2_path()


@pytest.fixture(scope="session")
def smollm2_source(smollm2_path):
    from fastserve_edge.models import open_model

    return open_model(smollm2_path)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_path):
    """transformers' own reading of the same GGUF (dequantized to fp32): the oracle."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32).eval()


@pytest.fixture
def fastserve_home(tmp_path, monkeypatch) -> Path:
    """An empty FASTSERVE_HOME for one test."""
    monkeypatch.setenv("FASTSERVE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"
