"""Cache translation: a transmitter's cache of its notes, rewritten into the receiver's cache space.

The C2C fusers (``fusion.fuser``) add deltas to the receiver's own positions of the shared question; trained on
question/answer pairs they learn which of the answers they saw the transmitter's cache points at, and carry
nothing of a value they never saw (docs/TRANSFER.md). A translator instead learns how the *receiver* would have
cached a text from how the *transmitter* cached it, token by token, on any text both read, with no answers at all:

- the transmitter prefills its retrieved note lines (``note_span``) and sends the cache of those positions with
  its keys made position-free (RoPE undone at its own positions), every layer at the plan's precision;
- the receiver's translator maps each transmitter token's K and V over all transmitter layers (``features``:
  standardised, a missing layer at its mean) to the receiver's K and V over all its layers: one ridge regression
  to the receiver's cache at the token that covers the transmitter token's last character, kept at a low rank;
- the receiver places the translated positions after its own frame head, rotates their keys to those positions
  (``translated_prompt``) and reads ``Question: q`` itself on top, as if it had read the notes: its own attention,
  not a trained decoder, finds the value, so values never seen in training carry.

The receiver never sees the note text; one receiver position stands for each transmitter token. A model into
itself needs no translator (``identity``: its own cache, re-rotated). What travels is the notes' cache: a
receiver with a translator reads them much as if sent as text (docs/PROTOCOL.md, privacy).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bus.errors import ConfigError, FuserError, FusionError
from fusion.formats import QUESTION_LABEL, notes_block
from fusion.kvcache import KV, KVCache
from fusion.models import LanguageModel

log = logging.getLogger(__name__)

TRANSLATOR_FORMAT = "fedrefine.translator"
DEFAULT_RANK = 256  # 9216 -> 256 -> 11,520 for Gemma-3-270M into SmolLM2-135M: 5.3M parameters, 10.6 MB fp16
DEFAULT_RIDGE = 1000.0  # on standardised features (chosen on held-out rows of the real pair: docs/TRANSFER.md)


# ---- positions ----------------------------------------------------------------------------------


def rope_tables(model: LanguageModel, start: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the model's rotary ``(cos, sin)``, each ``(1, length, head_dim)``, at positions ``start..``."""
    emb = getattr(model.body, "rotary_emb", None)
    if emb is None:
        raise FusionError(f"{model.name} ({model.arch}) has no rotary position embedding to translate keys with")
    x = torch.zeros(1, length, 1, dtype=torch.float32, device=model.device)
    pos = torch.arange(start, start + length, device=model.device)[None]
    types = getattr(model.config, "layer_types", None)
    if hasattr(emb, "layer_types") and types:  # one table per layer type (Gemma 3: local and global theta)
        per = {t: emb(x, pos, t) for t in set(types)}
        return [per[t] for t in types]
    return [emb(x, pos)] * model.num_layers


