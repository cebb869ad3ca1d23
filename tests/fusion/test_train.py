"""Fuser training: deterministic per seed, resumable, and (on the quick zoo) the loss falls."""

from __future__ import annotations

import pytest
import torch

from fusion.models import LanguageModel
from fusion.train import FuserTrainConfig, FusionItem, fused_accuracy, prepare_examples, train_fuser

NAMES = ("Zorbin", "Kala", "Mefu", "Trosk", "Blin", "Gera", "Pomu", "Sarix")
OPTIONS = ("red", "blue", "green", "pink")
CFG = FuserTrainConfig(steps=24, batch_size=4, lr=3e-3, hidden=16, checkpoint_every=8)


@pytest.fixture(scope="module")
def setup():
    receiver, transmitter = LanguageModel.load("tiny-qwen3"), LanguageModel.load("tiny-llama")
    items = [FusionItem(f"What is the color of {n}?", OPTIONS, i % 4) for i, n in enumerate(NAMES)]
    items.append(FusionItem("What is the color of Zorbin?", OPTIONS, 1, shared_stem="Which color has Zorbin?"))
    return receiver, transmitter, prepare_examples(receiver, transmitter, items)


def _state(fuser) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in fuser.state_dict().items()}


def test_training_is_deterministic_per_seed(setup) -> None:
    receiver, transmitter, examples = setup
    a = train_fuser(receiver, transmitter, examples, CFG, progress=False)
    b = train_fuser(receiver, transmitter, examples, CFG, progress=False)
    c = train_fuser(receiver, transmitter, examples, FuserTrainConfig(**{**CFG.__dict__, "seed": 1}), progress=False)
    assert a.losses == b.losses
    assert all(torch.equal(x, y) for x, y in zip(_state(a.fuser).values(), _state(b.fuser).values(), strict=True))
    assert a.losses != c.losses
    assert not a.fuser.training  # handed back ready for inference


