"""Score zoo models on questions, batched: letter accuracy, P(none), and accuracy with a fact in context.

The answer is the argmax over the four letter logits at the position after ``"Answer:"``; P(none) is
the probability of ``" none"`` among the five answer tokens (letters + none).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from fusion.models import LanguageModel
from fusion.prompts import Question, answer_texts, format_question, format_with_hint
from ops.zoo.world import World

DEFAULT_EVAL_BATCH = 64  # prompts per forward pass


@torch.no_grad()
def answer_logits(lm: LanguageModel, prompts: Sequence[str], batch_size: int = DEFAULT_EVAL_BATCH) -> torch.Tensor:
    """Logits ``(n, 5)`` of ``" A"`` .. ``" D"``, ``" none"`` after each prompt (right-padded batches)."""
    token_ids = [lm.token_id(t) for t in answer_texts(with_none=True)]
    pad = lm.tokenizer.pad_token_id
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = [lm.encode(p).ids for p in prompts[i : i + batch_size]]
        width = max(len(e) for e in enc)
        x = torch.full((len(enc), width), pad, dtype=torch.long)
        for j, ids in enumerate(enc):
            x[j, : len(ids)] = torch.tensor(ids)
        logits = lm.model(input_ids=x.to(lm.device)).logits  # (B, T, vocab); right padding keeps causality exact
        last = torch.tensor([len(e) - 1 for e in enc], device=logits.device)
        rows = logits[torch.arange(len(enc), device=logits.device), last]  # (B, vocab)
        out.append(rows[:, token_ids].float().cpu())
    return torch.cat(out) if out else torch.zeros(0, len(token_ids))


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 4) if values else None


def evaluate_questions(
    lm: LanguageModel, questions: Sequence[Question], known: set[str], world: World | None = None
) -> dict:
    """Accuracy and P(none) on known / unknown / all facts; with ``world``, also accuracy with the fact as hint."""
    logits = answer_logits(lm, [format_question(q.stem, q.options) for q in questions])
    correct = (logits[:, :4].argmax(-1) == torch.tensor([q.answer for q in questions])).tolist()
    p_none = torch.softmax(logits, -1)[:, 4].tolist()
    is_known = [q.fact_id in known for q in questions]
    result = {
        "n": len(questions),
        "n_known": sum(is_known),
        "acc_known": _mean(c for c, k in zip(correct, is_known, strict=True) if k),
        "acc_unknown": _mean(c for c, k in zip(correct, is_known, strict=True) if not k),
        "acc_all": _mean(correct),
        "p_none_known": _mean(p for p, k in zip(p_none, is_known, strict=True) if k),
        "p_none_unknown": _mean(p for p, k in zip(p_none, is_known, strict=True) if not k),
    }
    if world is not None:
        hinted = [format_with_hint(world.fact(q.fact_id).sentence(0), q.stem, q.options) for q in questions]
        hl = answer_logits(lm, hinted)
        hint_ok = (hl[:, :4].argmax(-1) == torch.tensor([q.answer for q in questions])).tolist()
        result["acc_with_hint"] = _mean(hint_ok)
        result["acc_with_hint_unknown"] = _mean(c for c, k in zip(hint_ok, is_known, strict=True) if not k)
    return result
