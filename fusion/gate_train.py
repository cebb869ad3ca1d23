"""Training the gating network after the pair fusers, with the fusers and both language models frozen.

Each training question is run once through every transmitter (its offer and its fuser's deltas at weight 1)
and the receiver (its prefix). A step draws a batch, leaves each transmitter out with probability
``1 - keep_prob`` (so the gate learns to weigh any subset), fuses ``prefix + sum_t w_t * delta_t`` with the
gate's weights and minimises the receiver's letter cross-entropy. Afterwards every transmitter layer's
usefulness is measured by ablation (loss increase when that layer is not received): the gate's profile.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bus.errors import FusionError
from fusion.align import align_cache
from fusion.c2c import batch_letter_logits, letter_ids, prefix_alignment, prefix_cache, question_texts, receiver_view
from fusion.fuser import PairFuser
from fusion.gate import GateConfig, GateNetwork, OfferSummary, summarize_offer
from fusion.kvcache import KV, KVCache
from fusion.models import LanguageModel
from fusion.train import FusionItem, continuation_groups, pad_layers

log = logging.getLogger(__name__)

DEFAULT_PROFILE_FLOOR = 0.01  # importance of a layer the fuser reads but whose loss no single ablation raises


@dataclass(frozen=True)
class GateTrainConfig:
    """Optimisation of the gating network."""

    steps: int = 300  # optimiser steps
    batch_size: int = 32  # questions per step
    lr: float = 3e-3  # AdamW learning rate (cosine decay to 10%)
    weight_decay: float = 0.01
    keep_prob: float = 0.7  # chance that each transmitter takes part in a training row
    seed: int = 0
    gate: GateConfig = field(default_factory=GateConfig)  # the network's shape


@dataclass
class GateExample:
    """A question with the receiver's prefix and, per transmitter (in order), its offer and weight-1 deltas."""

    prefix: KVCache
    continuation: list[int]
    target: int
    offers: list[OfferSummary]
    deltas: list[dict[int, KV]]  # receiver layer -> (dK, dV), each (1, H_r, T, D_r)


@dataclass
class TrainedGate:
    """A trained gate and how training went."""

    gate: GateNetwork
    losses: list[float]
    seconds: float


@torch.no_grad()
def prepare_gate_examples(
    receiver: LanguageModel,
    transmitters: Mapping[str, LanguageModel],
    fusers: Mapping[str, PairFuser],
    items: Sequence[FusionItem],
    progress: bool = False,
) -> list[GateExample]:
    """Offers and frozen-fuser deltas of every transmitter for every item."""
    names = list(transmitters)
    missing = [n for n in names if n not in fusers]
    if missing:
        raise FusionError(f"no fuser for transmitters {missing}")
    out = []
    for item in tqdm(items, desc="gate caches", disable=not progress, leave=False):
        shared, original = question_texts(item.stem, item.options, item.shared_stem)
        view = receiver_view(receiver, shared, original)
        prefix = prefix_cache(receiver, view)
        offers, deltas = [], []
        for name in names:
            pre = transmitters[name].prefill(shared)
            offers.append(summarize_offer(transmitters[name], pre))
            aligned = align_cache(pre.cache, prefix_alignment(view, pre.offsets))
            deltas.append(fusers[name].eval().deltas(prefix, aligned, 1.0))
        out.append(GateExample(prefix, view.continuation_ids, item.target, offers, deltas))
    return out


def _collate(examples: Sequence[GateExample]) -> tuple[KVCache, list[dict[int, KV]], torch.Tensor, list, torch.Tensor]:
    lengths = torch.tensor([e.prefix.num_tokens for e in examples])
    T = int(lengths.max())
    prefix = KVCache(
        [pad_layers([e.prefix.layers[i] for e in examples], T) for i in range(examples[0].prefix.num_layers)]
    )
    deltas = []
    for t in range(len(examples[0].deltas)):
        layers = examples[0].deltas[t].keys()
        deltas.append({layer: pad_layers([e.deltas[t][layer] for e in examples], T) for layer in layers})
    targets = torch.tensor([e.target for e in examples])
    return prefix, deltas, lengths, [e.continuation for e in examples], targets


