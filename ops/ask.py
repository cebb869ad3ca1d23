"""Push questions to a running federation and print the answers with their provenance.

    python -m ops.ask "What is the color of Zorbin?" --option red --option blue --option green --option pink
    python -m ops.ask --file questions.jsonl [--concurrency 8] [--private]

One question: the answer letter and text, which transmitters (and layers) went into it, which did not and
why. The asker is a ``client`` identity: ``--creds FILE`` (``FEDREFINE_CREDS``; ``python -m ops.server
--creds-dir DIR`` writes ``DIR/client.creds``) and ``--tls-ca DIR/ca.pem``; ``--insecure`` only for a server run
with ``--insecure``. ``--file``: one JSON object per line (``stem`` or ``question``, four ``options``, optionally
``answer`` as an index or letter and ``private``); pushes them all and prints accuracy, latency and bytes.

``--nats A,B,C`` (or ``NATS_URL``) lists several servers of a cluster: the asker fails over between them. An ask in
flight when its connection moves to another server is asked again with the time it has left (the receiver's
reply, allowed only on the connection the ask came in on, may be lost with the old one), and an ask that finds no
receiver (``no responders``, e.g. while they reconnect after a server restart) is tried again until its deadline:
see :class:`ReconnectWatch`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nats
from nats.aio.client import Client
from pydantic import ValidationError

from bus.auth import ClientSecurity
from bus.cli import NATS_HELP, OneLineParser, nats_argument, nats_from_env
from bus.connect import close, connect
from bus.errors import ConfigError, ConnectError, FedRefineError, SchemaError
from bus.schemas import Answer, Ask, ErrorReply, decode_message
from bus.subjects import DEFAULT_PREFIX, Subjects
from fusion.prompts import LETTERS, exact_match

DEFAULT_DEADLINE_MS = 10_000  # milliseconds the federation has to answer
DEFAULT_CONCURRENCY = 4  # questions in flight at once with --file
DEFAULT_REPLY_SLACK_S = 2.0  # seconds past the deadline the client still waits for the reply
DEFAULT_MIN_REASK_S = 0.3  # an ask is asked again (after a failover, or no responders) only with this much time left
DEFAULT_RETRY_WAIT_S = 0.1  # seconds between tries while no receiver answers

Reply = Answer | ErrorReply


@dataclass(frozen=True)
class Item:
    """One question to push (``answer``: the right option's index, or the free-text answer, when known)."""

    stem: str
    options: tuple[str, ...]
    private: bool = False
    answer: int | str | None = None
    id: str = ""
    mode: str = "c2c"  # "t2t": the others write text hints (the baseline); "translate": their notes' caches


@dataclass(frozen=True)
class Outcome:
    """What came back for one item, and how long the round trip took."""

    item: Item
    reply: Reply
    seconds: float

    @property
    def answered(self) -> bool:
        """Whether an answer (not an error) came back."""
        return isinstance(self.reply, Answer)

    @property
    def correct(self) -> bool | None:
        """Whether the answer is right (None when the item has no known answer or none came back): the option, or
        (free text) an exact match of the normalised answer."""
        if self.item.answer is None or not isinstance(self.reply, Answer):
            return None
        if isinstance(self.item.answer, str):
            return exact_match(self.reply.text, self.item.answer)
        if self.reply.choice is None:
            return None
        return ord(self.reply.choice) - ord("A") == self.item.answer


class ReconnectWatch:
    """Counts the reconnects of the asker's connection (pass :meth:`on_reconnect` as ``reconnected_cb``), so an ask in
    flight across one is asked again: the receiver may answer only on the connection the ask reached it by."""

    def __init__(self) -> None:
        self.reconnects = 0
        self._changed = asyncio.Event()

    async def on_reconnect(self) -> None:
        """The connection is up again, perhaps on another server."""
        self.reconnects += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def next_change(self) -> asyncio.Event:
        """An event set at the next reconnect."""
        return self._changed


async def ask_once(
    nc: Client, subjects: Subjects, item: Item, deadline_s: float, watch: ReconnectWatch | None = None
) -> Reply:
    """Send one Ask (request/reply) and return the Answer, or an ErrorReply for every kind of failure.

    With ``watch``: asked again, with the time left, after a reconnect or while no receiver responds (module
    docstring), until the deadline.
    """
    if watch is None:
        return await _ask(nc, subjects, item, deadline_s)
    end = time.monotonic() + deadline_s
    while True:
        left = end - time.monotonic()
        changed = watch.next_change()
        request = asyncio.ensure_future(_ask(nc, subjects, item, left))
        waiting = asyncio.ensure_future(changed.wait())
        await asyncio.wait({request, waiting}, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if request.done():
            reply = request.result()
            retry = isinstance(reply, ErrorReply) and reply.code == "unavailable" and "no receiver" in reply.message
            if not retry or end - time.monotonic() < DEFAULT_MIN_REASK_S + DEFAULT_RETRY_WAIT_S:
                return reply
            await asyncio.sleep(DEFAULT_RETRY_WAIT_S)
            continue
        request.cancel()  # the reply to this one may be lost with the old connection: ask again
        if end - time.monotonic() < DEFAULT_MIN_REASK_S:
            return ErrorReply(
                code="timeout", message="the connection moved to another server; no time left to ask again"
            )


async def _ask(nc: Client, subjects: Subjects, item: Item, deadline_s: float) -> Reply:
    """One request/reply."""
    try:
        ask = Ask(question=item.stem, options=item.options, private=item.private, deadline_s=deadline_s, mode=item.mode)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return ErrorReply(code="bad_request", message=f"{where}: {first['msg']}"[:500])
    try:
        msg = await nc.request(subjects.ask(), ask.to_bytes(), timeout=deadline_s + DEFAULT_REPLY_SLACK_S)
    except nats.errors.NoRespondersError:
        return ErrorReply(code="unavailable", message=f"no receiver is serving {subjects.ask()}")
    except TimeoutError:
        return ErrorReply(code="timeout", message=f"no answer within {deadline_s + DEFAULT_REPLY_SLACK_S:.1f} s")
    except nats.errors.Error as exc:
        return ErrorReply(code="unavailable", message=f"request failed: {exc or type(exc).__name__}"[:500])
    try:
        reply = decode_message(msg.data)
    except SchemaError as exc:
        return ErrorReply(code="internal", message=f"unreadable reply: {exc}"[:500])
    if not isinstance(reply, Answer | ErrorReply):
        return ErrorReply(code="internal", message=f"unexpected {reply.kind} reply")
    return reply


async def push_many(
    nc: Client,
    subjects: Subjects,
    items: Sequence[Item],
    *,
    deadline_s: float,
    concurrency: int = DEFAULT_CONCURRENCY,
    on_done: Callable[[Outcome], None] | None = None,
    watch: ReconnectWatch | None = None,
) -> list[Outcome]:
    """Push every item, ``concurrency`` at a time; outcomes in item order (``watch``: see :func:`ask_once`)."""
    if concurrency < 1:
        raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
    gate = asyncio.Semaphore(concurrency)

    async def one(item: Item) -> Outcome:
        async with gate:
            t0 = time.perf_counter()
            reply = await ask_once(nc, subjects, item, deadline_s, watch)
            outcome = Outcome(item, reply, time.perf_counter() - t0)
        if on_done is not None:
            on_done(outcome)
        return outcome

    return list(await asyncio.gather(*(one(i) for i in items)))


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summarize(outcomes: Sequence[Outcome]) -> dict:
    """Accuracy, latency percentiles, bytes per query and per-transmitter usage of a batch."""
    answers = [o for o in outcomes if o.answered]
    graded = [o.correct for o in answers if o.correct is not None]
    lat = [o.seconds for o in answers]
    used: Counter[str] = Counter()
    omitted: Counter[str] = Counter()
    for o in answers:
        assert isinstance(o.reply, Answer)
        used.update(u.transmitter_id for u in o.reply.used)
        omitted.update(f"{m.transmitter_id}:{m.reason}" for m in o.reply.omitted)
    errors = Counter(o.reply.code for o in outcomes if isinstance(o.reply, ErrorReply))
    p50, p95 = _percentile(lat, 0.5), _percentile(lat, 0.95)
    return {
        "queries": len(outcomes),
        "answered": len(answers),
        "accuracy": round(sum(graded) / len(graded), 4) if graded else None,
        "latency_p50_ms": round(1000 * p50, 1) if p50 is not None else None,
        "latency_p95_ms": round(1000 * p95, 1) if p95 is not None else None,
        "bytes_per_query": round(statistics.fmean(o.reply.bytes_received for o in answers)) if answers else 0,  # type: ignore[union-attr]
        "used": dict(sorted(used.items())),
        "omitted": dict(sorted(omitted.items())),
        "errors": dict(errors),
    }


def describe(reply: Reply) -> str:
    """A few lines a person reads: the answer, then its provenance."""
    if isinstance(reply, ErrorReply):
        return f"error ({reply.code}): {reply.message}"
    lines = [f"answer: {reply.text}    ({1000 * reply.latency_s:.0f} ms, {reply.bytes_received} bytes of KV)"]
    for use in reply.used:
        if use.precision is None:  # text-to-text: its hint was read
            lines.append(f"  used     {use.transmitter_id}: its text hint, {use.bytes} bytes")
            continue
        layers = ",".join(map(str, use.layers))
        lines.append(
            f"  used     {use.transmitter_id}: layers {layers} at {use.precision}, weight {use.weight:.2f}, "
            f"{use.bytes} bytes"
        )
    for miss in reply.omitted:
        lines.append(f"  omitted  {miss.transmitter_id}: {miss.reason}" + (f" ({miss.detail})" if miss.detail else ""))
    if not reply.used:
        lines.append("  the receiver answered alone")
    lines.extend(f"  note: {note}" for note in reply.notes)
    return "\n".join(lines)


def load_items(path: Path, private: bool = False) -> list[Item]:
    """Questions from a JSONL file (see the module docstring); ConfigError names the bad line."""
    items = []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            stem = row.get("stem") or row["question"]
            options = tuple(str(o) for o in row["options"])
            answer = row.get("answer")
            if isinstance(answer, str):
                answer = LETTERS.index(answer.strip().upper())
            items.append(Item(str(stem), options, bool(row.get("private", private)), answer, str(row.get("id", n))))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{path}:{n}: not a question line ({type(exc).__name__}: {exc})") from exc
    return items


# ---- the command --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command's flags."""
    p = OneLineParser(prog="python -m ops.ask", description=__doc__.splitlines()[0])
    p.add_argument("question", nargs="?", help="the question (or use --file)")
    p.add_argument("--option", action="append", default=[], help="an answer option (give four)")
    p.add_argument("--file", type=Path, help="JSONL file of questions to push")
    p.add_argument("--private", action="store_true", help="rephrase before anything leaves the receiver side")
    p.add_argument(
        "--mode",
        choices=("c2c", "t2t", "translate"),
        default="c2c",
        help="c2c: the others share KV caches; t2t: they write text hints (the text-to-text baseline); translate: "
        "they send their retrieved notes' caches, which the receiver's translators read",
    )
    p.add_argument("--deadline-ms", type=int, default=DEFAULT_DEADLINE_MS, help="answer deadline (milliseconds)")
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="questions in flight with --file")
    p.add_argument("--limit", type=int, default=None, help="push only the first N questions of --file")
    p.add_argument("--nats", type=nats_argument, default=nats_from_env(os.environ), help=NATS_HELP)
    p.add_argument("--prefix", default=os.environ.get("FEDREFINE_PREFIX", DEFAULT_PREFIX), help="subject prefix")
    p.add_argument(
        "--creds", default=os.environ.get("FEDREFINE_CREDS") or None, help="a client identity's credentials file"
    )
    p.add_argument(
        "--tls-ca", default=os.environ.get("FEDREFINE_TLS_CA") or None, help="CA certificate that verifies the server"
    )
    p.add_argument("--insecure", action="store_true", help="no credentials, no TLS (a server run with --insecure)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    return p


async def _run(args: argparse.Namespace) -> int:
    subjects = Subjects(args.prefix)
    if args.deadline_ms <= 0:
        raise ConfigError(f"--deadline-ms must be positive, got {args.deadline_ms}")
    deadline_s = args.deadline_ms / 1000
    if args.file is None:
        if not args.question:
            raise ConfigError("give a question, or --file FILE")
        items = [Item(args.question, tuple(args.option), args.private)]
    else:
        items = load_items(args.file, args.private)[: args.limit]
    items = [dataclasses.replace(item, mode=args.mode) for item in items]
    security = client_security(args.creds, args.tls_ca, args.insecure)
    watch = ReconnectWatch()
    try:
        nc = await connect(args.nats, name="ops.ask", retries=1, security=security, reconnected_cb=watch.on_reconnect)
    except ConnectError as exc:
        raise ConnectError(f"no NATS server at {args.nats}; start one with `python -m ops.server`") from exc
    try:
        if args.file is None:
            reply = await ask_once(nc, subjects, items[0], deadline_s, watch)
            print(reply.model_dump_json(indent=2) if args.json else describe(reply))
            return 0 if isinstance(reply, Answer) else 1
        from tqdm import tqdm

        with tqdm(total=len(items), desc="questions", unit="q", disable=args.json) as bar:
            outcomes = await push_many(
                nc,
                subjects,
                items,
                deadline_s=deadline_s,
                concurrency=args.concurrency,
                on_done=lambda o: bar.update(),
                watch=watch,
            )
        summary = summarize(outcomes)
        print(json.dumps(summary, indent=2))
        return 0 if summary["answered"] == summary["queries"] else 1
    finally:
        await close(nc)


def client_security(creds: str | None, tls_ca: str | None, insecure: bool) -> ClientSecurity:
    """The asker's identity from the flags; :class:`ConfigError` without ``--creds`` unless ``--insecure``."""
    if creds is None and not insecure:
        raise ConfigError(
            "--creds FILE is required (a client identity: python -m ops.server --creds-dir DIR writes DIR/client.creds)"
            "; --insecure asks a server run with --insecure"
        )
    if creds is None:
        print("warning: --insecure: no credentials, no TLS", file=sys.stderr)
    return ClientSecurity(creds=creds, tls_ca=tls_ca)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ops.ask``: 0 all answered, 1 some not, 2 bad input or no server."""
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(_run(args))
    except FedRefineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
