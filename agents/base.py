"""The small base every agent shares: connect, heartbeat, route errors, drain and leave.

Life cycle (``async with agent:`` or ``start()`` / ``stop()``)::

    start: connect pub + sub (bounded first attempts; after that reconnects forever with exponential
           backoff, resubscribing and heartbeating again when the server returns) -> setup() subscribes
           -> first heartbeat on <prefix>.presence.<role>.<id>
    stop:  stop taking new work (unsubscribe the intake subjects) -> wait for in-flight work (drain_s)
           -> goodbye on the presence subject -> teardown() -> close both connections

Identity: the agent connects with its credentials (``--creds``; ``--insecure`` only to a server without
authorization, with a warning) and verifies the server by TLS (``--tls-ca``); the server pins it to its own subjects.

Error routing: a message handler that raises a :class:`FedRefineError` (bad JSON, wrong schema, hostile id,
oversized, an id that is not its subject's) costs one logged warning line (at most a burst of
``DEFAULT_REJECT_LOG_BURST`` and then ``DEFAULT_REJECT_LOG_RATE`` a second: a flood is summed up in one line a
second instead); any other exception is logged with its traceback; the subscription keeps serving either way.
Presence messages are read at most ``DEFAULT_BEAT_RATE`` a second per subject: one identity cannot keep the
others busy decoding its heartbeats. Forward passes run on a one-thread executor per agent, so heartbeats and I/O
keep flowing while the model works and the agent never uses more than one core for model math; a kind of call
that has been taking less than ``inline_compute_ms`` (a tiny model's prefill, a fuser's deltas) runs on the event
loop instead, where the two thread wake-ups, GIL hand-offs and the loop's self-pipe of a hand-off cost more than
the few milliseconds the loop would otherwise keep serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, ClassVar, TypeVar

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from agents import tracing
from agents.config import AgentConfig
from agents.ratelimit import RejectLog, TokenBucket
from agents.roster import Roster
from agents.service import AgentService, LatencyWindow, agent_stats
from bus import connect as busconn
from bus.errors import AgentError, FedRefineError, SchemaError
from bus.schemas import ErrorReply, FuserSpec, Goodbye, Message, Presence, decode_message
from bus.subjects import Subjects

log = logging.getLogger(__name__)

DEFAULT_FIRST_RETRY_WAIT = 0.5  # seconds between first-connection attempts
DEFAULT_BACKOFF_BASE_S = 0.1  # first reconnect wait; doubles per failed attempt up to backoff_max_s
DEFAULT_CLOSE_TIMEOUT_S = 3.0  # seconds a connection may take to drain when the agent stops
DEFAULT_REASON_CHARS = 200  # a rejection reason is cut to this many characters in the log
DEFAULT_REJECT_LOG_BURST = 200  # rejection lines logged at once before the rate applies
DEFAULT_REJECT_LOG_RATE = 50.0  # rejection lines per second after the burst; the rest are counted in a summary line
DEFAULT_BEAT_RATE = 5.0  # presence messages per second read from one subject (burst DEFAULT_BEAT_BURST)
DEFAULT_BEAT_BURST = 20.0
DEFAULT_BEAT_SUBJECTS = 4096  # presence subjects with a rate bucket (the oldest is forgotten beyond)

T = TypeVar("T")
M = TypeVar("M", bound=Message)
Handler = Callable[[Msg], Awaitable[None]]


def decode(msg: Msg, cls: type[M]) -> M:
    """Parse a control message as ``cls``; :class:`SchemaError` on anything else."""
    return decode_message(msg.data, cls)  # type: ignore[return-value]


class Agent:
    """Base of the four roles; subclasses set ``role`` and implement ``setup()`` (and optionally more hooks)."""

    role: ClassVar[str] = ""
    tracks_presence: ClassVar[bool] = False  # keep a roster of every agent's heartbeats
    announce_at_start: ClassVar[bool] = True  # heartbeat as soon as it serves (False: one interval later)

    def __init__(self, cfg: AgentConfig) -> None:
        if not cfg.id:
            raise AgentError("agent config has no id (build it with agents.config.make_config)")
        self.cfg = cfg
        self.id = cfg.id
        self.security = cfg.security()  # ConfigError now, before a model loads, when credentials are missing
        self.subjects = Subjects(cfg.prefix)
        self.pub: Client | None = None
        self.sub: Client | None = None
        self.roster = Roster()
        self.rejected: Counter[str] = Counter()  # warnings per subject kind (tests and stats read it)
        self.rejected_by: Counter[str] = Counter()  # ... per error class
        self.count: Counter[str] = Counter()  # role counters for the stats (asks, offers, plans, ...)
        self.latency = LatencyWindow()  # the role's main step, milliseconds (stats)
        self.tracer = tracing.Tracer(self, cfg.trace)
        self.service: AgentService | None = None
        self._reject_log = RejectLog(f"{self.role} {self.id}", DEFAULT_REJECT_LOG_RATE, DEFAULT_REJECT_LOG_BURST)
        self._beats: OrderedDict[str, TokenBucket] = OrderedDict()  # presence subject -> its read budget
        self.model_fingerprint: str | None = None
        self.link_rate_bps: float | None = None
        self.rtt_s: float | None = None  # measured round trip to the server (transmitters), in heartbeats
        self.draining = False
        self._intake: list[Subscription] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.role}-compute")
        self._compute_s: dict[str, float] = {}  # per kind of call: a running mean of its duration, seconds
        self.computed = Counter[str]()  # calls run on the event loop ("loop") and on the compute thread ("thread")
        self._started = False
        self._stopped = False
        self.started_at = 0.0  # monotonic time it began serving

    # ---- hooks for subclasses -----------------------------------------------------------------------------

    async def setup(self) -> None:
        """Subscribe to the role's subjects (called once connected)."""

    async def teardown(self) -> None:
        """Release role resources after the goodbye (connections are still open)."""

    async def drain_wait(self, until: float) -> None:
        """Wait (until the monotonic time ``until``) for work that is not a tracked task, e.g. plans not yet in."""

    def capabilities(self) -> tuple[str, ...]:
        """What this agent advertises in its heartbeats."""
        return ()

    def fusers(self) -> tuple[FuserSpec, ...] | None:
        """The fusers it lists in its heartbeats (a receiver's; None: none listed)."""
        return None

    def counters(self) -> dict[str, Any]:
        """Role counters for the stats (``agents.service``): counts and sizes, never a question or an answer."""
        return dict(self.count)

    def stats(self) -> dict[str, Any]:
        """What this agent's micro service reports (``agents.service.agent_stats``)."""
        return agent_stats(self)

    # ---- life cycle ---------------------------------------------------------------------------------------

    async def start(self) -> Agent:
        """Connect, subscribe, start heartbeating."""
        if self._started:
            raise AgentError(f"{self.role} {self.id} already started")
        self._started = True
        if self.security.creds is None:
            log.warning(
                "%s %s connects without credentials or TLS (--insecure): anyone who reaches the server can read and "
                "forge this federation's messages",
                self.role,
                self.id,
            )
        self.pub = await self._connect("pub")
        try:
            self.sub = await self._connect("sub")
            if self.tracks_presence:
                await self.listen(self.subjects.presence_all(), self._on_presence, intake=False)
            await self.setup()
            self.service = AgentService(self)
            await self.service.start()  # $SRV.PING / INFO / STATS and <prefix>.status.<role>.<id>
            await busconn.subscribed(self.sub)  # two round trips: a flush's PING can overtake a queued SUB
        except BaseException:
            await self._close_connections()
            raise
        self._background.add(asyncio.create_task(self._heartbeat_loop(), name=f"{self.id}-heartbeat"))
        self.started_at = time.monotonic()
        if self.announce_at_start:
            await self.publish_presence()
        log.info("%s %s serving on %s (prefix %s)", self.role, self.id, self.cfg.nats, self.cfg.prefix)
        return self

    async def stop(self, reason: str = "stopped") -> None:
        """Stop taking work, finish what is in flight (up to ``drain_s``), say goodbye, disconnect."""
        if self._stopped or not self._started:
            return
        self._stopped = True
        self.draining = True
        for sub in self._intake:
            with contextlib.suppress(nats.errors.Error, OSError):
                await sub.unsubscribe()
        until = time.monotonic() + self.cfg.drain_s
        if self._tasks:
            log.info("%s %s draining %d task(s)", self.role, self.id, len(self._tasks))
            await asyncio.wait(set(self._tasks), timeout=self.cfg.drain_s)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.drain_wait(until), timeout=max(0.0, until - time.monotonic()))
        await self._cancel_all(self._tasks, "in-flight")
        await self._cancel_all(self._background, "background")
        await self._goodbye(reason)
        if self.service is not None:
            await self.service.stop()
        try:
            await self.teardown()
        finally:
            await self._close_connections()
            self._executor.shutdown(wait=False, cancel_futures=True)
        log.info("%s %s stopped (%s)", self.role, self.id, reason)

    async def _cancel_all(self, tasks: set[asyncio.Task[Any]], kind: str) -> None:
        """Cancel ``tasks`` and wait for them a bounded time: a task that will not end must not keep us alive."""
        if not tasks:
            return
        for task in tasks:
            task.cancel()
        _, stuck = await asyncio.wait(set(tasks), timeout=DEFAULT_CLOSE_TIMEOUT_S)
        for task in stuck:
            log.warning(
                "%s %s: %s task %s did not stop when cancelled; leaving it", self.role, self.id, kind, task.get_name()
            )

    async def __aenter__(self) -> Agent:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop("stopped" if exc is None else f"error: {type(exc).__name__}")

    # ---- connections --------------------------------------------------------------------------------------

    def _backoff(self, servers: list[Any], info: dict[str, Any]) -> tuple[None, float]:
        """nats-py reconnect hook: exponential backoff with jitter, capped at ``backoff_max_s``."""
        attempts = max((getattr(s, "reconnects", 0) for s in servers), default=0)
        delay = min(self.cfg.backoff_max_s, DEFAULT_BACKOFF_BASE_S * 2 ** min(attempts, 16))
        return None, delay * random.uniform(0.8, 1.2)

    async def _connect(self, which: str) -> Client:
        async def disconnected() -> None:
            if not self._stopped:
                log.warning("%s %s (%s) lost the NATS connection; reconnecting", self.role, self.id, which)

        async def reconnected() -> None:
            log.info("%s %s (%s) reconnected to %s", self.role, self.id, which, self.cfg.nats)
            if which == "pub":
                with contextlib.suppress(FedRefineError):
                    await self.publish_presence()

        return await busconn.connect(
            self.cfg.nats,
            name=f"{self.id}-{which}",
            retries=self.cfg.connect_retries,
            retry_wait=DEFAULT_FIRST_RETRY_WAIT,
            max_reconnect_attempts=-1,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            reconnect_to_server_handler=self._backoff,
            security=self.security,
        )

    async def _close_connections(self) -> None:
        for nc in (self.sub, self.pub):
            if nc is not None:
                await busconn.close(nc, timeout=DEFAULT_CLOSE_TIMEOUT_S)  # bounded even when nats-py hangs

    # ---- messaging ----------------------------------------------------------------------------------------

    async def listen(self, subject: str, handler: Handler, *, queue: str = "", intake: bool = False) -> Subscription:
        """Subscribe ``handler`` with size checks and error routing; ``intake`` subscriptions end at drain."""
        if self.sub is None:
            raise AgentError(f"{self.role} {self.id} is not connected")
        limit = self.cfg.max_control_bytes

        async def callback(msg: Msg) -> None:
            tracing.QUERY_ID.set(self._query_of(msg.subject))  # this callback's log lines name the query
            if len(msg.data) > limit:
                why = f"{len(msg.data)}-byte message exceeds the {limit}-byte limit"
                self.reject(msg.subject, why)
                with contextlib.suppress(FedRefineError):
                    await self.respond(msg, ErrorReply(code="limit", message=why))
                return
            try:
                await handler(msg)
            except FedRefineError as exc:
                self.reject(msg.subject, str(exc), type(exc).__name__)
            except Exception:  # a bug in a handler must not end the subscription
                log.exception("%s %s: handler for %s failed", self.role, self.id, msg.subject)

        sub = await busconn.subscribe(self.sub, subject, callback, queue=queue)
        if intake:
            self._intake.append(sub)
        return sub

    def _query_of(self, subject: str) -> str:
        """The query id a subject names (offers, plans, KV, answers), else ``-``."""
        try:
            return self.subjects.parse(subject).query_id or tracing.NO_QUERY
        except FedRefineError:
            return tracing.NO_QUERY

    def reject(self, subject: str, reason: str, error: str = "other") -> None:
        """One warning line for a message we will not act on (a flood is summed up); the agent keeps serving."""
        kind = subject.removeprefix(self.subjects.prefix + ".").split(".", 1)[0]
        self.rejected[kind] += 1
        self.rejected_by[error] += 1
        self._reject_log.warn(subject, reason[:DEFAULT_REASON_CHARS])

    async def publish(self, subject: str, message: Message, via: Client | None = None) -> int:
        """Publish a control message on the publishing connection (or ``via`` another of ours); its size in bytes."""
        nc = via or self.pub
        if nc is None:
            raise AgentError(f"{self.role} {self.id} is not connected")
        data = message.to_bytes()
        try:
            await nc.publish(subject, data)
        except (nats.errors.Error, OSError) as exc:
            raise AgentError(f"publish to {subject} failed: {exc or type(exc).__name__}", subject=subject) from exc
        return len(data)

    async def respond(self, msg: Msg, message: Message) -> None:
        """Reply to a request (no-op when the request had no reply subject).

        The reply leaves on the connection the request came in on: the server lets an identity answer only the
        requests it received on that connection (``allow_responses``), and only once.
        """
        if not msg.reply:
            return
        await self.publish(msg.reply, message, via=self.sub)

    # ---- work ---------------------------------------------------------------------------------------------

    @property
    def load(self) -> int:
        """Tasks in flight."""
        return len(self._tasks)

    def accepting(self) -> bool:
        """Whether new work may start (not draining, below ``max_inflight``)."""
        return not self.draining and len(self._tasks) < self.cfg.max_inflight

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str, query_id: str | None = None) -> asyncio.Task[Any]:
        """Run ``coro`` as tracked in-flight work (its log lines name ``query_id``, else the current query); its
        failure is logged, never raised into a subscription."""
        task = asyncio.create_task(coro, name=name, context=tracing.in_query(query_id))
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if t.cancelled():
                return
            exc = t.exception()
            if isinstance(exc, FedRefineError):
                log.warning("%s %s: %s failed: %s", self.role, self.id, name, exc)
            elif exc is not None:
                log.error("%s %s: %s crashed", self.role, self.id, name, exc_info=exc)

        task.add_done_callback(done)
        return task

    async def compute(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a CPU-bound call (a forward pass) on this agent's one compute thread, or right here on the event
        loop when calls of ``fn`` have been taking less than ``inline_compute_ms`` (module docstring)."""
        kind = getattr(fn, "__qualname__", "") or repr(fn)
        took = self._compute_s.get(kind)

        def timed() -> T:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - t0
                before = self._compute_s.get(kind)
                self._compute_s[kind] = seconds if before is None else 0.8 * before + 0.2 * seconds

        if took is not None and 1000 * took < self.cfg.inline_compute_ms:
            self.computed["loop"] += 1
            return timed()
        self.computed["thread"] += 1
        ctx = tracing.in_query(None)  # the thread's log lines name this task's query too
        return await asyncio.get_running_loop().run_in_executor(self._executor, tracing.run_in, ctx, timed)

    # ---- presence -----------------------------------------------------------------------------------------

    def presence(self) -> Presence:
        """This agent's heartbeat."""
        return Presence(
            role=self.role,  # type: ignore[arg-type]
            agent_id=self.id,
            model_fingerprint=self.model_fingerprint,
            capabilities=self.capabilities(),
            fusers=self.fusers(),
            load=float(self.load),
            link_rate_bps=self.link_rate_bps,
            rtt_s=self.rtt_s,
            interval_s=self.cfg.heartbeat_s,
            sent_unix=time.time(),
        )

    async def publish_presence(self) -> None:
        """Send one heartbeat now."""
        if self.pub is None or self.pub.is_closed or self._stopped:
            return
        await self.publish(self.subjects.presence(self.role, self.id), self.presence())

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.heartbeat_s)
            try:
                await self.publish_presence()
            except FedRefineError as exc:  # disconnected: nats-py buffers or we try again next beat
                log.debug("heartbeat failed: %s", exc)
            self._reject_log.summarize()
            if self.tracks_presence:
                self.roster.expire()

    async def _goodbye(self, reason: str) -> None:
        if self.pub is None or not self.pub.is_connected:
            return
        try:
            bye = Goodbye(role=self.role, agent_id=self.id, reason=reason[:200])  # type: ignore[arg-type]
            await self.publish(self.subjects.presence(self.role, self.id), bye)
            await busconn.flush(self.pub, timeout=2.0)
        except FedRefineError as exc:
            log.debug("goodbye not delivered: %s", exc)

    async def _on_presence(self, msg: Msg) -> None:
        bucket = self._beats.get(msg.subject)
        if bucket is None:
            bucket = self._beats[msg.subject] = TokenBucket(DEFAULT_BEAT_RATE, DEFAULT_BEAT_BURST)
            while len(self._beats) > DEFAULT_BEAT_SUBJECTS:
                self._beats.popitem(last=False)
        if not bucket.take():
            raise SchemaError(f"presence messages faster than {DEFAULT_BEAT_RATE:g} a second; not read")
        parts = self.subjects.parse(msg.subject)
        beat = decode_message(msg.data)
        if not isinstance(beat, Presence | Goodbye):
            raise SchemaError(f"a {beat.kind} message on a presence subject")
        if (beat.role, beat.agent_id) != (parts.role, parts.agent_id):
            raise SchemaError(f"{beat.role} {beat.agent_id} heartbeat on another agent's subject")
        if beat.agent_id == self.id and beat.role == self.role:
            return
        self.roster.update(beat)


async def serve(agent: Agent) -> None:
    """Run ``agent`` until SIGINT or SIGTERM, then stop it cleanly (a second signal exits at once)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second signal: leaving without draining")
            raise SystemExit(130)
        log.info("%s %s: %s received, draining", agent.role, agent.id, signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    await agent.start()
    try:
        await stop.wait()
    finally:
        await agent.stop("signal")
