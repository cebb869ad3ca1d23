"""The KV-inversion attacker: it reads tokens back where a cache holds them, and the leakage benchmark's pieces."""

from __future__ import annotations

import pytest
import torch

from fusion.kvcache import KVCache
from fusion.models import LanguageModel
from fusion.prompts import Question
from privacy.inversion import (
    BagInverter,
    TokenInverter,
    detail_read,
    position_features,
    recall,
    span_positions,
)

VOCAB, HEADS, DIM = 40, 2, 16


@pytest.fixture(autouse=True)
def _one_thread():
    """Small MLPs on a shared machine: torch's thread pool costs 40x here when the cores are busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cache(ids: list[int], table: torch.Tensor, mix: bool) -> KVCache:
    """A one-layer cache whose K at each position is that token's vector (V: the running mean, when ``mix``)."""
    k = table[ids].reshape(1, len(ids), HEADS, DIM).permute(0, 2, 1, 3)  # (1, H, T, D)
    v = k.cumsum(2) / torch.arange(1, len(ids) + 1).reshape(1, 1, -1, 1) if mix else k
    return KVCache([(k, v)])


def test_features_are_each_positions_k_and_v_of_every_layer() -> None:
    k = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4)
    cache = KVCache([(k, -k), (2 * k, -2 * k)])
    feats = position_features(cache)
    assert feats.shape == (3, 2 * 2 * 2 * 4)
    assert torch.equal(feats[1, :8], k[0, :, 1, :].reshape(-1)) and torch.equal(
        feats[2, 8:16], -k[0, :, 2, :].reshape(-1)
    )
    assert torch.equal(position_features(cache, [2]), feats[2:])
    assert span_positions([(0, 2), (2, 5), (5, 9), (9, 9)], 2, 9) == [1, 2]


def test_a_cache_that_holds_its_tokens_is_read_back() -> None:
    g = torch.Generator().manual_seed(0)
    table = torch.randn(VOCAB, HEADS * DIM, generator=g)
    texts = [torch.randint(0, VOCAB, (8,), generator=g).tolist() for _ in range(400)]
    token_inv = TokenInverter.fit([(position_features(_cache(t, table, False)), t) for t in texts], VOCAB, steps=300)
    bag_inv = BagInverter.fit([(position_features(_cache(t, table, True))[-1], t) for t in texts], VOCAB, steps=800)
    held_out = [torch.randint(0, VOCAB, (8,), generator=g).tolist() for _ in range(20)]
    per_position = [token_inv.read(position_features(_cache(t, table, False))) == t for t in held_out]
    assert sum(per_position) >= 18  # a cache that is the tokens gives them all back
    bags = [recall(bag_inv.read(position_features(_cache(t, table, True))[-1], k=8), t) for t in held_out]
    assert sum(bags) / len(bags) > 0.5  # the mean of a text's vectors still says much of what it held


def test_recall_and_detail_reading() -> None:
    assert recall([1, 2, 3], [1, 1, 2]) == 2 / 3 and recall([], []) == 1.0
    assert detail_read(top=[5, 6, 1], detail=[1, 5, 6], sent=[1, 2])  # its own tokens 5 and 6 were read
    assert not detail_read(top=[5, 1], detail=[1, 5, 6], sent=[1, 2])
    assert not detail_read(top=[1, 2], detail=[1, 2], sent=[1, 2])  # nothing beyond the sent text: not evidence


def test_the_benchmark_attacks_a_real_model_and_its_control_reads_the_details() -> None:
    from ops.bench.leakage import attack_model, attacker_texts

    model = LanguageModel.load("tiny-llama")
    opts = ("red", "blue", "green", "pink")
    train = [
        Question(
            id=f"t{i}",
            stem=f"Hi, I'm Mara Velt {i}. What is the color of Zorbin{i}?",
            options=opts,
            answer=0,
            pii=(f"Mara Velt {i}",),
        )
        for i in range(12)
    ] + [Question(id=f"p{i}", stem=f"What is the color of Kalu{i}?", options=opts, answer=1) for i in range(12)]
    q = Question(
        id="x",
        stem="Hi, I'm Mara Velt 99. What is the color of Zorbin3?",
        options=opts,
        answer=0,
        pii=("Mara Velt 99",),
    )
    out = attack_model(model, attacker_texts(train, 20), [(q, "What is the color of Zorbin3?")], steps=60)
    assert set(out) >= {"qprime_token_recovery", "planted_details_recovered", "control_if_q_were_sent"}
    assert out["planted_details_recovered"]["full_cache"] == 0.0  # the detail is not in q': nothing to read
    for value in (*out["qprime_token_recovery"].values(), *out["control_if_q_were_sent"].values()):
        assert value is None or 0.0 <= value <= 1.0
