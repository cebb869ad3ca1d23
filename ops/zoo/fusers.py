"""Post-build step of the zoo: a fuser per transmitter -> receiver pair, one reverse pair, and the gating network.

Training questions come only from the *train* pool of facts (held-out facts are never seen by a fuser or
the gate). Per pair (TOYWORLD lessons 1-2): letter questions about the facts the transmitter knows, plus
"keep-targets" questions about the facts the receiver knows, both answered with the true letter; a share
of them in the private format (the transmitter reads q', a paraphrase or a rule redaction; the receiver
then reads q). The gate trains on questions about facts some model knows, with the fusers frozen.
Everything lands in a ``FuserRegistry`` under the zoo directory, keyed by model fingerprints.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bus.errors import FuserError
from fusion.gate import GateNetwork, load_gate, save_gate
from fusion.gate_train import GateTrainConfig, prepare_gate_examples, train_gate
from fusion.models import LanguageModel
from fusion.prompts import Question
from fusion.registry import FuserRegistry
from fusion.train import KEEP_OWN, FuserTrainConfig, FusionItem, fused_accuracy, prepare_examples, train_fuser
from ops.zoo.world import World, make_question, paraphrase
from privacy.redact import redact

log = logging.getLogger(__name__)

FUSERS_DIR = "fusers"  # under the zoo directory
DEFAULT_FUSION_WORKERS = 2  # pair fusers trained at a time (one process and one torch thread each)
SUMMARY_FILE = "fusion.json"


@dataclass(frozen=True)
class FusionBuildSpec:
    """How the zoo's fusers and gate are trained."""

    fuser: FuserTrainConfig
    gate: GateTrainConfig
    questions_per_fact: int = 4  # fresh questions (phrasing, option order, letter) per training fact
    gate_questions_per_fact: int = 2
    private_fraction: float = 0.3  # share of training questions in the private format
    mismatch_fraction: float = 0.0  # extra items whose transmitter cache is of another question (target: keep own)
    keep_boost: int = 2  # questions per fact on facts only the receiver knows, relative to questions_per_fact
    unknown_fraction: float = 0.5  # share of the facts neither model knows used as "leave it alone" items
    # Items where the transmitter reads a fact in context (a random value of a fact neither model knows) and the
    # receiver must answer it, as many as this times all the other items. Values drawn
    # afresh per item, so the fuser cannot memorise them: it has to carry the transmitter's answer over.
    context_fraction: float = 0.0
    reverse: tuple[str, ...] = ("t1-llama",)  # transmitters that also get a fuser *from* the receiver (Co-C2C)
    # Share of the train-pool facts no fuser trains on, kept for the gate: it then learns how the fusers behave on
    # facts they never saw (as at test time) rather than on facts they fit. 0: the gate uses the whole pool.
    gate_holdout: float = 0.0
    seed: int = 0


def fusion_spec(quick: bool, seed: int = 0) -> FusionBuildSpec:
    """Full: hidden 128, 600 steps (TOYWORLD), lr 3e-3, window 1, a quarter of the facts for the gate only (see below).
    Quick: a smoke-sized version for tests."""
    if quick:
        return FusionBuildSpec(  # small enough that the test suite's first run trains it in about a minute
            fuser=FuserTrainConfig(
                steps=150, lr=2e-3, hidden=64, batch_size=16, window=1, confidence_weighting=True, seed=seed
            ),
            gate=GateTrainConfig(steps=100, batch_size=16, seed=seed),
            questions_per_fact=3,
            context_fraction=0.5,
            seed=seed,
        )
    # context_fraction 1.0: measured on t3-qwen3 -> receiver (600 steps), accuracy on facts the transmitter knows and
    # the fuser never saw went from 0.19 to 0.57 (train-pool facts held out) and 0.37 -> 0.38 on the test facts.
    # window 1 (fuse only the receiver's last prefix token, the one anchored on the transmitter's final token), lr 3e-3
    # and confidence weighting: measured on t2-qwen2 -> receiver (test facts, zoo be7858b1c19f), gain on facts only the
    # transmitter knows 0.54 -> 0.89 (prior-weighted, as at inference) and the receiver's own facts kept 0.69 -> 0.72;
    # fusing every token let the fuser memorise training facts (fresh questions on them: 0.71) instead of reading them.
    return FusionBuildSpec(
        fuser=FuserTrainConfig(steps=600, lr=3e-3, hidden=128, window=1, confidence_weighting=True, seed=seed),
        gate=GateTrainConfig(steps=300, seed=seed),
        context_fraction=1.0,
        gate_holdout=0.25,
        gate_questions_per_fact=6,
        seed=seed,
    )


