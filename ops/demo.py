"""The main job: a whole federation on this machine, answering the sample questions.

    python -m ops.demo [--full | --quick | --tiny] [--questions N] [--deadline-ms N] [--concurrency N] [--insecure]
    python -m ops.demo --cluster [...]      # a 3-member cluster, a leaf node per transmitter, two gates and rephrasers

Starts an embedded nats-server (authorization and TLS on: fresh credentials for each agent and the asker, in a
temporary directory; ``--insecure`` runs without, and says so), builds or loads the zoo (the quick zoo unless
the full one is already built; ``--full`` builds it), starts the receiver, the rephraser, the gate and four
transmitters as separate processes, pushes held-out test questions (those with personal details as private
queries) with a progress bar, prints accuracy, latency, bytes per query and per-transmitter usage, and stops
everything cleanly, also on Ctrl-C. ``--tiny`` runs the same thing on tiny random models in seconds (a smoke
test: accuracy is chance there).

``--cluster``: the same questions through the deployment NATS recommends for devices at the edge (``ops.cluster``):
three servers joined by routes, the receiver side (receiver, two rephrasers, two gates) and the asker on the first,
each transmitter on a leaf node of its own linked to another member, so every cache crosses a leaf link and a route.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from agents.launch import AgentSpec, Federation, identities_for
from bus.cli import OneLineParser
from bus.connect import close, connect
from bus.errors import ConfigError, FedRefineError
from bus.schemas import Answer
from bus.server import NatsServer
from bus.subjects import Subjects
from fusion.prompts import Question
from ops.ask import Item, Outcome, ReconnectWatch, push_many, summarize
from ops.server import INSECURE_WARNING
from privacy.credentials import CredentialStore

log = logging.getLogger(__name__)

DEFAULT_QUESTIONS = 60  # held-out questions pushed by default
DEFAULT_DEADLINE_MS = 10_000  # per question
DEFAULT_CONCURRENCY = 4  # questions in flight
# --real: one at a time. Five pretrained models in five processes share the machine's cores; with 4 in flight on 2
# cores, 12 questions took a p50 of 4.7 s and a third of the devices' offers missed the gate's window (accuracy 0.333
# against 0.500 one at a time, p50 1.8 s, none late)
DEFAULT_REAL_CONCURRENCY = 1
DEFAULT_CANCEL_WAIT_S = 5.0  # seconds the pushing task may take to end once a signal arrived
ASKER_ID = "client"  # the identity the demo pushes questions as
DEFAULT_LINKS_MBPS = (None, 6.0, 1.0, 0.25)  # uplinks (MB/s) of the four transmitters: LAN, laptop, phone, weak phone
TINY_TRANSMITTERS = ("tiny-llama", "tiny-qwen2", "tiny-llama", "tiny-qwen2")

T = TypeVar("T")


@dataclass
class Setup:
    """What the agents run (model paths, fusers, gate) and what to ask."""

    name: str
    receiver: str  # model directory or tiny model name
    transmitters: dict[str, str]  # agent id -> model directory or tiny model name
    fusers: str  # fuser registry directory
    gate: str | None  # gating network file (None: uniform weights)
    questions: list[Question] = field(default_factory=list)
    links_mbps: dict[str, float | None] = field(default_factory=dict)
    self_check: float | None = None  # the receiver answers alone below this P(none) (fusion.refine)
    notes: dict[str, str] = field(default_factory=dict)  # agent id -> its device's notes file (real models)
    rules_only: bool = False  # the rephraser redacts by rules only (the real models were never taught to reword)
    mode: str = "c2c"  # how the questions are asked (translate: the devices send their notes' caches, translated)

    def specs(self, receiver_id: str = "receiver", redundant: bool = False) -> list[AgentSpec]:
        """The seven agents of the demo (``redundant``: and a second gate and a second rephraser, nine)."""
        gates = ("gate", "gate-2") if redundant else ("gate",)
        rx_args = ("--model", self.receiver, "--fusers", self.fusers, "--gates", ",".join(gates)) + self.check_args()
        rephrasers = ("rephraser", "rephraser-2") if redundant else ("rephraser",)
        specs = [AgentSpec("receiver", receiver_id, rx_args)]
        rephrase = ("--rules-only",) if self.rules_only else ("--model", self.receiver)
        reph_args = (*rephrase, "--receiver-id", receiver_id)
        specs += [AgentSpec("rephraser", r, reph_args) for r in rephrasers]
        specs += [AgentSpec("gate", g, ("--gate", self.gate) if self.gate else ()) for g in gates]
        for tid, model in self.transmitters.items():
            link = self.links_mbps.get(tid)
            notes = ("--notes", self.notes[tid]) if tid in self.notes else ()
            link_args = ("--link-mbps", str(link)) if link else ()
            specs.append(AgentSpec("transmitter", tid, ("--model", model, *notes, *link_args)))
        return specs

    def check_args(self) -> tuple[str, ...]:
        """The receiver's ``--self-check`` flag, when the setup has one."""
        return ("--self-check", str(self.self_check)) if self.self_check is not None else ()


