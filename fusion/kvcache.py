"""A model-agnostic KV cache: a list of per-layer (K, V) tensors ``[B, kv_heads, T, head_dim]``."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PretrainedConfig

from bus.errors import FusionError

KV = tuple[torch.Tensor, torch.Tensor]


def last_tokens(kv: KV, n: int) -> KV:
    """The last ``n`` token positions of a (K, V) pair: ``(B, H, T, D) -> (B, H, n, D)`` each."""
    return kv[0][:, :, -n:], kv[1][:, :, -n:]


@dataclass
class KVCache:
    """The prefill cache of one model: ``layers[i] = (K, V)``, each ``(B, kv_heads, T, head_dim)``."""

    layers: list[KV]

    def __post_init__(self) -> None:
        if not self.layers:
            raise FusionError("a KV cache needs at least one layer")
        shape = self.layers[0][0].shape
        for i, (k, v) in enumerate(self.layers):
            if k.dim() != 4 or k.shape != v.shape or k.shape[0] != shape[0] or k.shape[2] != shape[2]:
                raise FusionError(
                    f"layer {i}: K {tuple(k.shape)} and V {tuple(v.shape)} must both be (B, heads, T, head_dim) "
                    f"with B and T equal across layers",
                    layer=i,
                )

    @property
    def num_layers(self) -> int:
        """Number of layers."""
        return len(self.layers)

    @property
    def batch_size(self) -> int:
        """Batch dimension B."""
        return self.layers[0][0].shape[0]

    @property
    def num_tokens(self) -> int:
        """Sequence length T."""
        return self.layers[0][0].shape[2]

    @property
    def kv_heads(self) -> int:
        """KV heads of layer 0 (all layers share it in the supported architectures)."""
        return self.layers[0][0].shape[1]

    @property
    def head_dim(self) -> int:
        """Head dimension of layer 0."""
        return self.layers[0][0].shape[3]

    @property
    def nbytes(self) -> int:
        """Bytes held by all K and V tensors at their current dtype."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)

    def __iter__(self) -> Iterator[KV]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def to_dynamic(self, config: PretrainedConfig | None = None) -> DynamicCache:
        """A fresh transformers ``DynamicCache`` holding these tensors (later appends never touch ours)."""
        cache = DynamicCache(config=config) if config is not None else DynamicCache()
        for i, (k, v) in enumerate(self.layers):
            cache.update(k, v, i)
        return cache

    @classmethod
    def from_dynamic(cls, cache: DynamicCache) -> KVCache:
        """Wrap the tensors of a transformers cache (no copy)."""
        return cls([(layer.keys, layer.values) for layer in cache.layers])

    def as_mapping(self) -> dict[int, KV]:
        """``{layer: (K, V)}``: the bus codec's input."""
        return dict(enumerate(self.layers))

    @classmethod
    def from_mapping(cls, layers: Mapping[int, KV], num_layers: int | None = None) -> KVCache:
        """Rebuild from a complete ``{layer: (K, V)}`` mapping (every layer 0..n-1 present)."""
        n = num_layers if num_layers is not None else len(layers)
        missing = [i for i in range(n) if i not in layers]
        if missing:
            raise FusionError(f"cache is missing layers {missing}", missing=missing)
        return cls([layers[i] for i in range(n)])

    def clone(self) -> KVCache:
        """A deep copy."""
        return KVCache([(k.clone(), v.clone()) for k, v in self.layers])

    def truncate(self, num_tokens: int) -> KVCache:
        """The first ``num_tokens`` positions (views, no copy)."""
        if not 0 < num_tokens <= self.num_tokens:
            raise FusionError(f"cannot truncate a {self.num_tokens}-token cache to {num_tokens} tokens")
        return KVCache([(k[:, :, :num_tokens], v[:, :, :num_tokens]) for k, v in self.layers])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """Move/cast every tensor."""
        return KVCache([(k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)) for k, v in self.layers])
