"""Training one zoo model: top-ups while it misses a target, then a fresh start with another seed."""

from __future__ import annotations

from ops.zoo.spec import MemberSpec, ShapeSpec, TrainSpec
from ops.zoo.tokenizers import train_tokenizer
from ops.zoo.train_lm import RESTART_SEED_STRIDE, skills, train_member
from ops.zoo.world import WorldSpec, generate_world


def _member(**check) -> MemberSpec:
    mixture = {"fact": 0.3, "letter": 0.3, "hint": 0.4}
    train = TrainSpec(steps=3, lr=1e-3, warmup=1, batch_size=4, max_tokens=48, mixture=mixture, **check)
    shape = ShapeSpec(hidden_size=32, num_layers=1, head_dim=8, intermediate_size=64)
    return MemberSpec(name="m", role="transmitter", arch="llama", shape=shape, vocab_size=300, share=0.5, train=train)


def test_missing_targets_tops_up_then_starts_over(tmp_path, caplog) -> None:
    world = generate_world(WorldSpec(num_entities=8, values_per_attribute=4))
    known = [f.id for f in world.facts[:10]]
    member = _member(target_acc=0.5, target_hint_acc=1.01, topup_steps=2, max_topups=1, max_restarts=1)
    result = train_member(member, world, known, train_tokenizer(world, 300), tmp_path / "m", seed=5)
    assert (result.restarts, result.topups, result.steps) == (1, 2, 3 + 2 + 3 + 2)  # 1.01 is out of reach
    assert result.hint_acc is not None and result.own_acc is not None
    assert (tmp_path / "m" / "config.json").is_file()
    assert f"starting over with seed {5 + RESTART_SEED_STRIDE}" in caplog.text


def test_no_targets_no_check(tmp_path) -> None:
    world = generate_world(WorldSpec(num_entities=8, values_per_attribute=4))
    known = [f.id for f in world.facts[:10]]
    result = train_member(_member(), world, known, train_tokenizer(world, 300), tmp_path / "m", seed=1)
    assert (result.restarts, result.topups, result.steps, result.own_acc) == (0, 0, 3, None)


def test_skills_reports_own_and_hint(tmp_path) -> None:
    from fusion.models import LanguageModel

    world = generate_world(WorldSpec(num_entities=8, values_per_attribute=4))
    tok = train_tokenizer(world, 300)
    lm = LanguageModel.build("llama", _member().shape.to_model_spec(), tok, seed=0, name="m", device="cpu")
    got = skills(lm, world, [f.id for f in world.facts[:5]], seed=0)
    assert set(got) == {"own", "hint"} and all(0.0 <= v <= 1.0 for v in got.values())