def private_stem(question: Question, rng: random.Random) -> str:
    """A q' for training: the paraphrase the receiver's rephraser learned, or the rule redaction (its fallback)."""
    if rng.random() < 0.5:
        return paraphrase(question.entity, question.attribute, question.phrasing)
    return " ".join(redact(question.stem).text.split())


def gate_facts(world: World, spec: FusionBuildSpec) -> set[str]:
    """The train-pool facts held out from every fuser for the gate (``spec.gate_holdout`` of them, seeded)."""
    pool = sorted(world.train_fact_ids)
    return set(random.Random(f"gate-holdout/{spec.seed}").sample(pool, round(spec.gate_holdout * len(pool))))


def fuser_facts(world: World, spec: FusionBuildSpec) -> set[str]:
    """The train-pool facts the fusers train on (all of them unless some are held out for the gate)."""
    return set(world.train_fact_ids) - gate_facts(world, spec)


def _questions(world: World, fact_ids: Sequence[str], per_fact: int, tag: str, rng: random.Random) -> list[Question]:
    return [
        make_question(world, fact, rng, f"{tag}-{fact.id}-{j}")
        for fact in world.facts_of(sorted(fact_ids))
        for j in range(per_fact)
    ]


def _items(
    world: World,
    fact_ids: Sequence[str],
    per_fact: int,
    private_fraction: float,
    tag: str,
    seed: int,
    keep_own: bool = False,
) -> list[FusionItem]:
    rng = random.Random(f"fusion-items/{tag}/{seed}")
    items = []
    for q in _questions(world, fact_ids, per_fact, tag, rng):
        shared = private_stem(q, rng) if rng.random() < private_fraction else None
        items.append(FusionItem(q.stem, tuple(q.options), KEEP_OWN if keep_own else q.answer, shared_stem=shared))
    rng.shuffle(items)
    return items


def mismatch_items(world: World, receiver_known: set[str], count: int, tag: str, seed: int) -> list[FusionItem]:
    """Items whose transmitter reads another question: the fuser must then leave the receiver's answer alone."""
    rng = random.Random(f"fusion-mismatch/{tag}/{seed}")
    pool = _questions(world, world.train_fact_ids, 1, f"{tag}-mis", rng)
    items = []
    for _ in range(count):
        q, donor = rng.sample(pool, 2)
        target = q.answer if q.fact_id in receiver_known else KEEP_OWN
        items.append(FusionItem(q.stem, tuple(q.options), target, donor=(donor.stem, tuple(donor.options))))
    return items


