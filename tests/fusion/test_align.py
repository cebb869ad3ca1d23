"""Token and layer alignment on hand-made offsets and on real tokenizers with different vocabularies."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from bus.errors import FusionError
from fusion.align import align_cache, align_layers, align_tokens, gather_tokens
from fusion.kvcache import KVCache
from fusion.tokenizer import byte_level_tokenizer, wrap_tokenizer


def test_same_tokenizer_is_the_identity() -> None:
    offsets = [(0, 2), (2, 5), (5, 6), (6, 10)]
    al = align_tokens(offsets, offsets)
    assert al.index.tolist() == [0, 1, 2, 3]
    assert al.coverage.tolist() == [2, 3, 1, 4]


def test_longest_coverage_picks_the_token_sharing_most_characters() -> None:
    receiver = [(0, 3), (3, 6), (6, 7)]
    transmitter = [(0, 2), (2, 5), (5, 7)]
    al = align_tokens(receiver, transmitter)
    assert al.index.tolist() == [0, 1, 2]
    assert al.covering == ((0, 1), (1, 2), (2,))
    assert al.coverage.tolist() == [2, 2, 1]


def test_ties_go_to_the_later_token() -> None:
    assert align_tokens([(0, 4)], [(0, 2), (2, 4)]).index.tolist() == [1]


def test_one_long_transmitter_token_serves_many_receiver_tokens() -> None:
    al = align_tokens([(0, 1), (1, 2), (2, 3), (3, 7)], [(0, 7)])
    assert al.index.tolist() == [0, 0, 0, 0]
    assert al.coverage.tolist() == [1, 1, 1, 4]


def test_tokens_overlapping_nothing_fall_back_to_the_previous_transmitter_token() -> None:
    # The transmitter's offsets skip the space at 3..4 (trimmed offsets); an empty receiver span at the end.
    al = align_tokens([(0, 3), (3, 4), (4, 7), (7, 7)], [(0, 3), (4, 7)])
    assert al.index.tolist() == [0, 0, 1, 1]
    assert al.coverage.tolist() == [3, 0, 3, 0]


def test_bad_offsets_are_an_error() -> None:
    with pytest.raises(FusionError):
        align_tokens([], [(0, 1)])
    with pytest.raises(FusionError):
        align_tokens([(3, 1)], [(0, 3)])


def _trained_bpe(vocab: int):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Zorbin's café is naïve ☃ and the colour of Zorbin is red."] * 50 + ["Answer: A B C D"] * 20
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        ),
    )
    return wrap_tokenizer(tok)


@pytest.mark.parametrize(
    "text", ["Q: What is the colour of Zorbin? A) red\nAnswer:", "Zorbin's café ☃ naïve — 東京 Answer:"]
)
def test_real_tokenizers_with_different_boundaries_and_unicode(text: str) -> None:
    byte_tok, bpe = byte_level_tokenizer(), _trained_bpe(300)

    def offsets(tok):
        return [tuple(o) for o in tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]

    r, t = offsets(byte_tok), offsets(bpe)
    assert len(r) != len(t)  # the boundaries really differ
    al = align_tokens(r, t)
    assert al.num_tokens == len(r)
    assert al.index.tolist() == sorted(al.index.tolist())  # monotone: reading order is kept
    for i, j in enumerate(al.index.tolist()):
        (rs, re), (ts, te) = r[i], t[j]
        if al.coverage[i] > 0:
            assert (
                min(re, te) - max(rs, ts) == al.coverage[i] == max(min(re, t2e) - max(rs, t2s) for t2s, t2e in t)
            )  # longest coverage
        assert j in al.covering[i] or al.coverage[i] == 0
    # Every multi-byte character's byte tokens map to a transmitter token covering that character.
    for i, (rs, re) in enumerate(r):
        if re - rs == 1 and ord(text[rs]) > 127:
            ts, te = t[int(al.index[i])]
            assert ts <= rs < te


def test_layer_alignment_strategies() -> None:
    assert align_layers(4, 3) == [0, 0, 1, 2]  # terminal: last layers meet
    assert align_layers(2, 3) == [1, 2]
    assert align_layers(3, 3) == [0, 1, 2]
    assert align_layers(4, 3, "proportional") == [0, 1, 1, 2]
    assert align_layers(2, 5, "proportional") == [0, 4]
    assert align_layers(1, 3, "proportional") == [2]
    assert align_layers(3, 5, "last") == [4, 4, 4]
    with pytest.raises(FusionError, match="unknown layer alignment"):
        align_layers(4, 3, "diagonal")


def test_gather_puts_transmitter_tokens_on_receiver_positions() -> None:
    k = torch.arange(5, dtype=torch.float32).reshape(1, 1, 5, 1).expand(1, 2, 5, 3).contiguous()
    cache = KVCache([(k, k + 100), (k * 2, k * 2)])
    al = align_tokens([(0, 1), (1, 2), (2, 4)], [(0, 2), (2, 3), (3, 4), (4, 5), (5, 6)])
    out = align_cache(cache, al)
    assert out[0][0].shape == (1, 2, 3, 3)
    assert out[0][0][0, 0, :, 0].tolist() == [0.0, 0.0, 2.0]
    assert out[0][1][0, 0, :, 0].tolist() == [100.0, 100.0, 102.0]
    only_layer_1 = gather_tokens({1: cache.layers[1]}, al.index)
    assert list(only_layer_1) == [1]
    with pytest.raises(FusionError):
        gather_tokens({0: cache.layers[0]}, torch.tensor([7]))
