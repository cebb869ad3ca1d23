"""Model fingerprints: the recipe of docs/PROTOCOL.md section 1.1, recomputed without torch or transformers' models,
gives what the agents announce, and ``python -m fusion.fingerprint`` prints it."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer
from transformers import AutoConfig

from fusion.models import LanguageModel, ModelSpec

VOLATILE = ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype")


def documented_fingerprint(path: Path) -> str:
    """Section 1.1 step by step: config JSON, tokenizer JSON, a sample of every weight as float32."""
    h = hashlib.sha256()
    config = {k: v for k, v in AutoConfig.from_pretrained(path).to_dict().items() if k not in VOLATILE}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(Tokenizer.from_file(str(path / "tokenizer.json")).to_str().encode())
    weights: dict[str, np.ndarray] = {}
    for file in sorted(path.glob("*.safetensors")):
        weights.update(load_file(file))
    if config.get("tie_word_embeddings") and "lm_head.weight" not in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    for name in sorted(weights):
        flat = weights[name].reshape(-1)
        sample = np.concatenate([flat[:64], flat[-64:]]).astype("<f4")
        h.update(name.encode() + str(tuple(weights[name].shape)).encode() + sample.tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("seed", [0, 1])
def test_the_documented_recipe_is_the_fingerprint(tmp_path: Path, seed: int) -> None:
    model = LanguageModel.build("qwen3", ModelSpec(), seed=seed, device="cpu")
    model.save(tmp_path)
    assert documented_fingerprint(tmp_path) == model.fingerprint == LanguageModel.load(tmp_path, "cpu").fingerprint


def test_fingerprints_differ_by_weights(tmp_path: Path) -> None:
    prints = {LanguageModel.build("qwen3", ModelSpec(), seed=s, device="cpu").fingerprint for s in (0, 1, 2)}
    assert len(prints) == 3


def test_the_command_prints_it_and_refuses_a_bad_path(tmp_path: Path) -> None:
    model = LanguageModel.build("llama", ModelSpec(), seed=3, device="cpu")
    model.save(tmp_path / "m")
    run = [sys.executable, "-m", "fusion.fingerprint"]
    out = subprocess.run([*run, str(tmp_path / "m")], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == model.fingerprint
    bad = subprocess.run([*run, str(tmp_path / "absent")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1
