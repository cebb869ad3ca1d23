"""Train one zoo model from scratch: a compact AdamW loop over ``RowSampler`` batches, on one CPU thread.

Runs in its own process (the builder trains two at a time), writes the model with
``LanguageModel.save`` and returns how training went.
"""

from __future__ import annotations

import itertools
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
LENGTH_GROUPS = 2  # a batch is padded in this many parts of like length (t1-llama: 90 -> 71 ms a step; 4 parts: 69)


@dataclass(frozen=True)
class TrainResult:
    """What one training run did."""

    name: str
    steps: int
    seconds: float
    final_loss: float  # mean loss over the last 50 steps
    topups: int = 0  # extra phases run because the model missed a target
    own_acc: float | None = None  # accuracy on its own facts at the end (when a target is set)
    restarts: int = 0  # fresh starts with another seed because top-ups did not reach the targets
    hint_acc: float | None = None  # accuracy on facts it does not know, given as a hint (when a target is set)


def collate(tokenizer: PreTrainedTokenizerFast, rows: list[Row], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(B, T)`` input ids and labels (``-100`` off the target), cut to ``max_tokens``."""
    return _pad(_sequences(tokenizer, rows, max_tokens), tokenizer.pad_token_id)


def collate_groups(
    tokenizer: PreTrainedTokenizerFast, rows: list[Row], max_tokens: int, groups: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The rows sorted by token count and cut into ``groups`` parts, each padded only to its own longest row.

    One padded batch was half padding (fact rows are ~10 tokens, questions with personal details ~60); a
    step's gradient is the same either way (see ``row_loss_sum``)."""
    seqs = sorted(_sequences(tokenizer, rows, max_tokens), key=lambda s: len(s[0]))
    bounds = [round(i * len(seqs) / groups) for i in range(groups + 1)]
    return [_pad(seqs[a:b], tokenizer.pad_token_id) for a, b in itertools.pairwise(bounds) if b > a]


def _sequences(tokenizer: PreTrainedTokenizerFast, rows: list[Row], max_tokens: int) -> list[tuple[list, list]]:
    """Per row: input ids and labels, shifted by one and cut to ``max_tokens``."""
    prompts = tokenizer([r.prompt for r in rows], add_special_tokens=False)["input_ids"]
    targets = tokenizer([r.target for r in rows], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    out = []
    for row, p, t in zip(rows, prompts, targets, strict=True):
        t = t + [eos] if row.eos else t
        ids = (p + t)[: max_tokens + 1]
        lab = ([_IGNORE] * len(p) + t)[: max_tokens + 1]
        out.append((ids[:-1], lab[1:]))
    return out


def _pad(seqs: list[tuple[list, list]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s, _ in seqs)
    x = torch.full((len(seqs), width), pad, dtype=torch.long)
    y = torch.full((len(seqs), width), _IGNORE, dtype=torch.long)
    for i, (s, lab) in enumerate(seqs):
        x[i, : len(s)] = torch.tensor(s)
        y[i, : len(lab)] = torch.tensor(lab)
    return x, y  # (B, T) each


def row_loss_sum(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over rows of each row's mean cross-entropy on its labelled tokens (a one-token answer weighs as much as a
    sentence). Logits are computed only where there is a label: a question row has one, and the vocabulary
    projection of every position was a fifth of the step."""
    hidden = model.base_model(input_ids=x).last_hidden_state  # (B, T, H)
    mask = labels != _IGNORE  # (B, T)
    logits = model.get_output_embeddings()(hidden[mask])  # (N, vocab), N labelled tokens
    tok = F.cross_entropy(logits, labels[mask], reduction="none")  # (N,)
    counts = mask.sum(1)  # (B,)
    per_token = (1.0 / counts.clamp(min=1)).repeat_interleave(counts)  # (N,): each token's share of its row
    return (tok * per_token).sum()


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
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for x, y in collate_groups(tokenizer, sampler.batch(spec.batch_size), spec.max_tokens, LENGTH_GROUPS):
            part = row_loss_sum(model, x, y) / spec.batch_size  # the batch's mean row loss, summed over parts
            part.backward()
            loss += part.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{sum(losses[-25:]) / len(losses[-25:]):.3f}")
        if on_step is not None:
            on_step(step + 1)
    bar.close()
    model.eval()
    return losses


DEFAULT_HINT_CHECK = 200  # facts the model does not know, asked with the fact as a hint, in the skills check
RESTART_SEED_STRIDE = 7919  # seed offset of each fresh start


def skills(lm: LanguageModel, world: World, known: list[str], seed: int, hint: bool = True) -> dict[str, float]:
    """``own``: accuracy on one fresh question per known fact; ``hint``: accuracy on facts it does not know when the
    fact is given in its context (``DEFAULT_HINT_CHECK`` of them)."""
    from ops.zoo.evaluate import evaluate_questions

    rng = random.Random(f"own-check/{seed}")
    questions = [make_question(world, f, rng, f"own-{i}") for i, f in enumerate(world.facts_of(known))]
    out = {"own": evaluate_questions(lm, questions, set(known))["acc_known"] or 0.0}
    if hint:
        known_set = set(known)
        unknown = [f for f in world.facts if f.id not in known_set]
        picked = rng.sample(unknown, min(DEFAULT_HINT_CHECK, len(unknown)))
        asked = [make_question(world, f, rng, f"hint-{i}") for i, f in enumerate(picked)]
        out["hint"] = (evaluate_questions(lm, asked, known_set, world)["acc_with_hint"] or 0.0) if asked else 1.0
    return out


def _short(spec: TrainSpec, got: dict[str, float]) -> bool:
    return got["own"] < spec.target_acc or got.get("hint", 1.0) < spec.target_hint_acc


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
    """Build ``member`` from scratch and train it on its rows, topping up (then starting over with another seed)
    while it misses its targets; save it."""
    torch.set_num_threads(threads)
    spec = member.train
    start = time.perf_counter()
    steps = topups = 0
    for restart in range(spec.max_restarts + 1):
        run_seed = seed + restart * RESTART_SEED_STRIDE
        lm, losses, phase_steps, phase_topups, got = _train_once(
            member, world, known, tokenizer, run_seed, position, callback, restart
        )
        steps, topups = steps + phase_steps, topups + phase_topups
        if got is None or not _short(spec, got) or restart == spec.max_restarts:
            break
        log.warning(
            "%s: still short after %d top-ups (%s); starting over with seed %d",
            member.name,
            phase_topups,
            got,
            run_seed + RESTART_SEED_STRIDE,
        )
    lm.save(out_dir)
    seconds = time.perf_counter() - start
    final = sum(losses[-50:]) / len(losses[-50:])
    log.info("trained %s: %d steps in %.0f s, final loss %.3f", member.name, steps, seconds, final)
    own = got["own"] if got is not None else None
    hint = got.get("hint") if got is not None else None
    return TrainResult(member.name, steps, seconds, final, topups, own, restart, hint)


def _train_once(
    member: MemberSpec,
    world: World,
    known: list[str],
    tokenizer: PreTrainedTokenizerFast,
    seed: int,
    position: int,
    callback: Callable[[int, LanguageModel], None] | None,
    restart: int,
) -> tuple[LanguageModel, list[float], int, int, dict[str, float] | None]:
    """One start from scratch: the main phase, then top-ups while short. (model, losses, steps, top-ups, skills)."""
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
    on_step = (lambda step: callback(step, lm)) if callback is not None else None
    desc = f"{member.name:>14}" if not restart else f"{member.name[:9]:>9} r{restart}"
    losses = _phase(model, opt, sampler, tokenizer, spec, spec.steps, spec.lr, desc, position, on_step)
    steps, topups = spec.steps, 0
    checking = spec.target_acc > 0 or spec.target_hint_acc > 0
    got = skills(lm, world, known, seed, hint=spec.target_hint_acc > 0) if checking else None
    while got is not None and _short(spec, got) and topups < spec.max_topups:
        topups += 1
        log.info("%s: %s short of its targets; %d more steps", member.name, got, spec.topup_steps)
        more = f"{member.name[:9]:>9} +{topups}"
        losses += _phase(model, opt, sampler, tokenizer, spec, spec.topup_steps, spec.topup_lr, more, position)
        steps += spec.topup_steps
        got = skills(lm, world, known, seed, hint=spec.target_hint_acc > 0)
    return lm, losses, steps, topups, got
