"""Training examples for fusers and gates: items, their frozen-model caches computed once, and padded batches.

An item says what both models read and what the fused receiver should answer. ``prepare_examples`` runs both
frozen models over every item once: the receiver's prefix cache, the transmitter's cache aligned onto the
receiver's fused positions (only those: the last ``span`` of the prefix), and the target (a letter index for
the toy zoo's letter style; the answer's token ids, ending with the format's stop, for text style). The loss
then needs only the receiver's continuation per step (``fusion.losses``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bus.errors import FusionError
from fusion.align import gather_tokens
from fusion.answers import read_answer
from fusion.c2c import ReceiverView, letter_ids, prefix_alignment, prefix_cache, question_texts, receiver_view
from fusion.gate import OfferSummary, answer_distribution, prior_weight
from fusion.kvcache import KV, KVCache
from fusion.models import LanguageModel
from fusion.notes import Retrieved
from fusion.prompts import format_question, hint_lead

KEEP_OWN = -1  # item target meaning "the receiver's own answer without fusion" (a contribution that must not harm)
CACHE_DTYPE = torch.float16  # text style: prepared caches are stored at this dtype (halves memory; cast back per step)
PREPARE_CHUNK = 64  # text style: items whose prompts are batched together
KEEP_TOKENS = 6  # text style: the first tokens of the receiver's own answer a KEEP_OWN item trains towards
ANCHOR_KEEP = 2  # text style: the transmitter's last sent tokens kept per example (what a held-back token may read)


@dataclass(frozen=True)
class FusionItem:
    """One training question: what both models read, and what the fused receiver should answer."""

    stem: str  # the original question q
    options: tuple[str, ...]  # letter style: four options in prompt order; text style: unused (may be empty)
    target: int | str  # letter index or answer text; KEEP_OWN: whatever the receiver answers alone
    shared_stem: str | None = None  # q' for the private format (transmitter sees q', receiver then reads q)
    donor: tuple[str, tuple[str, ...]] | None = None  # (stem, options) of another question the transmitter reads
    context: str | None = None  # letter style: a fact the transmitter reads before its prompt
    notes: tuple[str, ...] = ()  # text style: the note lines the transmitter retrieved and reads before q'
    coverage: float = 0.0  # text style: how well those notes cover q' (its offer's ``coverage``)


@dataclass
class PreparedExample:
    """An item with its frozen-model caches: the receiver prefix and the aligned transmitter layers."""

    prefix: KVCache  # (1, H_r, T, D_r) per layer
    aligned: dict[int, KV]  # transmitter layer -> (1, H_t, A, D_t) aligned onto the prefix's last A positions
    continuation: list[int]  # receiver tokens read after the fused prefix
    target: int | list[int]  # letter index (letter style) or the answer's token ids (text style)
    weight: float = 1.0  # the gate's prior weight from the transmitter's P(none) (1: it knows, 0: it says it doesn't)
    offer: OfferSummary | None = None  # what the transmitter offered (gate training)
    last: dict[int, KV] | None = None  # the transmitter's last ANCHOR_KEEP sent tokens per layer (text style)

    @property
    def span(self) -> int:
        """How many of the prefix's last positions the transmitter's layers cover (the only ones fused)."""
        return next(iter(self.aligned.values()))[0].shape[2]


@torch.no_grad()
def prepare_examples(
    receiver: LanguageModel,
    transmitter: LanguageModel,
    items: Sequence[FusionItem],
    progress: bool = False,
) -> list[PreparedExample]:
    """Run both frozen models over every item once: the receiver's prefix cache and the aligned transmitter cache."""
    if receiver.style == "text":
        return _prepare_text_many(receiver, transmitter, items, progress)
    desc = f"caches {transmitter.name}->{receiver.name}"
    return [
        _prepare_letter(receiver, transmitter, i) for i in tqdm(items, desc=desc, disable=not progress, leave=False)
    ]


@dataclass
class ReceiverSide:
    """One question as the receiver reads it: its view and its own prefix cache (stored at ``CACHE_DTYPE``)."""

    view: ReceiverView
    prefix: KVCache


