"""Shared fixtures: a tiny BERT model and tokenizer built on the spot, never downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import ME5_DIR, build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain Hugging Face BERT directory (no sentence-transformers files)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def me5_dir() -> Path:
    if not ME5_DIR.is_dir():
        pytest.skip(f"slow test needs the shared model at {ME5_DIR}, which is absent")
    return ME5_DIR
