"""Versioned pydantic models for every message of the query protocol (see DESIGN.md, "query protocol").

Every message is frozen, forbids unknown fields, carries ``schema_version`` and a ``kind`` tag, and
validates ids against ``[A-Za-z0-9_-]{1,64}`` so an id can never inject NATS subject tokens
(``.``, ``*``, ``>``, whitespace). Tensors never travel as JSON: :class:`KVChunkHeader` is the binary frame
header of ``bus.frames``, validated with the same rules.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal, TypeVar

import xxhash
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_serializer,
    model_validator,
)

from bus.errors import SchemaError

SCHEMA_VERSION = 3  # control messages (JSON); 3: typed fuser lists, unused fields gone (docs/PROTOCOL.md)
KV_SCHEMA_VERSION = 1  # the schema_version byte inside a KV frame header (bus.frames; the frame has its own version)
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
FINGERPRINT_PATTERN = re.compile(r"[A-Za-z0-9_.:+-]{1,128}")
MAX_TEXT_CHARS = 16_000  # characters in a question, query or answer text
MAX_OPTIONS = 26  # answer options (A..Z)
MAX_SUMMARY_DIM = 8192  # floats in an offer's pooled summary vector
MAX_LAYER_INDEX = 1023  # highest layer index a KV chunk may name
MAX_CHUNKS = 1 << 20  # chunks per tensor the schema admits (the reassembler's limit is lower)
MAX_DIM = 1 << 24  # largest single dimension of a KV tensor shape
MAX_OFFER_TOKENS = 8192  # token offsets an offer may carry
MAX_NOTES = 16  # free-text notes on an answer
MAX_INLINE_BYTES = 16_384  # bytes of cache an offer may carry inline (before base64)
MAX_WEIGHT = 1.0  # a gate's weight for a transmitter is in [0, MAX_WEIGHT] (the gating network's sigmoid)
MAX_HEARTBEAT_S = 60.0  # seconds: the longest heartbeat interval a presence may announce
MAX_GATES = 16  # gates a query may name
MAX_FUSERS = 64  # fuser pairs a receiver lists in a query or heartbeat (more: it lists none)
DEFAULT_HEARTBEAT_S = 1.0  # seconds between heartbeats when a presence does not say
DIGEST_MAX = (1 << 64) - 1
HASH32_MAX = 0xFFFFFFFF

Precision = Literal["fp32", "fp16", "bf16", "int8", "int4"]
# how the others help: KV caches of q' fused (c2c), text hints (the text-to-text baseline), or the caches of their
# retrieved notes translated into the receiver's (translate: docs/PROTOCOL.md section 3.2)
Mode = Literal["c2c", "t2t", "translate"]
MAX_HINT_CHARS = 2000  # a text hint in an offer
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8", "int4")
Role = Literal["receiver", "transmitter", "gate", "rephraser"]
ROLES: tuple[str, ...] = ("receiver", "transmitter", "gate", "rephraser")
SourceDtype = Literal["float32", "float16", "bfloat16"]
ScaleAxis = Literal["none", "channel", "token"]


def validate_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a safe id (``[A-Za-z0-9_-]{1,64}``), else raise :class:`SchemaError`."""
    if not isinstance(value, str) or ID_PATTERN.fullmatch(value) is None:
        raise SchemaError(f"invalid {what} {value!r}: use 1-64 characters from A-Z a-z 0-9 _ -", value=value)
    return value


def _id(value: str) -> str:
    if ID_PATTERN.fullmatch(value) is None:
        raise ValueError("ids are 1-64 characters from A-Z a-z 0-9 _ - (no '.', '*', '>', whitespace)")
    return value


def _fingerprint(value: str) -> str:
    if FINGERPRINT_PATTERN.fullmatch(value) is None:
        raise ValueError("fingerprints are 1-128 characters from A-Z a-z 0-9 _ . : + -")
    return value


def _finite(values: tuple[float, ...]) -> tuple[float, ...]:
    if not all(math.isfinite(v) for v in values):
        raise ValueError("values must be finite")
    return values