@torch.no_grad()
def receiver_sides(receiver: LanguageModel, items: Sequence[FusionItem], progress: bool = False) -> list[ReceiverSide]:
    """Every item's receiver side, prefilled in batches (text style; shared by every transmitter into it)."""
    out: list[ReceiverSide] = []
    for chunk in _chunks(items, f"receiver {receiver.name}", progress):
        views = [receiver_view(receiver, *question_texts(i.stem, i.options, i.shared_stem, "text")) for i in chunk]
        prefixes = receiver.prefill_many([v.prefix_ids for v in views])
        out.extend(ReceiverSide(v, pre.cache.to(dtype=CACHE_DTYPE)) for v, pre in zip(views, prefixes, strict=True))
    return out


@torch.no_grad()
def transmitter_sides(transmitter: LanguageModel, items: Sequence[FusionItem], progress: bool = False) -> list:
    """Every item's transmitter prefill (its notes, then q' or a donor's question), in batches (text style; shared
    by every receiver it fuses into). Returns ``fusion.refine.TransmitterPrefill``s."""
    from fusion.refine import transmitter_prompt

    out = []
    for chunk in _chunks(items, f"transmitter {transmitter.name}", progress):
        prompts = []
        for item in chunk:
            shared = question_texts(item.stem, item.options, item.shared_stem, "text")[0]
            t_text = question_texts(item.donor[0], (), style="text")[0] if item.donor is not None else shared
            prompts.append(transmitter_prompt(transmitter, t_text, Retrieved(item.notes, item.coverage)))
        for prompt, full in zip(prompts, transmitter.prefill_many([p.ids for p in prompts]), strict=True):
            pre = prompt.finish("t", transmitter, full, 0.0)
            out.append(replace(pre, cache=pre.cache.to(dtype=CACHE_DTYPE)))
    return out


def combine(sides: Sequence[ReceiverSide], prefills: Sequence, targets: Sequence[list[int]]) -> list[PreparedExample]:
    """Examples of one pair from its receiver sides, transmitter prefills and targets (item by item)."""
    out = []
    for side, pre, target in zip(sides, prefills, targets, strict=True):
        index = prefix_alignment(side.view, pre.offsets).index[-side.view.span :]
        aligned = gather_tokens(pre.cache.as_mapping(), index)
        last = {m: (k[:, :, -ANCHOR_KEEP:], v[:, :, -ANCHOR_KEEP:]) for m, (k, v) in pre.cache.as_mapping().items()}
        out.append(PreparedExample(side.prefix, aligned, side.view.continuation_ids, target, 1.0, pre.offer, last))
    return out


def text_targets(
    receiver: LanguageModel, items: Sequence[FusionItem], sides: Sequence[ReceiverSide]
) -> list[list[int]]:
    """Each item's answer tokens for this receiver (``KEEP_OWN``: the start of its own answer alone)."""
    return [
        text_target(receiver, i, s.view, s.prefix.to(dtype=torch.float32)) for i, s in zip(items, sides, strict=True)
    ]


def _prepare_text_many(
    receiver: LanguageModel, transmitter: LanguageModel, items: Sequence[FusionItem], progress: bool
) -> list[PreparedExample]:
    """Text style: every receiver side, every transmitter prefill, combined."""
    sides = receiver_sides(receiver, items, progress)
    return combine(sides, transmitter_sides(transmitter, items, progress), text_targets(receiver, items, sides))


def _chunks(items: Sequence[FusionItem], desc: str, progress: bool):
    """``items`` in slices of ``PREPARE_CHUNK`` under one progress bar counting items."""
    bar = tqdm(total=len(items), desc=desc, disable=not progress, leave=False, unit="item")
    for start in range(0, len(items), PREPARE_CHUNK):
        chunk = items[start : start + PREPARE_CHUNK]
        yield chunk
        bar.update(len(chunk))
    bar.close()


def _prepare_letter(receiver: LanguageModel, transmitter: LanguageModel, item: FusionItem) -> PreparedExample:
    shared, original = question_texts(item.stem, item.options, item.shared_stem)
    view = receiver_view(receiver, shared, original)
    t_text = format_question(*item.donor) if item.donor is not None else shared
    lead = hint_lead(item.context or "")
    t_pre = transmitter.prefill(lead + t_text)
    aligned = gather_tokens(t_pre.cache.as_mapping(), prefix_alignment(view, t_pre.offsets, shift=len(lead)).index)
    prefix = prefix_cache(receiver, view)
    target = item.target
    if target == KEEP_OWN:
        target = int(receiver.forward_from(prefix, view.continuation_ids)[-1][letter_ids(receiver)].argmax())
    p_none = answer_distribution(transmitter, t_pre.logits)
    weight = prior_weight(float(p_none[-1])) if p_none is not None else 1.0
    return PreparedExample(prefix, aligned, view.continuation_ids, int(target), weight)


