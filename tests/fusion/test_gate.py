"""The gating network: offers, scores, layer importance, and training on frozen fusers (tiny models)."""

from __future__ import annotations

import pytest
import torch

from fusion.fuser import FuserConfig, PairFuser
from fusion.gate import SUMMARY_DIM, GateConfig, GateNetwork, OfferSummary, summarize_offer, uniform_scores
from fusion.gate_train import GateTrainConfig, prepare_gate_examples, train_gate
from fusion.models import LanguageModel
from fusion.prompts import format_question
from fusion.train import FusionItem

OPTIONS = ("red", "blue", "green", "pink")


def _offer(fp: str = "ab" * 8, p_none: float = 0.1, layers: int = 3) -> OfferSummary:
    return OfferSummary(
        fingerprint=fp,
        num_layers=layers,
        num_tokens=30,
        p_none=p_none,
        p_top=0.7,
        entropy=0.9,
        summary=(0.0,) * SUMMARY_DIM,
    )


@pytest.fixture(scope="module")
def tiny():
    receiver = LanguageModel.load("tiny-qwen3")
    transmitters = {"llama": LanguageModel.load("tiny-llama"), "qwen2": LanguageModel.load("tiny-qwen2")}
    fusers = {}
    for i, (name, model) in enumerate(transmitters.items()):
        torch.manual_seed(i)
        fusers[name] = PairFuser(FuserConfig.for_models(receiver, model, hidden=16, delta_init_std=0.3)).eval()
    return receiver, transmitters, fusers


def test_offer_summary_is_small_and_deterministic(tiny) -> None:
    _, transmitters, _ = tiny
    model = transmitters["llama"]
    prompt = format_question("What is the color of Zorbin?", OPTIONS)
    a, b = summarize_offer(model, model.prefill(prompt)), summarize_offer(model, model.prefill(prompt))
    assert a == b
    other = summarize_offer(model, model.prefill(format_question("Which pet does Kalu have?", OPTIONS)))
    assert other.summary != a.summary and (other.p_none, other.entropy) != (a.p_none, a.entropy)
    assert a.fingerprint == model.fingerprint and a.num_layers == model.num_layers
    assert len(a.summary) == SUMMARY_DIM and 0 <= a.p_none <= 1 and 0 < a.p_top <= 1
    assert len(a.model_dump_json()) < 400  # a few floats: fits any Offer message


def test_scores_weights_and_layer_importance() -> None:
    fp = "ab" * 8
    gate = GateNetwork(GateConfig(hidden=8, min_weight=0.2), {fp: (0.0, 0.5, 1.0)}).eval()
    (score,) = gate.score([_offer(fp)])
    assert 0 <= score.weight <= 1
    assert score.layer_importance == (0.0, 0.5 * score.weight, score.weight)
    assert score.layers() == [2, 1]  # most important first, unused layer 0 never sent
    with torch.no_grad():
        gate.bias.fill_(-10.0)
    (off,) = gate.score([_offer(fp)])
    assert off.weight == 0.0 and off.layers() == []
    # An unknown transmitter gets the shared slot and a flat profile.
    (other,) = gate.score([_offer("cd" * 8, layers=2)])
    assert len(other.layer_importance) == 2
    assert [s.weight for s in uniform_scores([_offer(fp)], {fp: (0.0, 1.0, 1.0)})] == [1.0]


def test_gate_training_is_deterministic_and_profiles_follow_the_fusers(tiny) -> None:
    receiver, transmitters, fusers = tiny
    with torch.no_grad():
        fusers["llama"].gate_logits[0] = -4.0  # receiver layer 0 (reading llama layer 1) closed
    items = [FusionItem(f"What is the color of {n}?", OPTIONS, i % 4) for i, n in enumerate(("Zorbin", "Kala", "Mefu"))]
    examples = prepare_gate_examples(receiver, transmitters, fusers, items)
    cfg = GateTrainConfig(steps=6, batch_size=3, gate=GateConfig(hidden=8))
    a = train_gate(receiver, examples, list(fusers.values()), cfg, progress=False)
    b = train_gate(receiver, examples, list(fusers.values()), cfg, progress=False)
    assert a.losses == b.losses
    fewer = train_gate(receiver, examples[:2], list(fusers.values()), cfg, progress=False)
    assert fewer.losses != a.losses  # the losses come from the examples
    llama = transmitters["llama"].fingerprint
    profile = a.gate.profiles[llama]
    assert len(profile) == 3 and profile[0] == 0.0 and profile[1] == 0.0 and profile[2] > 0
    scores = a.gate.score([e for e in examples[0].offers])
    assert all(0 <= s.weight <= 1 for s in scores)
