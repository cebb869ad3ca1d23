"""In-process FedRefine on tiny random models: every mode runs, answers are deterministic, pieces compose."""

from __future__ import annotations

import pytest
import torch

from bus.errors import CodecError, FusionError
from fusion.fuser import FuserConfig, PairFuser
from fusion.models import LanguageModel
from fusion.prompts import LETTERS, Question
from fusion.refine import MODES, knows_alone, receiver_self_check, refine, transmitter_prefill
from fusion.wire import transmit

Q = Question(
    id="q1",
    stem="Hi, I'm Mara Velt (account ACC-123456). What is the color of Zorbin?",
    options=("red", "blue", "green", "pink"),
    answer=2,
    pii=("Mara Velt", "ACC-123456"),
)
DONOR = Question(id="q2", stem="Which pet does Kalu have?", options=("cat", "dog", "owl", "fox"), answer=0)


@pytest.fixture(scope="module")
def world():
    receiver = LanguageModel.load("tiny-qwen3")
    transmitters = {"t-llama": LanguageModel.load("tiny-llama"), "t-qwen2": LanguageModel.load("tiny-qwen2")}
    fusers = {}
    for i, model in enumerate(transmitters.values()):
        torch.manual_seed(i)
        fusers[model.fingerprint] = PairFuser(
            FuserConfig.for_models(receiver, model, hidden=16, delta_init_std=0.5)
        ).eval()
    return receiver, transmitters, fusers


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_is_deterministic(world, mode) -> None:
    receiver, transmitters, fusers = world
    kw = dict(mode=mode, fusers=fusers, donors={n: DONOR for n in transmitters})
    a = refine(Q, receiver, transmitters, **kw)
    b = refine(Q, receiver, transmitters, **kw)
    assert a.answer in set(LETTERS) and abs(sum(a.probs) - 1) < 1e-4
    assert (a.answer, a.probs, a.used, a.bytes_sent, a.hints) == (b.answer, b.probs, b.used, b.bytes_sent, b.hints)
    other = refine(DONOR, receiver, transmitters, **{**kw, "donors": {n: Q for n in transmitters}})
    assert other.probs != a.probs  # a constant would pass the lines above, not this one


def test_c2c_changes_the_receiver_and_reports_bytes(world) -> None:
    receiver, transmitters, fusers = world
    alone = refine(Q, receiver, transmitters, mode="receiver")
    fused = refine(Q, receiver, transmitters, mode="c2c-uniform", fusers=fusers)
    assert fused.probs != alone.probs
    assert set(fused.used) == set(transmitters)
    assert fused.bytes_sent > 0 and fused.tokens_sent > 0
    assert fused.weights == {n: 1.0 for n in transmitters}


def test_private_mode_sends_only_the_rephrased_question(world) -> None:
    receiver, transmitters, fusers = world
    res = refine(Q, receiver, transmitters, mode="c2c-uniform", fusers=fusers, private=True)
    assert "Mara" not in res.shared_text and "ACC-123456" not in res.shared_text
    again = refine(Q, receiver, transmitters, mode="c2c-uniform", fusers=fusers, private=True)
    assert res.probs == again.probs


def test_precision_goes_through_the_codec(world) -> None:
    receiver, transmitters, fusers = world
    sizes = {
        p: refine(Q, receiver, transmitters, mode="c2c-uniform", fusers=fusers, precision=p).bytes_sent
        for p in ("fp32", "fp16", "int8", "int4")
    }
    assert sizes["fp32"] > sizes["fp16"] > sizes["int8"] > sizes["int4"]
    pre = transmitter_prefill("t", transmitters["t-llama"], Q.prompt())
    layers = pre.cache.as_mapping()
    same, _ = transmit(layers, "fp32")
    assert all(torch.equal(same[i][0], layers[i][0]) for i in layers)
    int8, _ = transmit(layers, "int8")
    k, k8 = layers[0][0], int8[0][0]
    assert (k - k8).abs().max() <= (k.amax() - k.amin()) / 255 + 1e-5
    with pytest.raises(CodecError):
        transmit(layers, "int3")


def test_bad_requests_are_clear_errors(world) -> None:
    receiver, transmitters, fusers = world
    with pytest.raises(FusionError, match="unknown mode"):
        refine(Q, receiver, transmitters, mode="telepathy")
    with pytest.raises(FusionError, match="no fuser"):
        refine(Q, receiver, transmitters, mode="c2c-uniform", fusers={})
    with pytest.raises(FusionError, match="donor"):
        refine(Q, receiver, transmitters, mode="c2c-shuffled", fusers=fusers)
    with pytest.raises(FusionError, match="at least one transmitter"):
        refine(Q, receiver, {}, mode="c2c")


def test_the_self_check_is_off_for_a_receiver_that_cannot_say_none(world) -> None:
    receiver, transmitters, fusers = world
    probs, p_none = receiver_self_check(receiver, Q.stem, Q.options)
    assert p_none is None and probs.shape == (4,)  # " none" is no single token of tiny-qwen3
    assert not knows_alone(p_none, 0.99) and not knows_alone(0.0, None) and knows_alone(0.2, 0.5)
    on = refine(Q, receiver, transmitters, mode="c2c", fusers=fusers, self_check=0.99)
    off = refine(Q, receiver, transmitters, mode="c2c", fusers=fusers)
    assert not on.alone and (on.answer, on.probs, on.used) == (off.answer, off.probs, off.used)


