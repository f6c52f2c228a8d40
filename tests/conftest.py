"""Shared pytest fixtures (append yours below)."""

from __future__ import annotations

import pytest


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """An empty mixq cache for this test (MIXQ_CACHE points into tmp_path)."""
    cache = tmp_path / "mixq-cache"
    monkeypatch.setenv("MIXQ_CACHE", str(cache))
    return cache
