"""The gating network: from a transmitter's small offer alone, how much to trust it and which layers matter.

A transmitter prefills q' and offers a few numbers (``OfferSummary``, computed by ``summarize_offer``):
its own "I don't know" probability P(none) (TOYWORLD lesson 3: the signal that lets several
transmitters help), how sure it is of a letter, the entropy of its answer, its token count and a pooled
summary vector of its cache. The ``GateNetwork`` turns each offer into a weight in [0, 1] (the ``w_t``
of ``fusion.fuser``) and a per-transmitter-layer importance = weight x the layer's measured usefulness
for that transmitter (an ablation profile, zero for layers the fuser never reads). Bandwidth policies
drop layers by that importance. Training lives in ``fusion.gate_train``.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from bus.errors import FuserError, FusionError
from fusion.kvcache import KVCache
from fusion.models import LanguageModel, Prefill
from fusion.prompts import answer_texts
from fusion.registry import FORMAT_VERSION, GATE_FORMAT, module_size, read_module, write_module

log = logging.getLogger(__name__)

SUMMARY_DIM = 8  # floats of pooled cache summary in an offer
DEFAULT_MIN_WEIGHT = 0.1  # a transmitter weighted below this is left out of the plan
DEFAULT_PRIOR_SCALE = 8.0  # P(none)=0.1 -> weight 0.96, P(none)=0.9 -> 0.04 before training
SCALAR_FEATURES = 6  # p_none, logit(p_none), p_top, entropy, log tokens, notes coverage


class OfferSummary(BaseModel):
    """What a transmitter tells the gate about its cache of q' (a few bytes; travels in the bus Offer)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    fingerprint: str  # the transmitter model's fingerprint (selects its pair fuser and its gate profile)
    num_layers: int = Field(ge=1)
    num_tokens: int = Field(ge=1)
    p_none: float = Field(ge=0.0, le=1.0)  # letter style: P(" none") among the five answer tokens; text: 1 - p_top
    p_top: float = Field(ge=0.0, le=1.0)  # letter style: its top letter among the five; text: its top next token
    entropy: float = Field(ge=0.0)  # nats, over the five answer tokens (letter style) or the vocabulary (text)
    summary: tuple[float, ...] = ()  # SUMMARY_DIM floats: its last layer's values, mean-pooled and projected
    coverage: float = Field(default=0.0, ge=0.0, le=1.0)  # how well its notes cover q' (fusion.notes; 0: no notes)


def prior_weight(p_none: float, scale: float = DEFAULT_PRIOR_SCALE) -> float:
    """The gate's prior weight of a transmitter that gives "I don't know" probability ``p_none``."""
    return 1.0 / (1.0 + math.exp(-scale * (0.5 - p_none)))


@functools.lru_cache(maxsize=64)
def _projection(width: int) -> torch.Tensor:
    """A fixed random projection ``(width, SUMMARY_DIM)``; the same on every machine for the same width."""
    gen = torch.Generator().manual_seed(7919 * width + SUMMARY_DIM)
    return torch.randn(width, SUMMARY_DIM, generator=gen) / math.sqrt(width)


def cache_summary(cache: KVCache) -> tuple[float, ...]:
    """Mean over tokens of the last layer's V, flattened over heads, projected to ``SUMMARY_DIM`` floats."""
    v = cache.layers[-1][1][0].float().cpu()  # (H, T, D)
    pooled = v.mean(dim=1).reshape(-1)  # (H*D,)
    return tuple(round(float(x), 5) for x in pooled @ _projection(pooled.numel()))


def answer_distribution(model: LanguageModel, logits: torch.Tensor) -> torch.Tensor | None:
    """Probabilities ``(5,)`` of the four letters and ``" none"`` (None when the vocabulary lacks one of them)."""
    ids = []
    for text in answer_texts(with_none=True):
        enc = model.word_ids(text)
        if len(enc) != 1:
            return None
        ids.append(enc[0])
    return torch.softmax(logits.float().cpu()[ids], dim=-1)


