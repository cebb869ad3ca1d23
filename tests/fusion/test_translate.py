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
    translation_rows_both,
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


@pytest.mark.parametrize("pair", [("tiny-qwen3", "tiny-llama"), ("tiny-llama", "tiny-qwen2")])
def test_one_read_per_model_makes_both_directions_rows(models, pair) -> None:
    """The kit reads each block once per model for both directions: a transmitter's features come from the prefix
    of its read that is its note span (causal attention), as close to ``note_span``'s own prefill as float allows."""
    import dataclasses

    from fusion import translate

    a, b = models[pair[0]], models[pair[1]]
    lines = NOTES[:2]
    (x_ba, y_ba), (x_ab, y_ab) = translation_rows_both(a, b, lines)
    for rx, tx, x, y in ((a, b, x_ba, y_ba), (b, a, x_ab, y_ab)):
        span = note_span(tx, lines)
        cfg = TranslatorConfig.for_models(rx, tx, rank=1)
        sent = CacheTranslator(TranslatorConfig(**{**cfg.to_dict(), "identity": False})).features(span.layers)
        assert x.shape == sent.shape and torch.allclose(x, sent, atol=1e-4)
        assert y.shape == (span.num_tokens, cfg.out_features)
        x2, y2 = translation_rows(rx, tx, lines)
        assert torch.equal(x, x2) and torch.equal(y, y2)
        # a read whose notes do not start where note_span's do is read again, not sliced
        read = translate._read(tx, lines, "What is it?")
        again = translate._read_span(dataclasses.replace(read, start=read.start + 1))
        assert again.ends == span.ends and all(torch.equal(again.layers[m][0], span.layers[m][0]) for m in span.layers)
    with pytest.raises(FusionError, match="at least one note line"):
        translation_rows_both(a, b, [])


def test_the_two_direction_rows_pass_checkpoints_and_resumes(models, tmp_path, monkeypatch) -> None:
    from fusion import train_cli

    a, b = models["tiny-qwen3"], models["tiny-llama"]
    blocks = [NOTES[:1], NOTES[1:], NOTES]
    train_cli.translator_rows_both(a, b, blocks[:2], tmp_path, every=1)  # stopped after two blocks
    calls = []
    from fusion import translate

    original = translate.translation_rows_both
    monkeypatch.setattr(translate, "translation_rows_both", lambda *args: calls.append(args) or original(*args))
    train_cli.translator_rows_both(a, b, blocks, tmp_path)
    assert len(calls) == 1  # the third block only
    for rx, tx in ((a, b), (b, a)):
        xs, ys = torch.load(train_cli.rows_checkpoint(tmp_path, tx, rx))
        assert len(xs) == len(ys) == 3
        for lines, x, y in zip(blocks, xs, ys, strict=True):
            x2, y2 = translation_rows(rx, tx, lines)
            assert torch.equal(x, x2.half()) and torch.equal(y, y2.half())


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
    read: list[int] = []  # tokens each batch of the receiver reads after the translated notes
    scored: list[int] = []  # positions the vocabulary projection scores, per batch
    body, head_logits = receiver.body.forward, receiver.head_logits

    def read_spy(*args, **kwargs):
        if kwargs.get("position_ids") is not None:  # a tuning batch, not the frame head's prefill
            read.append(kwargs["input_ids"].shape[1])
        return body(*args, **kwargs)

    def scored_spy(hidden):
        scored.append(hidden.shape[0])
        return head_logits(hidden)

    receiver.body.forward, receiver.head_logits = read_spy, scored_spy
    try:
        tune_translator(translator, receiver, transmitter, [item], steps=4, batch_size=3, window=3)
        windowed, read[:], scored[:] = (list(read), list(scored)), [], []
        tune_translator(translator, receiver, transmitter, [item], steps=1, batch_size=2, window=0)
        whole = (list(read), list(scored))
    finally:
        del receiver.body.forward, receiver.head_logits
    assert sum(windowed[1]) == 4 * 3 * 3  # three answer tokens scored per row, whatever the answer's length
    assert len(set(windowed[0])) > 1  # the window ends at different answer tokens
    assert max(windowed[0]) <= whole[0][0]  # never beyond the answer
    assert whole[1] == [2 * len(answer)]  # window 0: the whole answer of both rows, in one batch
    with pytest.raises(ConfigError, match="window"):
        tune_translator(translator, receiver, transmitter, [item], steps=1, window=-1)


