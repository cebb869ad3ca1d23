"""Pretrained (text-style) models on tiny stand-ins: frames, views, what a transmitter sends, every refine() mode
with free text and options, the held-back token fused as it is computed, notes retrieval and answer scoring."""

from __future__ import annotations

import pytest
import torch

from bus.errors import FusionError
from fusion.answers import contains_answer, exact_match, normalize_answer, read_answer
from fusion.c2c import receiver_view
from fusion.fuse import Received, fuse
from fusion.fuser import FuserConfig, PairFuser
from fusion.live import FusingCache, LiveTerm
from fusion.models import LanguageModel
from fusion.notes import DeviceNotes
from fusion.prompts import LETTERS, Question
from fusion.refine import (
    MODES,
    answer_alone,
    calibrate_self_check,
    refine,
    transmitter_prefill,
    transmitter_prompt,
)

NOTES = [
    "The color of Zorbin is teal.",
    "The color of Kalu is red.",
    "Brenna Tol is located in Oslo.",
    "The mascot of Zorbin is a fox.",
]
TEXT_Q = Question(id="t", stem="What is the color of Zorbin?", answer="teal")
CHOICE_Q = Question(id="c", stem="What is the color of Zorbin?", options=("red", "teal", "gold", "pink"), answer=1)
PRIVATE_Q = Question(
    id="p",
    stem="Hi, I'm Mara Velt (account ACC-123456). What is the color of Zorbin?",
    answer="teal",
    pii=("Mara Velt",),
)


def text_model(name: str) -> LanguageModel:
    """A tiny random model that answers in text in the plain frame (a pretrained checkpoint's stand-in)."""
    tiny = LanguageModel.load(name)
    return LanguageModel(tiny.model, tiny.tokenizer, f"{name}-text", style="text")


@pytest.fixture(scope="module")
def world():
    receiver = text_model("tiny-qwen3")
    transmitters = {"a": text_model("tiny-llama"), "b": text_model("tiny-qwen2")}
    fusers = {}
    for i, model in enumerate(transmitters.values()):
        torch.manual_seed(i)
        cfg = FuserConfig.for_models(receiver, model, hidden=16, delta_init_std=0.5, window=1, fuse_last=True)
        fusers[model.fingerprint] = PairFuser(cfg).eval()
    notes = {"a": DeviceNotes(NOTES), "b": DeviceNotes(NOTES[2:])}
    return receiver, transmitters, fusers, notes


def test_the_receiver_holds_back_its_last_token_and_may_fuse_from_the_shared_text_on(world) -> None:
    receiver = world[0]
    view = receiver_view(receiver, "What is the color of Zorbin?")
    framed = receiver.format.frame("What is the color of Zorbin?")
    ids = receiver.encode_framed(framed).ids
    assert view.prefix_ids + view.continuation_ids == ids and len(view.continuation_ids) == 1
    fused = view.prefix_offsets[-view.span :]
    assert fused[0][0] == 0 and max(e for _, e in fused) >= len("What is the color of Zorbin?")
    private = receiver_view(receiver, "What is the color of Zorbin?", "My name is Ann. What is the color of Zorbin?")
    assert private.span > view.span  # q follows q' inside the frame, in the prefix


def test_a_transmitter_sends_the_shared_text_and_its_final_token_never_its_notes(world) -> None:
    _, transmitters, _, notes = world
    model = transmitters["a"]
    prompt = transmitter_prompt(model, "What is the color of Zorbin?", notes["a"])
    assert prompt.retrieved.lines[0] == "The color of Zorbin is teal." and prompt.retrieved.coverage == 1.0
    assert prompt.positions[-1] == len(prompt.ids) - 1
    assert prompt.offsets[-1] == (len("What is the color of Zorbin?"),) * 2
    pre = transmitter_prefill("a", model, "What is the color of Zorbin?", notes["a"])
    assert pre.cache.num_tokens == len(prompt.positions) < len(prompt.ids)  # no note token travels
    assert pre.offer.coverage == 1.0 and pre.notes == prompt.retrieved.lines
    bare = transmitter_prefill("a", model, "What is the color of Zorbin?")
    assert bare.offer.coverage == 0.0 and bare.cache.num_tokens == pre.cache.num_tokens
    # the notes change what it sends (its q' positions attended to them)
    assert not torch.equal(bare.cache.layers[-1][1], pre.cache.layers[-1][1])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("question", [TEXT_Q, CHOICE_Q], ids=["text", "choice"])
