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
from tqdm.auto import tqdm

from bus.errors import FusionError
from fusion.align import gather_tokens
from fusion.c2c import ReceiverView, prefix_alignment, prefix_cache, question_texts, receiver_view
from fusion.examples import CACHE_DTYPE, FusionItem, continuation_groups, pad_layers
from fusion.fuser import PairFuser
from fusion.gate import GateConfig, GateNetwork, OfferSummary
from fusion.kvcache import KV, KVCache
from fusion.live import LiveTerm
from fusion.losses import fused_loss
from fusion.models import LanguageModel
from fusion.notes import Retrieved

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
    target: int | list[int]  # letter index, or the answer's token ids (text style)
    offers: list[OfferSummary]
    deltas: list[dict[int, KV]]  # receiver layer -> (dK, dV), each (1, H_r, span, D_r): the fused positions only
    anchors: list[
        dict[int, KV]
    ]  # transmitter layer -> its final token (1, H_t, 1, D_t): what the held-back token reads

    @property
    def span(self) -> int:
        """How many of the prefix's last positions the deltas cover."""
        for contribution in self.deltas:
            for dk, _ in contribution.values():
                return dk.shape[2]
        return 1


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
    notes: Sequence[Mapping[str, Retrieved]] | None = None,
) -> list[GateExample]:
    """Offers and frozen-fuser deltas of every transmitter for every item (``notes[i][name]``: what transmitter
    ``name`` retrieved for item ``i``, text style)."""
    from fusion.refine import transmitter_prefill

    names = list(transmitters)
    missing = [n for n in names if n not in fusers]
    if missing:
        raise FusionError(f"no fuser for transmitters {missing}")
    style = receiver.style
    out = []
    for i, item in enumerate(tqdm(items, desc="gate caches", disable=not progress, leave=False)):
        shared, original = question_texts(item.stem, item.options, item.shared_stem, style)
        view = receiver_view(receiver, shared, original)
        prefix = prefix_cache(receiver, view)
        prefills = []
        for name in names:
            got = notes[i].get(name) if notes is not None else None
            prefills.append(transmitter_prefill(name, transmitters[name], shared, got))
        if style == "text":
            from fusion.examples import text_target

            target = text_target(receiver, item, view, prefix)
        else:
            target = item.target
        out.append(gate_example(view, prefix, target, prefills, [fusers[n] for n in names]))
    return out


@torch.no_grad()
def gate_example(
    view: ReceiverView, prefix: KVCache, target: int | list[int], prefills: Sequence, fusers: Sequence[PairFuser]
) -> GateExample:
    """One gate example: per transmitter (``prefills``, in order, with their ``fusers``) its offer, weight-1 deltas on
    the fused positions, and its final token; a text-style receiver's tensors are stored at ``CACHE_DTYPE``."""
    offers, deltas, finals = [], [], []
    text = isinstance(target, list)
    prefix = prefix.to(dtype=torch.float32)
    for pre, fuser in zip(prefills, fusers, strict=True):
        offers.append(pre.offer)
        layers = {m: (k.float(), v.float()) for m, (k, v) in pre.cache.as_mapping().items()}
        aligned = gather_tokens(layers, prefix_alignment(view, pre.offsets).index)
        full = fuser.eval().deltas(prefix, aligned, 1.0, span=view.span)
        deltas.append({m: (dk[:, :, -view.span :], dv[:, :, -view.span :]) for m, (dk, dv) in full.items()})
        a = fuser.cfg.anchor_tokens
        finals.append({m: (k[:, :, -a:], v[:, :, -a:]) for m, (k, v) in layers.items()})
    if text:
        prefix = prefix.to(dtype=CACHE_DTYPE)
        deltas = [{m: (dk.to(CACHE_DTYPE), dv.to(CACHE_DTYPE)) for m, (dk, dv) in d.items()} for d in deltas]
    return GateExample(prefix, view.continuation_ids, target, offers, deltas, finals)


def _anchors(examples: Sequence[GateExample], t: int) -> dict[int, KV]:
    """Transmitter ``t``'s final token per layer, stacked over the examples: ``(B, H_t, 1, D_t)`` each."""
    return {
        m: (
            torch.cat([e.anchors[t][m][0] for e in examples]).float(),
            torch.cat([e.anchors[t][m][1] for e in examples]).float(),
        )
        for m in examples[0].anchors[t]
    }