Id = Annotated[str, AfterValidator(_id)]
Fingerprint = Annotated[str, AfterValidator(_fingerprint)]
Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]
Option = Annotated[str, Field(min_length=1, max_length=2000)]
Hash32 = Annotated[int, Field(ge=0, le=HASH32_MAX)]  # the low 32 bits of an XXH3-64
Rate = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class Message(BaseModel):
    """Base of all protocol messages: frozen, no unknown fields, versioned, JSON on the wire."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[3] = SCHEMA_VERSION

    def to_bytes(self) -> bytes:
        """Serialise to compact JSON bytes."""
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls: type[M], data: bytes | bytearray | memoryview | str) -> M:
        """Parse and validate; any problem becomes one :class:`SchemaError` line."""
        return decode_message(data, cls)


M = TypeVar("M", bound=Message)


class Ask(Message):
    """A user's question to the federation (request/reply on ``fr.ask``)."""

    kind: Literal["ask"] = "ask"
    question: Text
    options: tuple[Option, ...] = Field(default=(), max_length=MAX_OPTIONS)
    private: bool = False
    deadline_s: float = Field(default=30.0, gt=0, le=3600, allow_inf_nan=False)  # seconds from now
    ask_id: Id | None = None
    # "c2c": the others share KV caches (the method); "t2t": they write short text hints instead (the baseline)
    mode: Mode = "c2c"


class FuserSpec(BaseModel):
    """One transmitter model a receiver can fuse, and how much of its cache that fuser reads."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    transmitter_fingerprint: Fingerprint
    tail_tokens: int | None = Field(default=None, ge=1, le=MAX_OFFER_TOKENS)  # reads only the last n (None: all)
    whole: bool = False  # reads this cache only whole: every layer or none (a model read into itself, translate mode)

    @model_serializer(mode="wrap")
    def _whole_only_when_true(self, handler: Any) -> Any:
        """``whole`` is written only when true: a query without such a model reads the same to a peer that
        predates the field."""
        data = handler(self)
        if not self.whole and isinstance(data, dict):
            data.pop("whole", None)
        return data


class Query(Message):
    """The (possibly rephrased) query q' the receiver side publishes to transmitters."""

    kind: Literal["query"] = "query"
    query_id: Id
    receiver_id: Id
    text: Text
    options: tuple[Option, ...] = Field(default=(), max_length=MAX_OPTIONS)
    deadline_unix: float = Field(gt=0, allow_inf_nan=False)  # absolute, seconds since the epoch
    # the receiver's fusers, so the gate plans this query right before it has heard the receiver's heartbeat;
    # None: not listed (the gate reads the heartbeat's, and plans everyone when that lists none either)
    fusers: tuple[FuserSpec, ...] | None = Field(default=None, max_length=MAX_FUSERS)
    # the gates whose plan counts for this query (empty: any gate); transmitters and the receiver ignore the others
    gates: tuple[Id, ...] = Field(default=(), max_length=MAX_GATES)
    mode: Mode = "c2c"  # "t2t": transmitters answer with a text hint in their offer; no gate plans, no KV travels


def query_digest(query_id: str, receiver_id: str, text: str, options: Sequence[str]) -> int:
    """XXH3-64 (seed 0) of a query's identity and content: offers and plans carry it, so a copy of one made for
    another query (or the same id with another text) is refused. Fields joined by the unit separator U+001F."""
    return xxhash.xxh3_64_intdigest("\x1f".join([query_id, receiver_id, text, *options]).encode())


def digest_of(query: Query) -> int:
    """:func:`query_digest` of a :class:`Query`."""
    return query_digest(query.query_id, query.receiver_id, query.text, query.options)


FLOAT_ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2}


def inline_raw_bytes(n_layers: int, kv_heads: int, tokens: int, head_dim: int, precision: str) -> int:
    """Bytes (before base64) of an inline cache: every layer's K and V, ``(1, kv_heads, tokens, head_dim)`` each."""
    return n_layers * 2 * kv_heads * tokens * head_dim * FLOAT_ITEMSIZE[precision]


