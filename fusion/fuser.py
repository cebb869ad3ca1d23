"""The C2C pair fuser: projects a transmitter's KV cache into a receiver's cache space and adds it, gated.

Per receiver layer ``l`` (reading transmitter layer ``map[l]``, see ``fusion.align``) and separately for
K and V: the receiver's and the aligned transmitter's per-token vectors (all heads flattened, each
LayerNorm-ed) are concatenated, a 3-layer MLP gives a delta in the receiver's shape and a per-head
dynamic weight in (0, 1); a learnable per-layer gate (Gumbel-sigmoid with an annealed temperature
while training, hard 0/1 at inference) switches the layer on or off::

    fused_l = receiver_l + w_t * gate_l * weight_l(token, head) * delta_l(token, head)

``w_t`` is the gating network's scalar for this transmitter (1 when no gate is used). Several
transmitters' terms are summed (``fuse``). Receiver layers whose transmitter layer was not received get
no term.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bus.errors import FusionError
from fusion.align import DEFAULT_LAYER_STRATEGY, align_layers
from fusion.kvcache import KV, KVCache, last_tokens

log = logging.getLogger(__name__)

DEFAULT_HIDDEN = 128  # MLP width (TOYWORLD: 128 trains in ~30 s and transfers)
DEFAULT_GATE_INIT = 1.0  # initial gate logit: sigmoid 0.73 while training, open (1) at inference
DEFAULT_DELTA_INIT_STD = 1e-3  # the MLP's last layer starts near zero, so an untrained fuser barely moves the cache


@dataclass(frozen=True)
class FuserConfig:
    """Shape of a pair fuser (transmitter -> receiver) and its initialisation."""

    receiver_layers: int  # L_r: cache layers of the receiver
    receiver_kv_heads: int  # H_r
    receiver_head_dim: int  # D_r
    transmitter_layers: int  # L_t
    transmitter_kv_heads: int  # H_t
    transmitter_head_dim: int  # D_t
    hidden: int = DEFAULT_HIDDEN  # width of each 3-layer MLP
    layer_strategy: str = DEFAULT_LAYER_STRATEGY  # how receiver layers pick transmitter layers (fusion.align)
    gate_init: float = DEFAULT_GATE_INIT  # initial per-layer gate logit
    delta_init_std: float = DEFAULT_DELTA_INIT_STD  # std of the MLP's output layer at initialisation
    window: int | None = None  # fuse only the last ``window`` prefix tokens (None: every token, as C2C)
    rms_scale: bool = False  # scale each delta by its receiver vector's RMS (pretrained caches: K norms vary by layer)
    fuse_last: bool = False  # also fuse the held-back last prompt token as it is computed (fusion.live); the window
    # then counts it: window 1 fuses that token alone
    anchor_tokens: int = 1  # the held-back token reads the transmitter's last this many tokens, side by side (its
    # final token, then its last shared ones: a probe finds the answer there too); more than 1 needs window 1

    def __post_init__(self) -> None:
        if self.anchor_tokens > 1 and not (self.fuse_last and self.window == 1):
            raise ValueError("anchor_tokens > 1 needs fuse_last and window 1 (only the held-back token reads them)")

    @classmethod
    def for_models(cls, receiver, transmitter, **kwargs) -> FuserConfig:
        """The config for two ``LanguageModel``s (or anything with num_layers, kv_heads, head_dim)."""
        return cls(
            receiver_layers=receiver.num_layers,
            receiver_kv_heads=receiver.kv_heads,
            receiver_head_dim=receiver.head_dim,
            transmitter_layers=transmitter.num_layers,
            transmitter_kv_heads=transmitter.kv_heads,
            transmitter_head_dim=transmitter.head_dim,
            **kwargs,
        )

    def to_dict(self) -> dict:
        """Plain JSON-able dict (saved with the weights)."""
        return asdict(self)


def gumbel_sigmoid(logits: torch.Tensor, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A relaxed Bernoulli sample ``sigmoid((logits + logistic noise) / tau)``."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device).clamp(1e-6, 1 - 1e-6)
    noise = torch.log(u) - torch.log1p(-u)  # logistic = difference of two Gumbels
    return torch.sigmoid((logits + noise) / tau)


class KVProjector(nn.Module):
    """One path (K or V) of one layer: (receiver, aligned transmitter) -> weighted delta in receiver space."""

    def __init__(
        self, r_heads: int, r_dim: int, t_heads: int, t_dim: int, hidden: int, init_std: float, rms_scale: bool = False
    ) -> None:
        super().__init__()
        self.r_heads, self.r_dim = r_heads, r_dim
        self.rms_scale = rms_scale
        self.norm_r = nn.LayerNorm(r_heads * r_dim)
        self.norm_t = nn.LayerNorm(t_heads * t_dim)
        self.fc1 = nn.Linear(r_heads * r_dim + t_heads * t_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, r_heads * r_dim)
        self.head_weight = nn.Linear(hidden, r_heads)  # per-head dynamic weight
        nn.init.normal_(self.fc3.weight, std=init_std)
        nn.init.zeros_(self.fc3.bias)

    def forward(self, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``r`` (B, H_r, T, D_r), ``t`` (B, H_t, T, D_t) -> delta (B, H_r, T, D_r)."""
        B, _, T, _ = r.shape
        dtype = self.fc1.weight.dtype  # the fuser's own (caches may come in another, e.g. a bf16 receiver's)
        r_flat = r.transpose(1, 2).reshape(B, T, -1).to(dtype)  # (B, T, H_r*D_r)
        t_flat = t.transpose(1, 2).reshape(B, T, -1).to(dtype)  # (B, T, H_t*D_t)
        x = torch.cat([self.norm_r(r_flat), self.norm_t(t_flat)], dim=-1)  # (B, T, H_r*D_r + H_t*D_t)
        h = F.gelu(self.fc2(F.gelu(self.fc1(x))))  # (B, T, hidden)
        delta = self.fc3(h).view(B, T, self.r_heads, self.r_dim)  # (B, T, H_r, D_r)
        if self.rms_scale:
            delta = delta * r_flat.pow(2).mean(-1).add(1e-6).sqrt()[:, :, None, None]  # the receiver vector's size
        weight = torch.sigmoid(self.head_weight(h)).unsqueeze(-1)  # (B, T, H_r, 1)
        return (weight * delta).transpose(1, 2).to(r.dtype)  # (B, H_r, T, D_r)


