"""The model layer on tiny random models of each supported architecture."""

from __future__ import annotations

import pytest
import torch

from bus.errors import FusionError, ModelError
from fusion.kvcache import KVCache
from fusion.models import TINY_MODELS, LanguageModel, ModelSpec

PROMPT = "The colour of Zorbin is red. Q: What is the colour of Zorbin? Answer:"


@pytest.fixture(scope="module", params=sorted(TINY_MODELS))
def model(request) -> LanguageModel:
    return LanguageModel.load(request.param)


def test_prefill_then_continue_equals_full_forward(model: LanguageModel) -> None:
    full = model.prefill(PROMPT + " red")
    split = len(full.ids) - 3
    head = model.prefill(full.ids[:split])
    tail_logits = model.forward_from(head.cache, full.ids[split:])
    assert torch.allclose(tail_logits[-1], full.logits, atol=1e-4)
    assert head.cache.num_tokens == split
    assert head.cache.num_layers == model.num_layers
    assert head.cache.kv_heads == model.kv_heads and head.cache.head_dim == model.head_dim


def test_forward_from_never_mutates_the_cache(model: LanguageModel) -> None:
    pre = model.prefill(PROMPT)
    before = pre.cache.clone()
    model.forward_from(pre.cache, model.encode(" red blue").ids)
    assert pre.cache.num_tokens == before.num_tokens
    for (k, v), (k0, v0) in zip(pre.cache, before, strict=True):
        assert torch.equal(k, k0) and torch.equal(v, v0)


def test_options_scored_identically_with_and_without_cache(model: LanguageModel) -> None:
    options = [" red", " blue sky", " green", " pink and grey"]
    cached = model.score_options(model.prefill(PROMPT), options)
    plain = model.score_options(PROMPT, options)
    # Without any cache: score each option by a full forward of prompt + option.
    prompt_ids = model.encode(PROMPT).ids
    manual = []
    for option in options:
        ids = model.encode(option).ids
        logits, _ = model.forward_ids(torch.tensor([prompt_ids + ids]))
        logp = torch.log_softmax(logits[0, len(prompt_ids) - 1 : -1], dim=-1)
        manual.append(logp.gather(1, torch.tensor(ids)[:, None]).sum())
    assert torch.allclose(cached, plain, atol=1e-5)
    assert torch.allclose(cached, torch.stack(manual), atol=1e-4)


def test_offsets_cover_the_text(model: LanguageModel) -> None:
    text = "Zorbin's café: naïve ☃ test"
    enc = model.encode(text)
    assert len(enc.ids) == len(enc.offsets)
    assert enc.offsets[0][0] == 0 and enc.offsets[-1][1] == len(text)
    assert all(s <= e for s, e in enc.offsets)


def test_generate_is_greedy_and_deterministic(model: LanguageModel) -> None:
    a = model.generate(PROMPT, max_new_tokens=6, stop=None)
    b = model.generate(model.prefill(PROMPT), max_new_tokens=6, stop=None)
    assert a == b
    other = model.next_token_logprobs("Q: Which pet does Kalu have? Answer:")
    assert not torch.equal(model.next_token_logprobs(PROMPT), other)  # greedy over logits that follow the prompt


def test_fingerprints_stable_and_distinct(tmp_path) -> None:
    fps = {name: LanguageModel.load(name).fingerprint for name in TINY_MODELS}
    assert len(set(fps.values())) == len(fps)
    assert LanguageModel.load("tiny-qwen3").fingerprint == fps["tiny-qwen3"]
    other_seed = LanguageModel.build("qwen3", TINY_MODELS["tiny-qwen3"][1], seed=1)
    assert other_seed.fingerprint != fps["tiny-qwen3"]  # same config, different weights


def test_save_and_load_round_trip(tmp_path) -> None:
    m = LanguageModel.load("tiny-llama")
    path = m.save(tmp_path / "ckpt")
    back = LanguageModel.load(path)
    assert back.fingerprint == m.fingerprint
    assert torch.allclose(back.prefill(PROMPT).logits, m.prefill(PROMPT).logits, atol=1e-5)


def test_clear_errors(tmp_path) -> None:
    with pytest.raises(ModelError, match="no model at"):
        LanguageModel.load(tmp_path / "missing")
    with pytest.raises(ModelError, match="no config.json"):
        LanguageModel.load(tmp_path)
    with pytest.raises(ModelError, match="unknown architecture"):
        LanguageModel.build("gpt9", ModelSpec())
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"model_type": "mamba"}')
    with pytest.raises(ModelError, match="supported"):
        LanguageModel.load(tmp_path / "odd")
    with pytest.raises(ModelError, match="empty prompt"):
        LanguageModel.load("tiny-qwen3").prefill("")


def test_kvcache_helpers() -> None:
    layers = [(torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)) for _ in range(3)]
    cache = KVCache(layers)
    assert cache.num_layers == 3 and cache.num_tokens == 5 and cache.batch_size == 2
    assert cache.nbytes == 3 * 2 * 2 * 2 * 5 * 8 * 4
    assert cache.truncate(2).num_tokens == 2
    back = KVCache.from_mapping(cache.as_mapping())
    assert all(torch.equal(a[0], b[0]) for a, b in zip(back, cache, strict=True))
    with pytest.raises(FusionError, match="missing layers"):
        KVCache.from_mapping({0: layers[0], 2: layers[2]}, num_layers=3)
    with pytest.raises(FusionError):
        KVCache([(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 4, 8))])