def base64_chars(nbytes: int) -> int:
    """Length of the padded base64 text of ``nbytes`` bytes."""
    return 4 * -(-nbytes // 3)


class InlineKV(BaseModel):
    """A transmitter's cache tail carried inside its offer: every layer's last ``tokens`` tokens, K then V.

    ``data`` is the base64 of the tensors back to back, layer by layer (K then V, each ``(1, kv_heads, tokens,
    head_dim)`` little-endian at ``precision``); ``digest`` is XXH3-64 of those bytes. A small cache on a fast
    link travels this way so the receiver has it when the plan comes (no plan -> stream round trip).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    precision: Literal["fp32", "fp16", "bf16"]
    tokens: int = Field(ge=1, le=MAX_OFFER_TOKENS)
    digest: int = Field(ge=0, lt=1 << 64)
    data: str = Field(min_length=4, max_length=base64_chars(MAX_INLINE_BYTES))

    def raw_bytes(self, n_layers: int, kv_heads: int, head_dim: int) -> int:
        """Bytes the cache holds for an offer of this shape."""
        return inline_raw_bytes(n_layers, kv_heads, self.tokens, head_dim, self.precision)


class Offer(Message):
    """A transmitter's small offer to the gate after prefilling q'."""

    kind: Literal["offer"] = "offer"
    query_id: Id
    transmitter_id: Id
    query_digest: int = Field(ge=0, le=DIGEST_MAX)  # digest_of(the Query it answers)
    model_fingerprint: Fingerprint
    n_tokens: int = Field(ge=0)  # 0 only in a declined offer
    n_layers: int = Field(ge=1, le=MAX_LAYER_INDEX + 1)
    kv_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    summary: Annotated[tuple[float, ...], AfterValidator(_finite)] = Field(default=(), max_length=MAX_SUMMARY_DIM)
    confidence: float = Field(ge=0.0, le=1.0)  # e.g. 1 - P("I don't know")
    precisions: tuple[Precision, ...] = PRECISIONS
    link_rate_bps: Rate | None = None  # the transmitter's own estimate of its uplink
    rtt_s: float | None = Field(default=None, ge=0, le=3600, allow_inf_nan=False)  # its measured round trip
    # What the gating network reads besides ``summary`` (fusion.gate.OfferSummary), exactly, not via confidence:
    p_none: float | None = Field(default=None, ge=0.0, le=1.0)  # letter: P(" none") of five tokens; text: 1 - p_top
    p_top: float | None = Field(default=None, ge=0.0, le=1.0)  # letter: top letter of the five; text: top next token
    entropy: float | None = Field(default=None, ge=0.0, allow_inf_nan=False)  # nats, of that distribution
    coverage: float = Field(default=0.0, ge=0.0, le=1.0)  # how well its local notes cover q' (0: no notes)
    # Character span (start, end) in the prompt of q' of each of the transmitter's tokens: the receiver aligns
    # the transmitter's cache onto its own tokens with them. Empty, or exactly n_tokens spans.
    offsets: tuple[tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]], ...] = Field(
        default=(), max_length=MAX_OFFER_TOKENS
    )
    inline: InlineKV | None = None  # the cache tail itself, when small enough to ride along (InlineKV)
    hint: str | None = Field(default=None, max_length=MAX_HINT_CHARS)  # t2t queries: its short answer ("": none)
    # translate queries: nothing worth sending (no notes specific to q'): the gate stops waiting for this device
    # and never plans it; a declined offer carries no tokens, offsets, inline cache or hint
    declined: bool = False

    @model_validator(mode="after")
    def _offsets_fit(self) -> Offer:
        if self.declined != (self.n_tokens == 0):
            raise ValueError("an offer has tokens unless it is declined, and a declined offer has none")
        if self.declined and (self.offsets or self.inline is not None or self.hint is not None):
            raise ValueError("a declined offer carries nothing")
        if self.offsets and len(self.offsets) != self.n_tokens:
            raise ValueError(f"{len(self.offsets)} token offsets for n_tokens={self.n_tokens}")
        if any(start > end for start, end in self.offsets):
            raise ValueError("a token offset ends before it starts")
        if self.inline is not None:
            if self.inline.tokens > self.n_tokens:
                raise ValueError(f"inline cache of {self.inline.tokens} tokens; the offer has {self.n_tokens}")
            raw = self.inline.raw_bytes(self.n_layers, self.kv_heads, self.head_dim)
            if raw > MAX_INLINE_BYTES:
                raise ValueError(f"an inline cache of {raw} bytes exceeds {MAX_INLINE_BYTES}")
            if len(self.inline.data) != base64_chars(raw):
                raise ValueError(
                    f"inline cache text of {len(self.inline.data)} characters; its shape needs {raw} bytes"
                )
        return self


class PlanEntry(BaseModel):
    """What one chosen transmitter must send."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    transmitter_id: Id
    layers: tuple[Annotated[int, Field(ge=0, le=MAX_LAYER_INDEX)], ...] = Field(min_length=1)
    precision: Precision
    weight: float = Field(ge=0.0, le=MAX_WEIGHT, allow_inf_nan=False)
    byte_budget: int = Field(ge=0)
    tokens: int | None = Field(default=None, ge=1)  # send only each layer's last this many tokens (None: all)
    inline: bool = False  # the offer carried these layers (InlineKV): the receiver takes them from it, none stream

    @model_validator(mode="after")
    def _unique_layers(self) -> PlanEntry:
        if len(set(self.layers)) != len(self.layers):
            raise ValueError("layers must be unique")
        return self


class Plan(Message):
    """The gate's decision for one query: which transmitters send which layers, how and how much."""

    kind: Literal["plan"] = "plan"
    query_id: Id
    receiver_id: Id
    query_digest: int = Field(ge=0, le=DIGEST_MAX)  # digest_of(the Query it plans)
    deadline_unix: float = Field(gt=0, allow_inf_nan=False)
    entries: tuple[PlanEntry, ...] = ()
    omitted: tuple[Omission, ...] = Field(default=(), max_length=256)  # transmitters not planned, and why

    @model_validator(mode="after")
    def _unique_transmitters(self) -> Plan:
        ids = [e.transmitter_id for e in self.entries]
        if len(set(ids)) != len(ids):
            raise ValueError("a transmitter appears twice in the plan")
        return self


def int_scale_axis(tensor: str, shape: tuple[int, ...], precision: str) -> str:
    """Scale axis of ``int8``/``int4``: K per channel (KIVI) unless its per-channel fp16 scales would outweigh its
    data (fewer than 2 tokens at int8, 4 at int4: a transmitter's one-token tail), then per token, as V always is."""
    bits = 8 if precision == "int8" else 4
    return "channel" if tensor == "k" and shape[2] * bits >= 16 else "token"


def expected_raw_bytes(shape: tuple[int, ...], precision: str, scale_axis: str) -> int:
    """Bytes of a quantized tensor before compression: data plus fp16 scales (see ``bus.quant``)."""
    b, h, t, d = shape
    n = b * h * t * d
    if precision == "fp32":
        return 4 * n
    if precision in ("fp16", "bf16"):
        return 2 * n
    groups = b * h * d if scale_axis == "channel" else b * h * t
    data = n if precision == "int8" else (n + 1) // 2
    return data + 2 * groups


class KVChunkHeader(BaseModel):
    """The header of one KV frame (``bus.frames``): one chunk of one K or V tensor; its payload follows it.

    ``chunk_hash`` is the low 32 bits of an XXH3-64 of the header bytes, seeded by the payload's XXH3-64, so a
    payload or header mutated in flight fails the check; ``blob_hash`` covers the whole tensor blob, bound to
    its query, sender, layer and tensor (docs/PROTOCOL.md section 6).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = KV_SCHEMA_VERSION
    query_id: Id
    sender: Id
    layer: int = Field(ge=0, le=MAX_LAYER_INDEX)
    tensor: Literal["k", "v"]
    chunk: int = Field(ge=0)
    n_chunks: int = Field(ge=1, le=MAX_CHUNKS)
    chunk_size: int = Field(ge=1)  # bytes in every chunk but the last
    dtype: SourceDtype  # the sender's tensor dtype (informational)
    shape: tuple[
        Annotated[int, Field(ge=1, le=MAX_DIM)],
        Annotated[int, Field(ge=1, le=MAX_DIM)],
        Annotated[int, Field(ge=1, le=MAX_DIM)],
        Annotated[int, Field(ge=1, le=MAX_DIM)],
    ]  # (batch, kv_heads, tokens, head_dim)
    precision: Precision
    shuffle: bool
    compression: Literal["none", "lz4", "deflate"]
    scale_axis: ScaleAxis  # int formats: "channel" (K, KIVI) or "token" (V); floats: "none"
    scale_dtype: Literal["float16"] | None
    raw_bytes: int = Field(ge=1)  # quantized data + scales, before compression
    blob_bytes: int = Field(ge=1)  # what the chunks carry in total
    layers_total: int = Field(ge=1, le=MAX_LAYER_INDEX + 1)  # layers in this send
    chunk_hash: Hash32  # this chunk: header bytes seeded by the payload's XXH3-64
    blob_hash: Hash32  # the whole tensor blob, chunk by chunk

    @model_validator(mode="after")
    def _consistent(self) -> KVChunkHeader:
        if self.chunk >= self.n_chunks:
            raise ValueError(f"chunk {self.chunk} out of range for n_chunks={self.n_chunks}")
        if self.n_chunks != -(-self.blob_bytes // self.chunk_size):
            raise ValueError("n_chunks does not match blob_bytes / chunk_size")
        is_int = self.precision in ("int8", "int4")
        if is_int != (self.scale_axis != "none") or is_int != (self.scale_dtype is not None):
            raise ValueError(f"scale_axis/scale_dtype do not fit precision {self.precision}")
        if self.raw_bytes != expected_raw_bytes(self.shape, self.precision, self.scale_axis):
            raise ValueError("raw_bytes does not match shape and precision")
        if self.compression == "none" and self.blob_bytes != self.raw_bytes:
            raise ValueError("uncompressed blob must be raw_bytes long")
        if self.compression != "none" and self.blob_bytes > self.raw_bytes + self.raw_bytes // 64 + 1024:
            raise ValueError(f"compressed blob larger than {self.compression} can produce")
        return self

    @property
    def payload_len(self) -> int:
        """Bytes this chunk's payload must have."""
        if self.chunk < self.n_chunks - 1:
            return self.chunk_size
        return self.blob_bytes - self.chunk_size * (self.n_chunks - 1)

    def for_tensor(self, layer: int, tensor: str) -> KVChunkHeader:
        """This header for another tensor of its kind (a pack entry's ``layer`` and K/V; itself when they are its own).
        Not validated again: any layer up to ``MAX_LAYER_INDEX`` and K or V are valid wherever the rest is."""
        if self.layer == layer and self.tensor == tensor:
            return self
        return self.model_copy(update={"layer": layer, "tensor": tensor})

    @property
    def tensor_fields(self) -> tuple[Any, ...]:
        """Fields every chunk of the same tensor shares (duplicates and conflicts are judged on them)."""
        return (
            self.query_id,
            self.sender,
            self.layer,
            self.tensor,
            self.n_chunks,
            self.chunk_size,
            self.dtype,
            self.shape,
            self.precision,
            self.shuffle,
            self.compression,
            self.scale_axis,
            self.scale_dtype,
            self.raw_bytes,
            self.blob_bytes,
            self.blob_hash,
        )


class Presence(Message):
    """A heartbeat on ``fr.presence.<role>.<id>``."""

    kind: Literal["presence"] = "presence"
    role: Role
    agent_id: Id
    model_fingerprint: Fingerprint | None = None
    capabilities: tuple[Annotated[str, Field(max_length=64)], ...] = Field(default=(), max_length=64)
    fusers: tuple[FuserSpec, ...] | None = Field(default=None, max_length=MAX_FUSERS)  # a receiver's (as in Query)
    load: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)  # queries in progress
    link_rate_bps: Rate | None = None  # measured or configured uplink, bytes/s
    rtt_s: float | None = Field(default=None, ge=0, le=3600, allow_inf_nan=False)  # round trip to the server, s
    # the next heartbeat is due within this many seconds
    interval_s: float = Field(default=DEFAULT_HEARTBEAT_S, gt=0, le=MAX_HEARTBEAT_S, allow_inf_nan=False)
    sent_unix: float = Field(gt=0, allow_inf_nan=False)


