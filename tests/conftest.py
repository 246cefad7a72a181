"""Shared fixtures. The real SmolLM2 model is pulled once per machine by the project's own
`pull` into a test home outside the repo, and reused by every later run."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

TEST_HOME = Path(os.environ.get("FASTSERVE_TEST_HOME", Path(tempfile.gettempdir()) / "fastserve-test-home"))


def _pull_smollm2() -> Path:
    from fastserve_edge.models.registry import resolve
    from fastserve_edge.settings import load_settings

    settings = load_settings({"FASTSERVE_HOME": str(TEST_HOME)})
    return resolve("smollm2-135m", settings, pull_missing=True).path


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    override = os.environ.get("FASTSERVE_TEST_SMOLLM2")
    return Path(override) if override else _pull_smollm2()


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
