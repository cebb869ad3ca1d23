"""Fixtures for ops tests: the quick zoo, built once and cached on disk (later runs reuse it)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def quick_zoo():
    """The quick zoo (seed 0); the first test session builds it (about a minute), later ones load it."""
    from ops.zoo import load_zoo

    return load_zoo(quick=True)


@pytest.fixture(scope="session")
def tiny_real_kit(tmp_path_factory: pytest.TempPathFactory):
    """``(kit directory, FEDREFINE_HOME)`` of a real-style kit on two tiny GGUF models (built once per session,
    ~30 s; its gates uniform): tests that load it set ``FEDREFINE_HOME`` to the second item, where the GGUF
    conversions live."""
    from fusion.models import LanguageModel
    from ops.real.build import build_kit
    from tests.fusion.tiny_gguf import tiny_kit_spec

    root = tmp_path_factory.mktemp("tiny-real")
    home = root / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDREFINE_HOME", str(home))
        spec = tiny_kit_spec(root)
        kit = build_kit(spec)
        # two training steps leave the gate choosing no one: a uniform gate that takes every layer instead, so the
        # benchmarks that run on this kit move caches
        from fusion.gate import GateConfig, GateNetwork, save_gate
        from fusion.registry import FuserRegistry

        registry = FuserRegistry(kit / "fusers")
        fps = [LanguageModel.load(path).fingerprint for path in spec.models.values()]
        for rx in fps:
            profiles = {fp: [1.0] * LanguageModel.load("tiny-llama").num_layers for fp in fps}
            save_gate(GateNetwork(GateConfig(hidden=8, min_weight=0.0), profiles), registry.gate_path(rx), rx)
        return kit, home
