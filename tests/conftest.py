"""Shared test helpers: locating the assets in ../shared (CI has them; a user's machine may not)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("PREFTUNE_SHARED", REPO_ROOT.parent / "shared"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def shared_asset(relpath: str) -> Path:
    """Path of an asset under shared/assets; skip the test when absent, fail under CI (CI=true)."""
    path = SHARED_DIR / "assets" / relpath
    if not path.exists():
        message = f"shared asset missing: {path} (set PREFTUNE_SHARED to the shared/ folder)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def stories_model_dir() -> Path:
    """The real 260K-parameter Llama from shared/assets (no pad token: use unk)."""
    return shared_asset("stories260K-hf")
