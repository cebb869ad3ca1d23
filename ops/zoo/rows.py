"""Training rows for one zoo model: (prompt, target) text pairs drawn from a mixture of kinds.

Kinds (loss only on the target, except ``fact`` rows which are plain text):

- ``fact``: a known fact in a random sentence template.
- ``letter``: a question about a known fact, options reshuffled, answered by its letter.
- ``none``: a question about a train-pool fact the model does not know, answered ``" none"``.
  Held-out facts are never used here, so P(none) on them measures generalisation.
- ``context``: a fact given in context, then the question, answered by its letter. For facts the model
  knows the true fact; otherwise a random value (of a real or a made-up entity), so context rows teach
  reading the context and never leak an unknown fact into the weights.
- ``hint``: (transmitters) ``format_hint_request`` -> the canonical fact sentence, or ``" none"``.
- ``rephrase``: (receiver) ``format_rephrase_request`` -> a plain paraphrase without personal details.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from fusion.prompts import (
    NONE_ANSWER,
    answer_token_text,
    format_hint_request,
    format_question,
    format_rephrase_request,
    format_with_hint,
)
from ops.zoo.world import (
    FACT_TEMPLATES,
    Fact,
    World,
    entity_names,
    make_question,
    paraphrase,
    random_phrasing,
)

DEFAULT_FAKE_ENTITIES = 400  # made-up entities for context rows (never in the world)
_REPHRASE_PII_FRACTION = 0.8  # rephrase rows mostly start from stems with personal details


@dataclass(frozen=True)
class Row:
    """One training example: loss on ``target`` given ``prompt`` (``eos``: end the target with EOS)."""

    prompt: str
    target: str
    eos: bool = False


class RowSampler:
    """Draws training rows for one model from the world and the facts it knows."""

    def __init__(
        self,
        world: World,
        known: Sequence[str],
        mixture: dict[str, float],
        seed: int,
        pii_fraction: float | None = None,
    ) -> None:
        self.world = world
        self.rng = random.Random(f"rows/{seed}")
        self.pii_fraction = world.spec.pii_fraction if pii_fraction is None else pii_fraction
        known_set = set(known)
        self.known = world.facts_of(sorted(known_set))
        self.unknown = [f for f in world.facts if f.id not in known_set]
        train_pool = set(world.train_fact_ids)
        self.unknown_train = [f for f in self.unknown if f.id in train_pool]
        self.fake_entities = entity_names(random.Random(f"fake/{seed}"), DEFAULT_FAKE_ENTITIES, world.entities)
        kinds = [k for k, w in mixture.items() if w > 0]
        if not self.known:
            raise ValueError("a model must know at least one fact")
        if "none" in kinds and not self.unknown_train:
            kinds.remove("none")
        self.kinds = kinds
        self.weights = [mixture[k] for k in kinds]

    def sample(self) -> Row:
        """One row of a kind drawn from the mixture."""
        kind = self.rng.choices(self.kinds, self.weights)[0]
        return getattr(self, f"_{kind}")()

    def batch(self, size: int) -> list[Row]:
        """``size`` rows."""
        return [self.sample() for _ in range(size)]

    # ---- row kinds ----------------------------------------------------------------------------
    def _fact(self) -> Row:
        fact = self.rng.choice(self.known)
        return Row("", fact.sentence(self.rng.randrange(len(FACT_TEMPLATES))), eos=True)

    def _question(self, fact: Fact):
        return make_question(self.world, fact, self.rng, "row", phrasing=random_phrasing(self.rng, self.pii_fraction))

    def _question_row(self, fact: Fact, answer: str, hint: str | None = None) -> Row:
        q = self._question(fact)
        letter = q.answer_letter if answer == "letter" else NONE_ANSWER
        prompt = format_with_hint(hint, q.stem, q.options) if hint else format_question(q.stem, q.options)
        return Row(prompt, answer_token_text(letter))

    def _letter(self) -> Row:
        return self._question_row(self.rng.choice(self.known), "letter")

    def _none(self) -> Row:
        return self._question_row(self.rng.choice(self.unknown_train), NONE_ANSWER)

    def _context(self) -> Row:
        r = self.rng.random()
        if r < 0.3 or not self.unknown:
            fact = self.rng.choice(self.known)
        else:
            base = self.rng.choice(self.unknown or self.known)
            value = self.rng.choice(self.world.attributes[base.attribute])
            entity = base.entity if r < 0.65 else self.rng.choice(self.fake_entities)
            fact = Fact(id="ctx", entity=entity, attribute=base.attribute, value=value)
        return self._question_row(fact, "letter", hint=fact.sentence(0))

    def _hint(self) -> Row:
        if self.unknown_train and self.rng.random() < 0.4:
            fact, target = self.rng.choice(self.unknown_train), NONE_ANSWER
        else:
            fact = self.rng.choice(self.known)
            target = fact.sentence(0)
        q = self._question(fact)
        return Row(format_hint_request(q.stem), " " + target, eos=True)

    def _rephrase(self) -> Row:
        fact = self.rng.choice(self.world.facts)
        phrasing = random_phrasing(self.rng, _REPHRASE_PII_FRACTION)
        q = make_question(self.world, fact, self.rng, "row", phrasing=phrasing)
        return Row(format_rephrase_request(q.stem), " " + paraphrase(fact.entity, fact.attribute, phrasing), eos=True)
