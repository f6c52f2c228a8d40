"""Shared pytest fixtures (append yours below)."""

from __future__ import annotations

import pytest


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """An empty mixq cache for this test (MIXQ_CACHE points into tmp_path)."""
    cache = tmp_path / "mixq-cache"
    monkeypatch.setenv("MIXQ_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A factory of tiny random Hugging Face folders (real architectures), built once per session:
    `tiny_model("llama", num_hidden_layers=5) -> Path`. Treat the folders as read-only."""
    from tiny_models import make_tiny_hf

    root = tmp_path_factory.mktemp("tiny-models")
    made: dict = {}

    def get(arch: str, **overrides):
        key = (arch, tuple(sorted(overrides.items())))
        if key not in made:
            made[key] = make_tiny_hf(arch, root / f"{arch}-{len(made)}", **overrides)
        return made[key]

    return get


def _has_mlx() -> bool:
    try:
        import mlx.core  # noqa: F401
        import mlx_lm  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: no usable mlx here
        return False
    return True


def pytest_collection_modifyitems(config, items):
    """Tests marked `mlx` (mlx as the format's oracle) are skipped where mlx/mlx-lm cannot be imported."""
    if _has_mlx():
        return
    skip = pytest.mark.skip(reason="needs mlx and mlx-lm (pip install 'mixq[mlx]')")
    for item in items:
        if "mlx" in item.keywords:
            item.add_marker(skip)
