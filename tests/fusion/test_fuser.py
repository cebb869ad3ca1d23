"""The pair fuser on tiny random models of every architecture pair."""

from __future__ import annotations

import itertools

import pytest
import torch

from bus.errors import FusionError
from fusion.align import align_cache
from fusion.c2c import letter_logits, prefix_alignment, prefix_cache, question_texts, receiver_view
from fusion.fuser import FuserConfig, PairFuser, apply_deltas, fuse
from fusion.models import TINY_MODELS, LanguageModel

STEM = "What is the colour of Zorbin?"
OPTIONS = ("red", "blue", "green", "pink")


@pytest.fixture(scope="module")
def models() -> dict[str, LanguageModel]:
    return {name: LanguageModel.load(name) for name in sorted(TINY_MODELS)}


def _setup(receiver: LanguageModel, transmitter: LanguageModel, private: bool = False):
    shared, original = question_texts(STEM, OPTIONS, "Which colour has Zorbin?" if private else None)
    view = receiver_view(receiver, shared, original)
    t_pre = transmitter.prefill(shared)
    return view, prefix_cache(receiver, view), align_cache(t_pre.cache, prefix_alignment(view, t_pre.offsets))


def _fuser(receiver: LanguageModel, transmitter: LanguageModel, seed: int = 0, **kw) -> PairFuser:
    torch.manual_seed(seed)
    return PairFuser(FuserConfig.for_models(receiver, transmitter, hidden=32, delta_init_std=0.1, **kw)).eval()


@pytest.mark.parametrize("pair", list(itertools.product(sorted(TINY_MODELS), repeat=2)), ids=lambda p: "->".join(p))
def test_output_shapes_for_every_architecture_pair(models, pair) -> None:
    receiver, transmitter = models[pair[1]], models[pair[0]]
    view, prefix, aligned = _setup(receiver, transmitter)
    fuser = _fuser(receiver, transmitter)
    fused = fuser(prefix, aligned)
    assert fused.num_layers == receiver.num_layers
    for (k, v), (k0, v0) in zip(fused, prefix, strict=True):
        assert k.shape == k0.shape == (1, receiver.kv_heads, len(view.prefix_ids), receiver.head_dim)
        assert v.shape == v0.shape
        assert not torch.equal(k, k0)  # the fuser really adds something
    assert letter_logits(receiver, fused, view).shape == (4,)


def test_a_closed_gate_leaves_the_receiver_answer_unchanged(models) -> None:
    receiver, transmitter = models["tiny-qwen3"], models["tiny-llama"]
    view, prefix, aligned = _setup(receiver, transmitter)
    fuser = _fuser(receiver, transmitter)
    with torch.no_grad():
        fuser.gate_logits.fill_(-5.0)
    fused = fuser(prefix, aligned)
    for (k, v), (k0, v0) in zip(fused, prefix, strict=True):
        assert torch.equal(k, k0) and torch.equal(v, v0)
    assert torch.equal(letter_logits(receiver, fused, view), letter_logits(receiver, prefix, view))
    # Private format (the original question read after the fused prefix) too.
    view, prefix, aligned = _setup(receiver, transmitter, private=True)
    assert torch.equal(letter_logits(receiver, fuser(prefix, aligned), view), letter_logits(receiver, prefix, view))


def test_weight_zero_is_the_receiver_and_weights_scale_the_delta(models) -> None:
    receiver, transmitter = models["tiny-qwen2"], models["tiny-qwen3"]
    _, prefix, aligned = _setup(receiver, transmitter)
    fuser = _fuser(receiver, transmitter)
    with torch.no_grad():
        zero = fuser(prefix, aligned, weight=0.0)
        half = fuser(prefix, aligned, weight=0.5)
        full = fuser(prefix, aligned, weight=1.0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(zero, prefix, strict=True))
    for (kh, _), (kf, _), (k0, _) in zip(half, full, prefix, strict=True):
        assert torch.allclose(kh - k0, 0.5 * (kf - k0), atol=1e-6)


def test_only_receiver_layers_reading_a_received_layer_change(models) -> None:
    receiver, transmitter = models["tiny-qwen3"], models["tiny-llama"]  # 2 receiver layers read llama layers [1, 2]
    _, prefix, aligned = _setup(receiver, transmitter)
    fuser = _fuser(receiver, transmitter)
    assert fuser.layer_map == [1, 2]
    with torch.no_grad():
        fused = fuser(prefix, {2: aligned[2]})
    assert torch.equal(fused.layers[0][0], prefix.layers[0][0])
    assert not torch.equal(fused.layers[1][0], prefix.layers[1][0])
    assert fuser.transmitter_layers_used() == [1, 2]
    with torch.no_grad():
        fuser.gate_logits[0] = -1.0
    assert fuser.transmitter_layers_used() == [2]