def summarize_offer(model: LanguageModel, prefill: Prefill, coverage: float = 0.0) -> OfferSummary:
    """The offer a transmitter sends after prefilling the shared text (what the transmitter agent calls).

    Letter style (the toy zoo): its distribution over the four letters and " none". Text style: its own next-token
    distribution after the question (``p_top`` its top token, ``p_none = 1 - p_top``) and its notes' ``coverage``.
    """
    if model.style == "text":
        probs = torch.softmax(prefill.logits.float().cpu(), dim=-1)
        p_top = float(probs.max())
        entropy = float(-(probs * probs.clamp_min(1e-12).log()).sum())
        p_none = 1.0 - p_top
    else:
        dist = answer_distribution(model, prefill.logits)
        if dist is None:  # a model never taught to abstain: fall back to its four letters
            from fusion.c2c import letter_ids

            letters = torch.softmax(prefill.logits.float().cpu()[letter_ids(model)], dim=-1)
            dist = torch.cat([letters, torch.zeros(1)])
        entropy = float(-(dist * dist.clamp_min(1e-12).log()).sum())
        p_none, p_top = float(dist[4]), float(dist[:4].max())
    return OfferSummary(
        fingerprint=model.fingerprint,
        num_layers=prefill.cache.num_layers,
        num_tokens=prefill.cache.num_tokens,
        p_none=min(max(p_none, 0.0), 1.0),
        p_top=min(max(p_top, 0.0), 1.0),
        entropy=max(entropy, 0.0),
        summary=cache_summary(prefill.cache),
        coverage=min(max(coverage, 0.0), 1.0),
    )


@dataclass(frozen=True)
class GateConfig:
    """Shape of the gating network."""

    hidden: int = 32  # MLP width
    use_summary: bool = True  # read the pooled cache summary too (not only the confidence numbers)
    min_weight: float = DEFAULT_MIN_WEIGHT  # weights below this become 0 (the transmitter is not asked to send)
    prior_scale: float = DEFAULT_PRIOR_SCALE  # initial slope of the weight logit in (0.5 - P(none))


@dataclass(frozen=True)
class GateScore:
    """The gate's verdict on one offer."""

    weight: float  # w_t in [0, 1]; 0 means leave this transmitter out
    layer_importance: tuple[float, ...]  # per transmitter layer: weight x usefulness (0: not worth sending)

    def layers(self, threshold: float = 0.0) -> list[int]:
        """Transmitter layers whose importance exceeds ``threshold``, most important first."""
        ranked = sorted(range(len(self.layer_importance)), key=lambda i: -self.layer_importance[i])
        return [i for i in ranked if self.layer_importance[i] > threshold]


def offer_features(offers: Sequence[OfferSummary], use_summary: bool = True) -> torch.Tensor:
    """Feature rows ``(N, SCALAR_FEATURES + SUMMARY_DIM)`` of offers."""
    rows = []
    for o in offers:
        p = min(max(o.p_none, 1e-4), 1 - 1e-4)
        summary = list(o.summary) if use_summary and len(o.summary) == SUMMARY_DIM else [0.0] * SUMMARY_DIM
        scalars = [o.p_none, math.log(p / (1 - p)) / 4, o.p_top, o.entropy, math.log(o.num_tokens) / 4, o.coverage]
        rows.append(scalars + summary)
    return torch.tensor(rows, dtype=torch.float32)


