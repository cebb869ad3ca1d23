"""Cache translation on tiny stand-ins: keys made position-free and placed again, a model read into itself
exactly, a ridge fit that recovers a known map at its rank, files that refuse the wrong pair, and the translate
modes of ``refine()``."""

from __future__ import annotations

import pytest
import torch

from bus.errors import ConfigError, FuserError, FusionError
from fusion.answers import read_answer
from fusion.formats import notes_content
from fusion.models import LanguageModel
from fusion.notes import DeviceNotes
from fusion.prompts import Question
from fusion.refine import refine
from fusion.translate import (
    CacheTranslator,
    TranslatorConfig,
    fit_translator,
    load_translator,
    note_span,
    pack_weights,
    restore_translator,
    rope_tables,
    save_translator,
    stored_copy,
    translated_prompt,
    translation_rows,
    turn_keys,
)

NOTES = ["The color of Zorbin is teal.", "Brenna Tol is located in Oslo.", "The mascot of Kalu is a fox."]
CHOICE_Q = Question(id="c", stem="What is the color of Zorbin?", options=("red", "teal", "gold", "pink"), answer=1)
TEXT_Q = Question(id="t", stem="What is the color of Zorbin?", answer="teal")


def text_model(name: str) -> LanguageModel:
    tiny = LanguageModel.load(name)
    return LanguageModel(tiny.model, tiny.tokenizer, f"{name}-text", style="text")


@pytest.fixture(scope="module")
def models() -> dict[str, LanguageModel]:
    return {name: text_model(name) for name in ("tiny-qwen3", "tiny-llama", "tiny-qwen2")}


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-llama", "tiny-qwen2"])
def test_keys_made_position_free_and_placed_again_are_the_models_own(models, name) -> None:
    model = models[name]
    pre = model.prefill(model.encode("Notes about Zorbin and Kalu.").ids)
    n = pre.cache.num_tokens
    here, there = rope_tables(model, 0, n), rope_tables(model, 7, n)
    for m, (k, _) in enumerate(pre.cache.layers):
        free = turn_keys(k, *here[m], inverse=True)
        assert torch.allclose(turn_keys(free, *here[m]), k, atol=1e-5)
        moved = turn_keys(free, *there[m])
        assert not torch.allclose(moved, k, atol=1e-3)  # another position is another rotation
        # a dot product of two keys depends only on how far apart they are
        near, far = rope_tables(model, 0, 2)[m], rope_tables(model, 9, 2)[m]
        a, b = turn_keys(free[:, :, :2], *near), turn_keys(free[:, :, :2], *far)
        assert torch.allclose((a[:, :, 0] * a[:, :, 1]).sum(-1), (b[:, :, 0] * b[:, :, 1]).sum(-1), atol=1e-4)


def test_a_model_read_into_itself_answers_as_if_it_had_read_the_notes(models) -> None:
    model = models["tiny-qwen3"]
    ident = CacheTranslator(TranslatorConfig.for_models(model, model))
    assert ident.cfg.identity and sum(p.numel() for p in ident.parameters()) == 0
    span = note_span(model, NOTES)
    cache, rest = translated_prompt(model, CHOICE_Q.stem, [ident(span.layers)])
    translated = read_answer(model, cache, rest, CHOICE_Q.options)
    content, _ = notes_content(NOTES, CHOICE_Q.stem)
    ids = model.encode_framed(model.format.frame(content)).ids
    assert cache.num_tokens + len(rest) == len(ids)  # one position per note token, the question read on top
    own = read_answer(model, model.prefill(ids[:-1]).cache, ids[-1:], CHOICE_Q.options)
    assert translated.choice == own.choice
    assert torch.allclose(torch.tensor(translated.scores), torch.tensor(own.scores), atol=1e-3)
    with pytest.raises(FusionError, match="needs every layer"):
        ident({m: kv for m, kv in span.layers.items() if m})


