"""Training a pair fuser with both language models frozen.

Loss: the receiver's cross-entropy after it reads its continuation from the fused prefix cache
(``fusion.losses``: over the four letters for the toy zoo, over every answer token for a pretrained model).
Both models' caches are computed once (``fusion.examples``); batches are right-padded (masked, with true
positions), so prompts of any length mix. Progress bar, checkpoints every N steps
(``train_fuser(..., checkpoint=path)`` resumes from one), and the whole run is a function of the seed.
``python -m fusion.train`` trains the fuser of any pair from a JSONL file (``fusion.train_cli``).

What the items say is the caller's business; TOYWORLD's lessons for a good fuser: letter answers, and
"keep-targets" (also train on facts the receiver knows, with its correct answer) so fusion does not
wreck what the receiver already knows.
"""

from __future__ import annotations

if __name__ == "__main__":  # flags first: --help and a bad flag answer before torch is imported
    from fusion.train_cli import main

    raise SystemExit(main())

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bus.errors import FusionError
from fusion.answers import is_correct, read_answer
from fusion.c2c import batch_letter_logits, letter_ids
from fusion.examples import (
    KEEP_OWN,
    FusionItem,
    PreparedExample,
    anchors,
    collate,
    continuation_groups,
    pad_layers,
    pad_tokens,
    prepare_examples,
)
from fusion.fuser import FuserConfig, PairFuser, apply_deltas
from fusion.live import LiveTerm
from fusion.losses import fused_loss
from fusion.models import LanguageModel

__all__ = [
    "KEEP_OWN",
    "FusionItem",
    "PreparedExample",
    "collate",
    "continuation_groups",
    "pad_layers",
    "pad_tokens",
    "prepare_examples",
]

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 2


@dataclass(frozen=True)
class FuserTrainConfig:
    """Optimisation of one pair fuser (defaults from TOYWORLD: hidden 128, AdamW 1e-3, wd 0.05, ~600 steps)."""

    steps: int = 600  # optimiser steps
    batch_size: int = 32  # examples per step
    lr: float = 1e-3  # peak AdamW learning rate (linear warm-up, cosine decay to 10%)
    warmup: int = 20  # steps of linear warm-up
    weight_decay: float = 0.05  # AdamW weight decay (not on the layer gates)
    gate_lr_scale: float = 30.0  # the layer gates learn this much faster (TOYWORLD lesson 4: else they never move)
    tau_start: float = 1.0  # Gumbel-sigmoid temperature at step 0
    tau_end: float = 0.1  # ... annealed geometrically to this at the last step
    hidden: int = 128  # fuser MLP width
    layer_strategy: str = "terminal"  # layer alignment (fusion.align)
    window: int | None = None  # fuse only the last this many prefix tokens (None: all)
    confidence_weighting: bool = False  # scale each example's deltas by the gate's P(none) prior, as at inference
    rms_scale: bool = False  # deltas in units of the receiver vector's RMS (pretrained caches)
    fuse_last: bool = False  # fuse the held-back last prompt token as it is computed (fusion.live)
    anchor_tokens: int = 1  # ... reading the transmitter's last this many tokens
    delta_init_std: float = 1e-3  # the fuser's last layer starts this close to zero
    seed: int = 0  # initialisation, batch order and gate noise
    checkpoint_every: int = 100  # steps between checkpoints (when a checkpoint path is given)


@dataclass
class TrainedFuser:
    """A trained fuser and how its training went."""

    fuser: PairFuser
    losses: list[float] = field(default_factory=list)  # mean loss per step
    seconds: float = 0.0  # wall time of this call (excluding resumed steps)
    resumed_from: int = 0  # step the run resumed at (0: fresh)
    num_examples: int = 0

    def meta(self) -> dict:
        """Facts saved with the fuser in the registry."""
        head, tail = self.losses[:20], self.losses[-20:]
        return {
            "steps": len(self.losses),
            "examples": self.num_examples,
            "loss_first": float(sum(head) / max(len(head), 1)),
            "loss_last": float(sum(tail) / max(len(tail), 1)),
            "seconds": round(self.seconds, 2),
        }


