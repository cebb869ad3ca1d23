"""Token and layer alignment between a transmitter and a receiver with different tokenizers and depths.

Tokens: both models tokenize the *same text*; every receiver token is matched to the transmitter
token(s) whose character spans overlap its own, and "longest coverage" (as in C2C) picks the one that
shares the most characters (ties go to the later token, which has read more of the text). A receiver
token that overlaps nothing (an empty span, or characters the transmitter's offsets skip) falls back
to the last transmitter token that starts before its end. The result is an index tensor for a gather.

Layers: receiver layer ``l`` reads transmitter layer ``map[l]``. ``terminal`` (default) lines the two
stacks up at their last layers, ``l - (L_r - L_t)`` clamped to ``[0, L_t - 1]``; ``proportional``
spreads the transmitter's layers evenly over the receiver's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from bus.errors import FusionError
from fusion.kvcache import KV, KVCache

log = logging.getLogger(__name__)

Offsets = Sequence[tuple[int, int]]
DEFAULT_LAYER_STRATEGY = "terminal"


@dataclass(frozen=True)
class TokenAlignment:
    """For each receiver token, the transmitter token it reads (``index``) and how many characters they share."""

    index: torch.Tensor  # (T_r,) long: transmitter position per receiver position
    coverage: torch.Tensor  # (T_r,) long: shared characters (0 where the fallback was used)
    covering: tuple[tuple[int, ...], ...]  # every transmitter token overlapping each receiver token

    @property
    def num_tokens(self) -> int:
        """Receiver tokens aligned."""
        return int(self.index.numel())

    def truncate(self, num_tokens: int) -> TokenAlignment:
        """The alignment of the first ``num_tokens`` receiver tokens."""
        if not 0 < num_tokens <= self.num_tokens:
            raise FusionError(f"cannot truncate an alignment of {self.num_tokens} tokens to {num_tokens}")
        return TokenAlignment(self.index[:num_tokens], self.coverage[:num_tokens], self.covering[:num_tokens])


def _spans(offsets: Offsets, side: str) -> torch.Tensor:
    spans = torch.tensor([tuple(o) for o in offsets], dtype=torch.long).reshape(-1, 2)  # (T, 2)
    if spans.numel() == 0:
        raise FusionError(f"cannot align: the {side} has no tokens")
    if bool((spans[:, 1] < spans[:, 0]).any()) or bool((spans < 0).any()):
        raise FusionError(f"cannot align: the {side} has a token span that ends before it starts")
    return spans


def align_tokens(receiver_offsets: Offsets, transmitter_offsets: Offsets) -> TokenAlignment:
    """Longest-coverage alignment of two tokenizations of the same text, given each token's ``(start, end)``."""
    r = _spans(receiver_offsets, "receiver")  # (T_r, 2)
    t = _spans(transmitter_offsets, "transmitter")  # (T_t, 2)
    r_start, r_end = r[:, 0:1], r[:, 1:2]  # (T_r, 1)
    # An empty receiver span (e.g. a special token) counts as the one character at its start.
    r_end = torch.maximum(r_end, r_start + (r_end == r_start).long())
    shared = (torch.minimum(r_end, t[None, :, 1]) - torch.maximum(r_start, t[None, :, 0])).clamp(min=0)  # (T_r, T_t)
    # argmax returns the first maximum; flip so ties pick the later transmitter token.
    last_best = shared.flip(1).argmax(dim=1)  # (T_r,)
    index = (t.shape[0] - 1) - last_best
    coverage = shared.gather(1, index[:, None]).squeeze(1)
    # Fallback for tokens with no overlap: the last transmitter token starting before the receiver token ends.
    fallback = ((t[None, :, 0] < r_end).long().sum(1) - 1).clamp(min=0)  # (T_r,); starts are ascending
    index = torch.where(coverage > 0, index, fallback)
    per_row: list[list[int]] = [[] for _ in range(shared.shape[0])]
    for i, j in torch.nonzero(shared > 0).tolist():  # row-major: each row's columns ascending
        per_row[i].append(j)
    covering = tuple(tuple(row) for row in per_row)
    missing = int((coverage == 0).sum())
    if missing:
        log.debug("%d of %d receiver tokens overlap no transmitter token; used the fallback", missing, len(r))
    return TokenAlignment(index=index, coverage=coverage, covering=covering)


def gather_tokens(layers: Mapping[int, KV], index: torch.Tensor) -> dict[int, KV]:
    """Each layer's K and V at the aligned positions: ``(B, H_t, T_t, D_t) -> (B, H_t, T_r, D_t)``."""
    out: dict[int, KV] = {}
    for layer, (k, v) in layers.items():
        if int(index.max()) >= k.shape[2]:
            raise FusionError(
                f"alignment points at transmitter token {int(index.max())} but layer {layer} has {k.shape[2]} tokens"
            )
        idx = index.to(k.device)
        out[layer] = (k.index_select(2, idx), v.index_select(2, idx))
    return out


def _terminal(num_receiver: int, num_transmitter: int) -> list[int]:
    shift = num_receiver - num_transmitter
    return [min(max(layer - shift, 0), num_transmitter - 1) for layer in range(num_receiver)]


def _proportional(num_receiver: int, num_transmitter: int) -> list[int]:
    if num_receiver == 1:
        return [num_transmitter - 1]
    return [round(layer * (num_transmitter - 1) / (num_receiver - 1)) for layer in range(num_receiver)]


def _last(num_receiver: int, num_transmitter: int) -> list[int]:
    """Every receiver layer reads the transmitter's last cache layer (where its answer is most readable): one
    transmitter layer on the wire, whatever the depths."""
    return [num_transmitter - 1] * num_receiver


LAYER_STRATEGIES: dict[str, Callable[[int, int], list[int]]] = {
    "terminal": _terminal,
    "proportional": _proportional,
    "last": _last,
}


def align_layers(num_receiver: int, num_transmitter: int, strategy: str = DEFAULT_LAYER_STRATEGY) -> list[int]:
    """``map[l]``: the transmitter layer that receiver layer ``l`` reads, by the named strategy."""
    if strategy not in LAYER_STRATEGIES:
        raise FusionError(
            f"unknown layer alignment {strategy!r}; choose one of {sorted(LAYER_STRATEGIES)}", strategy=strategy
        )
    if num_receiver < 1 or num_transmitter < 1:
        raise FusionError(f"cannot align {num_receiver} receiver layers with {num_transmitter} transmitter layers")
    return LAYER_STRATEGIES[strategy](num_receiver, num_transmitter)


def align_cache(cache: KVCache | Mapping[int, KV], alignment: TokenAlignment) -> dict[int, KV]:
    """A transmitter cache (or the layers of it that arrived) gathered onto the receiver's token positions."""
    layers = cache.as_mapping() if isinstance(cache, KVCache) else dict(cache)
    return gather_tokens(layers, alignment.index)