def test_every_mode_answers_free_text_and_options_deterministically(world, mode, question) -> None:
    receiver, transmitters, fusers, notes = world
    donors = {n: Question(id="d", stem="Where is Brenna Tol located?", answer="Oslo") for n in transmitters}
    kw = dict(mode=mode, fusers=fusers, notes=notes, donors=donors)
    a = refine(question, receiver, transmitters, **kw)
    b = refine(question, receiver, transmitters, **kw)
    assert (a.answer, a.probs, a.text, a.used, a.hints) == (b.answer, b.probs, b.text, b.used, b.hints)
    if question.options:  # (a tiny random model writes the same free text for any question)
        other = question.model_copy(update={"stem": "Which animal guards the gate of Velmora?"})
        assert refine(other, receiver, transmitters, **kw).probs != a.probs  # it reads the question
    if question.options:
        assert a.answer in set(LETTERS) and a.text in question.options and abs(sum(a.probs) - 1) < 1e-4
    else:
        assert a.choice is None and a.answer == a.text and a.probs == []
    assert a.correct(question) == (a.index == question.answer if question.options else exact_match(a.text, "teal"))


def test_fusion_changes_the_answer_through_the_held_back_token_only(world) -> None:
    receiver, transmitters, fusers, notes = world
    alone = refine(CHOICE_Q, receiver, transmitters, mode="receiver")
    fused = refine(CHOICE_Q, receiver, transmitters, mode="c2c-uniform", fusers=fusers, notes=notes)
    assert fused.probs != alone.probs and set(fused.used) == set(transmitters)
    assert fused.bytes_sent > 0 and fused.tokens_sent == 2  # window 1: each sends its final token only
    view = receiver_view(receiver, CHOICE_Q.stem)
    prefix = receiver.prefill(view.prefix_ids).cache
    pre = transmitter_prefill("a", transmitters["a"], CHOICE_Q.stem, notes["a"])
    got = {"a": Received(pre.offer.fingerprint, pre.cache.as_mapping(), pre.offsets)}
    result = fuse(view, prefix, got, fusers)
    assert len(result.live) == 1 and result.used == {"a": list(range(pre.cache.num_layers))}
    for (k, v), (k0, v0) in zip(result.cache.layers, prefix.layers, strict=True):  # the prefix is untouched
        assert torch.equal(k, k0) and torch.equal(v, v0)
    with_live = read_answer(receiver, result.cache, view.continuation_ids, CHOICE_Q.options, live=result.live)
    without = read_answer(receiver, result.cache, view.continuation_ids, CHOICE_Q.options)
    assert with_live.probs != without.probs


def test_a_fusing_cache_with_zero_deltas_is_the_plain_cache(world) -> None:
    receiver, transmitters, fusers, _ = world
    zero = PairFuser(FuserConfig.for_models(receiver, transmitters["a"], hidden=8, window=1, fuse_last=True)).eval()
    with torch.no_grad():
        for layer in zero.layers:
            for path in (layer.key, layer.value):
                path.fc3.weight.zero_()
    view = receiver_view(receiver, TEXT_Q.stem)
    prefix = receiver.prefill(view.prefix_ids).cache
    anchor = {m: (k[:, :, -1:], v[:, :, -1:]) for m, (k, v) in enumerate(transmitters["a"].prefill("x y").cache.layers)}
    cache = FusingCache(receiver.config, prefix, [LiveTerm(zero, anchor)])
    fused = receiver.model(input_ids=torch.tensor([view.continuation_ids]), cache=cache, use_cache=True).logits
    plain = receiver.forward_from(prefix, view.continuation_ids)
    torch.testing.assert_close(fused[0], plain)


def test_private_questions_send_only_the_rephrased_text(world) -> None:
    receiver, transmitters, fusers, notes = world
    res = refine(PRIVATE_Q, receiver, transmitters, mode="c2c-uniform", fusers=fusers, notes=notes, private=True)
    assert "Mara Velt" not in res.shared_text and "ACC-123456" not in res.shared_text
    assert "Zorbin" in res.shared_text


def test_a_missing_fuser_or_a_letter_model_with_notes_is_a_clear_error(world) -> None:
    receiver, transmitters, _, notes = world
    with pytest.raises(FusionError, match="no fuser"):
        refine(TEXT_Q, receiver, transmitters, mode="c2c-uniform", fusers={}, notes=notes)
    with pytest.raises(FusionError, match="cannot read notes"):
        transmitter_prefill("z", LanguageModel.load("tiny-llama"), "What?", DeviceNotes(NOTES))


