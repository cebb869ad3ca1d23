"""The cache-to-cache data path shared by fuser training, gate training and ``refine()``.

Both models read the same *shared text* S (what leaves the receiver), each in its own frame; only positions
inside S are fused, aligned by character spans of S. The receiver's *prefix* is its prompt up to the end of S
(its own cache of it is what fusers add to); the *continuation* is what it reads after the fused prefix.

- Letter style (the toy zoo, TOYWORLD lesson 1): S is the whole prompt ``P = format_question(q', options)``;
  the prefix is P but its last token, the transmitter sends its cache of all of P, and the continuation is the
  last token of P (then, private, ``"\\n" + format_question(q, options)``); the answer is one of four letters.
- Text style (pretrained checkpoints, ``fusion.formats``): S is q' alone inside each model's frame (chat template
  or ``Question: ...\\nAnswer:``; a transmitter's frame also holds its local notes before S). A transmitter sends
  its cache of the S positions and of its prompt's final token (where its own answer forms; offset
  ``(len(S), len(S))``), nothing of its notes. The receiver's prefix is its whole prompt but the last token
  (private: ``"\\n" + q`` follows S inside its frame); its tokens from S's first on may be fused (S's by
  character spans, the frame's after S onto the transmitter's final token); the continuation is its last prompt
  token, then the answer is generated or the options scored by likelihood.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from bus.errors import FusionError
from fusion.align import TokenAlignment, align_tokens
from fusion.kvcache import KV, KVCache, last_tokens
from fusion.live import as_model_cache
from fusion.models import LanguageModel
from fusion.prompts import LETTERS, answer_token_text, format_question

PRIVATE_JOIN = "\n"  # between the rephrased prompt and the original question in private mode
ANCHOR_LAST = True  # the receiver's last prefix token reads the transmitter's final token (see prefix_alignment)


def letter_ids(model: LanguageModel) -> list[int]:
    """Token ids of ``" A"`` .. ``" D"`` (for a vocabulary that splits them, as byte-level test models do: the last)."""
    ids = [model.word_ids(answer_token_text(letter))[-1] for letter in LETTERS]
    if len(set(ids)) != len(ids):
        raise FusionError(f"{model.name} has no distinct tokens for the answer letters {LETTERS}")
    return ids


@dataclass(frozen=True)
class ReceiverView:
    """What the receiver prefills (the prefix) and what it reads after the fused prefix (the continuation)."""

    prefix_ids: list[int]  # its prompt up to the end of S (letter style: P but its last token)
    prefix_offsets: list[tuple[int, int]]  # their character spans in S ((0, 0) for frame tokens before S)
    continuation_ids: list[int]  # what it reads after the fused prefix
    shared_text: str  # S, the text the transmitters read
    span: int  # how many of the last prefix tokens lie in S: the only ones a fuser may change

    def __post_init__(self) -> None:
        if not 1 <= self.span <= len(self.prefix_ids) or not self.continuation_ids:
            raise FusionError(f"cannot fuse {self.shared_text!r}: no shared tokens or nothing to read after them")


def receiver_view(receiver: LanguageModel, shared_text: str, original_text: str | None = None) -> ReceiverView:
    """Split the receiver's prompt of ``shared_text`` (S) into prefix and continuation; ``original_text`` (private
    mode: q, or the toy's prompt of q) is read after S."""
    if receiver.style == "text":
        return _text_view(receiver, shared_text, original_text)
    enc = receiver.encode(shared_text)
    if len(enc.ids) < 2:
        raise FusionError(f"prompt {shared_text!r} is too short to fuse ({len(enc.ids)} tokens)")
    continuation = enc.ids[-1:]
    if original_text is not None:
        continuation = continuation + receiver.encode(PRIVATE_JOIN + original_text).ids
    return ReceiverView(enc.ids[:-1], list(enc.offsets[:-1]), continuation, shared_text, len(enc.ids) - 1)


def _text_view(receiver: LanguageModel, shared_text: str, original_text: str | None) -> ReceiverView:
    content = shared_text if original_text is None else shared_text + PRIVATE_JOIN + original_text
    framed = receiver.format.frame(content)  # type: ignore[union-attr]
    enc = receiver.encode_framed(framed)
    start, end = framed.span(0, len(shared_text))
    first = next((i for i, (_, e) in enumerate(enc.offsets) if e > start), None)
    if first is None or first >= len(enc.ids) - 1:
        raise FusionError(f"cannot fuse {shared_text!r}: the receiver's prompt has no shared tokens before its last")
    offsets = [(max(s - start, 0), max(e - start, 0)) if e > start else (0, 0) for s, e in enc.offsets[:-1]]
    return ReceiverView(enc.ids[:-1], offsets, enc.ids[-1:], shared_text, len(enc.ids) - 1 - first)


def question_texts(
    stem: str, options: Sequence[str], shared_stem: str | None = None, style: str = "letter"
) -> tuple[str, str | None]:
    """``(S, original)``: what leaves the receiver (from ``shared_stem``, q', when given) and, when private, what the
    receiver reads after it. Letter style: the lettered prompts of q' and q; text style: q' and q themselves."""
    if style == "text":
        return (" ".join((shared_stem or stem).split()), " ".join(stem.split()) if shared_stem is not None else None)
    if shared_stem is None:
        return format_question(stem, options), None
    return format_question(shared_stem, options), format_question(stem, options)