def _live_terms(examples: Sequence[GateExample], fusers: Sequence[PairFuser], weights: torch.Tensor) -> list[LiveTerm]:
    """The held-back token's terms of every ``fuse_last`` fuser, at the batch's weights ``(B, N)``."""
    return [
        LiveTerm(fuser, _anchors(examples, t), weights[:, t]) for t, fuser in enumerate(fusers) if fuser.cfg.fuse_last
    ]


def _collate(examples: Sequence[GateExample]) -> tuple[KVCache, list[dict[int, KV]], torch.Tensor, list, list]:
    lengths = torch.tensor([e.prefix.num_tokens for e in examples])
    T = int(lengths.max())
    prefix = KVCache(
        [pad_layers([e.prefix.layers[i] for e in examples], T) for i in range(examples[0].prefix.num_layers)]
    ).to(dtype=torch.float32)
    left = (lengths - torch.tensor([e.span for e in examples])).tolist()
    deltas = []
    for t in range(len(examples[0].deltas)):
        layers = examples[0].deltas[t].keys()
        deltas.append(
            {
                layer: tuple(x.float() for x in pad_layers([e.deltas[t][layer] for e in examples], T, left))
                for layer in layers
            }
        )
    return prefix, deltas, lengths, [e.continuation for e in examples], [e.target for e in examples]


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
            rows = [batch[i] for i in group]
            prefix, deltas, lengths, conts, targets = _collate(rows)
            fused = weighted_fuse(prefix, deltas, weights[group])
            live = _live_terms(rows, fusers, weights[group])
            loss = loss + fused_loss(receiver, fused, lengths, conts, targets, live) / len(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    gate.eval()
    gate.profiles = layer_profiles(receiver, examples, fusers)
    return TrainedGate(gate, losses, time.perf_counter() - t0)


def _loss_without(
    receiver: LanguageModel,
    batch: tuple,
    contribution: Mapping[int, KV],
    fuser: PairFuser,
    skip: set[int],
    anchor: Mapping[int, KV],
) -> float:
    """Summed loss of a batch fused with one transmitter, without the transmitter layers in ``skip``."""
    prefix, _, lengths, conts, targets = batch
    kept = {layer: d for layer, d in contribution.items() if fuser.layer_map[layer] not in skip}
    fused = weighted_fuse(prefix, [kept], torch.ones(len(targets), 1))
    live = [LiveTerm(fuser, {m: kv for m, kv in anchor.items() if m not in skip})] if fuser.cfg.fuse_last else []
    return float(fused_loss(receiver, fused, lengths, conts, targets, live))


@torch.no_grad()
def layer_profiles(
    receiver: LanguageModel, examples: Sequence[GateExample], fusers: Sequence[PairFuser], batch_size: int = 64
) -> dict[str, tuple[float, ...]]:
    """Per transmitter model: each of its layers' usefulness, the mean loss increase when it alone is withheld (max
    1). Devices that run the same model share its profile (keyed by fingerprint): the first device's is measured."""
    out: dict[str, tuple[float, ...]] = {}
    examples = sorted(examples, key=lambda e: len(e.continuation))  # batches of like continuations pad little
    for t, fuser in enumerate(fusers):
        offer = examples[0].offers[t]
        if offer.fingerprint in out:
            continue  # another device of this model: the same fuser and profile key, a pass per layer saved
        used = fuser.transmitter_layers_used()
        increase = torch.zeros(offer.num_layers)
        for start in range(0, len(examples), batch_size):
            rows = examples[start : start + batch_size]
            batch = _collate(rows)
            anchor = _anchors(rows, t)
            base = _loss_without(receiver, batch, batch[1][t], fuser, set(), anchor)
            for m in used:
                increase[m] += _loss_without(receiver, batch, batch[1][t], fuser, {m}, anchor) - base
        increase = increase.clamp_min(0) / len(examples)
        top = float(increase.max())
        profile = [0.0] * offer.num_layers
        for m in used:
            profile[m] = max(float(increase[m]) / top if top > 0 else 1.0, DEFAULT_PROFILE_FLOOR)
        out[offer.fingerprint] = tuple(round(p, 4) for p in profile)
    return out