# ---- setups -------------------------------------------------------------------------------------------------


def tiny_setup(root: Path, n_questions: int = 12, seed: int = 0) -> Setup:
    """Tiny random models with untrained fusers and gate, and synthetic questions (a third of them private)."""
    import torch

    from fusion.fuser import FuserConfig, PairFuser
    from fusion.gate import GateConfig, GateNetwork, save_gate
    from fusion.models import LanguageModel
    from fusion.registry import FuserRegistry

    receiver = LanguageModel.load("tiny-qwen3")
    registry = FuserRegistry(root / "fusers")
    profiles = {}
    for i, name in enumerate(sorted(set(TINY_TRANSMITTERS))):
        model = LanguageModel.load(name)
        torch.manual_seed(seed + i)
        fuser = PairFuser(FuserConfig.for_models(receiver, model, hidden=16, delta_init_std=0.5))
        registry.save(fuser, model.fingerprint, receiver.fingerprint)
        profiles[model.fingerprint] = [1.0] * model.num_layers
    torch.manual_seed(seed)
    gate = save_gate(
        GateNetwork(GateConfig(hidden=8), profiles), registry.gate_path(receiver.fingerprint), receiver.fingerprint
    )
    rng = random.Random(seed)
    names = ["Zorbin", "Kalu", "Brenna", "Quorr", "Mirelle", "Tavik"]
    attributes = {"color": ("red", "blue", "green", "pink"), "pet": ("cat", "dog", "owl", "fox")}
    questions = []
    for i in range(n_questions):
        attr, values = rng.choice(sorted(attributes.items()))
        stem = f"What is the {attr} of {rng.choice(names)}?"
        pii: tuple[str, ...] = ()
        if i % 3 == 0:
            stem, pii = f"I'm Mara Velt, account ACC-{100000 + i}. {stem}", ("Mara Velt", f"ACC-{100000 + i}")
        options = tuple(rng.sample(values, 4))
        questions.append(Question(id=f"tiny{i}", stem=stem, options=options, answer=rng.randrange(4), pii=pii))
    tids = [f"t{i + 1}-{name}" for i, name in enumerate(TINY_TRANSMITTERS)]
    return Setup(
        name="tiny random models",
        receiver="tiny-qwen3",
        transmitters=dict(zip(tids, TINY_TRANSMITTERS, strict=True)),
        fusers=str(registry.root),
        gate=str(gate),
        questions=questions,
        links_mbps=dict(zip(tids, DEFAULT_LINKS_MBPS, strict=True)),
    )


def zoo_setup(full: bool | None, n_questions: int) -> Setup:
    """The quick or full zoo (``full=None``: the full one if already built, else the quick one), built if needed.

    Fusers and the gate are trained into the zoo if it has none yet (``ops.zoo.fusers.zoo_step``).
    """
    from fusion.models import LanguageModel
    from fusion.registry import FuserRegistry
    from ops.zoo import load_zoo
    from ops.zoo.fusers import FUSERS_DIR, zoo_step

    if full is None:
        try:
            zoo = load_zoo(quick=False, build_if_missing=False)
        except FedRefineError:
            zoo = load_zoo(quick=True)
    else:
        zoo = load_zoo(quick=not full)
    registry = FuserRegistry(zoo.root / FUSERS_DIR)
    receiver_fp = LanguageModel.load(zoo.path(zoo.receiver)).fingerprint
    gate = registry.gate_path(receiver_fp)
    fusers = [p for p in registry.pairs() if p[1] == receiver_fp]
    if not registry.has_gate(receiver_fp) or len(fusers) < len(zoo.transmitters):
        print(f"training the zoo's fusers and gate into {registry.root} (once) ...", file=sys.stderr, flush=True)
        zoo_step(zoo)
    tids = list(zoo.transmitters)
    return Setup(
        name=f"{zoo.manifest.spec.name} zoo ({zoo.root.name})",
        receiver=str(zoo.path(zoo.receiver)),
        transmitters={t: str(zoo.path(t)) for t in tids},
        fusers=str(registry.root),
        gate=str(gate),
        questions=zoo.questions("test")[:n_questions],
        links_mbps=dict(zip(tids, DEFAULT_LINKS_MBPS, strict=False)),
        self_check=zoo.self_check,
    )


