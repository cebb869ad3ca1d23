"""The receiver's loss after fusing, for a padded batch (fuser and gate training).

Letter style: cross-entropy over the four answer letters at the continuation's last position. Text style:
cross-entropy of every answer token, teacher-forced after the continuation; the vocabulary projection runs only
at the labelled positions (a 262k-word output layer at every position would dominate the step).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fusion.c2c import batch_letter_logits, letter_ids
from fusion.kvcache import KVCache
from fusion.live import LiveTerm, as_model_cache
from fusion.models import LanguageModel


def _inputs(
    receiver: LanguageModel,
    caches: KVCache,
    prefix_lengths: torch.Tensor,
    rows: Sequence[Sequence[int]],
    live: Sequence[LiveTerm] = (),
) -> dict:
    """Model inputs that feed ``rows[i]`` after row i's right-padded prefix, at its own positions, pads masked."""
    B, T = caches.batch_size, caches.num_tokens
    C = max(len(r) for r in rows)
    device = caches.layers[0][0].device
    pad = receiver.tokenizer.pad_token_id or 0
    ids = torch.full((B, C), pad, dtype=torch.long, device=device)
    mask = torch.zeros((B, T + C), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(list(row), device=device)
        mask[i, : int(prefix_lengths[i])] = 1
        mask[i, T : T + len(row)] = 1
    positions = prefix_lengths.to(device)[:, None] + torch.arange(C, device=device)[None, :]  # (B, C)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": positions,
        "cache": as_model_cache(receiver.config, caches, live),
    }


def answer_token_logits(
    receiver: LanguageModel,
    caches: KVCache,
    prefix_lengths: torch.Tensor,
    continuations: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    live: Sequence[LiveTerm] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(N, vocab)`` at every answer token of every row (teacher-forced) and the labels ``(N,)``."""
    rows = [list(c) + list(a[:-1]) for c, a in zip(continuations, answers, strict=True)]
    out = receiver.body(**_inputs(receiver, caches, prefix_lengths, rows, live), use_cache=True)
    where_r, where_c, labels = [], [], []
    for i, (c, a) in enumerate(zip(continuations, answers, strict=True)):
        for j, token in enumerate(a):
            where_r.append(i)
            where_c.append(len(c) - 1 + j)
            labels.append(token)
    hidden = out.last_hidden_state[torch.tensor(where_r), torch.tensor(where_c)]  # (N, hidden)
    return receiver.head_logits(hidden), torch.tensor(labels, device=hidden.device)


def fused_loss(
    receiver: LanguageModel,
    fused: KVCache,
    prefix_lengths: torch.Tensor,
    continuations: Sequence[Sequence[int]],
    targets: Sequence[int | Sequence[int]],
    live: Sequence[LiveTerm] = (),
) -> torch.Tensor:
    """Summed loss of a batch read from fused caches: per row, letter cross-entropy (letter style) or the mean
    cross-entropy of its answer tokens (text style); ``live`` terms fuse each row's first continuation token."""
    if receiver.style == "letter":
        letters = torch.tensor(letter_ids(receiver))
        logits = batch_letter_logits(receiver, fused, prefix_lengths, continuations, letters, live)  # (B, 4)
        return F.cross_entropy(logits, torch.tensor(list(targets), device=logits.device), reduction="sum")
    logits, labels = answer_token_logits(receiver, fused, prefix_lengths, continuations, targets, live)  # type: ignore[arg-type]
    per_token = F.cross_entropy(logits.float(), labels, reduction="none")
    sizes = torch.tensor([len(a) for a in targets], device=per_token.device)  # type: ignore[arg-type]
    row = torch.repeat_interleave(torch.arange(len(sizes), device=per_token.device), sizes)
    return torch.zeros(len(sizes), device=per_token.device).index_add(0, row, per_token).div(sizes).sum()
