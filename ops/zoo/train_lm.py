"""Train one zoo model from scratch: a compact AdamW loop over ``RowSampler`` batches, on one CPU thread.

Runs in its own process (the builder trains two at a time), writes the model with
``LanguageModel.save`` and returns how training went.
"""

from __future__ import annotations

import logging
import math
import random
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
from ops.zoo.spec import MemberSpec, TrainSpec
from ops.zoo.world import World, make_question

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
    topups: int = 0  # extra phases run because the model missed its target on its own facts
    own_acc: float | None = None  # accuracy on its own facts at the end (when a target is set)


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


def _phase(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sampler: RowSampler,
    tokenizer: PreTrainedTokenizerFast,
    spec: TrainSpec,
    steps: int,
    peak_lr: float,
    desc: str,
    position: int,
    on_step: Callable[[int], None] | None = None,
) -> list[float]:
    """``steps`` optimiser steps with warm-up and cosine decay to ``peak_lr * final_lr_ratio``; the losses."""
    model.train()
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, position=position, leave=False, mininterval=1.0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, peak_lr, min(spec.warmup, steps // 4), steps, spec.final_lr_ratio)
        x, y = collate(tokenizer, sampler.batch(spec.batch_size), spec.max_tokens)
        loss = row_mean_loss(model(input_ids=x).logits, y)  # logits (B, T, vocab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 25 == 0:
            bar.set_postfix(loss=f"{sum(losses[-25:]) / len(losses[-25:]):.3f}")
        if on_step is not None:
            on_step(step + 1)
    bar.close()
    model.eval()
    return losses


def own_fact_accuracy(lm: LanguageModel, world: World, known: list[str], seed: int) -> float:
    """Letter accuracy on one fresh question per known fact (the check that decides on more training)."""
    from ops.zoo.evaluate import evaluate_questions

    rng = random.Random(f"own-check/{seed}")
    questions = [make_question(world, f, rng, f"own-{i}") for i, f in enumerate(world.facts_of(known))]
    return evaluate_questions(lm, questions, set(known))["acc_known"] or 0.0


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
    """Build ``member`` from scratch, train it on its rows (topping up while it misses its target), save it."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    lm = LanguageModel.build(
        member.arch, member.shape.to_model_spec(), tokenizer, seed=seed, name=member.name, device="cpu"
    )
    model = lm.model
    spec = member.train
    sampler = RowSampler(world, known, spec.mixture, seed=seed, pii_fraction=spec.pii_fraction)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
        betas=(0.9, 0.95),
    )
    start = time.perf_counter()
    on_step = (lambda step: callback(step, lm)) if callback is not None else None
    desc = f"{member.name:>14}"
    losses = _phase(model, opt, sampler, tokenizer, spec, spec.steps, spec.lr, desc, position, on_step)
    steps, topups = spec.steps, 0
    acc = own_fact_accuracy(lm, world, known, seed) if spec.target_acc > 0 else None
    while acc is not None and acc < spec.target_acc and topups < spec.max_topups:
        topups += 1
        log.info("%s: %.3f on its own facts < %.2f; %d more steps", member.name, acc, spec.target_acc, spec.topup_steps)
        more = f"{member.name[:9]:>9} +{topups}"
        losses += _phase(model, opt, sampler, tokenizer, spec, spec.topup_steps, spec.topup_lr, more, position)
        steps += spec.topup_steps
        acc = own_fact_accuracy(lm, world, known, seed)
    lm.save(out_dir)
    seconds = time.perf_counter() - start
    final = sum(losses[-50:]) / len(losses[-50:])
    log.info("trained %s: %d steps in %.0f s, final loss %.3f", member.name, steps, seconds, final)
    return TrainResult(member.name, steps, seconds, final, topups, acc)
