"""Fixtures of the data tests."""

from __future__ import annotations

import pytest

from qlora_lite.data.cache import DATA_CACHE_ENV


@pytest.fixture(autouse=True)
def data_cache(tmp_path, monkeypatch):
    """Each test prepares its data into a cache of its own, never into ~/.cache."""
    folder = tmp_path / "data-cache"
    monkeypatch.setenv(DATA_CACHE_ENV, str(folder))
    return folder