class Goodbye(Message):
    """Sent on a clean stop on the agent's presence subject."""

    kind: Literal["goodbye"] = "goodbye"
    role: Role
    agent_id: Id
    reason: str = Field(default="", max_length=200)


OmissionReason = Literal["left", "late", "not_chosen", "no_fuser", "error"]


class TransmitterUse(BaseModel):
    """Provenance: one transmitter whose cache went into the answer."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    transmitter_id: Id
    layers: tuple[Annotated[int, Field(ge=0, le=MAX_LAYER_INDEX)], ...]  # empty: its text hint was read (t2t)
    precision: Precision | None  # None: a text hint (t2t), no cache
    bytes: int = Field(ge=0)
    weight: float = Field(default=1.0, ge=0.0, allow_inf_nan=False)
    # the planned layers it said it sent when it cut its stream short (a stream cut); None: it did not cut
    sent: tuple[Annotated[int, Field(ge=0, le=MAX_LAYER_INDEX)], ...] | None = None


class Omission(BaseModel):
    """Provenance: one transmitter that did not contribute, and why."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    transmitter_id: Id
    reason: OmissionReason
    detail: str = Field(default="", max_length=500)


class Answer(Message):
    """The receiver's reply to an ask, with provenance."""

    kind: Literal["answer"] = "answer"
    query_id: Id
    receiver_id: Id
    text: str = Field(max_length=MAX_TEXT_CHARS)
    choice: str | None = Field(default=None, max_length=8)  # option letter when options were given
    used: tuple[TransmitterUse, ...] = ()
    omitted: tuple[Omission, ...] = ()
    latency_s: float = Field(ge=0.0, allow_inf_nan=False)
    bytes_received: int = Field(default=0, ge=0)  # KV bytes that arrived for this query: streams and inline caches
    probs: tuple[Annotated[float, Field(ge=0.0, le=1.0)], ...] = Field(default=(), max_length=MAX_OPTIONS)
    alone: bool = False  # the receiver's self-check answered (it knows this): no one was asked
    notes: tuple[Annotated[str, Field(max_length=500)], ...] = Field(default=(), max_length=MAX_NOTES)