def test_several_transmitters_sum_their_deltas(models) -> None:
    receiver = models["tiny-qwen3"]
    parts = []
    for name in ("tiny-llama", "tiny-qwen2"):
        _, prefix, aligned = _setup(receiver, models[name])
        parts.append((_fuser(receiver, models[name]), aligned, 0.7))
    with torch.no_grad():
        both = fuse(prefix, parts)
        by_hand = apply_deltas(prefix, [f.deltas(prefix, a, w) for f, a, w in parts])
        first = fuse(prefix, parts[:1])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(both, by_hand, strict=True))
    assert not torch.equal(both.layers[1][0], first.layers[1][0])


def test_gates_are_relaxed_while_training_and_hard_at_inference(models) -> None:
    fuser = _fuser(models["tiny-qwen3"], models["tiny-llama"])
    fuser.train()
    fuser.tau = 0.5
    soft = fuser.gates(torch.Generator().manual_seed(0))
    assert ((soft > 0) & (soft < 1)).all()
    fuser.eval()
    assert fuser.gates().tolist() == [1.0, 1.0]


def test_mismatched_caches_are_an_error(models) -> None:
    receiver, transmitter = models["tiny-qwen3"], models["tiny-llama"]
    _, prefix, aligned = _setup(receiver, transmitter)
    wrong = _fuser(receiver, models["tiny-qwen2"])  # expects qwen2's heads
    with pytest.raises(FusionError, match="transmitter layer"):
        wrong(prefix, aligned)
    fuser = _fuser(receiver, transmitter)
    with pytest.raises(FusionError, match="align the tokens"):
        fuser(prefix, {k: (a[:, :, :3], b[:, :, :3]) for k, (a, b) in aligned.items()})
    with pytest.raises(FusionError, match="receiver cache"):
        fuser(_setup(models["tiny-qwen2"], transmitter)[1], aligned)


@pytest.mark.parametrize("window", [1, 3])
def test_a_padded_batch_gets_each_rows_own_window_deltas(models, window: int) -> None:
    """Rows of different lengths, right-padded (one shorter than the window): each row's deltas equal those of the
    row alone, zero on its padding, and gradients reach the fuser through every row's window."""
    from fusion.kvcache import KVCache
    from fusion.train import pad_layers

    receiver, transmitter = models["tiny-qwen3"], models["tiny-llama"]
    _, prefix, aligned = _setup(receiver, transmitter)
    cuts = [prefix.num_tokens, 2, 1 if window > 1 else 5]  # the last row is shorter than a window of 3
    rows = [
        (
            KVCache([(k[:, :, :n], v[:, :, :n]) for k, v in prefix]),
            {i: (k[:, :, :n], v[:, :, :n]) for i, (k, v) in aligned.items()},
        )
        for n in cuts
    ]
    T = max(cuts)
    batch = KVCache([pad_layers([r.layers[i] for r, _ in rows], T) for i in range(prefix.num_layers)])
    batch_aligned = {i: pad_layers([a[i] for _, a in rows], T) for i in aligned}
    fuser = _fuser(receiver, transmitter, window=window)
    got = fuser.deltas(batch, batch_aligned, weight=torch.tensor([1.0, 0.5, 2.0]), lengths=torch.tensor(cuts))
    for b, ((r, a), n, w) in enumerate(zip(rows, cuts, (1.0, 0.5, 2.0), strict=True)):
        alone = fuser.deltas(r, a, weight=w)
        for layer, (dk, dv) in alone.items():
            torch.testing.assert_close(got[layer][0][b : b + 1, :, :n], dk)
            torch.testing.assert_close(got[layer][1][b : b + 1, :, :n], dv)
            assert not got[layer][0][b, :, n:].any() and not got[layer][1][b, :, n:].any()
    fuser.train()
    loss = sum(
        dk.sum() + dv.sum() for dk, dv in fuser.deltas(batch, batch_aligned, lengths=torch.tensor(cuts)).values()
    )
    loss.backward()
    assert all(
        layer.key.fc3.weight.grad is not None and layer.key.fc3.weight.grad.abs().sum() > 0 for layer in fuser.layers
    )


@pytest.mark.parametrize("window", [1, 3, 10_000])
def test_a_window_fuser_computes_only_its_tokens_and_matches_the_masked_batch_path(models, window: int) -> None:
    receiver, transmitter = models["tiny-qwen3"], models["tiny-llama"]
    _, prefix, aligned = _setup(receiver, transmitter)
    fuser = _fuser(receiver, transmitter, window=window)
    sliced = fuser.deltas(prefix, aligned)  # inference: the MLP runs on the window only
    masked = fuser.deltas(prefix, aligned, lengths=torch.tensor([prefix.num_tokens]))  # training: mask after
    tail = min(window, prefix.num_tokens)
    assert sliced.keys() == masked.keys()
    for layer, (dk, dv) in sliced.items():
        assert dk.shape == masked[layer][0].shape == prefix.layers[layer][0].shape
        torch.testing.assert_close(dk, masked[layer][0])
        torch.testing.assert_close(dv, masked[layer][1])
        assert not dk[:, :, : prefix.num_tokens - tail].any() and dk[:, :, -tail:].abs().sum() > 0