class GateNetwork(nn.Module):
    """Offer -> weight (a small MLP plus a learned bias per known transmitter) and per-layer importance."""

    def __init__(self, cfg: GateConfig, profiles: Mapping[str, Sequence[float]]) -> None:
        super().__init__()
        self.cfg = cfg
        self.fingerprints = sorted(profiles)  # transmitters the gate was trained with
        self.mlp = nn.Sequential(
            nn.Linear(SCALAR_FEATURES + SUMMARY_DIM, cfg.hidden),
            nn.GELU(),
            nn.Linear(cfg.hidden, 1),
        )
        nn.init.zeros_(self.mlp[-1].weight)  # start from the prior alone; training learns the corrections
        nn.init.zeros_(self.mlp[-1].bias)
        self.bias = nn.Parameter(torch.zeros(len(self.fingerprints) + 1))  # last slot: an unknown transmitter
        # Prior (TOYWORLD lesson 3): a transmitter that says "I don't know" is weighted down. Learnable slope.
        self.prior_scale = nn.Parameter(torch.tensor(float(cfg.prior_scale)))
        self.profiles = {fp: tuple(float(x) for x in profiles[fp]) for fp in self.fingerprints}

    def _slot(self, fingerprint: str) -> int:
        return self.fingerprints.index(fingerprint) if fingerprint in self.fingerprints else len(self.fingerprints)

    def logits(self, offers: Sequence[OfferSummary]) -> torch.Tensor:
        """Unsquashed weights ``(N,)``."""
        x = offer_features(offers, self.cfg.use_summary).to(self.bias.device)  # (N, F)
        slots = torch.tensor([self._slot(o.fingerprint) for o in offers], device=self.bias.device)
        prior = self.prior_scale * (0.5 - x[:, 0])  # x[:, 0] is P(none)
        return prior + self.mlp(x).squeeze(-1) + self.bias[slots]  # (N,)

    def forward(self, offers: Sequence[OfferSummary]) -> torch.Tensor:
        """Weights ``(N,)`` in (0, 1), differentiable (training)."""
        return torch.sigmoid(self.logits(offers))

    @torch.no_grad()
    def score(self, offers: Sequence[OfferSummary]) -> list[GateScore]:
        """The verdict per offer: a weight (0 below ``min_weight``) and per-layer importance."""
        if not offers:
            return []
        weights = self.forward(offers).cpu().tolist()
        out = []
        for offer, w in zip(offers, weights, strict=True):
            w = w if w >= self.cfg.min_weight else 0.0
            profile = self.profiles.get(offer.fingerprint, (1.0,) * offer.num_layers)
            if len(profile) != offer.num_layers:
                raise FusionError(
                    f"offer from {offer.fingerprint} has {offer.num_layers} layers; the gate knows {len(profile)}"
                )
            out.append(GateScore(weight=w, layer_importance=tuple(w * p for p in profile)))
        return out


def uniform_scores(
    offers: Sequence[OfferSummary], profiles: Mapping[str, Sequence[float]] | None = None
) -> list[GateScore]:
    """The no-gate baseline: every transmitter at weight 1, every layer it offers (or its profile's used layers)."""
    out = []
    for o in offers:
        profile = (profiles or {}).get(o.fingerprint) or (1.0,) * o.num_layers
        out.append(GateScore(weight=1.0, layer_importance=tuple(float(p) for p in profile)))
    return out


def save_gate(gate: GateNetwork, path: str | Path, receiver_fp: str, meta: dict | None = None) -> Path:
    """Write a gating network for this receiver as a directory (registry format, see ``fusion.registry``)."""
    params, nbytes = module_size(gate)
    config = {
        "format": GATE_FORMAT,
        "version": FORMAT_VERSION,
        "receiver": receiver_fp,
        "config": asdict(gate.cfg),
        "fingerprints": list(gate.fingerprints),
        "profiles": {fp: list(p) for fp, p in gate.profiles.items()},
        "params": params,
        "bytes_fp16": nbytes,
        "meta": dict(meta or {}),
    }
    return write_module(path, config, gate.state_dict())


def load_gate(path: str | Path, receiver_fp: str | None = None) -> GateNetwork:
    """A gating network saved by ``save_gate``; ``FuserError`` if it belongs to another receiver or is damaged."""
    config, state = read_module(path, GATE_FORMAT)
    if receiver_fp is not None and config.get("receiver") != receiver_fp:
        raise FuserError(f"{path} is a gate for receiver {config.get('receiver')}, not {receiver_fp}", path=str(path))
    try:
        gate = GateNetwork(GateConfig(**config["config"]), config["profiles"])
        gate.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError) as exc:
        raise FuserError(f"{path} holds a gate this code cannot rebuild: {exc}", path=str(path)) from exc
    return gate.eval()