def test_the_fit_recovers_a_known_low_rank_map_and_reports_held_out_r2() -> None:
    cfg = TranslatorConfig(2, 1, 4, 3, 1, 4, rank=3, ridge=1e-3)  # 24 features -> 16 outputs
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(600, cfg.in_features, generator=gen) * 3 + 1
    truth = torch.randn(cfg.in_features, 3, generator=gen) @ torch.randn(3, cfg.out_features, generator=gen)
    y = x @ truth + 0.5
    translator, stats = fit_translator(cfg, x, y)
    assert stats["r2_heldout"] > 0.999 and stats["r2_heldout_pooled"] > 0.999 and stats["rows"] == 600
    flat = y.clone()
    flat[:, 0] = 7.0 + 1e-7 * torch.randn(600, generator=gen)  # a number the receiver holds constant: no R^2 of its own
    assert fit_translator(cfg, x, flat)[1]["r2_heldout"] > 0.999
    assert tuple(translator.down.shape) == (24, 3) and tuple(translator.up.shape) == (3, 16)
    test = torch.randn(5, cfg.in_features, generator=gen)
    assert torch.allclose(translator.rows(test), test @ truth + 0.5, atol=1e-2)
    noise, stats = fit_translator(cfg, x, torch.randn(600, cfg.out_features, generator=gen))
    assert stats["r2_heldout"] < 0.05  # nothing to learn: nothing learned
    with pytest.raises(FuserError, match="pair needs"):
        fit_translator(cfg, x[:, :5], y)
    with pytest.raises(FuserError, match="do not pair up"):
        fit_translator(cfg, x[:10], y)