def asked_mode(mode: str | None, real: bool) -> str:
    """The mode questions are asked in when no ``--mode`` names one: translate on the real pair (its C2C fusers carry
    nothing measurable on the kit's tasks, docs/TRANSFER.md), c2c on the zoo and tiny models."""
    return mode or ("translate" if real else "c2c")


def real_setup(
    receiver_model: str, n_questions: int, quick: bool = False, seed: int = 0, kit: Any = None, mode: str = "c2c"
) -> Setup:
    """The real pair (``ops.real``'s kit, built if needed, or the ``kit`` given): the receiver model with no notes,
    four devices (two per model) with their notes, held-out questions of both formats (those with personal details
    private). A receiver whose kit holds its translators only runs ``mode="translate"`` (no gate: uniform)."""
    from fusion.models import LanguageModel
    from fusion.registry import FuserRegistry
    from ops.real.kit import load_kit, model_files

    kit = kit if kit is not None else load_kit(quick=quick)
    files = model_files(kit.spec)
    if receiver_model not in files:
        raise ConfigError(f"unknown receiver model {receiver_model!r}; choose one of {sorted(files)}")
    receiver_fp = LanguageModel.load(files[receiver_model]).fingerprint
    registry = FuserRegistry(kit.fusers_dir)
    if mode == "c2c" and not registry.has_gate(receiver_fp):
        raise ConfigError(
            f"this kit has no C2C fusers into {receiver_model} (its translators only): run `python -m ops.real build "
            f"--c2c --receiver-model {receiver_model}`, or ask with --mode translate"
        )
    pool = kit.test_questions()
    questions = random.Random(f"demo-real/{seed}").sample(pool, min(n_questions, len(pool)))
    devices = list(kit.spec.devices)
    return Setup(
        name=f"real pair, receiver {receiver_model} ({kit.root.name})",
        receiver=str(files[receiver_model]),
        transmitters={d: str(files[m]) for d, m in kit.spec.devices.items()},
        fusers=str(kit.fusers_dir),
        gate=str(registry.gate_path(receiver_fp)) if registry.has_gate(receiver_fp) else None,
        questions=questions,
        links_mbps=dict(zip(devices, DEFAULT_LINKS_MBPS, strict=False)),
        notes={d: str(kit.notes_path(d)) for d in devices},
        rules_only=True,
        mode=mode,
    )


def items_of(questions: Sequence[Question], mode: str = "c2c") -> list[Item]:
    """Questions as pushable items (asked in ``mode``): those carrying personal details go private."""
    return [Item(q.stem, q.options, private=bool(q.pii), answer=q.answer, id=q.id, mode=mode) for q in questions]


# ---- running ------------------------------------------------------------------------------------------------


class _Interrupted(Exception):
    """SIGINT or SIGTERM arrived while the demo's event loop ran."""