def text_target(receiver: LanguageModel, item: FusionItem, view, prefix: KVCache) -> list[int]:
    """The answer tokens a text-style item trains towards (KEEP_OWN: the receiver's own answer alone)."""
    if item.target == KEEP_OWN:
        own = read_answer(receiver, prefix, view.continuation_ids, (), KEEP_TOKENS).text
        return receiver.answer_target(own)
    return receiver.answer_target(str(item.target))


def pad_tokens(tensors: Sequence[torch.Tensor], length: int, left: Sequence[int] | None = None) -> torch.Tensor:
    """Pad ``(1, H, T_i, D)`` tensors along tokens to ``length`` (``left[i]`` zeros first, the rest after) and stack
    them to ``(B, H, length, D)``."""
    left = left or [0] * len(tensors)
    return torch.cat([F.pad(t, (0, 0, lf, length - lf - t.shape[2])) for t, lf in zip(tensors, left, strict=True)])


def pad_layers(layers: Sequence[KV], length: int, left: Sequence[int] | None = None) -> KV:
    """Pad and stack one layer's (K, V) of several examples (``pad_tokens``)."""
    return pad_tokens([k for k, _ in layers], length, left), pad_tokens([v for _, v in layers], length, left)


Batch = tuple[KVCache, dict[int, KV], torch.Tensor, list[list[int]], list, torch.Tensor]


def collate(examples: Sequence[PreparedExample], dtype: torch.dtype = torch.float32) -> Batch:
    """A right-padded batch: receiver prefixes, aligned transmitter layers (placed at each row's fused positions),
    true prefix lengths, continuations, targets, and each row's fused span."""
    lengths = torch.tensor([e.prefix.num_tokens for e in examples])
    spans = torch.tensor([e.span for e in examples])
    T = int(lengths.max())
    num_layers = examples[0].prefix.num_layers
    prefix = KVCache([pad_layers([e.prefix.layers[i] for e in examples], T) for i in range(num_layers)]).to(dtype=dtype)
    left = (lengths - spans).tolist()
    aligned = {
        m: tuple(x.to(dtype) for x in pad_layers([e.aligned[m] for e in examples], T, left))
        for m in examples[0].aligned
    }
    return prefix, aligned, lengths, [e.continuation for e in examples], [e.target for e in examples], spans


def anchors(examples: Sequence[PreparedExample], dtype: torch.dtype = torch.float32, count: int = 1) -> dict[int, KV]:
    """Per transmitter layer, what each example's held-back token reads, stacked: the transmitter's last ``count``
    sent tokens (``(B, H_t, count, D_t)`` each; with one, the token aligned onto the last prefix position)."""

    def last(e: PreparedExample, m: int, t: int) -> torch.Tensor:
        if count == 1 or e.last is None:
            return e.aligned[m][t][:, :, -1:]
        if e.last[m][t].shape[2] < count:
            raise FusionError(f"an example kept {e.last[m][t].shape[2]} transmitter tokens; {count} are read")
        return e.last[m][t][:, :, -count:]

    return {
        m: (
            torch.cat([last(e, m, 0) for e in examples]).to(dtype),
            torch.cat([last(e, m, 1) for e in examples]).to(dtype),
        )
        for m in examples[0].aligned
    }


def continuation_groups(continuations: Sequence[Sequence[int]]) -> list[list[int]]:
    """Batch rows split by continuation: indices of the one-token ones (plain questions), then of the longer ones
    (private mode, the original question follows); empty groups left out. Padding each group only to its own longest
    continuation saves most of the receiver's work: a private row reads ~30-60 tokens after the prefix, a plain one
    1, and padding every row of a batch to the longest did 3-5 times the work that mattered."""
    short = [i for i, c in enumerate(continuations) if len(c) == 1]
    long = [i for i, c in enumerate(continuations) if len(c) != 1]
    return [group for group in (short, long) if group]
