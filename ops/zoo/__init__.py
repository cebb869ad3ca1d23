"""The toy world and its model zoo: ``python -m ops.zoo build [--quick]``; ``load_zoo(quick)`` from Python.

``world`` generates facts and questions, ``tokenizers`` trains the BPE vocabularies, ``rows`` and
``train_lm`` train one model, ``build`` builds and caches a whole zoo, ``zoo`` loads a built one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ops.zoo.zoo import Zoo


def load_zoo(quick: bool, seed: int = 0, build_if_missing: bool = True, workers: int | None = None) -> Zoo:
    """The quick or full zoo for ``seed`` (built and cached on first use); see ``ops.zoo.build.load_zoo``."""
    from ops.zoo.build import load_zoo as _load

    return _load(quick, seed, build_if_missing, workers)


__all__ = ["load_zoo"]