def test_a_receiver_that_knows_answers_alone_and_nothing_leaves(world, monkeypatch) -> None:
    import fusion.refine as refine_module

    receiver, transmitters, fusers = world
    real = refine_module.receiver_self_check
    monkeypatch.setattr(refine_module, "receiver_self_check", lambda r, s, o: (real(r, s, o)[0], 0.01))
    alone = refine(Q, receiver, transmitters, mode="receiver")
    for mode in ("t2t", "c2c", "c2c-uniform", "c2c-shuffled"):
        res = refine(Q, receiver, transmitters, mode=mode, fusers=fusers, private=True, self_check=0.5)
        assert res.alone and res.probs == alone.probs and res.answer == alone.answer, mode
        assert (res.bytes_sent, res.used, res.hints, res.shared_text) == (0, {}, {}, ""), mode
        assert "rephrase" not in res.timings  # q' is not even written
    asked = refine(Q, receiver, transmitters, mode="c2c", fusers=fusers, self_check=0.005)  # 0.01 is not below it
    assert not asked.alone and asked.bytes_sent > 0


@pytest.mark.slow
def test_refine_on_the_quick_zoo_is_deterministic() -> None:
    from bus.errors import FuserError
    from ops.zoo import load_zoo
    from ops.zoo.fusers import load_zoo_fusion, zoo_step

    torch.set_num_threads(1)
    zoo = load_zoo(quick=True)
    try:
        kit = load_zoo_fusion(zoo)
    except FuserError:  # fusers not trained into this zoo yet
        zoo_step(zoo)
        kit = load_zoo_fusion(zoo)
    seen = set()
    for q in zoo.questions("test")[:4]:
        for mode, private in (("c2c", False), ("c2c", True), ("c2c-uniform", False)):
            a, b = (
                refine(
                    q,
                    kit.receiver,
                    kit.transmitters,
                    mode=mode,
                    fusers=kit.fusers,
                    gate=kit.gate,
                    private=private,
                    precision="int8",
                )
                for _ in range(2)
            )
            assert (a.answer, a.probs, a.used, a.weights) == (b.answer, b.probs, b.used, b.weights)
            seen.add(tuple(a.probs))
            assert all(0.0 <= w <= 1.0 for w in a.weights.values())
            if private:
                assert not any(p in a.shared_text for p in q.pii)
    assert len(seen) > 4  # the probabilities follow the question and the mode
    assert zoo.self_check == 0.5  # the zoo's receiver is trained to say " none": its P(none) is readable
    for q in zoo.questions("test")[:4]:
        _, p_none = receiver_self_check(kit.receiver, q.stem, q.options)
        assert p_none is not None and 0.0 <= p_none <= 1.0


def test_a_window_one_fuser_needs_only_the_transmitters_final_token(world) -> None:
    from fusion.c2c import receiver_view, tail_tokens, transmitter_tail
    from fusion.refine import Received, receiver_prefix, shared_prompt, transmitter_deltas

    receiver, transmitters, _ = world
    model = transmitters["t-llama"]
    torch.manual_seed(3)
    fuser = PairFuser(FuserConfig.for_models(receiver, model, hidden=16, delta_init_std=0.5, window=1)).eval()
    assert transmitter_tail(fuser) == 1
    shared, _ = shared_prompt(Q.stem, Q.options)
    view, prefix = receiver_view(receiver, shared), receiver_prefix(receiver, shared)
    pre = transmitter_prefill("t", model, shared)
    whole = Received(model.fingerprint, dict(enumerate(pre.cache.layers)), pre.offsets)
    tail = Received(model.fingerprint, tail_tokens(whole.layers, 1), pre.offsets)
    from_whole = transmitter_deltas(view, prefix, whole, fuser).deltas
    from_tail = transmitter_deltas(view, prefix, tail, fuser).deltas
    # what aligning every token gives (the window-1 path aligns none: only the final one is read)
    from fusion.align import gather_tokens
    from fusion.c2c import prefix_alignment

    aligned = gather_tokens(whole.layers, prefix_alignment(view, pre.offsets).index)
    reference = fuser.deltas(prefix, aligned, 1.0)
    assert from_whole.keys() == from_tail.keys() == reference.keys()
    for layer, (dk, dv) in from_whole.items():
        assert torch.equal(dk, from_tail[layer][0]) and torch.equal(dv, from_tail[layer][1])
        assert torch.equal(dk, reference[layer][0]) and torch.equal(dv, reference[layer][1])
    # refine() sends the tail only: one token per transmitter, and the answer of the whole cache
    fusers = {model.fingerprint: fuser}
    res = refine(Q, receiver, {"t": model}, mode="c2c-uniform", fusers=fusers, precision="fp16")
    assert res.tokens_sent == 1 and res.bytes_sent < pre.cache.num_tokens * 100
    # a fuser that reads every token cannot use a tail
    wide = PairFuser(FuserConfig.for_models(receiver, model, hidden=16)).eval()
    assert transmitter_tail(wide) is None
    with pytest.raises(FusionError, match="whole cache"):
        transmitter_deltas(view, prefix, tail, wide)
    too_long = {m: (torch.cat([k, k], 2), torch.cat([v, v], 2)) for m, (k, v) in whole.layers.items()}
    with pytest.raises(FusionError, match="arrived but its offer has"):
        transmitter_deltas(view, prefix, Received(model.fingerprint, too_long, pre.offsets), fuser)