Plan.model_rebuild()  # ``omitted`` refers to Omission, defined below Plan


class ErrorReply(Message):
    """A typed failure reply to a request (an ask or a rephrase)."""

    kind: Literal["error"] = "error"
    code: Literal["bad_request", "timeout", "unavailable", "limit", "internal"]
    message: str = Field(max_length=500)
    query_id: Id | None = None


AnyMessage = Annotated[
    Ask | Query | Offer | Plan | Presence | Goodbye | Answer | ErrorReply,
    Field(discriminator="kind"),
]
_ANY = TypeAdapter(AnyMessage)


def decode_message(data: bytes | bytearray | memoryview | str, expected: type[M] | None = None) -> M | Message:
    """Parse JSON into the message its ``kind`` names (or into ``expected``); raise :class:`SchemaError`."""
    raw = bytes(data) if isinstance(data, bytearray | memoryview) else data
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SchemaError(f"message is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise SchemaError("message is not a JSON object")
    version = obj.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise SchemaError(f"unsupported schema_version {version!r} (this build speaks {SCHEMA_VERSION})")
    try:
        if expected is not None:
            return expected.model_validate(obj)
        return _ANY.validate_python(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        name = expected.__name__ if expected is not None else obj.get("kind", "message")
        raise SchemaError(f"invalid {name}: {where}: {first['msg']}", errors=exc.errors()) from exc
