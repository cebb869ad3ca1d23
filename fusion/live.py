"""Fusing the receiver's last prompt token as it is computed (a cache whose ``update()`` applies the fusers).

Fusing a prefilled cache cannot change what the last prompt token already predicted, so the receiver holds that
token back and reads it after the fused prefix (``fusion.c2c``). A fuser with ``fuse_last`` goes further (as a
prototype on the real pair found works best): at every layer, the held-back token's own K and V are fused with
the transmitter's final token the moment they are computed, before that token attends, so the fusion acts on
its own attention at every depth (and on every later layer's K and V, which it changes).

``FusingCache`` is a ``DynamicCache`` that does this for the first new token of its first forward pass and
stores the result; later passes (generation) append as usual.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PretrainedConfig

from fusion.kvcache import KV, KVCache


@dataclass(frozen=True)
class LiveTerm:
    """One transmitter's contribution to the held-back token: its fuser, its final token's K/V per transmitter
    layer (each ``(B, H_t, 1, D_t)``), and its weight (a float or ``(B,)``)."""

    fuser: object  # fusion.fuser.PairFuser
    anchor: Mapping[int, KV]
    weight: float | torch.Tensor = 1.0
    generator: torch.Generator | None = None  # gate noise while training


class FusingCache(DynamicCache):
    """A cache holding ``base`` whose first update per layer fuses the first new token with ``terms``."""

    def __init__(self, config: PretrainedConfig, base: KVCache, terms: Sequence[LiveTerm]) -> None:
        super().__init__(config=config)
        for i, (k, v) in enumerate(base.layers):
            super().update(k, v, i)
        self.terms = list(terms)
        self._fused: set[int] = set()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append the new K/V of one layer; on its first call, the first new token's are fused first."""
        if layer_idx not in self._fused and self.terms:
            self._fused.add(layer_idx)
            k0, v0 = key_states[:, :, :1], value_states[:, :, :1]  # (B, H_r, 1, D_r)
            dk_sum, dv_sum = torch.zeros_like(k0), torch.zeros_like(v0)
            for term in self.terms:
                dk, dv = term.fuser.live_deltas(  # type: ignore[attr-defined]
                    layer_idx, (k0, v0), term.anchor, term.weight, term.generator
                )
                if dk is not None:
                    dk_sum, dv_sum = dk_sum + dk.to(k0.dtype), dv_sum + dv.to(v0.dtype)
            key_states = torch.cat([k0 + dk_sum, key_states[:, :, 1:]], dim=2)
            value_states = torch.cat([v0 + dv_sum, value_states[:, :, 1:]], dim=2)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def as_model_cache(config: PretrainedConfig, cache: KVCache, terms: Sequence[LiveTerm] = ()) -> DynamicCache:
    """The transformers cache to run new tokens from: plain, or fusing the first new token with ``terms``."""
    return FusingCache(config, cache, terms) if terms else cache.to_dynamic(config)
