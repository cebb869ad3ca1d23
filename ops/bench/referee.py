"""Is an answer right for what it says it used? ``refine()`` in process, with exactly those transmitters.

A fault may leave transmitters out of an answer; that answer is then not wrong, only less helped. It is **wrong**
when its letter differs from the letter ``refine()`` gives for the same question with the same transmitters (the
agents and ``refine()`` give the same answers for the same inputs: ``ops.bench e2e`` measures parity 1.00), with
q' made the same way (the rephraser's model, or the rules when the answer says no rephraser answered), alone when
the receiver's self-check or its queue answered alone. An answer that fused only some planned layers, or a cache
at another precision than fp16 (a shaped link), has no in-process twin: it is counted as unverified, not as right.
"""

from __future__ import annotations

from dataclasses import dataclass

from bus.errors import FedRefineError
from bus.schemas import Answer
from fusion.prompts import Question
from ops.bench.e2e import PRECISION, InProcess
from ops.demo import Setup


@dataclass(frozen=True)
class Verdict:
    """The referee's call on one answer."""

    checked: bool  # False: no in-process twin (partial layers, another precision)
    wrong: bool
    expected: str | None = None  # refine()'s letter


class Referee:
    """Reference letters for (question, transmitters used, how q' was made), computed once each."""

    def __init__(self, setup: Setup) -> None:
        self.local = InProcess(setup)
        self._cache: dict[tuple, str | None] = {}

    def judge(self, question: Question, private: bool, answer: Answer) -> Verdict:
        """Whether ``answer`` is what ``refine()`` gives with the transmitters it used."""
        if any(u.precision != PRECISION for u in answer.used) or any(
            ":" in n and "planned layers" in n for n in answer.notes
        ):
            return Verdict(checked=False, wrong=False)
        notes = " ".join(answer.notes)
        shed = "too little of its deadline" in notes  # read alone: no q', no fusion
        rules = "rephraser unavailable" in notes
        used = tuple(sorted(u.transmitter_id for u in answer.used))
        key = (question.id, question.stem, private, used, rules, shed, answer.alone)
        if key not in self._cache:
            try:
                self._cache[key] = self._reference(question, private, used, rules, shed, answer.alone)
            except FedRefineError:  # no twin after all: not counted either way
                self._cache[key] = None
        expected = self._cache[key]
        if expected is None:
            return Verdict(checked=False, wrong=False)
        return Verdict(checked=True, wrong=answer.choice != expected, expected=expected)

    def _reference(
        self, question: Question, private: bool, used: tuple[str, ...], rules: bool, shed: bool, alone: bool
    ) -> str | None:
        from fusion.prompts import option_letter
        from fusion.refine import answer_alone, refine
        from privacy.rephrase import rephrase

        local = self.local
        if shed:  # the receiver read the question alone, no q' at all
            reading = answer_alone(local.receiver, question.stem, question.options)
            return option_letter(reading.choice) if reading.choice is not None else None
        stem = rephrase(question.stem, None).text if private and rules else None
        if not used and not alone:  # asked the others, fused nothing: its own reading of q' (and q, when private)
            return self._unhelped(question, private, stem)
        result = refine(
            question,
            local.receiver,
            {tid: local.transmitters[tid] for tid in used},
            mode="c2c",
            fusers=local.fusers,
            gate=local.gate,
            private=private,
            private_stem=stem,
            precision=PRECISION,
            self_check=local.self_check,
        )
        return result.answer

    def _unhelped(self, question: Question, private: bool, stem: str | None) -> str | None:
        """What the receiver reads from its own view with nothing fused (the bus path with an empty or no plan)."""
        from fusion.c2c import prefix_cache, receiver_view
        from fusion.fuse import fuse
        from fusion.prompts import option_letter
        from fusion.refine import answer_after, shared_prompt
        from privacy.rephrase import rephrase

        model = self.local.receiver
        text = (stem or rephrase(question.stem, model).text) if private else question.stem
        shared, original = shared_prompt(question.stem, question.options, text if private else None, model.style)
        view = receiver_view(model, shared, original)
        fused = fuse(view, prefix_cache(model, view), {}, {})
        reading = answer_after(model, view, fused, question.options)
        return option_letter(reading.choice) if reading.choice is not None else None
