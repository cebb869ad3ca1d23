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