class LayerFuser(nn.Module):
    """K and V projectors of one receiver layer."""

    def __init__(self, cfg: FuserConfig) -> None:
        super().__init__()
        t_dim = cfg.transmitter_head_dim * cfg.anchor_tokens  # anchors side by side along the feature axis
        dims = (cfg.receiver_kv_heads, cfg.receiver_head_dim, cfg.transmitter_kv_heads, t_dim)
        self.key = KVProjector(*dims, cfg.hidden, cfg.delta_init_std, cfg.rms_scale)
        self.value = KVProjector(*dims, cfg.hidden, cfg.delta_init_std, cfg.rms_scale)

    def forward(self, receiver: KV, transmitter: KV) -> KV:
        """Ungated deltas (dK, dV), each (B, H_r, T, D_r)."""
        return self.key(receiver[0], transmitter[0]), self.value(receiver[1], transmitter[1])


class PairFuser(nn.Module):
    """All receiver layers of one transmitter -> receiver pair, with a learnable gate per layer."""

    def __init__(self, cfg: FuserConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_map = align_layers(cfg.receiver_layers, cfg.transmitter_layers, cfg.layer_strategy)
        self.layers = nn.ModuleList(LayerFuser(cfg) for _ in range(cfg.receiver_layers))
        self.gate_logits = nn.Parameter(torch.full((cfg.receiver_layers,), float(cfg.gate_init)))
        self.tau = 1.0  # Gumbel-sigmoid temperature; the trainer anneals it

    def gates(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-layer gate values ``(L_r,)``: relaxed samples while training, hard 0/1 in eval mode."""
        if self.training:
            return gumbel_sigmoid(self.gate_logits, self.tau, generator)
        return (self.gate_logits > 0).to(self.gate_logits.dtype)

    def open_layers(self) -> list[int]:
        """Receiver layers whose hard gate is open."""
        return [i for i, g in enumerate((self.gate_logits > 0).tolist()) if g]

    def transmitter_layers_used(self) -> list[int]:
        """Transmitter layers that some open receiver layer reads (the only ones worth sending)."""
        return sorted({self.layer_map[i] for i in self.open_layers()})

    def check_shapes(self, receiver: KVCache, transmitter: Mapping[int, KV]) -> None:
        """Raise ``FusionError`` unless the caches match this fuser's config and token count."""
        cfg = self.cfg
        if (receiver.num_layers, receiver.kv_heads, receiver.head_dim) != (
            cfg.receiver_layers,
            cfg.receiver_kv_heads,
            cfg.receiver_head_dim,
        ):
            raise FusionError(
                f"receiver cache (layers={receiver.num_layers}, heads={receiver.kv_heads}, dim={receiver.head_dim}) "
                f"does not match the fuser (layers={cfg.receiver_layers}, heads={cfg.receiver_kv_heads}, "
                f"dim={cfg.receiver_head_dim})"
            )
        for layer, (k, _) in transmitter.items():
            if not 0 <= layer < cfg.transmitter_layers:
                raise FusionError(f"transmitter layer {layer} is out of range (fuser has {cfg.transmitter_layers})")
            if (k.shape[1], k.shape[3]) != (cfg.transmitter_kv_heads, cfg.transmitter_head_dim):
                raise FusionError(
                    f"transmitter layer {layer} has heads={k.shape[1]}, dim={k.shape[3]}; the fuser expects "
                    f"heads={cfg.transmitter_kv_heads}, dim={cfg.transmitter_head_dim}"
                )
            if k.shape[2] != receiver.num_tokens or k.shape[0] != receiver.batch_size:
                raise FusionError(
                    f"transmitter layer {layer} has {k.shape[2]} tokens (batch {k.shape[0]}) but the receiver has "
                    f"{receiver.num_tokens} (batch {receiver.batch_size}); align the tokens first"
                )

    def deltas(
        self,
        receiver: KVCache,
        transmitter: Mapping[int, KV],
        weight: float | torch.Tensor = 1.0,
        generator: torch.Generator | None = None,
        lengths: torch.Tensor | None = None,
        span: int | torch.Tensor | None = None,
    ) -> dict[int, KV]:
        """Gated, weighted deltas per receiver layer, from the transmitter layers present (aligned to receiver tokens).

        ``weight`` is a scalar or a ``(B,)`` tensor (one per batch row); ``lengths`` ``(B,)`` the true prefix
        lengths of a right-padded batch; ``span`` (an int or ``(B,)``) how many of each row's last prefix tokens
        lie in the shared text (the only ones fused; None: all). The fuser's ``window`` narrows it further.
        """
        self.check_shapes(receiver, transmitter)
        gates = self.gates(generator)  # (L_r,)
        like = receiver.layers[0][0]
        w = torch.as_tensor(weight, dtype=like.dtype, device=like.device)
        w = w.reshape(-1, 1, 1, 1) if w.dim() == 1 else w  # (B, 1, 1, 1) or scalar
        # The MLP runs on the fused tokens only (it is per token, so this is the same result as running it
        # everywhere and masking, at a fraction of the work: one token of ~40 with window 1). An unpadded prompt
        # takes its last tokens; a right-padded batch gathers each row's own last ones and scatters back.
        T = receiver.num_tokens
        window = self.prefix_window()
        if window == 0:
            return {}  # only the held-back token is fused (live_deltas)
        if lengths is None:
            widths = None
            tail = min(window if window is not None else T, int(span) if span is not None else T)
            tail = None if tail >= T else tail
        else:
            widths = lengths.clone() if span is None else torch.as_tensor(span).expand_as(lengths).clone()
            if window is not None:
                widths = widths.clamp(max=window)
            tail = None
            if window is None and span is None:
                widths = None  # every token of every row: no gather
        picked = _window_positions(lengths, widths, like) if widths is not None else None
        out: dict[int, KV] = {}
        for layer, fuser in enumerate(self.layers):
            source = self.layer_map[layer]
            if source not in transmitter or (not self.training and float(gates[layer]) == 0.0):
                continue
            r, t = receiver.layers[layer], transmitter[source]
            if picked is not None:
                pos, valid = picked
                dk, dv = fuser(_gather_tokens(r, pos), _gather_tokens(t, pos))  # each (B, H_r, window, D_r)
                dk, dv = (
                    _scatter_tokens(valid * dk, pos, r[0]),
                    _scatter_tokens(valid * dv, pos, r[1]),
                )  # (B, H_r, T, D_r)
            elif tail is None:
                dk, dv = fuser(r, t)  # each (B, H_r, T, D_r)
            else:
                dk, dv = fuser(last_tokens(r, tail), last_tokens(t, tail))  # each (B, H_r, tail, D_r)
                dk, dv = F.pad(dk, (0, 0, T - tail, 0)), F.pad(dv, (0, 0, T - tail, 0))  # zeros before the window
            scale = w * gates[layer]
            out[layer] = (scale * dk, scale * dv)
        return out

    def prefix_window(self) -> int | None:
        """How many of the prefix's last tokens this fuser changes (None: all; 0: none, only the held-back one)."""
        if self.cfg.window is None:
            return None
        return int(self.cfg.window) - 1 if self.cfg.fuse_last else int(self.cfg.window)

    def live_deltas(
        self,
        layer: int,
        receiver: KV,
        anchor: Mapping[int, KV],
        weight: float | torch.Tensor = 1.0,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Gated, weighted deltas for the held-back token at receiver ``layer`` (``receiver``: its own K, V there,
        each ``(B, H_r, 1, D_r)``; ``anchor``: the transmitter's final token per transmitter layer); ``(None, None)``
        when this layer takes nothing (its gate is shut or its transmitter layer did not arrive)."""
        source = self.layer_map[layer]
        if not self.cfg.fuse_last or source not in anchor:
            return None, None
        gate = self.gates(generator)[layer]
        if not self.training and float(gate) == 0.0:
            return None, None
        k, v = anchor[source]  # each (B, H_t, A, D_t): the transmitter's last A tokens
        A = self.cfg.anchor_tokens
        if k.shape[2] < A:
            raise FusionError(f"the held-back token reads {A} transmitter tokens; {k.shape[2]} arrived")
        side = (_side_by_side(k[:, :, -A:]), _side_by_side(v[:, :, -A:]))  # each (B, H_t, 1, A*D_t)
        dk, dv = self.layers[layer](receiver, side)  # each (B, H_r, 1, D_r)
        w = torch.as_tensor(weight, dtype=dk.dtype, device=dk.device)
        w = w.reshape(-1, 1, 1, 1) if w.dim() == 1 else w
        return w * gate * dk, w * gate * dv

    def forward(self, receiver: KVCache, transmitter: Mapping[int, KV], weight: float | torch.Tensor = 1.0) -> KVCache:
        """The receiver cache with this transmitter fused in."""
        return apply_deltas(receiver, [self.deltas(receiver, transmitter, weight)])


def _side_by_side(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, A, D)`` -> ``(B, H, 1, A*D)``: a few tokens read as one wider vector."""
    B, H, A, D = x.shape
    return x.reshape(B, H, 1, A * D)


def _window_positions(
    lengths: torch.Tensor, widths: torch.Tensor, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's last ``widths[i]`` real prefix positions, as ``(B, W)`` positions (W the widest; clamped at 0)
    and a ``(B, 1, W, 1)`` mask in ``like``'s dtype that is 0 on a row's positions outside its own width."""
    W = int(widths.max())
    steps = torch.arange(W, device=like.device)[None, :]  # (1, W)
    pos = lengths.to(like.device)[:, None] - W + steps  # (B, W)
    valid = (steps >= W - widths.to(like.device)[:, None]) & (pos >= 0)
    return pos.clamp(min=0), valid[:, None, :, None].to(like.dtype)


def _gather_tokens(kv: KV, pos: torch.Tensor) -> KV:
    """Rows' own token positions ``pos`` ``(B, n)`` of a (K, V) pair: ``(B, H, T, D) -> (B, H, n, D)`` each."""
    k, v = kv
    return k.gather(2, _token_index(pos, k)), v.gather(2, _token_index(pos, v))


def _token_index(pos: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``pos`` ``(B, n)`` expanded to index dimension 2 of ``x`` ``(B, H, *, D)``: ``(B, H, n, D)``."""
    return pos[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3])


def _scatter_tokens(delta: torch.Tensor, pos: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``delta`` ``(B, H, n, D)`` placed at positions ``pos`` ``(B, n)`` of zeros shaped ``like`` ``(B, H, T, D)``
    (repeated positions add up; their deltas are masked to zero)."""
    return torch.zeros_like(like).scatter_add(2, _token_index(pos, delta), delta)


def apply_deltas(receiver: KVCache, deltas: Iterable[Mapping[int, KV]]) -> KVCache:
    """``receiver + sum(deltas)`` layer by layer (a new cache; the receiver's tensors are not modified)."""
    layers = list(receiver.layers)
    for contribution in deltas:
        for layer, (dk, dv) in contribution.items():
            k, v = layers[layer]
            layers[layer] = (k + dk.to(k.dtype), v + dv.to(v.dtype))
    return KVCache(layers)


def fuse(
    receiver: KVCache,
    contributions: Sequence[tuple[PairFuser, Mapping[int, KV], float | torch.Tensor]],
) -> KVCache:
    """Fuse several transmitters: ``receiver + sum_t fuser_t.deltas(receiver, aligned_t, weight_t)``."""
    return apply_deltas(receiver, [f.deltas(receiver, t, w) for f, t, w in contributions])