def weighted_fuse(prefix: KVCache, deltas: Sequence[Mapping[int, KV]], weights: torch.Tensor) -> KVCache:
    """``prefix + sum_t weights[:, t] * deltas[t]`` for a batch (``weights`` is ``(B, N)``)."""
    layers = list(prefix.layers)
    for t, contribution in enumerate(deltas):
        w = weights[:, t].reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
        for layer, (dk, dv) in contribution.items():
            k, v = layers[layer]
            layers[layer] = (k + w * dk, v + w * dv)
    return KVCache(layers)


def train_gate(
    receiver: LanguageModel,
    examples: Sequence[GateExample],
    fusers: Sequence[PairFuser],
    cfg: GateTrainConfig | None = None,
    progress: bool = True,
) -> TrainedGate:
    """Train a gate on prepared examples (``fusers`` in the examples' transmitter order), then measure profiles."""
    cfg = cfg or GateTrainConfig()
    if not examples:
        raise FusionError("cannot train a gate on no examples")
    letters = torch.tensor(letter_ids(receiver))
    fps = [o.fingerprint for o in examples[0].offers]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        gate = GateNetwork(cfg.gate, {fp: (1.0,) * o.num_layers for fp, o in zip(fps, examples[0].offers, strict=True)})
    opt = torch.optim.AdamW(gate.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed * 7_919 + 3)
    n = len(fps)
    losses: list[float] = []
    t0 = time.perf_counter()
    gate.train()
    for step in tqdm(range(cfg.steps), desc="gate", disable=not progress, leave=False):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))
        pick = torch.randint(len(examples), (min(cfg.batch_size, len(examples)),), generator=gen)
        batch = [examples[int(i)] for i in pick]
        keep = (torch.rand((len(batch), n), generator=gen) < cfg.keep_prob).float()  # (B, N)
        offers = [o for e in batch for o in e.offers]
        weights = gate(offers).reshape(len(batch), n) * keep  # (B, N)
        loss = torch.zeros(())
        for group in continuation_groups([e.continuation for e in batch]):  # padded apart, as in fuser training
            prefix, deltas, lengths, conts, targets = _collate([batch[i] for i in group])
            fused = weighted_fuse(prefix, deltas, weights[group])
            logits = batch_letter_logits(receiver, fused, lengths, conts, letters)
            loss = loss + F.cross_entropy(logits, targets, reduction="sum") / len(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    gate.eval()
    gate.profiles = layer_profiles(receiver, examples, fusers)
    return TrainedGate(gate, losses, time.perf_counter() - t0)


def _loss_without(
    receiver: LanguageModel, batch: tuple, contribution: Mapping[int, KV], fuser: PairFuser, skip: set[int], letters
) -> float:
    """Summed letter loss of a batch fused with one transmitter's deltas, minus the receiver layers reading ``skip``."""
    prefix, _, lengths, conts, targets = batch
    kept = {layer: d for layer, d in contribution.items() if fuser.layer_map[layer] not in skip}
    fused = weighted_fuse(prefix, [kept], torch.ones(len(targets), 1))
    logits = batch_letter_logits(receiver, fused, lengths, conts, letters)
    return float(F.cross_entropy(logits, targets, reduction="sum"))


@torch.no_grad()
def layer_profiles(
    receiver: LanguageModel, examples: Sequence[GateExample], fusers: Sequence[PairFuser], batch_size: int = 64
) -> dict[str, tuple[float, ...]]:
    """Per transmitter: each of its layers' usefulness, the mean loss increase when it alone is withheld (max 1)."""
    letters = torch.tensor(letter_ids(receiver))
    out: dict[str, tuple[float, ...]] = {}
    examples = sorted(examples, key=lambda e: len(e.continuation))  # batches of like continuations pad little
    for t, fuser in enumerate(fusers):
        offer = examples[0].offers[t]
        used = fuser.transmitter_layers_used()
        increase = torch.zeros(offer.num_layers)
        for start in range(0, len(examples), batch_size):
            batch = _collate(examples[start : start + batch_size])
            base = _loss_without(receiver, batch, batch[1][t], fuser, set(), letters)
            for m in used:
                increase[m] += _loss_without(receiver, batch, batch[1][t], fuser, {m}, letters) - base
        increase = increase.clamp_min(0) / len(examples)
        top = float(increase.max())
        profile = [0.0] * offer.num_layers
        for m in used:
            profile[m] = max(float(increase[m]) / top if top > 0 else 1.0, DEFAULT_PROFILE_FLOOR)
        out[offer.fingerprint] = tuple(round(p, 4) for p in profile)
    return out
