"""The one fusion loop: what arrived from transmitters, fused into the receiver's prefix.

``refine()`` (in process) and the receiver agent (over the bus) both call :func:`fuse`, so the bus stays
transport: the same contributions in the same order give the same cache, and a contribution that cannot be
used (no fuser for its model, a cache that does not fit) is left out with a reason while the rest is fused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from bus.errors import FusionError
from fusion.align import gather_tokens
from fusion.c2c import ANCHOR_LAST, ReceiverView, prefix_alignment, tail_alignment
from fusion.fuser import PairFuser, apply_deltas
from fusion.kvcache import KV, KVCache
from fusion.live import LiveTerm


@dataclass(frozen=True)
class Received:
    """What arrived from one transmitter: some of its layers (already decoded) and its token offsets in S."""

    fingerprint: str
    layers: dict[int, KV]
    offsets: list[tuple[int, int]]
    weight: float = 1.0


@dataclass(frozen=True)
class Contribution:
    """One transmitter's part: deltas on the receiver's prefix and (``fuse_last`` fusers) its held-back token's."""

    deltas: dict[int, KV]  # receiver layer -> (dK, dV) on the prefix, each (1, H_r, T, D_r)
    live: LiveTerm | None = None  # fused into the held-back last prompt token as it is computed (fusion.live)


@dataclass
class Fused:
    """The receiver's prefix with every usable contribution added, and what happened to each transmitter."""

    cache: KVCache
    live: list[LiveTerm] = field(default_factory=list)  # terms for the held-back token (read_answer applies them)
    used: dict[str, list[int]] = field(default_factory=dict)  # transmitter -> its layers that were fused
    failed: dict[str, str] = field(default_factory=dict)  # transmitter -> why it was left out


@torch.no_grad()
def transmitter_deltas(view: ReceiverView, prefix: KVCache, got: Received, fuser: PairFuser) -> Contribution:
    """One transmitter's weighted contribution to the receiver's prefix (``fuse`` sums them in transmitter order).

    The receiver agent computes them as each stream completes, while the others still travel. A window-1 fuser
    reads only the receiver's last prefix token, which (anchored) reads the transmitter's final token: every
    position then points at that token, and the other tokens are not aligned (nobody reads them).
    """
    arrived = next(iter(got.layers.values()))[0].shape[2] if got.layers else len(got.offsets)  # a tail, or all
    if ANCHOR_LAST and fuser.cfg.window == 1 and got.offsets:
        if arrived > len(got.offsets):
            raise FusionError(f"{arrived} transmitter tokens arrived but its offer has {len(got.offsets)}")
        index = torch.full((len(view.prefix_ids),), arrived - 1, dtype=torch.long)
    else:
        alignment = prefix_alignment(view, got.offsets)
        if arrived != len(got.offsets):
            alignment = tail_alignment(alignment, len(got.offsets), arrived, fuser.cfg.window)
        index = alignment.index
    if fuser.training:  # (eval() walks every submodule: not on every question)
        fuser.eval()
    live = None
    if fuser.cfg.fuse_last:  # the held-back token reads the transmitter's final token (the last that arrived)
        a = fuser.cfg.anchor_tokens
        live = LiveTerm(fuser, {m: (k[:, :, -a:], v[:, :, -a:]) for m, (k, v) in got.layers.items()}, got.weight)
        if fuser.prefix_window() == 0:
            return Contribution({}, live)
    aligned = gather_tokens(got.layers, index)
    return Contribution(fuser.deltas(prefix, aligned, got.weight, span=view.span), live)


def fuse(
    view: ReceiverView,
    prefix: KVCache,
    received: Mapping[str, Received],
    fusers: Mapping[str, PairFuser],
    ready: Mapping[str, tuple[tuple[int, ...], Contribution]] | None = None,
) -> Fused:
    """``prefix`` plus each received transmitter's deltas, in transmitter-name order (a fixed sum).

    ``fusers`` maps a transmitter model fingerprint to its fuser into this receiver; ``ready`` holds deltas
    already computed (per transmitter: the layers they were made from, and the deltas), used when the layers
    still match. A transmitter at weight 0 or with no layers is skipped silently; one with no fuser, or whose
    cache does not fit its fuser, is left out with the reason in ``failed``.
    """
    contributions: list[dict[int, KV]] = []
    out = Fused(prefix)
    for name in sorted(received):
        got = received[name]
        if got.weight <= 0 or not got.layers:
            continue
        fuser = fusers.get(got.fingerprint)
        if fuser is None:
            out.failed[name] = f"no fuser for transmitter model {got.fingerprint} into this receiver"
            continue
        layers = tuple(sorted(got.layers))
        early = (ready or {}).get(name)
        try:
            part = (
                early[1] if early is not None and early[0] == layers else transmitter_deltas(view, prefix, got, fuser)
            )
        except FusionError as exc:
            out.failed[name] = str(exc)
            continue
        contributions.append(part.deltas)
        if part.live is not None:
            out.live.append(part.live)
        out.used[name] = list(layers)
    if contributions:
        out.cache = apply_deltas(prefix, contributions)
    return out