def test_rows_fit_save_and_load_for_a_real_pair_shape(models, tmp_path) -> None:
    receiver, transmitter = models["tiny-qwen3"], models["tiny-llama"]
    xs, ys = zip(*(translation_rows(receiver, transmitter, NOTES[i : i + 2]) for i in range(2)), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    cfg = TranslatorConfig.for_models(receiver, transmitter, rank=8)
    assert x.shape[1] == cfg.in_features and y.shape[1] == cfg.out_features and not cfg.identity
    assert x.shape[0] == sum(note_span(transmitter, NOTES[i : i + 2]).num_tokens for i in range(2))
    translator, stats = fit_translator(cfg, x, y)
    path = save_translator(translator, tmp_path / "tr", transmitter.fingerprint, receiver.fingerprint, stats)
    back, meta = load_translator(path, transmitter.fingerprint, receiver.fingerprint)
    assert meta["params"] == sum(p.numel() for p in translator.parameters()) and meta["rows"] == x.shape[0]
    span = note_span(transmitter, NOTES)
    a, b = translator(span.layers), back(span.layers)
    assert set(a) == set(range(receiver.num_layers))
    assert a[0][0].shape == (1, receiver.kv_heads, span.num_tokens, receiver.head_dim)
    assert all(torch.allclose(a[m][i], b[m][i], atol=5e-2, rtol=1e-2) for m in a for i in (0, 1))  # stored fp16
    with pytest.raises(FuserError, match="wrong model pair"):
        load_translator(path, receiver.fingerprint, receiver.fingerprint)
    with pytest.raises(FusionError, match="wrong model pair"):
        translator(note_span(models["tiny-qwen2"], NOTES).layers)
    # a layer that did not arrive stands at its mean: the translation still comes out, and differs
    dropped = translator({m: kv for m, kv in span.layers.items() if m != 1})
    assert dropped[0][0].shape == a[0][0].shape and not torch.allclose(dropped[0][0], a[0][0])


def test_translate_modes_of_refine(models) -> None:
    receiver, transmitter = models["tiny-qwen3"], models["tiny-llama"]
    cfg = TranslatorConfig.for_models(receiver, transmitter, rank=4)
    translator = CacheTranslator(cfg)
    with torch.no_grad():
        translator.up.normal_()
    notes = {"a": DeviceNotes(NOTES), "self": DeviceNotes(NOTES[:1])}
    txs = {"a": transmitter, "self": receiver}
    translators = {transmitter.fingerprint: translator}
    res = refine(CHOICE_Q, receiver, txs, mode="translate", notes=notes, translators=translators, precision="int8")
    assert res.failed == {"self": f"no translator for transmitter model {receiver.fingerprint} into this receiver"}
    assert list(res.used) == ["a"] and res.bytes_sent > 0 and res.choice is not None
    assert res.tokens_sent == note_span(transmitter, notes["a"].retrieve(CHOICE_Q.stem).named).num_tokens
    ident = {receiver.fingerprint: CacheTranslator(TranslatorConfig.for_models(receiver, receiver))}
    both = refine(TEXT_Q, receiver, txs, mode="translate", notes=notes, translators=translators | ident)
    assert sorted(both.used) == ["a", "self"] and isinstance(both.text, str) and not both.failed
    alone = refine(CHOICE_Q, receiver, txs, mode="receiver")
    nothing = refine(CHOICE_Q, receiver, txs, mode="translate", notes={}, translators=translators)
    assert nothing.bytes_sent == 0 and nothing.probs == alone.probs  # no notes anywhere: the receiver alone
    donor = Question(id="d", stem="Where is Brenna Tol located?", answer="Oslo")
    shuffled = refine(
        CHOICE_Q,
        receiver,
        txs,
        mode="translate-shuffled",
        notes=notes,
        translators=translators,
        donors={"a": donor, "self": donor},
    )
    assert shuffled.bytes_sent > 0
    # notes that do not name the question's subject stay home; translate-every sends them anyway
    crowd = {"a": DeviceNotes([f"The color of Entity{i} is red." for i in range(8)])}
    kept = refine(CHOICE_Q, receiver, {"a": transmitter}, mode="translate", notes=crowd, translators=translators)
    assert kept.bytes_sent == 0 and kept.probs == alone.probs
    every = refine(CHOICE_Q, receiver, {"a": transmitter}, mode="translate-every", notes=crowd, translators=translators)
    assert every.bytes_sent > 0 and list(every.used) == ["a"]
    mixed = {"a": DeviceNotes([f"The color of Entity{i} is red." for i in range(8)] + NOTES)}
    one = refine(CHOICE_Q, receiver, {"a": transmitter}, mode="translate", notes=mixed, translators=translators)
    assert one.tokens_sent == note_span(transmitter, NOTES[:1]).num_tokens  # the Zorbin line only, not two colours
    with pytest.raises(FusionError, match="donor"):
        refine(CHOICE_Q, receiver, txs, mode="translate-shuffled", notes=notes, translators=translators)


def test_the_held_out_fit_from_shared_moments_is_the_ridge_fit_of_the_training_rows() -> None:
    cfg = TranslatorConfig(2, 1, 4, 3, 1, 4, rank=16, ridge=50.0)  # 24 -> 16, full rank: no truncation
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, cfg.in_features, generator=gen).exp() * 2 - 1  # skewed: the split moves the means
    y = torch.tanh(x @ torch.randn(cfg.in_features, cfg.out_features, generator=gen)) + 0.1 * torch.randn(
        300, 16, generator=gen
    )
    _, stats = fit_translator(cfg, x, y, held_out=0.2, seed=3)
    order = torch.randperm(300, generator=torch.Generator().manual_seed(3))
    train, test = order[:240], order[240:]
    z = (x - x.mean(0)) / x.std(0)  # all rows' scale, the training rows' own means: solved directly here
    zt = z[train] - z[train].mean(0)
    w = torch.linalg.solve(zt.T @ zt + 50.0 * torch.eye(24), zt.T @ (y[train] - y[train].mean(0)))
    pred = (z[test] - z[train].mean(0)) @ w + y[train].mean(0)
    truth = y[test]
    r2 = 1 - ((pred - truth) ** 2).sum(0) / ((truth - truth.mean(0)) ** 2).sum(0)
    assert abs(stats["r2_heldout"] - float(r2.mean())) < 2e-4
    assert 0.2 < stats["r2_heldout"] < 0.999  # a fit with something left to miss


def test_tuning_makes_the_receiver_write_what_a_reader_of_the_lines_writes(models) -> None:
    from fusion.translate import TuneItem, repeat_item, tune_translator

    receiver, transmitter = models["tiny-qwen3"], models["tiny-llama"]
    xs, ys = zip(*(translation_rows(receiver, transmitter, [line]) for line in NOTES), strict=True)
    translator, _ = fit_translator(
        TranslatorConfig.for_models(receiver, transmitter, rank=8), torch.cat(xs), torch.cat(ys)
    )
    items = [repeat_item([line]) for line in NOTES] + [TuneItem((NOTES[0],), TEXT_Q.stem, "teal")]
    assert items[0].answer == NOTES[0] and items[0].lines == (NOTES[0],)
    before = {k: v.clone() for k, v in translator.state_dict().items()}
    flags = [p.requires_grad for p in receiver.model.parameters()]
    losses = tune_translator(translator, receiver, transmitter, items, steps=30, batch_size=4, lr=3e-2)
    assert len(losses) == 30 and sum(losses[-5:]) < 0.95 * sum(losses[:5])  # it learns (random tiny: slowly)
    after = translator.state_dict()
    assert not torch.equal(before["up"], after["up"]) and torch.equal(before["scale"], after["scale"])
    assert not any(p.requires_grad for p in translator.parameters())
    assert [p.requires_grad for p in receiver.model.parameters()] == flags  # the receiver as it was
    ident = CacheTranslator(TranslatorConfig.for_models(receiver, receiver))
    assert tune_translator(ident, receiver, receiver, items) == []