def test_notes_retrieval_ranks_the_entity_and_reports_coverage() -> None:
    notes = DeviceNotes(NOTES)
    got = notes.retrieve("Which color is Kalu?", k=2)
    assert got.lines[0] == "The color of Kalu is red." and len(got.lines) == 2
    assert got.coverage == 1.0
    unknown = notes.retrieve("What is the color of Glorp?")
    assert unknown.coverage < 0.5 and len(unknown.lines) == 3  # distractors, and a low coverage says so
    assert DeviceNotes([]).retrieve("anything").lines == ()


def test_notes_are_specific_to_a_question_when_their_best_line_names_its_subject() -> None:
    many = DeviceNotes([f"The color of Entity{i} is red." for i in range(8)] + ["Kalu plays the harp."])
    assert many.retrieve("What is the color of Entity3?").specific  # "entity3": one line of nine
    assert many.retrieve("What does Kalu play?").specific
    assert many.retrieve("What is the color of Entity3?").named == ("The color of Entity3 is red.",)
    assert many.retrieve("What is the color of Entity3?").translated == ("The color of Entity3 is red.",)
    other = many.retrieve("What is the color of Glorp?")
    assert other.lines and not other.specific and not other.named  # "color" is in eight lines: not Glorp's facts
    assert other.translated == ()
    big = DeviceNotes([f"Thing{i} likes item{i % 5}." for i in range(600)])
    assert big.retrieve("What does Thing7 like?").specific  # one line
    assert not big.retrieve("Who likes item3?").specific  # 120 lines: above 1% of 600


def test_free_text_is_scored_by_normalised_exact_match() -> None:
    assert normalize_answer("  The Teal.\nmore") == "teal"
    assert exact_match("a fox", "fox") and exact_match("Oslo!", "oslo")
    assert not exact_match("teal blue", "teal")


def test_batched_prefill_equals_one_at_a_time(world) -> None:
    receiver = world[0]
    prompts = [receiver.encode(t).ids for t in ("What is the color of Zorbin?", "Hi", "Where is Oslo located today?")]
    for one, many in zip(prompts, receiver.prefill_many(prompts, batch_size=2), strict=True):
        single = receiver.prefill(one)
        torch.testing.assert_close(single.logits, many.logits, atol=1e-5, rtol=1e-4)
        for (k1, v1), (k2, v2) in zip(single.cache.layers, many.cache.layers, strict=True):
            torch.testing.assert_close(k1, k2, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(v1, v2, atol=1e-5, rtol=1e-4)


def test_free_text_containment_needs_the_gold_as_whole_words_and_no_other_candidate() -> None:
    options = ("red", "teal", "dark blue", "blue")
    assert contains_answer("The color of Zorbin is teal.", "teal", options)
    assert contains_answer("It is Dark Blue!", "dark blue", options)  # "blue" lies inside the gold: not another
    assert not contains_answer("It is tealish.", "teal", options)  # whole words only
    assert not contains_answer("Either teal or red.", "teal", options)  # two candidate values never count
    assert not contains_answer("The color is blue.", "dark blue", options)
    assert contains_answer("Lives in New York City", "new york") and not contains_answer("", "teal")
    assert contains_answer("Wuthering Heights by Emily Brontë", "Bronte")  # accents folded


@pytest.mark.parametrize("question", [TEXT_Q, CHOICE_Q], ids=["text", "choice"])
def test_a_confident_text_receiver_answers_alone_and_an_unsure_one_fuses(world, question) -> None:
    receiver, transmitters, fusers, notes = world
    own = answer_alone(receiver, question.stem, question.options)
    assert own.confidence is not None and 0 < own.confidence <= 1
    kw = dict(mode="c2c-uniform", fusers=fusers, notes=notes)
    sure = refine(question, receiver, transmitters, self_check=own.confidence, **kw)
    assert sure.alone and sure.bytes_sent == 0 and not sure.used and sure.text == own.text
    unsure = refine(question, receiver, transmitters, self_check=own.confidence + 1e-6, **kw)
    assert not unsure.alone and unsure.bytes_sent > 0 and set(unsure.used) == set(transmitters)
    assert unsure.probs == refine(question, receiver, transmitters, **kw).probs  # the check changes nothing else


def test_the_self_check_threshold_keeps_out_fusion_where_it_harms_on_calibration() -> None:
    conf = [0.9, 0.8, 0.6, 0.3, 0.2]
    # the receiver is right where it is sure, fusion where it is not: alone at 0.6 and above
    assert calibrate_self_check(conf, [1, 1, 1, 0, 0], [0, 0, 0, 1, 1]) == 0.6
    assert calibrate_self_check(conf, [0] * 5, [1] * 5) == float("inf")  # fusion always better: never alone
    assert calibrate_self_check(conf, [1] * 5, [1] * 5) == 0.2  # a tie: fewer questions leave
