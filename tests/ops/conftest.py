"""Fixtures for ops tests: the quick zoo, built once and cached on disk (later runs reuse it)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def quick_zoo():
    """The quick zoo (seed 0); the first test session builds it (about a minute), later ones load it."""
    from ops.zoo import load_zoo

    return load_zoo(quick=True)