async def _until_interrupted(work: Awaitable[T]) -> T:
    """``work``'s result; :class:`_Interrupted` as soon as SIGINT or SIGTERM arrives (``work`` is then cancelled).

    asyncio.run's own Ctrl-C handling cancels the main task once, and nats-py swallows a cancel that lands in a
    publish: the demo then carried on to the last question (seen once in a fresh-clone `.ci/run`). Here the signal
    only sets an event.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum in previous:
        loop.add_signal_handler(signum, stop.set)
    task, stopped = asyncio.ensure_future(work), asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not stop.is_set():
            return task.result()
        task.cancel()
        await asyncio.wait({task}, timeout=DEFAULT_CANCEL_WAIT_S)  # bounded: the cancel may be swallowed too
        raise _Interrupted
    finally:
        stopped.cancel()
        for signum, handler in previous.items():
            loop.remove_signal_handler(signum)
            signal.signal(signum, handler)  # asyncio would leave SIGTERM at its default: killed without cleanup


async def _drive(fed: Federation, setup: Setup, deadline_s: float, concurrency: int, quiet: bool) -> list[Outcome]:
    from tqdm import tqdm

    _say(f"starting {len(fed.procs)} agents (logs in {fed.log_dir}) ...", quiet)
    t0 = time.monotonic()
    await _until_interrupted(fed.wait_ready())
    _say(f"all agents up in {time.monotonic() - t0:.1f} s; pushing {len(setup.questions)} questions", quiet)
    security = fed.store.client_security(ASKER_ID) if fed.store is not None else None
    watch = ReconnectWatch()
    nc = await connect(fed.url, name="ops.demo", security=security, reconnected_cb=watch.on_reconnect)
    try:
        items = items_of(setup.questions, setup.mode)
        with tqdm(total=len(items), desc="questions", unit="q", disable=quiet, file=sys.stderr) as bar:
            return await _until_interrupted(
                push_many(
                    nc,
                    Subjects(fed.prefix),
                    items,
                    deadline_s=deadline_s,
                    concurrency=concurrency,
                    on_done=lambda o: bar.update(),
                    watch=watch,
                )
            )
    finally:
        await close(nc)


def run_demo(
    setup: Setup,
    *,
    deadline_s: float = DEFAULT_DEADLINE_MS / 1000,
    concurrency: int = DEFAULT_CONCURRENCY,
    log_dir: Path | None = None,
    quiet: bool = False,
    insecure: bool = False,
    cluster: bool = False,
) -> list[Outcome]:
    """Server and agents up, questions pushed, everything stopped (also on KeyboardInterrupt)."""
    if cluster:
        from ops.cluster import run_cluster_demo

        return run_cluster_demo(setup, deadline_s, concurrency, log_dir, quiet)
    server, store = secure_server(setup.specs(), insecure)
    fed = Federation(server.url, setup.specs(), log_dir=log_dir, store=store)
    try:
        fed.start()
        try:
            return asyncio.run(_drive(fed, setup, deadline_s, concurrency, quiet))
        except _Interrupted:
            raise KeyboardInterrupt from None  # the caller says so and exits 130
    finally:
        _say("stopping agents ...", quiet)
        statuses = fed.stop()
        server.stop()
        if store is not None:
            shutil.rmtree(store.root, ignore_errors=True)
        unclean = {aid: rc for aid, rc in statuses.items() if rc not in (0, None)}
        if unclean:
            log.warning("agents that did not exit cleanly: %s (logs in %s)", unclean, fed.log_dir)


def secure_server(
    specs: Sequence[AgentSpec],
    insecure: bool = False,
    extra: Sequence[tuple[str, str, str | None]] = (),
    warn: bool = True,
) -> tuple[NatsServer, CredentialStore | None]:
    """A started embedded server with credentials (in a temporary directory) for ``specs``, the asker and ``extra``;
    ``insecure``: no authorization, no TLS (a warning on stderr unless ``warn`` is off: a benchmark's baseline)."""
    if insecure:
        if warn:
            print(INSECURE_WARNING, file=sys.stderr, flush=True)
        return NatsServer().start(), None
    store = CredentialStore(tempfile.mkdtemp(prefix="fedrefine-creds-"))
    store.ensure([*identities_for(specs), ("client", ASKER_ID, None), *extra])
    return store.server().start(), store


def receiver_alone(setup: Setup) -> float | None:
    """Accuracy of the receiver alone on the questions (in process), for comparison."""
    from fusion.models import LanguageModel
    from fusion.refine import refine

    if not setup.questions:
        return None
    model = LanguageModel.load(setup.receiver)
    right = sum(refine(q, model, {}, mode="receiver").correct(q) for q in setup.questions)
    return right / len(setup.questions)


def table(setup: Setup, outcomes: Sequence[Outcome], alone: float | None) -> str:
    """The demo's report."""
    s = summarize(outcomes)
    n_private = sum(o.item.private for o in outcomes)
    alone_n = sum(isinstance(o.reply, Answer) and o.reply.alone for o in outcomes)
    lines = [
        f"FedRefine demo: {setup.name}; {len(setup.transmitters)} transmitters; {s['queries']} questions "
        f"({n_private} private); {setup.mode} mode",
        f"  answered          {s['answered']}/{s['queries']}"
        + (f"   errors {s['errors']}" if s["errors"] else "")
        + (f"   ({alone_n} alone: the receiver knew, nobody was asked)" if alone_n else ""),
        f"  accuracy          {_fmt(s['accuracy'])}"
        + (f"   (receiver alone: {alone:.3f})" if alone is not None else ""),
        f"  latency           p50 {_fmt(s['latency_p50_ms'])} ms   p95 {_fmt(s['latency_p95_ms'])} ms",
        f"  KV bytes / query  {s['bytes_per_query']:,}",
        "",
        f"  {'transmitter':<18} {'model':<14} {'link':>9} {'used':>5} {'KV bytes':>11}  not used (reason: count)",
    ]
    reasons: dict[str, Counter[str]] = {t: Counter() for t in setup.transmitters}
    nbytes: Counter[str] = Counter()
    for o in outcomes:
        if isinstance(o.reply, Answer):
            for u in o.reply.used:
                nbytes[u.transmitter_id] += u.bytes
            for m in o.reply.omitted:
                reasons.setdefault(m.transmitter_id, Counter())[m.reason] += 1
    for tid, model in setup.transmitters.items():
        link = setup.links_mbps.get(tid)
        why = ", ".join(f"{r}: {c}" for r, c in sorted(reasons[tid].items())) or "-"
        lines.append(
            f"  {tid:<18} {Path(model).name[:14]:<14} {(f'{link:g} MB/s' if link else 'LAN'):>9} "
            f"{s['used'].get(tid, 0):>5} {nbytes[tid]:>11,}  {why}"
        )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) and value <= 1 else f"{value}"