@pytest.mark.parametrize("window", [None, 1])
def test_a_batch_split_by_continuation_has_the_whole_batchs_loss_and_gradient(setup, window) -> None:
    """Plain and private rows are padded separately (``continuation_groups``); the summed parts must equal the one
    padded batch, loss and gradient (the layer gates pinned open, so their noise cannot differ)."""
    from fusion.train import _batch_loss, continuation_groups, new_fuser

    receiver, transmitter, examples = setup
    parts = [[examples[i] for i in group] for group in continuation_groups([e.continuation for e in examples])]
    assert [len(p) for p in parts] == [len(examples) - 1, 1]  # the private row goes on its own
    fuser = new_fuser(receiver, transmitter, FuserTrainConfig(hidden=16, window=window)).train()
    with torch.no_grad():
        fuser.gate_logits.fill_(50.0)
    noise = torch.Generator().manual_seed(0)

    def loss_and_grads(groups) -> tuple[float, list[torch.Tensor]]:
        fuser.zero_grad()
        total = 0.0
        for group in groups:
            loss = _batch_loss(receiver, fuser, group, True, noise) / len(examples)
            loss.backward()
            total += float(loss.detach())
        return total, [p.grad.clone() for p in fuser.parameters() if p.grad is not None]

    whole, whole_grads = loss_and_grads([examples])
    split, split_grads = loss_and_grads(parts)
    assert split == pytest.approx(whole, rel=1e-5)
    for a, b in zip(whole_grads, split_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_resuming_from_a_checkpoint_gives_the_same_fuser(setup, tmp_path) -> None:
    receiver, transmitter, examples = setup
    straight = train_fuser(receiver, transmitter, examples, CFG, progress=False)
    ckpt = tmp_path / "pair.ckpt"
    first = train_fuser(receiver, transmitter, examples, CFG, checkpoint=ckpt, progress=False, stop_after=16)
    assert len(first.losses) == 16 and ckpt.is_file()
    rest = train_fuser(receiver, transmitter, examples, CFG, checkpoint=ckpt, progress=False)
    assert rest.resumed_from == 16
    assert rest.losses == straight.losses
    for x, y in zip(_state(rest.fuser).values(), _state(straight.fuser).values(), strict=True):
        assert torch.equal(x, y)


def test_a_checkpoint_of_another_run_is_ignored(setup, tmp_path) -> None:
    receiver, transmitter, examples = setup
    ckpt = tmp_path / "pair.ckpt"
    train_fuser(receiver, transmitter, examples, CFG, checkpoint=ckpt, progress=False, stop_after=8)
    other = FuserTrainConfig(**{**CFG.__dict__, "lr": 1e-3})
    again = train_fuser(receiver, transmitter, examples, other, checkpoint=ckpt, progress=False)
    assert again.resumed_from == 0 and len(again.losses) == other.steps
    ckpt.write_bytes(b"garbage")
    assert train_fuser(receiver, transmitter, examples, CFG, checkpoint=ckpt, progress=False).resumed_from == 0


def test_loss_falls_and_the_fuser_fits_its_targets(setup) -> None:
    receiver, transmitter, examples = setup
    cfg = FuserTrainConfig(steps=80, batch_size=9, lr=3e-3, hidden=32)
    res = train_fuser(receiver, transmitter, examples, cfg, progress=False)
    assert sum(res.losses[-10:]) / 10 < 0.85 * sum(res.losses[:10]) / 10
    assert fused_accuracy(receiver, res.fuser, examples) > fused_accuracy(receiver, None, examples)


@pytest.fixture(scope="module")
def quick_zoo():
    from ops.zoo import load_zoo

    torch.set_num_threads(1)
    return load_zoo(quick=True)


def _about(stem: str, entity: str, attribute: str) -> bool:
    return f" {entity}" in f" {stem}".replace("?", " ").replace(".", " ") and f" {attribute} " in f" {stem} "


@pytest.mark.slow
def test_fuser_and_gate_items_never_use_held_out_facts(quick_zoo) -> None:
    from ops.zoo.fusers import fusion_spec, gate_items, pair_items

    zoo, spec = quick_zoo, fusion_spec(quick=True)
    known = {n: set(zoo.known(n)) for n in zoo.names}
    items = pair_items(zoo.world, known[zoo.receiver], known[zoo.transmitters[0]], spec, "test")
    items += gate_items(zoo.world, known, spec)
    held_out = zoo.world.facts_of(zoo.world.test_fact_ids)
    for item in items:
        texts = (item.stem, item.shared_stem, item.donor[0] if item.donor else None, item.context)
        for stem in filter(None, texts):
            assert not any(_about(stem, f.entity, f.attribute) for f in held_out), stem


@pytest.mark.slow
def test_training_loss_falls_on_the_quick_zoo(quick_zoo) -> None:
    from ops.zoo.fusers import fusion_spec, pair_items

    zoo = quick_zoo
    receiver, transmitter = zoo.model(zoo.receiver), zoo.model(zoo.transmitters[0])
    items = pair_items(
        zoo.world, set(zoo.known(zoo.receiver)), set(zoo.known(zoo.transmitters[0])), fusion_spec(True), "test"
    )
    res = train_fuser(
        receiver, transmitter, items, FuserTrainConfig(steps=100, batch_size=16, lr=2e-3, hidden=32), progress=False
    )
    first, last = sum(res.losses[:15]) / 15, sum(res.losses[-15:]) / 15
    assert last < 0.8 * first, (first, last)


def test_a_fact_in_the_transmitters_context_is_aligned_past_it(setup) -> None:
    from fusion.c2c import prefix_alignment, receiver_view
    from fusion.prompts import format_question, hint_lead

    receiver, transmitter, _ = setup
    prompt = format_question("What is the color of Zorbin?", OPTIONS)
    lead = hint_lead("The color of Zorbin is pink.")
    view = receiver_view(receiver, prompt)
    plain = prefix_alignment(view, transmitter.prefill(prompt).offsets, anchor_last=False)
    told = transmitter.prefill(lead + prompt)
    shifted = prefix_alignment(view, told.offsets, anchor_last=False, shift=len(lead))
    first = next(i for i, (s, _) in enumerate(told.offsets) if s >= len(lead))
    assert int(shifted.index.min()) >= first  # nothing of the fact itself is fused
    assert torch.equal(shifted.index, plain.index + first)  # the same prompt tokens, after the fact


@pytest.mark.slow
def test_context_items_teach_facts_nobody_knows_with_fresh_values(quick_zoo) -> None:
    from ops.zoo.fusers import context_items

    zoo = quick_zoo
    r_known, t_known = set(zoo.known(zoo.receiver)), set(zoo.known(zoo.transmitters[0]))
    items = context_items(zoo.world, r_known, t_known, 200, 0.3, "t", 0)
    assert len(items) == 200 and any(it.shared_stem for it in items)
    by_id = {f.entity + "/" + f.attribute: f for f in zoo.world.facts}
    values = {}
    for it in items:
        told = it.options[it.target]
        assert it.context is not None and told in it.context
        fact = next(f for key, f in by_id.items() if _about(it.stem, f.entity, f.attribute))
        assert fact.id in set(zoo.world.train_fact_ids) - r_known - t_known
        values.setdefault(fact.id, set()).add(told)
    assert max(len(v) for v in values.values()) > 1  # the same fact is told with different values


@pytest.mark.slow
def test_facts_held_out_for_the_gate_are_never_in_a_fuser_item(quick_zoo) -> None:
    from dataclasses import replace

    from ops.zoo.fusers import fuser_facts, fusion_spec, gate_facts, gate_items, pair_items

    zoo = quick_zoo
    spec = replace(fusion_spec(quick=True), gate_holdout=0.25)
    held, rest = gate_facts(zoo.world, spec), fuser_facts(zoo.world, spec)
    assert held and not held & rest and held | rest == set(zoo.world.train_fact_ids)
    assert gate_facts(zoo.world, fusion_spec(quick=True)) == set()  # no hold-out: the gate uses the whole pool
    known = {n: set(zoo.known(n)) for n in zoo.names}
    fuser_items = pair_items(zoo.world, known[zoo.receiver], known[zoo.transmitters[0]], spec, "test")
    held_facts = zoo.world.facts_of(sorted(held))
    for item in fuser_items:
        for stem in filter(None, (item.stem, item.shared_stem, item.context)):
            assert not any(_about(stem, f.entity, f.attribute) for f in held_facts), stem
    gate_stems = [item.stem for item in gate_items(zoo.world, known, spec)]
    assert gate_stems and all(any(_about(s, f.entity, f.attribute) for f in held_facts) for s in gate_stems)