def _lr_factor(step: int, cfg: FuserTrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _tau(step: int, cfg: FuserTrainConfig) -> float:
    return cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** (step / max(cfg.steps - 1, 1))


def new_fuser(receiver: LanguageModel, transmitter: LanguageModel, cfg: FuserTrainConfig) -> PairFuser:
    """A freshly initialised fuser for this pair (deterministic per ``cfg.seed``)."""
    config = FuserConfig.for_models(
        receiver,
        transmitter,
        hidden=cfg.hidden,
        layer_strategy=cfg.layer_strategy,
        window=cfg.window,
        rms_scale=cfg.rms_scale,
        fuse_last=cfg.fuse_last,
        anchor_tokens=cfg.anchor_tokens,
        delta_init_std=cfg.delta_init_std,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return PairFuser(config).to(receiver.device)


def _optimizer(fuser: PairFuser, cfg: FuserTrainConfig) -> torch.optim.AdamW:
    rest = [p for n, p in fuser.named_parameters() if n != "gate_logits"]
    groups = [
        {"params": rest, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "scale": 1.0},
        {
            "params": [fuser.gate_logits],
            "lr": cfg.lr * cfg.gate_lr_scale,
            "weight_decay": 0.0,
            "scale": cfg.gate_lr_scale,
        },
    ]
    return torch.optim.AdamW(groups)


def _checkpoint_key(receiver: LanguageModel, transmitter: LanguageModel, cfg: FuserTrainConfig, n: int) -> dict:
    return {"receiver": receiver.fingerprint, "transmitter": transmitter.fingerprint, "config": asdict(cfg), "n": n}


def _save_checkpoint(path: Path, key: dict, step: int, fuser, opt, gens, losses) -> None:
    blob = {
        "version": CHECKPOINT_VERSION,
        "key": key,
        "step": step,
        "fuser": fuser.state_dict(),
        "optimizer": opt.state_dict(),
        "generators": [g.get_state() for g in gens],
        "losses": torch.tensor(losses, dtype=torch.float64),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    torch.save(blob, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, key: dict) -> dict | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file: start over rather than fail
        log.warning("ignoring unreadable checkpoint %s (%s)", path, type(exc).__name__)
        return None
    if blob.get("version") != CHECKPOINT_VERSION or blob.get("key") != key:
        log.warning("ignoring checkpoint %s: it belongs to another run", path)
        return None
    return blob


def _batch_loss(
    receiver: LanguageModel,
    fuser: PairFuser,
    examples: Sequence[PreparedExample],
    weighted: bool,
    noise: torch.Generator,
) -> torch.Tensor:
    """Summed loss of the receiver after fusing, over ``examples`` (one padded batch)."""
    dtype = next(receiver.model.parameters()).dtype  # the receiver runs at its own dtype (bf16 trains faster)
    prefix, aligned, lengths, conts, targets, spans = collate(examples, dtype)
    weights = torch.tensor([e.weight for e in examples]) if weighted else 1.0
    deltas = fuser.deltas(prefix, aligned, weights, generator=noise, lengths=lengths, span=spans)
    live = (
        [LiveTerm(fuser, anchors(examples, dtype, fuser.cfg.anchor_tokens), weights, noise)]
        if fuser.cfg.fuse_last
        else []
    )
    return fused_loss(receiver, apply_deltas(prefix, [deltas]), lengths, conts, targets, live)


def train_fuser(
    receiver: LanguageModel,
    transmitter: LanguageModel,
    data: Sequence[FusionItem] | Sequence[PreparedExample],
    cfg: FuserTrainConfig | None = None,
    *,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainedFuser:
    """Train the ``transmitter -> receiver`` fuser on ``data`` (items, or examples already prepared).

    With ``checkpoint``, state is saved every ``cfg.checkpoint_every`` steps and a matching checkpoint is
    resumed. ``stop_after`` ends the call after that many total steps (to test resuming).
    """
    cfg = cfg or FuserTrainConfig()
    if not data:
        raise FusionError("cannot train a fuser on no examples")
    examples = (
        list(data) if isinstance(data[0], PreparedExample) else prepare_examples(receiver, transmitter, data, progress)
    )
    for p in receiver.model.parameters():
        p.requires_grad_(False)
    fuser = new_fuser(receiver, transmitter, cfg)
    opt = _optimizer(fuser, cfg)
    batch_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 1)
    noise_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 2)
    losses: list[float] = []
    start = 0
    path = Path(checkpoint) if checkpoint is not None else None
    key = _checkpoint_key(receiver, transmitter, cfg, len(examples))
    if path is not None and (blob := _load_checkpoint(path, key)) is not None:
        fuser.load_state_dict(blob["fuser"])
        opt.load_state_dict(blob["optimizer"])
        batch_gen.set_state(blob["generators"][0])
        noise_gen.set_state(blob["generators"][1])
        losses = [float(x) for x in blob["losses"]]
        start = int(blob["step"])
        log.info("resuming %s at step %d", path, start)
    end = min(cfg.steps, stop_after) if stop_after is not None else cfg.steps
    t0 = time.perf_counter()
    fuser.train()
    bar = tqdm(range(start, end), desc=f"fuser {transmitter.name}->{receiver.name}", disable=not progress, leave=False)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * group["scale"] * _lr_factor(step, cfg)
        fuser.tau = _tau(step, cfg)
        pick = torch.randint(len(examples), (min(cfg.batch_size, len(examples)),), generator=batch_gen)
        batch = [examples[int(i)] for i in pick]
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for group in continuation_groups([e.continuation for e in batch]):  # the batch's mean loss, summed by parts
            part = [batch[i] for i in group]
            part_loss = _batch_loss(receiver, fuser, part, cfg.confidence_weighting, noise_gen) / len(batch)
            part_loss.backward()
            loss += float(part_loss.detach())
        torch.nn.utils.clip_grad_norm_(fuser.parameters(), 1.0)
        opt.step()
        losses.append(loss)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
        if path is not None and (step + 1) % cfg.checkpoint_every == 0:
            _save_checkpoint(path, key, step + 1, fuser, opt, (batch_gen, noise_gen), losses)
    if path is not None and end > start:
        _save_checkpoint(path, key, end, fuser, opt, (batch_gen, noise_gen), losses)
    fuser.eval()
    return TrainedFuser(fuser, losses, time.perf_counter() - t0, start, len(examples))


@torch.no_grad()
def fused_predictions(
    receiver: LanguageModel,
    fuser: PairFuser | None,
    examples: Sequence[PreparedExample],
    batch_size: int = 64,
    weighted: bool = False,
) -> torch.Tensor:
    """Predicted letter per example of a letter-style receiver, fused (``fuser=None``: receiver alone; ``weighted``:
    prior weights applied)."""
    letters = torch.tensor(letter_ids(receiver))
    preds = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        prefix, aligned, lengths, conts, _, spans = collate(chunk)
        cache, live = prefix, []
        if fuser is not None:
            w = torch.tensor([e.weight for e in chunk]) if weighted else 1.0
            cache = apply_deltas(prefix, [fuser.eval().deltas(prefix, aligned, w, lengths=lengths, span=spans)])
            live = [LiveTerm(fuser, anchors(chunk, count=fuser.cfg.anchor_tokens), w)] if fuser.cfg.fuse_last else []
        preds.append(batch_letter_logits(receiver, cache, lengths, conts, letters, live).argmax(-1).cpu())
    return torch.cat(preds)


@torch.no_grad()
def fused_text(receiver: LanguageModel, fuser: PairFuser | None, example: PreparedExample) -> str:
    """A text-style receiver's generated answer for one prepared example, fused (``fuser=None``: alone)."""
    prefix = example.prefix.to(dtype=torch.float32)
    cache, live = prefix, []
    if fuser is not None:
        aligned = {m: (k.float(), v.float()) for m, (k, v) in example.aligned.items()}
        aligned = {
            m: pad_layers([kv], prefix.num_tokens, [prefix.num_tokens - example.span]) for m, kv in aligned.items()
        }
        cache = apply_deltas(prefix, [fuser.eval().deltas(prefix, aligned, 1.0, span=example.span)])
        live = [LiveTerm(fuser, anchors([example], count=fuser.cfg.anchor_tokens), 1.0)] if fuser.cfg.fuse_last else []
    return read_answer(receiver, cache, example.continuation, (), live=live).text


def fused_accuracy(
    receiver: LanguageModel, fuser: PairFuser | None, examples: Sequence[PreparedExample], weighted: bool = False
) -> float:
    """Share of examples the (fused) receiver answers right: its letter, or (text style) its free text exactly."""
    if not examples:
        return float("nan")
    if receiver.style == "text":
        hits = [is_correct(_reading(receiver, fuser, e), receiver.decode(list(e.target))) for e in examples]  # type: ignore[arg-type]
        return sum(hits) / len(hits)
    preds = fused_predictions(receiver, fuser, examples, weighted=weighted)
    return float((preds == torch.tensor([e.target for e in examples])).float().mean())


def _reading(receiver: LanguageModel, fuser: PairFuser | None, example: PreparedExample):
    from fusion.answers import Reading

    return Reading(None, (), fused_text(receiver, fuser, example))