def test_int8_weights_store_half_the_bytes_and_translate_as_the_float_weights(tmp_path) -> None:
    cfg = TranslatorConfig(3, 2, 8, 4, 1, 16, rank=12)  # 128 features -> 96 outputs
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(800, cfg.in_features, generator=gen) * torch.linspace(0.1, 5, cfg.in_features)
    y = x @ torch.randn(cfg.in_features, cfg.out_features, generator=gen) / 10
    translator, _ = fit_translator(cfg, x, y)
    packed = pack_weights(translator.state_dict(), "int8")
    assert packed["down"].dtype == packed["up"].dtype == torch.int8 and packed["up.scale"].shape == (cfg.out_features,)
    sizes = {}
    for weights in ("fp16", "int8"):
        path = save_translator(translator, tmp_path / weights, "a" * 16, "b" * 16, {"note": 1}, weights=weights)
        back, meta = load_translator(path, "a" * 16, "b" * 16)
        sizes[weights] = meta["bytes"]
        assert meta["weights"] == weights and meta["note"] == 1
        a, b = translator.rows(x[:50]), back.rows(x[:50])
        assert ((a - b).pow(2).mean() / a.var()).item() < 1e-4  # the same translation, within 0.01% of its variance
    params = sum(p.numel() for p in translator.parameters())
    matrices = translator.down.numel() + translator.up.numel()
    scales = 4 * (cfg.rank + cfg.out_features)  # one float32 per column of each matrix
    assert sizes["fp16"] == 2 * params and sizes["int8"] == matrices + scales + 2 * (params - matrices)
    copy = stored_copy(translator, "int8")
    assert torch.allclose(copy.rows(x[:5]), back.rows(x[:5]), atol=1e-3)  # what the bench row reads is the file's
    assert restore_translator(tmp_path / "fp16", "int8") == sizes["int8"]  # a kit's fp16 file stored again
    assert load_translator(tmp_path / "fp16")[1]["weights"] == "int8"
    with pytest.raises(ConfigError, match="unknown translator weights"):
        pack_weights(translator.state_dict(), "int3")


def test_tuning_scores_a_window_of_a_long_answer(models) -> None:
    from fusion.translate import repeat_item, tune_translator

    receiver, transmitter = models["tiny-qwen3"], models["tiny-llama"]
    translator = CacheTranslator(TranslatorConfig.for_models(receiver, transmitter, rank=8))
    item = repeat_item([" ".join(NOTES)])  # an answer of many tokens
    answer = receiver.answer_target(item.answer)
    assert len(answer) > 6
    seen: list[tuple[int, int]] = []  # (tokens read, logits kept) per scoring call of the receiver
    forward = receiver.model.forward

    def spy(*args, **kwargs):
        if kwargs.get("logits_to_keep", 0) > 1:  # not the frame head's prefill (its last logit)
            seen.append((kwargs["input_ids"].shape[1], kwargs["logits_to_keep"]))
        return forward(*args, **kwargs)

    receiver.model.forward = spy
    try:
        tune_translator(translator, receiver, transmitter, [item], steps=4, batch_size=3, window=3)
        windowed, seen[:] = list(seen), []
        tune_translator(translator, receiver, transmitter, [item], steps=1, batch_size=2, window=0)
        whole = list(seen)
    finally:
        del receiver.model.forward
    assert {kept for _, kept in windowed} == {4}  # three answer tokens scored, whatever the answer's length
    assert len({read for read, _ in windowed}) > 1  # the window ends at different answer tokens
    assert max(read for read, _ in windowed) <= whole[0][0]  # never beyond the answer
    assert {kept for _, kept in whole} == {len(answer) + 1}  # window 0: the whole answer, as before
    with pytest.raises(ConfigError, match="window"):
        tune_translator(translator, receiver, transmitter, [item], steps=1, window=-1)