def pair_items(
    world: World, receiver_known: set[str], transmitter_known: set[str], spec: FusionBuildSpec, tag: str
) -> list[FusionItem]:
    """Training items of one pair, all on train-pool facts.

    Facts the transmitter knows (true letter); facts only the receiver knows, ``keep_boost`` times as many
    questions (keep-targets: its own true letter); facts neither knows (the receiver's own answer, so a
    transmitter saying "I don't know" leaves it alone); and optionally mismatched caches.
    """
    train = fuser_facts(world, spec)
    t_known, r_only = train & set(transmitter_known), (train & set(receiver_known)) - set(transmitter_known)
    neither = sorted(train - set(transmitter_known) - set(receiver_known))
    per, frac, seed = spec.questions_per_fact, spec.private_fraction, spec.seed
    items = _items(world, sorted(t_known), per, frac, f"{tag}/t", seed)
    items += _items(world, sorted(r_only), per * spec.keep_boost, frac, f"{tag}/r", seed)
    rng = random.Random(f"fusion-neither/{tag}/{seed}")
    picked = rng.sample(neither, round(spec.unknown_fraction * len(neither)))
    items += _items(world, picked, max(per // 2, 1), frac, f"{tag}/n", seed, keep_own=True)
    n_context = round(spec.context_fraction * len(items))
    items += mismatch_items(world, receiver_known, round(spec.mismatch_fraction * len(items)), tag, seed)
    items += context_items(world, receiver_known, transmitter_known, n_context, frac, tag, seed, facts=train)
    return items


def context_items(
    world: World,
    receiver_known: set[str],
    transmitter_known: set[str],
    count: int,
    private_fraction: float,
    tag: str,
    seed: int,
    facts: set[str] | None = None,
) -> list[FusionItem]:
    """``count`` items on train-pool facts (or on ``facts``) neither model knows, each with a random value the
    transmitter reads in context (``FusionItem.context``); the target is that value's letter."""
    rng = random.Random(f"fusion-context/{tag}/{seed}")
    train = set(world.train_fact_ids) if facts is None else facts
    pool = world.facts_of(sorted(train - set(receiver_known) - set(transmitter_known)))
    items: list[FusionItem] = []
    for i in range(count if pool else 0):
        fact = rng.choice(pool)
        told = fact.model_copy(update={"value": rng.choice(world.attributes[fact.attribute])})
        q = make_question(world, told, rng, f"{tag}-ctx-{i}")
        shared = private_stem(q, rng) if rng.random() < private_fraction else None
        items.append(FusionItem(q.stem, tuple(q.options), q.answer, shared_stem=shared, context=told.sentence(0)))
    return items


def gate_items(world: World, known: Mapping[str, set[str]], spec: FusionBuildSpec) -> list[FusionItem]:
    """Gate training items: train-pool facts at least one model knows (only the held-out ones, if any are)."""
    held = gate_facts(world, spec)
    pool = (held or set(world.train_fact_ids)) & set().union(*known.values())
    return _items(world, sorted(pool), spec.gate_questions_per_fact, spec.private_fraction, "gate", spec.seed + 1)


def heldout_items(questions: Sequence[Question], keep: set[str]) -> list[FusionItem]:
    """Test questions about the facts in ``keep``, as plain-format items (for evaluation only)."""
    return [FusionItem(q.stem, tuple(q.options), q.answer) for q in questions if q.fact_id in keep]


@dataclass
class FusionKit:
    """A receiver, its transmitters, their fusers (by transmitter fingerprint) and the gate, ready for refine()."""

    receiver_name: str
    receiver: LanguageModel
    transmitters: dict[str, LanguageModel]  # zoo order: strongest first, the weak one last
    fusers: dict[str, object] = field(default_factory=dict)
    gate: GateNetwork | None = None
    registry: FuserRegistry | None = None


def _pair_report(receiver, transmitter, fuser, test_questions, known_r, known_t) -> dict:
    gain = prepare_examples(receiver, transmitter, heldout_items(test_questions, known_t - known_r))
    keep = prepare_examples(receiver, transmitter, heldout_items(test_questions, known_r))
    return {
        "heldout_t_knows_r_not": {
            "n": len(gain),
            "receiver": round(fused_accuracy(receiver, None, gain), 4),
            "fused": round(fused_accuracy(receiver, fuser, gain), 4),
            "fused_prior_weighted": round(fused_accuracy(receiver, fuser, gain, weighted=True), 4),
        },
        "heldout_r_knows": {
            "n": len(keep),
            "receiver": round(fused_accuracy(receiver, None, keep), 4),
            "fused": round(fused_accuracy(receiver, fuser, keep), 4),
            "fused_prior_weighted": round(fused_accuracy(receiver, fuser, keep, weighted=True), 4),
        },
    }


def train_pair(
    world: World,
    models: Mapping[str, LanguageModel],
    known: Mapping[str, set[str]],
    test_questions: Sequence[Question],
    out_dir: Path,
    spec: FusionBuildSpec,
    t_name: str,
    r_name: str,
    progress: bool = True,
) -> dict:
    """Train (or resume) the ``t_name -> r_name`` fuser, evaluate it on held-out questions, save it; its meta."""
    torch.manual_seed(spec.seed)
    t_model, r_model = models[t_name], models[r_name]
    t0 = time.perf_counter()
    items = pair_items(world, known[r_name], known[t_name], spec, f"{t_name}->{r_name}")
    ckpt = out_dir / "checkpoints" / f"{t_name}-to-{r_name}.ckpt"
    res = train_fuser(r_model, t_model, items, spec.fuser, checkpoint=ckpt, progress=progress)
    report = _pair_report(r_model, t_model, res.fuser, test_questions, known[r_name], known[t_name])
    meta = {**res.meta(), "transmitter_name": t_name, "receiver_name": r_name, "eval": report}
    meta["seconds_total"] = round(time.perf_counter() - t0, 1)
    FuserRegistry(out_dir).save(res.fuser, t_model.fingerprint, r_model.fingerprint, meta)
    log.info("fuser %s -> %s: %s", t_name, r_name, report)
    return meta


def _pair_in_child(zoo_root: str, spec: FusionBuildSpec, t_name: str, r_name: str) -> dict:
    """Process-pool entry: open the zoo again and train one pair (one torch thread)."""
    torch.set_num_threads(1)
    zoo = open_zoo(zoo_root)
    models = zoo_models(zoo)
    known = {name: set(zoo.known(name)) for name in models}
    out = zoo.root / FUSERS_DIR
    return train_pair(zoo.world, models, known, zoo.questions("test"), out, spec, t_name, r_name, progress=False)


def build_fusion(
    world: World,
    models: Mapping[str, LanguageModel],
    receiver_name: str,
    known: Mapping[str, set[str]],
    test_questions: Sequence[Question],
    out_dir: str | Path,
    spec: FusionBuildSpec,
    progress: bool = True,
    zoo_root: str | Path | None = None,
    workers: int = 1,
) -> dict:
    """Train every pair fuser, the reverse pairs and the gate into ``out_dir`` (resumable); return a summary.

    With ``zoo_root`` and ``workers`` > 1 the pairs train in that many processes (each opens the zoo itself).
    """
    torch.manual_seed(spec.seed)
    out_dir = Path(out_dir)
    registry = FuserRegistry(out_dir)
    receiver = models[receiver_name]
    names = [n for n in models if n != receiver_name]
    summary: dict = {"spec": asdict(spec), "pairs": {}, "reverse": {}}
    pairs = [(t, receiver_name) for t in names] + [(receiver_name, t) for t in spec.reverse if t in models]
    if zoo_root is not None and workers > 1:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            jobs = {pair: pool.submit(_pair_in_child, str(zoo_root), spec, *pair) for pair in pairs}
            metas = {pair: job.result() for pair, job in jobs.items()}
    else:
        metas = {p: train_pair(world, models, known, test_questions, out_dir, spec, *p, progress) for p in pairs}
    for (t_name, r_name), meta in metas.items():
        (summary["pairs"] if r_name == receiver_name else summary["reverse"])[f"{t_name}->{r_name}"] = meta
    fusers = {n: registry.load(models[n].fingerprint, receiver.fingerprint) for n in names}
    t0 = time.perf_counter()
    g_items = gate_items(world, known, spec)
    transmitters = {n: models[n] for n in names}
    examples = prepare_gate_examples(receiver, transmitters, fusers, g_items, progress=progress)
    trained = train_gate(receiver, examples, [fusers[n] for n in names], spec.gate, progress=progress)
    save_gate(trained.gate, registry.gate_path(receiver.fingerprint), receiver.fingerprint, {"steps": spec.gate.steps})
    summary["gate"] = {
        "examples": len(examples),
        "loss_first": round(sum(trained.losses[:20]) / max(len(trained.losses[:20]), 1), 4),
        "loss_last": round(sum(trained.losses[-20:]) / max(len(trained.losses[-20:]), 1), 4),
        "profiles": {n: list(trained.gate.profiles[models[n].fingerprint]) for n in names},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def load_fusion(models: Mapping[str, LanguageModel], receiver_name: str, out_dir: str | Path) -> FusionKit:
    """The receiver, transmitters, fusers and gate saved by ``build_fusion`` (``FuserError`` if any is missing)."""
    registry = FuserRegistry(out_dir)
    receiver = models[receiver_name]
    transmitters = {n: m for n, m in models.items() if n != receiver_name}
    fusers = {m.fingerprint: registry.load(m.fingerprint, receiver.fingerprint) for m in transmitters.values()}
    gate = load_gate(registry.gate_path(receiver.fingerprint), receiver.fingerprint)
    return FusionKit(receiver_name, receiver, transmitters, fusers, gate, registry)


def open_zoo(root: str | Path):
    """A built zoo from its directory (any spec), e.g. to benchmark an older build."""
    from bus.errors import ConfigError
    from ops.zoo.build import read_manifest
    from ops.zoo.zoo import Zoo

    manifest = read_manifest(Path(root))
    if manifest is None:
        raise ConfigError(f"no built zoo at {root} (no readable manifest.json)", path=str(root))
    return Zoo(Path(root), manifest)


def zoo_models(zoo) -> dict[str, LanguageModel]:
    """Every model of a built zoo, receiver first, transmitters in zoo order."""
    return {name: zoo.model(name) for name in [zoo.receiver, *zoo.transmitters]}


def zoo_fusion_spec(zoo) -> FusionBuildSpec:
    """The fusion settings this code uses for ``zoo``."""
    return fusion_spec(zoo.manifest.spec.name == "quick", zoo.manifest.spec.seed)


def trained_with(zoo) -> dict | None:
    """The fusion settings the zoo's fusers were trained with (None if they were not, or the summary is unreadable)."""
    try:
        return json.loads((zoo.root / FUSERS_DIR / SUMMARY_FILE).read_text())["spec"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def zoo_step(zoo) -> dict:
    """The zoo's post-build step (``ops.zoo.build.POST_BUILD_STEPS``): train fusers and the gate for ``zoo``."""
    torch.set_num_threads(1)
    spec = zoo_fusion_spec(zoo)
    models = zoo_models(zoo)
    known = {name: set(zoo.known(name)) for name in models}
    out = zoo.root / FUSERS_DIR
    workers = min(DEFAULT_FUSION_WORKERS, os.cpu_count() or 1)
    return build_fusion(
        zoo.world, models, zoo.receiver, known, zoo.questions("test"), out, spec, zoo_root=zoo.root, workers=workers
    )


def load_zoo_fusion(zoo, train_if_missing: bool = True) -> FusionKit:
    """The zoo's receiver, transmitters, fusers and gate for ``fusion.refine.refine`` (trained once if missing)."""
    current = json.loads(json.dumps(asdict(zoo_fusion_spec(zoo))))
    stale = trained_with(zoo) not in (None, current)
    if not stale:
        try:
            return load_fusion(zoo_models(zoo), zoo.receiver, zoo.root / FUSERS_DIR)
        except FuserError:
            if not train_if_missing:
                raise
    elif not train_if_missing:
        raise FuserError(f"the fusers in {zoo.root} were trained with other settings; retrain them")
    log.warning("%s fusers in %s: training them (once)", "stale" if stale else "no", zoo.root)
    zoo_step(zoo)
    return load_fusion(zoo_models(zoo), zoo.receiver, zoo.root / FUSERS_DIR)
