"""A KV-inversion attacker: small models trained to read tokens back from the caches transmitters send.

Prompt-reconstruction attacks on KV caches (e.g. "Shadow in the Cache", NDSS 2026) train an inverter on caches of
texts the attacker chooses, run through the same (public) model, then apply it to caches seen on the wire. Two
readers here, for the two things a transmitter may send:

- :class:`TokenInverter`: a whole cache (every token position's K and V, as a stream of a fuser that reads the
  whole prompt): per position, an MLP from that position's K and V of every layer to the token there;
- :class:`BagInverter`: a cache tail (the last position of every layer, as the reference window-1 fusers read and
  the transmitters send inline): an MLP from it to *which* tokens the text held (multi-label), read as its top k.

Both take any source of caches (:class:`CacheSource`: a tokenizer and a prefill, which ``fusion.models.
LanguageModel`` is) and any positions: a transmitter that prefills its private notes before q' and sends only the
cache of q''s positions is attacked with the same code, its notes as the targets. Nothing here sends anything.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from bus.errors import PrivacyError

log = logging.getLogger(__name__)

DEFAULT_HIDDEN = 256  # inverter MLP width
DEFAULT_STEPS = 1500  # optimiser steps (passes over the attacker's caches follow from their number)
DEFAULT_BATCH = 256  # positions (or caches) per step
DEFAULT_LR = 2e-3


class Cache(Protocol):
    """A KV cache: ``layers`` of (K, V), each ``(1, kv_heads, tokens, head_dim)`` (``fusion.kvcache.KVCache``)."""

    layers: Sequence[tuple[torch.Tensor, torch.Tensor]]


class Prefilled(Protocol):
    """A prompt run through a model (``fusion.models.Prefill``)."""

    cache: Cache
    ids: list[int]
    offsets: list[tuple[int, int]]


class CacheSource(Protocol):
    """What the attacker needs of a model: its prefill and its vocabulary (``fusion.models.LanguageModel``)."""

    def prefill(self, text: str) -> Prefilled: ...

    def decode(self, ids: list[int]) -> str: ...


def vocab_size(source: object) -> int:
    """The source's vocabulary size (``len(tokenizer)`` of a LanguageModel, else ``source.vocab_size``)."""
    tokenizer = getattr(source, "tokenizer", None)
    return len(tokenizer) if tokenizer is not None else int(source.vocab_size)  # type: ignore[attr-defined]


def position_features(cache: Cache, positions: Sequence[int] | None = None) -> torch.Tensor:
    """``(T, F)``: per position, K and V of every layer flattened (F = layers x 2 x kv_heads x head_dim)."""
    parts = []
    for k, v in cache.layers:
        for t in (k, v):  # (1, H, T, D) -> (T, H * D)
            parts.append(t[0].permute(1, 0, 2).reshape(t.shape[2], -1).float())
    feats = torch.cat(parts, dim=1)  # (T, F)
    return feats if positions is None else feats[list(positions)]


def span_positions(offsets: Sequence[tuple[int, int]], start: int, end: int) -> list[int]:
    """Token positions whose characters lie inside ``[start, end)`` (the tokens of one part of a prompt)."""
    return [i for i, (a, b) in enumerate(offsets) if a >= start and b <= end and b > a]


class _MLP(nn.Module):
    """Standardised features -> two hidden layers -> one logit per token of the vocabulary."""

    def __init__(self, n_in: int, n_out: int, hidden: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_in))
        self.register_buffer("std", torch.ones(n_in))
        self.net = nn.Sequential(
            nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, n_out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)  # (N, n_out)


def _train(model: _MLP, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module, steps: int, seed: int) -> None:
    model.mean.copy_(x.mean(0))
    model.std.copy_(x.std(0).clamp_min(1e-4))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=DEFAULT_LR, weight_decay=1e-4)
    epochs = max(1, math.ceil(steps / math.ceil(len(x) / DEFAULT_BATCH)))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * math.ceil(len(x) / DEFAULT_BATCH)))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), DEFAULT_BATCH):
            idx = order[i : i + DEFAULT_BATCH]
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


@dataclass
class TokenInverter:
    """Reads the token at each position of a whole cache."""

    model: _MLP

    @classmethod
    def fit(
        cls,
        samples: Iterable[tuple[torch.Tensor, Sequence[int]]],
        vocab: int,
        *,
        hidden: int = DEFAULT_HIDDEN,
        steps: int = DEFAULT_STEPS,
        seed: int = 0,
    ) -> TokenInverter:
        """Train on (features ``(T, F)``, token ids ``(T,)``) pairs of the attacker's own texts."""
        xs, ys = [], []
        for feats, ids in samples:
            xs.append(feats)
            ys.append(torch.as_tensor(list(ids), dtype=torch.long))
        if not xs:
            raise PrivacyError("no caches to train the inverter on")
        x, y = torch.cat(xs), torch.cat(ys)
        torch.manual_seed(seed)
        model = _MLP(x.shape[1], vocab, hidden)
        _train(model, x, y, nn.CrossEntropyLoss(), steps, seed)
        return cls(model)

    @torch.no_grad()
    def read(self, feats: torch.Tensor) -> list[int]:
        """The most likely token at each position ``(T, F)``."""
        return self.model(feats.float()).argmax(-1).tolist()


@dataclass
class BagInverter:
    """Reads which tokens a text held from one position's K and V of every layer (a transmitter's tail)."""

    model: _MLP
    vocab: int

    @classmethod
    def fit(
        cls,
        samples: Iterable[tuple[torch.Tensor, Iterable[int]]],
        vocab: int,
        *,
        hidden: int = DEFAULT_HIDDEN,
        steps: int = DEFAULT_STEPS,
        seed: int = 0,
    ) -> BagInverter:
        """Train on (features ``(F,)``, the token ids of the text) pairs of the attacker's own texts."""
        xs, ys = [], []
        for feat, ids in samples:
            target = torch.zeros(vocab)
            target[list(set(ids))] = 1.0
            xs.append(feat.reshape(-1))
            ys.append(target)
        if not xs:
            raise PrivacyError("no caches to train the inverter on")
        x, y = torch.stack(xs), torch.stack(ys)
        torch.manual_seed(seed)
        model = _MLP(x.shape[1], vocab, hidden)
        _train(model, x, y, nn.BCEWithLogitsLoss(), steps, seed)
        return cls(model, vocab)

    @torch.no_grad()
    def read(self, feat: torch.Tensor, k: int) -> list[int]:
        """The ``k`` tokens it is surest the text held."""
        logits = self.model(feat.reshape(1, -1).float())[0]
        return logits.topk(min(k, self.vocab)).indices.tolist()


def detail_read(top: Iterable[int], detail: Sequence[int], sent: Iterable[int]) -> bool:
    """Whether a bag reading holds a personal detail: every token of it that the sent text does not explain is among
    the tokens read (a detail made only of tokens the text has anyway cannot be told apart, and counts as not read)."""
    own = [t for t in detail if t not in set(sent)]
    pool = set(top)
    return bool(own) and all(t in pool for t in own)


def recall(found: Iterable[int], wanted: Sequence[int]) -> float:
    """Share of ``wanted`` (a multiset of token ids) among ``found`` (1.0 when nothing is wanted)."""
    if not wanted:
        return 1.0
    pool = list(found)
    hit = 0
    for token in wanted:
        if token in pool:
            pool.remove(token)
            hit += 1
    return hit / len(wanted)