def tiny_gemma3(tokenizer_from: LanguageModel, sliding: int) -> LanguageModel:
    """A random two-layer Gemma 3 (a sliding-window layer and a global one) on a tiny model's tokenizer."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = tokenizer_from.tokenizer
    cfg = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=sliding,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(3)
    return LanguageModel(Gemma3ForCausalLM(cfg).eval(), tok, "tiny-gemma3-text", style="text")


@pytest.mark.parametrize("receiver_name", ["tiny-qwen3", "gemma3-sliding"])
def test_a_padded_tuning_batch_has_the_losses_and_gradients_of_one_row_at_a_time(models, receiver_name) -> None:
    from transformers import DynamicCache

    from fusion.formats import QUESTION_LABEL
    from fusion.translate import _batch_loss, _groups, _Scored

    transmitter = models["tiny-llama"]
    receiver = tiny_gemma3(models["tiny-qwen3"], 128) if receiver_name == "gemma3-sliding" else models[receiver_name]
    translator, _ = fit_translator(
        TranslatorConfig.for_models(receiver, transmitter, rank=8),
        *(torch.cat(t) for t in zip(*(translation_rows(receiver, transmitter, [x]) for x in NOTES), strict=True)),
    )
    fmt = receiver.format
    head = receiver.prefill(list(receiver.tokenizer(fmt.head, add_special_tokens=fmt.add_special_tokens)["input_ids"]))
    head = head.cache
    rows = []  # spans and reads of different lengths, some answers scored in part
    for lines, stem, answer, scored in [
        (NOTES[:1], "What is the color of Zorbin?", "teal", 0),
        (NOTES, "Where is Brenna Tol?", "Brenna Tol is located in Oslo.", 4),
        (NOTES[1:], "Repeat.", " ".join(NOTES[1:]), 7),
        (NOTES[2:], "Mascot?", "a fox", 0),
    ]:
        q = receiver.tokenizer(QUESTION_LABEL + stem + fmt.tail, add_special_tokens=False)["input_ids"]
        a = receiver.answer_target(answer)
        rows.append(_Scored(note_span(transmitter, lines), list(q) + a, scored or len(a)))
    tuned = (translator.down, translator.up, translator.bias)

    def reference(row: _Scored) -> torch.Tensor:  # one row through the model's own forward, as tuning ran before
        out = translator.rows(translator.features(row.span.layers))
        n, L, H, D = out.shape[0], receiver.num_layers, receiver.kv_heads, receiver.head_dim
        k = out[:, : L * H * D].reshape(n, L, H, D).permute(1, 2, 0, 3)
        v = out[:, L * H * D :].reshape(n, L, H, D).permute(1, 2, 0, 3)
        tables = rope_tables(receiver, head.num_tokens, n)
        cache = DynamicCache(config=receiver.config)
        for m in range(L):
            k0, v0 = head.layers[m]
            cache.update(torch.cat([k0, turn_keys(k[m][None], *tables[m])], 2), torch.cat([v0, v[m][None]], 2), m)
        logits = receiver.model(
            input_ids=torch.tensor([row.ids]), cache=cache, use_cache=True, logits_to_keep=row.scored + 1
        ).logits
        return torch.nn.functional.cross_entropy(logits[0, :-1], torch.tensor(row.ids[-row.scored :]))

    def loss_and_grads(fn) -> tuple[float, list[torch.Tensor]]:
        for p in tuned:
            p.requires_grad_(True)
            p.grad = None
        loss = fn()
        loss.backward()
        grads = [p.grad.clone() for p in tuned]
        for p in tuned:
            p.requires_grad_(False)
        return float(loss.detach()), grads

    want, want_grads = loss_and_grads(lambda: sum(reference(r) for r in rows))
    longest = head.num_tokens + max(r.span.num_tokens for r in rows) + max(len(r.ids) for r in rows)
    sliding = getattr(receiver.config, "sliding_window", None)
    groups = _groups(rows, head.num_tokens, sliding, fixed=10**6)  # as few batches as the window allows
    if sliding is not None:
        assert longest > sliding and 1 < len(groups) < len(rows)  # the window splits this step, not into single rows
        for group in groups:
            padded = head.num_tokens + max(r.span.num_tokens for r in group) + max(len(r.ids) for r in group)
            assert len(group) == 1 or padded <= sliding
    else:
        assert [len(g) for g in groups] == [4]
    got, got_grads = loss_and_grads(lambda: sum(_batch_loss(receiver, translator, head, g) for g in groups))
    assert abs(got - want) < 1e-4 * abs(want)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert ((a - b).norm() / b.norm()).item() < 1e-3
    assert sorted(len(r.ids) for g in groups for r in g) == sorted(len(r.ids) for r in rows)  # every row, once


def test_tuning_batches_group_rows_of_like_length() -> None:
    from fusion.translate import _groups, _Scored

    def row(span: int, read: int) -> _Scored:
        return _Scored(NoteSpanStub(span), [1] * read, 1)  # type: ignore[arg-type]

    rows = [row(10, 80), row(10, 12), row(10, 78), row(10, 14), row(10, 13), row(10, 79)]
    groups = _groups(rows, 4, None, fixed=20)
    assert [sorted(len(r.ids) for r in g) for g in groups] == [[12, 13, 14], [78, 79, 80]]  # not 6 x 80
    assert [len(g) for g in _groups(rows, 4, None, fixed=10**6)] == [6]  # a batch costs more than any padding
    assert [len(g) for g in _groups(rows, 4, None, fixed=0)] == [1, 1, 1, 1, 1, 1]  # padding costs, batches not
    lone = _groups([row(10, 12), row(500, 20), row(10, 13)], 4, 64, fixed=10**6)
    assert [[len(r.ids) for r in g] for g in lone] == [[12, 13], [20]]  # longer than the window: alone


class NoteSpanStub:
    def __init__(self, n: int) -> None:
        self.num_tokens = n


def test_a_translate_offer_costs_the_device_one_read_of_its_named_lines(models, monkeypatch) -> None:
    """``agents.transmitter.prefill_notes``: the cache of the lines that name q''s subject, as ``note_span`` reads
    them, and nothing else read (the gate weighs translate offers uniformly); a device without such lines declines."""
    from agents.transmitter import prefill_notes

    model = models["tiny-llama"]
    notes = DeviceNotes(NOTES)
    reads = []
    original = model.prefill
    monkeypatch.setattr(model, "prefill", lambda ids: reads.append(ids) or original(ids))
    pre, inline = prefill_notes("dev", model, "What is the color of Zorbin?", notes)
    assert inline is None and len(reads) == 1  # one read: the span
    named = notes.retrieve("What is the color of Zorbin?").translated
    span = note_span(model, named)
    assert pre.notes == named and pre.offsets == [] and pre.cache.num_tokens == span.num_tokens
    assert all(torch.equal(pre.cache.layers[m][0], span.layers[m][0]) for m in span.layers)
    assert pre.offer.coverage == notes.retrieve("What is the color of Zorbin?").coverage > 0
    assert prefill_notes("dev", model, "Where does Quillan Vesk live?", notes) == (None, None)  # not specific