def turn_keys(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Keys ``(B, H, T, D)`` rotated to the table's positions (``inverse``: the rotation undone)."""
    c, s = cos[:, None].to(k.dtype), sin[:, None].to(k.dtype)
    half = k.shape[-1] // 2
    rotated = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
    return k * c - rotated * s if inverse else k * c + rotated * s


# ---- the transmitter's side ---------------------------------------------------------------------


@dataclass(frozen=True)
class NoteSpan:
    """A transmitter's cache of its note lines: what it sends in translate mode."""

    layers: dict[int, KV]  # layer -> (position-free K, V), each (1, H, n, D)
    ends: tuple[int, ...]  # each token's end (characters into ``notes_block(lines)``)
    lines: tuple[str, ...]  # the note lines read (never sent)

    @property
    def num_tokens(self) -> int:
        """Positions sent."""
        return len(self.ends)


@torch.no_grad()
def note_span(model: LanguageModel, lines: Sequence[str]) -> NoteSpan | None:
    """The model's position-free cache of ``notes_block(lines)`` read after its frame head (None: no lines)."""
    if not lines:
        return None
    if model.format is None:
        raise FusionError(f"{model.name} answers by letter (a zoo model); it has no notes to send")
    ids, inside, ends = _note_tokens(model, lines)
    pre = model.prefill(ids[: inside[-1] + 1])
    index = torch.tensor(inside, device=model.device)
    tables = rope_tables(model, 0, inside[-1] + 1)
    layers = {}
    for m, (k, v) in enumerate(pre.cache.layers):
        cos, sin = tables[m]
        free = turn_keys(k, cos, sin, inverse=True)
        layers[m] = (free.index_select(2, index), v.index_select(2, index))
    return NoteSpan(layers, ends, tuple(lines))


def _note_tokens(model: LanguageModel, lines: Sequence[str]) -> tuple[list[int], list[int], tuple[int, ...]]:
    """The model's tokens of its frame head then ``notes_block(lines)``, the indices of the block's tokens, and where
    each of those ends (characters into the block)."""
    fmt = model.format
    assert fmt is not None
    block = notes_block(list(lines))
    enc = model.tokenizer(fmt.head + block, add_special_tokens=fmt.add_special_tokens, return_offsets_mapping=True)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    start = len(fmt.head)
    inside = [i for i, (s, e) in enumerate(offsets) if s >= start and e > s]
    if not inside:
        raise FusionError(f"{model.name} has no tokens for its notes")
    return list(enc["input_ids"]), inside, tuple(offsets[i][1] - start for i in inside)


# ---- the translator -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TranslatorConfig:
    """Shapes of both models' caches, the rank kept and the ridge used (``identity``: a model into itself)."""

    receiver_layers: int
    receiver_kv_heads: int
    receiver_head_dim: int
    transmitter_layers: int
    transmitter_kv_heads: int
    transmitter_head_dim: int
    rank: int = DEFAULT_RANK
    ridge: float = DEFAULT_RIDGE
    identity: bool = False

    @classmethod
    def for_models(cls, receiver: LanguageModel, transmitter: LanguageModel, **kwargs: Any) -> TranslatorConfig:
        """The config for translating ``transmitter``'s cache into ``receiver``'s (the rank at most the narrower
        side's width)."""
        r = (receiver.num_layers, receiver.kv_heads, receiver.head_dim)
        t = (transmitter.num_layers, transmitter.kv_heads, transmitter.head_dim)
        widest = 2 * min(r[0] * r[1] * r[2], t[0] * t[1] * t[2])
        kwargs["rank"] = min(kwargs.get("rank", DEFAULT_RANK), widest)
        return cls(*r, *t, identity=receiver.fingerprint == transmitter.fingerprint, **kwargs)

    @property
    def in_features(self) -> int:
        """Per transmitter token: K and V of every layer."""
        return 2 * self.transmitter_layers * self.transmitter_kv_heads * self.transmitter_head_dim

    @property
    def out_features(self) -> int:
        """Per receiver position: K and V of every layer."""
        return 2 * self.receiver_layers * self.receiver_kv_heads * self.receiver_head_dim

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields."""
        return asdict(self)


class CacheTranslator(nn.Module):
    """Transmitter cache rows -> receiver cache rows: standardise, project to ``rank``, expand, add the mean."""

    def __init__(self, cfg: TranslatorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.identity:
            if cfg.in_features != cfg.out_features:
                raise FuserError("an identity translator needs the same cache shape on both sides")
            return
        if not 0 < cfg.rank <= min(cfg.in_features, cfg.out_features):
            raise FuserError(f"rank {cfg.rank} is outside 1..{min(cfg.in_features, cfg.out_features)}")
        frozen = {"requires_grad": False}
        self.mean = nn.Parameter(torch.zeros(cfg.in_features), **frozen)
        self.scale = nn.Parameter(torch.ones(cfg.in_features), **frozen)
        self.down = nn.Parameter(torch.zeros(cfg.in_features, cfg.rank), **frozen)
        self.up = nn.Parameter(torch.zeros(cfg.rank, cfg.out_features), **frozen)
        self.bias = nn.Parameter(torch.zeros(cfg.out_features), **frozen)

    def check(self, layers: Mapping[int, KV]) -> int:
        """Tokens in ``layers`` (a transmitter's span); ``FusionError`` when they do not fit this translator."""
        cfg = self.cfg
        if not layers:
            raise FusionError("no transmitter layers to translate")
        counts = set()
        for m, (k, v) in layers.items():
            if not 0 <= m < cfg.transmitter_layers:
                raise FusionError(f"transmitter layer {m} is outside 0..{cfg.transmitter_layers - 1}")
            want = (1, cfg.transmitter_kv_heads, cfg.transmitter_head_dim)
            for t in (k, v):
                if t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != want:
                    raise FusionError(
                        f"transmitter layer {m} has shape {tuple(t.shape)}; this translator reads (1, "
                        f"{want[1]}, T, {want[2]}): wrong model pair"
                    )
            counts.add(k.shape[2])
            counts.add(v.shape[2])
        if len(counts) != 1 or 0 in counts:
            raise FusionError(f"transmitter layers disagree on their token count: {sorted(counts)}")
        return counts.pop()

    def features(self, layers: Mapping[int, KV]) -> torch.Tensor:
        """``(n, in_features)``: per token, K of every transmitter layer then V of every layer (a layer that did not
        arrive stands at its mean, so the gate may drop layers)."""
        cfg = self.cfg
        n = self.check(layers)
        width = cfg.transmitter_kv_heads * cfg.transmitter_head_dim
        half = cfg.transmitter_layers * width
        out = self.mean.detach().float().expand(n, -1).clone() if not cfg.identity else torch.zeros(n, 2 * half)
        for m, (k, v) in layers.items():
            out[:, m * width : (m + 1) * width] = k[0].permute(1, 0, 2).reshape(n, width).float()
            out[:, half + m * width : half + (m + 1) * width] = v[0].permute(1, 0, 2).reshape(n, width).float()
        return out

    def rows(self, features: torch.Tensor) -> torch.Tensor:
        """Receiver rows ``(n, out_features)`` from transmitter feature rows."""
        if self.cfg.identity:
            return features
        z = (features - self.mean) / self.scale
        return (z @ self.down) @ self.up + self.bias

    @torch.no_grad()
    def forward(self, layers: Mapping[int, KV]) -> dict[int, KV]:
        """The receiver's position-free cache ``{layer: (K, V)}``, each ``(1, H_r, n, D_r)``."""
        cfg = self.cfg
        if cfg.identity and len(layers) != cfg.transmitter_layers:
            missing = sorted(set(range(cfg.transmitter_layers)) - set(layers))
            raise FusionError(f"a model read into itself needs every layer; layers {missing} did not arrive")
        rows = self.rows(self.features(layers))
        n = rows.shape[0]
        H, D, L = cfg.receiver_kv_heads, cfg.receiver_head_dim, cfg.receiver_layers
        k = rows[:, : L * H * D].reshape(n, L, H, D).permute(1, 2, 0, 3)  # (L, H, n, D)
        v = rows[:, L * H * D :].reshape(n, L, H, D).permute(1, 2, 0, 3)
        return {m: (k[m][None].contiguous(), v[m][None].contiguous()) for m in range(L)}


# ---- the receiver's side ------------------------------------------------------------------------


@torch.no_grad()
def translated_prompt(
    receiver: LanguageModel, stem: str, spans: Sequence[Mapping[int, KV]]
) -> tuple[KVCache, list[int]]:
    """The receiver's cache of its frame head then each translated span (keys rotated to their positions), and the
    tokens it reads after them (``Question: q`` and its frame's tail): ``fusion.answers.read_answer`` reads on."""
    fmt = receiver.format
    if fmt is None:
        raise FusionError(f"{receiver.name} answers by letter (a zoo model); it cannot read translated notes")
    head = list(receiver.tokenizer(fmt.head, add_special_tokens=fmt.add_special_tokens)["input_ids"])
    rest = list(
        receiver.tokenizer(QUESTION_LABEL + " ".join(stem.split()) + fmt.tail, add_special_tokens=False)["input_ids"]
    )
    if not head:
        raise FusionError(f"{receiver.name}'s frame has no head to place translated notes after")
    layers = [list(kv) for kv in receiver.prefill(head).cache.layers]
    pos = len(head)
    for span in spans:
        n = next(iter(span.values()))[0].shape[2]
        tables = rope_tables(receiver, pos, n)
        for m in range(receiver.num_layers):
            k, v = span[m]
            cos, sin = tables[m]
            dtype = layers[m][0].dtype
            layers[m][0] = torch.cat([layers[m][0], turn_keys(k.to(dtype), cos, sin)], dim=2)
            layers[m][1] = torch.cat([layers[m][1], v.to(dtype)], dim=2)
        pos += n
    return KVCache([(k, v) for k, v in layers]), rest


@torch.no_grad()
def read_translated(receiver: LanguageModel, stem: str, options: Sequence[str], spans: Sequence[Mapping[int, KV]]):
    """The receiver's reading of its question after the translated spans (``fusion.answers.Reading``); with none,
    its answer alone."""
    from fusion.answers import read_answer

    if not spans:
        from fusion.refine import answer_alone

        return answer_alone(receiver, stem, options)
    cache, continuation = translated_prompt(receiver, stem, spans)
    return read_answer(receiver, cache, continuation, options)


# ---- fitting ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Read:
    """One model's prefill of note lines then a question in its own frame, keys position-free (rows are made of it)."""

    model: LanguageModel
    lines: tuple[str, ...]
    ids: list[int]
    starts: torch.Tensor  # each token's first character in the framed text
    start: int  # where the content (the notes block first) starts in the framed text
    layers: list[KV]  # per layer (position-free K, V), each (1, H, T, D)


@torch.no_grad()
def _read(model: LanguageModel, lines: Sequence[str], question: str) -> _Read:
    from fusion.formats import notes_content

    content, _ = notes_content(list(lines), question)
    framed = model.format.frame(content)  # type: ignore[union-attr]
    enc = model.encode_framed(framed)
    pre = model.prefill(enc.ids)
    tables = rope_tables(model, 0, len(enc.ids))
    layers = [(turn_keys(k, *tables[m], inverse=True), v) for m, (k, v) in enumerate(pre.cache.layers)]
    starts = torch.tensor([s for s, _ in enc.offsets])
    return _Read(model, tuple(lines), list(enc.ids), starts, framed.start, layers)


def _read_span(read: _Read) -> NoteSpan:
    """``note_span`` of the read's lines, from the read itself when the frame head and the notes block are
    tokenized there as ``note_span`` tokenizes them alone (attention is causal: the same keys and values), else
    read again."""
    model = read.model
    ids, inside, ends = _note_tokens(model, read.lines)
    head = len(model.format.head)  # type: ignore[union-attr]
    if read.ids[: inside[-1] + 1] != ids[: inside[-1] + 1] or read.start != head:
        span = note_span(model, read.lines)
        assert span is not None  # the read has lines
        return span
    index = torch.tensor(inside, device=model.device)
    layers = {m: (k.index_select(2, index), v.index_select(2, index)) for m, (k, v) in enumerate(read.layers)}
    return NoteSpan(layers, ends, read.lines)


def _rows_of(receiver: _Read, transmitter: _Read) -> tuple[torch.Tensor, torch.Tensor]:
    span = _read_span(transmitter)
    cfg = TranslatorConfig.for_models(receiver.model, transmitter.model, rank=1)
    x = CacheTranslator(TranslatorConfig(**{**cfg.to_dict(), "identity": False})).features(span.layers)
    index = [int((receiver.starts <= receiver.start + end - 1).nonzero().max()) for end in span.ends]
    pick = torch.tensor(index, device=receiver.model.device)
    keys, values = [], []
    for k, v in receiver.layers:
        keys.append(k.index_select(2, pick)[0].permute(1, 0, 2).reshape(len(index), -1))  # (n, H*D)
        values.append(v.index_select(2, pick)[0].permute(1, 0, 2).reshape(len(index), -1))
    return x, torch.cat(keys + values, dim=1).float().cpu()


@torch.no_grad()
def translation_rows(
    receiver: LanguageModel, transmitter: LanguageModel, lines: Sequence[str], question: str = "What is it?"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training rows of one notes block: the transmitter's features per note token (as ``note_span`` sends them)
    and the receiver's position-free K and V, every layer, at the token covering that token's last character when
    the receiver reads the same notes and a question in its own frame."""
    if not lines:
        raise FusionError("a training block needs at least one note line")
    return _rows_of(_read(receiver, lines, question), _read(transmitter, lines, question))


@torch.no_grad()
def translation_rows_both(
    a: LanguageModel, b: LanguageModel, lines: Sequence[str], question: str = "What is it?"
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``translation_rows`` of ``b`` into ``a`` and of ``a`` into ``b`` from one read of the block by each model
    (a transmitter's note span is a prefix of its own read: half the prefills of the two calls)."""
    if not lines:
        raise FusionError("a training block needs at least one note line")
    read_a, read_b = _read(a, lines, question), _read(b, lines, question)
    return _rows_of(read_a, read_b), _rows_of(read_b, read_a)


@torch.no_grad()
def fit_translator(
    cfg: TranslatorConfig, x: torch.Tensor, y: torch.Tensor, held_out: float = 0.1, seed: int = 0
) -> tuple[CacheTranslator, dict[str, float]]:
    """A translator fitted to rows ``x`` (n, in) -> ``y`` (n, out) by ridge regression on standardised features,
    kept at ``cfg.rank`` (the top singular directions of its fitted outputs), and its R^2 on held-out rows
    (``held_out`` of them; the fit without them reuses the moments of all rows less theirs, so the two fits cost
    about one): ``r2_heldout``, the mean over output numbers that vary
    (a number the receiver's cache holds constant, as some of Gemma's do, has no R^2), and ``r2_heldout_pooled``,
    one minus all residual variance over all variance."""
    if cfg.identity:
        return CacheTranslator(cfg), {"r2_heldout": 1.0, "rows": float(x.shape[0])}
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise FuserError(f"translation rows do not pair up: x {tuple(x.shape)}, y {tuple(y.shape)}")
    if x.shape[1] != cfg.in_features or y.shape[1] != cfg.out_features:
        raise FuserError(
            f"rows are {x.shape[1]} -> {y.shape[1]} wide; the pair needs {cfg.in_features} -> {cfg.out_features}"
        )
    if x.shape[0] < 2:
        raise FuserError("a translator needs at least two rows")
    x, y = x.float(), y.float()
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / scale
    y_mean = y.mean(0)
    centred = y - y_mean
    gram, cross = z.T @ z, z.T @ centred  # once: the held-out fit subtracts its rows' share
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    cut = max(1, int(round(x.shape[0] * (1 - held_out)))) if held_out > 0 else x.shape[0]
    stats: dict[str, float] = {"rows": float(x.shape[0])}
    if cut < x.shape[0]:
        train, test = order[:cut], order[cut:]
        zh, ch = z[test], centred[test]
        z_mean = (z.sum(0) - zh.sum(0)) / cut  # the training rows' means, in the features and outputs
        c_mean = (centred.sum(0) - ch.sum(0)) / cut
        part_gram = gram - zh.T @ zh - cut * torch.outer(z_mean, z_mean)
        part_cross = cross - zh.T @ ch - cut * torch.outer(z_mean, c_mean)
        # the training rows' fit, as if standardised by their own means (the scale is all rows'): its R^2 on the rest
        part = _from_moments(
            cfg, part_gram, part_cross, z[train] - z_mean, mean + z_mean * scale, scale, y_mean + c_mean
        )
        pred = part.rows(x[test])
        truth = y[test]
        resid = ((pred - truth) ** 2).sum(0)
        total = ((truth - truth.mean(0)) ** 2).sum(0)
        varies = total > 1e-6 * float(total.mean()) + 1e-12
        stats["r2_heldout"] = round(float((1 - resid[varies] / total[varies]).mean()), 4) if varies.any() else 0.0
        stats["r2_heldout_pooled"] = round(float(1 - resid.sum() / total.sum().clamp_min(1e-12)), 4)
    return _from_moments(cfg, gram, cross, z, mean, scale, y_mean), stats


def _from_moments(
    cfg: TranslatorConfig, gram: torch.Tensor, cross: torch.Tensor, z: torch.Tensor, mean, scale, bias
) -> CacheTranslator:
    """The ridge solution from the standardised features' ``gram`` (Z^T Z) and ``cross`` (Z^T Y, both centred),
    kept at ``cfg.rank`` directions of the fitted outputs ``z @ w``; ``mean``, ``scale`` standardise an input row,
    ``bias`` is the outputs' mean."""
    gram = gram.clone()
    gram.diagonal().add_(cfg.ridge)
    w = torch.cholesky_solve(cross, torch.linalg.cholesky(gram))  # (in, out)
    basis = _top_directions(z, w, min(cfg.rank, *w.shape))  # (out, rank)
    out = CacheTranslator(cfg)
    out.mean.copy_(mean)
    out.scale.copy_(scale)
    out.down.copy_(w @ basis)
    out.up.copy_(basis.T)
    out.bias.copy_(bias)
    return out


def _top_directions(z: torch.Tensor, w: torch.Tensor, rank: int, power: int = 2, seed: int = 0) -> torch.Tensor:
    """The top ``rank`` right singular vectors of the fitted outputs ``z @ w`` (randomised, never forming them)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(w.shape[1], min(rank + 16, w.shape[1]), generator=gen)
    for _ in range(power):  # subspace iteration on (z w)^T (z w)
        q, _ = torch.linalg.qr(w.T @ (z.T @ (z @ (w @ q))))
    small = z @ (w @ q)  # (n, k): the fitted outputs in the subspace
    _, _, vh = torch.linalg.svd(small, full_matrices=False)
    return (q @ vh.T)[:, :rank]


# ---- tuning: the receiver reads from the translation --------------------------------------------

REPEAT_STEM = "Repeat the notes word for word."  # a tuning question any text answers: its own lines
# Answer tokens one tuning item is scored on: a longer answer (a paragraph repeated) is scored on a window of this
# many consecutive tokens, its end drawn at random, read after the answer's tokens before it. The receiver's vocabulary
# projection and its backward, per scored token, are most of a step for a large vocabulary (Gemma-3: 262,144 x 640,
# ~40% of a step on the paragraph repeats); the window bounds them, and over the steps every part of an answer is
# scored (docs/TRANSFER.md: the build time and the answers with and without it).
DEFAULT_TUNE_WINDOW = 16
# a batch of tuning rows costs about this many tokens more than its rows (every weight read once per forward):
# rows of like length share a batch, a short one is not padded to a long one's length (docs/TRANSFER.md)
TUNE_GROUP_TOKENS = 40


@dataclass(frozen=True)
class TuneItem:
    """One tuning example: the note lines the transmitter reads, the question the receiver reads after their
    translation, and the answer it should then write (a line repeated, a fact's sentence or value)."""

    lines: tuple[str, ...]
    stem: str
    answer: str


def repeat_item(lines: Sequence[str]) -> TuneItem:
    """An item from any text: read the lines, write them back (the copy a reader of the real text makes)."""
    return TuneItem(tuple(lines), REPEAT_STEM, " ".join(" ".join(x.split()) for x in lines))


@dataclass(frozen=True)
class _Scored:
    """One drawn item of a tuning step: the span read, the receiver's tokens after it, how many of the last score."""

    span: NoteSpan
    ids: list[int]  # question, then the answer up to the window's end
    scored: int  # the last ``scored`` of ``ids`` are the targets


def _groups(rows: list[_Scored], head: int, sliding: int | None, fixed: int = TUNE_GROUP_TOKENS) -> list[list[_Scored]]:
    """The step's rows in padded batches: runs of like length (sorted by tokens read) that minimise the tokens the
    receiver runs, pads included, plus ``fixed`` per batch (a forward reads every weight once, whatever its rows).
    On a sliding-window model a padded batch stays within the window (a pad shifts the index distances that the
    window counts); a row longer than the window runs alone, unpadded, as one at a time would."""
    rows = sorted(rows, key=lambda r: (len(r.ids), r.span.num_tokens))
    best: list[tuple[float, int]] = [(0.0, 0)]  # (cost of rows[:j], where its last batch starts)
    for j in range(1, len(rows) + 1):
        options = []
        for i in range(j):
            group = rows[i:j]
            longest = head + max(r.span.num_tokens for r in group) + len(rows[j - 1].ids)
            if j - i > 1 and sliding is not None and longest > sliding:
                continue
            options.append((best[i][0] + fixed + (j - i) * len(rows[j - 1].ids), i))
        best.append(min(options))
    groups, j = [], len(rows)
    while j > 0:
        i = best[j][1]
        groups.append(rows[i:j])
        j = i
    return groups[::-1]


def _batch_loss(receiver: LanguageModel, translator: CacheTranslator, head, rows: list[_Scored]) -> torch.Tensor:
    """The summed cross-entropy (each row's mean over its scored tokens) of ``rows`` in one padded forward of the
    receiver, differentiable in the translator: row i reads the frame head, its translated span (padded to the
    longest span), then its tokens (padded before them to the longest), pads masked out and positions as unpadded.
    The same losses as one row at a time, up to float noise; the weights are read once for the batch."""
    from transformers import DynamicCache

    B, h = len(rows), head.num_tokens
    L, H, D = receiver.num_layers, receiver.kv_heads, receiver.head_dim
    counts = [r.span.num_tokens for r in rows]
    N, Q = max(counts), max(len(r.ids) for r in rows)
    out = translator.rows(torch.cat([translator.features(r.span.layers) for r in rows]))  # one projection for all
    padded = torch.nn.utils.rnn.pad_sequence(out.split(counts), batch_first=True)  # (B, N, out), zeros after a span
    k = padded[..., : L * H * D].reshape(B, N, L, H, D).permute(2, 0, 3, 1, 4)  # (L, B, H, N, D)
    v = padded[..., L * H * D :].reshape(B, N, L, H, D).permute(2, 0, 3, 1, 4)
    tables = rope_tables(receiver, h, N)  # row i's span sits at h..h+n_i-1: the first n_i rows of these tables
    cache = DynamicCache(config=receiver.config)
    for m in range(L):
        k0, v0 = head.layers[m]
        placed = turn_keys(k[m].to(k0.dtype), *tables[m])
        cache.update(
            torch.cat([k0.expand(B, -1, -1, -1), placed], dim=2),
            torch.cat([v0.expand(B, -1, -1, -1), v[m].to(v0.dtype)], dim=2),
            m,
        )
    pad = receiver.tokenizer.pad_token_id if receiver.tokenizer.pad_token_id is not None else 0
    ids = torch.full((B, Q), pad, dtype=torch.long)
    mask = torch.zeros(B, h + N + Q, dtype=torch.long)
    positions = torch.zeros(B, Q, dtype=torch.long)
    mask[:, :h] = 1
    for i, (row, n) in enumerate(zip(rows, counts, strict=True)):
        q = len(row.ids)
        ids[i, Q - q :] = torch.tensor(row.ids)
        mask[i, h : h + n] = 1
        mask[i, h + N + Q - q :] = 1
        positions[i, Q - q :] = torch.arange(h + n, h + n + q)
        positions[i, : Q - q] = h + n  # pads: masked as keys, their outputs unread
    dev = receiver.device
    hidden = receiver.body(
        input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=positions.to(dev), cache=cache, use_cache=True
    ).last_hidden_state  # (B, Q, hidden)
    # the vocabulary projection only where a token is scored (position p predicts token p + 1): for a large
    # vocabulary it and its backward cost as much as the rest of the step
    at_row = torch.cat([torch.full((r.scored,), i) for i, r in enumerate(rows)])
    at_pos = torch.cat([torch.arange(Q - r.scored - 1, Q - 1) for r in rows])
    target = torch.tensor([t for r in rows for t in r.ids[len(r.ids) - r.scored :]], device=dev)
    weight = torch.cat([torch.full((r.scored,), 1.0 / r.scored) for r in rows]).to(dev)  # each row's mean
    logits = receiver.head_logits(hidden[at_row.to(dev), at_pos.to(dev)]).float()
    return (torch.nn.functional.cross_entropy(logits, target, reduction="none") * weight).sum()


def tune_translator(
    translator: CacheTranslator,
    receiver: LanguageModel,
    transmitter: LanguageModel,
    items: Sequence[TuneItem],
    steps: int = 100,
    batch_size: int = 8,
    lr: float = 1e-4,
    seed: int = 0,
    progress: bool = False,
    window: int = DEFAULT_TUNE_WINDOW,
) -> list[float]:
    """Tune a fitted translator (its projections and mean) so the frozen receiver, reading the translation, writes
    what a reader of the real lines writes: cross-entropy on each item's answer after its question (on a window of
    ``window`` answer tokens ending at a random token when the answer is longer; 0: the whole answer). The ridge fit
    matches caches number by number; this makes the numbers that the receiver's attention copies from right.
    Returns the loss per step."""
    from tqdm.auto import tqdm

    if translator.cfg.identity:
        return []
    if not items:
        raise FuserError("tuning a translator needs at least one item")
    if window < 0:
        raise ConfigError(f"the tuning window must be 0 (whole answers) or more tokens, got {window}")
    fmt = receiver.format
    if fmt is None:
        raise FusionError(f"{receiver.name} answers by letter (a zoo model); it cannot read translated notes")
    frozen = [p.requires_grad for p in receiver.model.parameters()]
    for p in receiver.model.parameters():
        p.requires_grad_(False)
    tuned = [translator.down, translator.up, translator.bias]
    for p in tuned:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(tuned, lr=lr, weight_decay=0.0)
    head_ids = list(receiver.tokenizer(fmt.head, add_special_tokens=fmt.add_special_tokens)["input_ids"])
    with torch.no_grad():
        head = receiver.prefill(head_ids).cache
    spans: dict[tuple[str, ...], NoteSpan] = {}
    sliding = getattr(receiver.config, "sliding_window", None)
    rng = torch.Generator().manual_seed(seed)
    losses = []
    try:
        for _ in tqdm(range(steps), desc="translator tuning", unit="step", disable=not progress):
            opt.zero_grad()
            total = 0.0
            rows = []
            for j in torch.randint(len(items), (batch_size,), generator=rng).tolist():
                item = items[j]
                if item.lines not in spans:
                    spans[item.lines] = note_span(transmitter, item.lines)  # type: ignore[assignment]
                question = receiver.tokenizer(
                    QUESTION_LABEL + " ".join(item.stem.split()) + fmt.tail, add_special_tokens=False
                )["input_ids"]
                answer = receiver.answer_target(item.answer)
                scored = len(answer)
                if 0 < window < len(answer):  # read up to a random end, score the window before it
                    end = int(torch.randint(window, len(answer) + 1, (1,), generator=rng))
                    answer, scored = answer[:end], window
                rows.append(_Scored(spans[item.lines], list(question) + answer, scored))
            for group in _groups(rows, head.num_tokens, sliding):
                loss = _batch_loss(receiver, translator, head, group) / batch_size
                loss.backward()
                total += float(loss.detach())
            opt.step()
            losses.append(round(total, 4))
    finally:
        for p in tuned:
            p.requires_grad_(False)
        for p, flag in zip(receiver.model.parameters(), frozen, strict=True):
            p.requires_grad_(flag)
    translator.eval()
    return losses


# ---- on disk ------------------------------------------------------------------------------------


TRANSLATOR_WEIGHTS = ("fp16", "int8")
_QUANTIZED = ("down", "up")  # the two matrices (all but ~1% of a translator's weights)


def pack_weights(state: Mapping[str, torch.Tensor], weights: str = "fp16") -> dict[str, torch.Tensor]:
    """A translator's weights as stored: fp16, or the two matrices as int8 with one float32 scale per column (each
    column is a direction of the fit or one receiver feature) and the rest fp16."""
    if weights not in TRANSLATOR_WEIGHTS:
        raise ConfigError(f"unknown translator weights {weights!r}; choose from {list(TRANSLATOR_WEIGHTS)}")
    out = {}
    for name, value in state.items():
        value = value.detach().float()
        if weights == "int8" and name in _QUANTIZED:
            scale = (value.abs().amax(dim=0) / 127.0).clamp_min(1e-12)
            out[name] = torch.round(value / scale).clamp(-127, 127).to(torch.int8)
            out[f"{name}.scale"] = scale
        else:
            out[name] = value.half()
    return out


def unpack_weights(packed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float weights of ``pack_weights``'s output."""
    return {
        name: value.float() * packed[f"{name}.scale"].float() if f"{name}.scale" in packed else value.float()
        for name, value in packed.items()
        if not name.endswith(".scale")
    }


def stored_copy(translator: CacheTranslator, weights: str) -> CacheTranslator:
    """``translator`` as it reads after being stored with ``weights`` (to measure what a precision costs)."""
    copy = CacheTranslator(translator.cfg)
    copy.load_state_dict(unpack_weights(pack_weights(translator.state_dict(), weights)))
    return copy.eval()


def save_translator(
    translator: CacheTranslator,
    path: str | Path,
    transmitter_fp: str,
    receiver_fp: str,
    meta: dict | None = None,
    weights: str = "fp16",
) -> Path:
    """Write a translator directory (``config.json`` with both fingerprints, shapes, version, its weights'
    precision and stored bytes; the weights, ``pack_weights``)."""
    from fusion.registry import pair_config, write_module

    packed = pack_weights(translator.state_dict(), weights)
    stored = sum(t.numel() * t.element_size() for t in packed.values())
    config = pair_config(TRANSLATOR_FORMAT, translator, transmitter_fp, receiver_fp, meta, weights=weights)
    config["bytes"] = stored
    return write_module(path, config, packed)


def restore_translator(path: str | Path, weights: str) -> int:
    """Store the translator at ``path`` again with ``weights`` (same pair, config and meta); its stored bytes."""
    from fusion.registry import read_module

    config, _ = read_module(path, TRANSLATOR_FORMAT)
    translator, _ = load_translator(path)
    save_translator(translator, path, config["transmitter"], config["receiver"], config.get("meta"), weights=weights)
    return read_module(path, TRANSLATOR_FORMAT)[0]["bytes"]


def load_translator(
    path: str | Path, transmitter_fp: str | None = None, receiver_fp: str | None = None
) -> tuple[CacheTranslator, dict[str, Any]]:
    """A translator and its meta; ``FuserError`` for a wrong pair, a damaged file or another version."""
    from fusion.registry import check_pair, read_module

    config, state = read_module(path, TRANSLATOR_FORMAT)
    check_pair(path, config, transmitter_fp, receiver_fp, "translator")
    try:
        translator = CacheTranslator(TranslatorConfig(**config["config"]))
        translator.load_state_dict(unpack_weights(state))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise FuserError(f"{path} holds a translator this code cannot rebuild: {exc}", path=str(path)) from exc
    meta = dict(config.get("meta", {}))
    meta.update(transmitter=config["transmitter"], receiver=config["receiver"], params=config.get("params"))
    meta.update(bytes_fp16=config.get("bytes_fp16"), weights=config.get("weights", "fp16"))
    meta.update(bytes=config.get("bytes", config.get("bytes_fp16")))
    return translator.eval(), meta
