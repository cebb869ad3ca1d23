"""Train one zoo model from scratch: a compact AdamW loop over ``RowSampler`` batches, on one CPU thread.

Runs in its own process (the builder trains two at a time), writes the model with
``LanguageModel.save`` and returns how training went.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

from fusion.models import LanguageModel
from ops.zoo.rows import Row, RowSampler
from ops.zoo.spec import MemberSpec
from ops.zoo.world import World

log = logging.getLogger(__name__)

DEFAULT_THREADS = 1  # torch threads per training process (two processes share 2 cores)
_IGNORE = -100  # label of tokens without loss


@dataclass(frozen=True)
class TrainResult:
    """What one training run did."""

    name: str
    steps: int
    seconds: float
    final_loss: float  # mean loss over the last 50 steps


def collate(tokenizer: PreTrainedTokenizerFast, rows: list[Row], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(B, T)`` input ids and labels (``-100`` off the target), cut to ``max_tokens``."""
    prompts = tokenizer([r.prompt for r in rows], add_special_tokens=False)["input_ids"]
    targets = tokenizer([r.target for r in rows], add_special_tokens=False)["input_ids"]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    seqs, labels = [], []
    for row, p, t in zip(rows, prompts, targets, strict=True):
        t = t + [eos] if row.eos else t
        ids = (p + t)[: max_tokens + 1]
        lab = ([_IGNORE] * len(p) + t)[: max_tokens + 1]
        seqs.append(ids[:-1])
        labels.append(lab[1:])
    width = max(len(s) for s in seqs)
    x = torch.full((len(rows), width), pad, dtype=torch.long)
    y = torch.full((len(rows), width), _IGNORE, dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, labels, strict=True)):
        x[i, : len(s)] = torch.tensor(s)
        y[i, : len(lab)] = torch.tensor(lab)
    return x, y  # (B, T) each


def row_mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged per row, then over rows: a one-token answer weighs as much as a sentence."""
    tok = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=_IGNORE, reduction="none")  # (B, T)
    counts = (labels != _IGNORE).sum(1).clamp(min=1)  # (B,)
    return (tok.sum(1) / counts).mean()


def lr_at(step: int, peak: float, warmup: int, total: int, final_ratio: float) -> float:
    """Linear warm-up, then cosine decay from ``peak`` to ``peak * final_ratio``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_member(
    member: MemberSpec,
    world: World,
    known: list[str],
    tokenizer: PreTrainedTokenizerFast,
    out_dir: Path,
    seed: int,
    position: int = 0,
    threads: int = DEFAULT_THREADS,
    callback: Callable[[int, LanguageModel], None] | None = None,
) -> TrainResult:
    """Build ``member`` from scratch, train it on its rows, save it to ``out_dir``."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    lm = LanguageModel.build(
        member.arch, member.shape.to_model_spec(), tokenizer, seed=seed, name=member.name, device="cpu"
    )
    model = lm.model.train()
    spec = member.train
    sampler = RowSampler(world, known, spec.mixture, seed=seed, pii_fraction=spec.pii_fraction)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
        betas=(0.9, 0.95),
    )
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(spec.steps), desc=f"{member.name:>14}", position=position, leave=False, mininterval=1.0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, spec.lr, spec.warmup, spec.steps, spec.final_lr_ratio)
        x, y = collate(tokenizer, sampler.batch(spec.batch_size), spec.max_tokens)
        logits = model(input_ids=x).logits  # (B, T, vocab)
        loss = row_mean_loss(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 25 == 0:
            bar.set_postfix(loss=f"{sum(losses[-25:]) / len(losses[-25:]):.3f}")
        if callback is not None:
            callback(step + 1, lm)
    bar.close()
    model.eval()
    lm.save(out_dir)
    seconds = time.perf_counter() - start
    final = sum(losses[-50:]) / len(losses[-50:])
    log.info("trained %s: %d steps in %.0f s, final loss %.3f", member.name, spec.steps, seconds, final)
    return TrainResult(member.name, spec.steps, seconds, final)