def prefix_alignment(
    view: ReceiverView,
    transmitter_offsets: Sequence[tuple[int, int]],
    anchor_last: bool = ANCHOR_LAST,
    shift: int = 0,
) -> TokenAlignment:
    """Align the receiver's prefix tokens to the transmitter's tokens of the same text P (longest coverage).

    With ``anchor_last`` the receiver's last prefix token reads the transmitter's *final* token instead: the
    transmitter's answer forms there (TOYWORLD lesson 1; a linear probe on the zoo finds it at 0.84 there and
    0.54 one token earlier), and the receiver's own last prompt token is fed after the fused prefix.
    ``shift``: the transmitter read ``shift`` characters of its own before P (a fact in context, in training).
    Only the view's last ``span`` tokens (those inside S) are aligned; earlier frame tokens point at token 0 with
    coverage 0 (no fuser reads them).
    """
    fused = view.prefix_offsets[-view.span :]
    receiver_offsets = [(s + shift, e + shift) for s, e in fused] if shift else fused
    al = align_tokens(receiver_offsets, transmitter_offsets)
    index = al.index.clone()
    if anchor_last:
        index[-1] = len(transmitter_offsets) - 1
    before = len(view.prefix_offsets) - view.span
    if before:
        zeros = torch.zeros(before, dtype=torch.long)
        return TokenAlignment(torch.cat([zeros, index]), torch.cat([zeros, al.coverage]), ((),) * before + al.covering)
    return TokenAlignment(index, al.coverage, al.covering)


def transmitter_tail(fuser) -> int | None:
    """How many of the transmitter's last tokens ``fuser`` reads (None: all of them, so the whole cache must travel).

    A fuser with ``window`` 1 fuses only the receiver's last (held-back) token, which reads the transmitter's final
    token (or its last ``anchor_tokens``): that many tokens per layer on the wire instead of the whole prompt. Wider
    windows read tokens whose position depends on both tokenizers, so they take the whole cache.
    """
    if ANCHOR_LAST and getattr(fuser.cfg, "window", None) == 1:
        return getattr(fuser.cfg, "anchor_tokens", 1)
    return None


def tail_tokens(layers: Mapping[int, KV], tail: int | None) -> dict[int, KV]:
    """Each layer's K and V cut to their last ``tail`` tokens (all of them for None): what a transmitter sends."""
    if tail is None:
        return dict(layers)
    if tail < 1:
        raise FusionError(f"a transmitted tail must be at least one token, got {tail}")
    return {m: last_tokens(kv, tail) for m, kv in layers.items()}


def tail_alignment(
    alignment: TokenAlignment, num_transmitter: int, received: int, window: int | None
) -> TokenAlignment:
    """The alignment onto a received tail (the transmitter's last ``received`` of ``num_transmitter`` tokens).

    FusionError unless every receiver token the fuser reads (the last ``window``) reads a token of the tail;
    tokens before the window point at the tail's first token, which the fuser never reads.
    """
    start = num_transmitter - received
    if start < 0:
        raise FusionError(f"{received} transmitter tokens arrived but its offer has {num_transmitter}")
    if start == 0:
        return alignment
    if window is None or int(alignment.index[-window:].min()) < start:
        raise FusionError(
            f"the fuser reads transmitter tokens before the {received} that arrived (of {num_transmitter}); "
            "this fuser needs the whole cache"
        )
    return TokenAlignment((alignment.index - start).clamp(min=0), alignment.coverage, alignment.covering)


@torch.no_grad()
def prefix_cache(receiver: LanguageModel, view: ReceiverView) -> KVCache:
    """The receiver's own cache of the prefix."""
    return receiver.prefill(view.prefix_ids).cache


def letter_logits(receiver: LanguageModel, cache: KVCache, view: ReceiverView) -> torch.Tensor:
    """Logits ``(4,)`` of the answer letters after reading the continuation from ``cache``."""
    logits = receiver.forward_from(cache, view.continuation_ids)[-1]  # (vocab,)
    return logits[letter_ids(receiver)].float().cpu()


def batch_letter_logits(
    receiver: LanguageModel,
    caches: KVCache,
    prefix_lengths: torch.Tensor,
    continuations: Sequence[Sequence[int]],
    letters: torch.Tensor,
    live: Sequence = (),
) -> torch.Tensor:
    """Letter logits ``(B, 4)`` for a right-padded batch, with gradients (training).

    ``caches`` holds B prefixes padded to a common length T (``prefix_lengths`` the true ones); each row's
    continuation is fed at its own positions, with padded prefix slots and padded continuation tokens masked.
    """
    B, T = caches.batch_size, caches.num_tokens
    C = max(len(c) for c in continuations)
    device = caches.layers[0][0].device
    pad = receiver.tokenizer.pad_token_id or 0
    ids = torch.full((B, C), pad, dtype=torch.long, device=device)
    mask = torch.zeros((B, T + C), dtype=torch.long, device=device)
    for i, cont in enumerate(continuations):
        ids[i, : len(cont)] = torch.tensor(list(cont), device=device)
        mask[i, : int(prefix_lengths[i])] = 1
        mask[i, T : T + len(cont)] = 1
    positions = prefix_lengths.to(device)[:, None] + torch.arange(C, device=device)[None, :]  # (B, C)
    out = receiver.model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        cache=as_model_cache(receiver.config, caches, live),
        use_cache=True,
    )
    last = torch.tensor([len(c) - 1 for c in continuations], device=device)
    final = out.logits[torch.arange(B, device=device), last]  # (B, vocab)
    return final[:, letters.to(device)]  # (B, 4)