def _say(text: str, quiet: bool) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)


# ---- the command --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The demo's flags."""
    p = OneLineParser(prog="python -m ops.demo", description=__doc__.splitlines()[0])
    which = p.add_mutually_exclusive_group()
    which.add_argument("--full", action="store_true", help="build (if needed) and use the full zoo")
    which.add_argument("--quick", action="store_true", help="use the quick zoo even if the full one is built")
    which.add_argument("--tiny", action="store_true", help="tiny random models: a smoke run in seconds")
    which.add_argument("--real", action="store_true", help="the real pretrained pair (make real; the kit builds once)")
    p.add_argument("--receiver-model", default="smollm2", help="--real: the receiver (smollm2 or gemma3)")
    p.add_argument(
        "--mode",
        choices=("c2c", "translate"),
        default=None,
        help="--real: translate (the devices' notes' caches, translated; the default) or c2c (fusers on q' caches: "
        "`python -m ops.real build --c2c` first)",
    )
    p.add_argument("--questions", type=int, default=DEFAULT_QUESTIONS, help="how many test questions to push")
    p.add_argument("--deadline-ms", type=int, default=DEFAULT_DEADLINE_MS, help="per-question deadline")
    p.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help=f"questions in flight at once (default {DEFAULT_CONCURRENCY}; --real {DEFAULT_REAL_CONCURRENCY})",
    )
    p.add_argument("--log-dir", type=Path, default=None, help="where the agents' logs go (default: a temp dir)")
    p.add_argument("-q", "--quiet", action="store_true", help="only the final table")
    p.add_argument("--insecure", action="store_true", help="no authorization, no TLS (prints a warning)")
    p.add_argument(
        "--cluster", action="store_true", help="3 servers, a leaf node per transmitter, two gates and two rephrasers"
    )
    return p


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the demo like Ctrl-C: agents drain and leave


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ops.demo``: 0 every question answered, 1 some not, 2 bad input, 130 interrupted."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        args.mode = asked_mode(args.mode, args.real)
        if args.concurrency is None:
            args.concurrency = DEFAULT_REAL_CONCURRENCY if args.real else DEFAULT_CONCURRENCY
        if args.questions < 1 or args.deadline_ms < 1 or args.concurrency < 1:
            raise ConfigError("--questions, --deadline-ms and --concurrency must be positive")
        if args.cluster and args.insecure:
            raise ConfigError("--cluster runs secure only (leaf nodes log in with their own identities)")
        if args.tiny:
            setup = tiny_setup(Path(tempfile.mkdtemp(prefix="fedrefine-tiny-")), args.questions)
        elif args.real:
            setup = real_setup(args.receiver_model, args.questions, mode=args.mode)
        else:
            setup = zoo_setup(True if args.full else False if args.quick else None, args.questions)
        if args.mode != "c2c" and not args.real:
            raise ConfigError("--mode translate needs --real (translators are for pretrained models)")
        setup.mode = args.mode
        alone = None if args.tiny else receiver_alone(setup)
        outcomes = run_demo(
            setup,
            deadline_s=args.deadline_ms / 1000,
            concurrency=args.concurrency,
            log_dir=args.log_dir,
            quiet=args.quiet,
            insecure=args.insecure,
            cluster=args.cluster,
        )
    except FedRefineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; every agent and the server were stopped", file=sys.stderr)
        return 130
    print(
        table(setup, outcomes, alone)
        + ("\n  (on a 3-server cluster, each transmitter on its own leaf node)" if args.cluster else "")
    )
    return 0 if all(o.answered for o in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
