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
    from ops.real.kit import RealSpec
    from ops.real.world import NotesSpec
    from tests.fusion.tiny_gguf import write_tiny_gguf

    root = tmp_path_factory.mktemp("tiny-real")
    home = root / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDREFINE_HOME", str(home))
        a = LanguageModel.load("tiny-llama")
        b = LanguageModel.load("tiny-llama")
        b.model.model.norm.weight.data.mul_(2.0)  # another model, another fingerprint
        models = {"m1": str(write_tiny_gguf(a, root / "m1.gguf")), "m2": str(write_tiny_gguf(b, root / "m2.gguf"))}
        spec = RealSpec(
            notes=NotesSpec(num_entities=40),
            devices={"a1": "m1", "a2": "m1", "b1": "m2", "b2": "m2"},
            models=models,
            train_questions=16,
            steps=2,
            batch_size=4,
            gate_steps=2,
            held_out=4,
        )
        kit = build_kit(spec)
        # two training steps leave the gate choosing no one: a uniform gate that takes every layer instead, so the
        # benchmarks that run on this kit move caches
        from fusion.gate import GateConfig, GateNetwork, save_gate
        from fusion.registry import FuserRegistry

        registry = FuserRegistry(kit / "fusers")
        fps = [LanguageModel.load(path).fingerprint for path in models.values()]
        for rx in fps:
            profiles = {fp: [1.0] * a.num_layers for fp in fps}
            save_gate(GateNetwork(GateConfig(hidden=8, min_weight=0.0), profiles), registry.gate_path(rx), rx)
        return kit, home
