"""Build a zoo: world, questions, tokenizers, then train every model (two processes at a time) and check them.

The result lives in ``<cache>/zoo/<spec hash>/`` (see ``manifest.py``) and is reused when present. A
file lock makes concurrent builders (two test sessions, say) wait for one another instead of racing.
After the models, ``POST_BUILD_STEPS`` run in order (e.g. fuser and gate training): each is a dotted
``"module:function"`` called as ``function(zoo)``; it is recorded in the manifest once done, so adding
a step to an existing zoo runs only that step.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import json
import logging
import multiprocessing
import resource
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from bus.errors import ConfigError, FedRefineError
from ops.zoo.manifest import (
    MANIFEST_FILE,
    TEST_QUESTIONS,
    TRAIN_QUESTIONS,
    WORLD_FILE,
    Manifest,
    ModelEntry,
    zoo_dir,
)
from ops.zoo.spec import FORMAT_VERSION, ZooSpec, zoo_spec
from ops.zoo.world import World, assign_knowledge, generate_world, question_set, save_questions

if TYPE_CHECKING:
    from ops.zoo.zoo import Zoo

log = logging.getLogger(__name__)

DEFAULT_WORKERS = 2  # training processes at a time (one torch thread each)
# Steps run after the language models are trained, in order: "package.module:function", called with the Zoo.
POST_BUILD_STEPS: tuple[str, ...] = ("ops.zoo.fusers:zoo_step",)  # fusers for every pair, then the gate
TRAIN_RECORD = "train.json"  # in each model directory: how it was trained and its member key


def knowledge(spec: ZooSpec, world: World) -> dict[str, tuple[str, ...]]:
    """Fact ids each member knows (receiver drawn independently; transmitters partition, plus overlap)."""
    shares = {("@" if m.role == "receiver" else "") + m.name: m.share for m in spec.members}
    return assign_knowledge(world, shares, spec.overlap, spec.seed)


def _train_one(spec_json: str, name: str, out_dir: str, position: int) -> dict:
    """Child-process entry: rebuild world and tokenizer (cheap, deterministic), train one member."""
    from ops.zoo.tokenizers import train_tokenizer
    from ops.zoo.train_lm import train_member

    spec = ZooSpec.model_validate_json(spec_json)
    member = spec.member(name)
    world = generate_world(spec.world)
    known = list(knowledge(spec, world)[name])
    tokenizer = train_tokenizer(world, member.vocab_size)
    seed = spec.seed * 1000 + [m.name for m in spec.members].index(name)
    result = train_member(member, world, known, tokenizer, Path(out_dir), seed=seed, position=position)
    return {
        "seconds": result.seconds,
        "final_loss": result.final_loss,
        "steps": result.steps,
        "topups": result.topups,
        "restarts": result.restarts,
    }


def member_key(spec: ZooSpec, name: str) -> str:
    """A hash of everything that decides how member ``name`` is trained: the world, every member's share (they
    decide who knows what), its own spec and seed, and the format version. Equal keys give the same model."""
    blob = {
        "format": FORMAT_VERSION,
        "seed": spec.seed,
        "world": spec.world.model_dump(mode="json"),
        "overlap": spec.overlap,
        "shares": [(m.name, m.role, m.share) for m in spec.members],
        "member": spec.member(name).model_dump(mode="json"),
        "index": [m.name for m in spec.members].index(name),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _reusable(spec: ZooSpec, name: str, cache: Path) -> tuple[Path, dict] | None:
    """A model of the same member key trained by an earlier build in ``cache`` (any zoo), and its training record."""
    key = member_key(spec, name)
    for record in sorted(cache.glob(f"*/models/{name}/{TRAIN_RECORD}")):
        try:
            got = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        if got.get("member_key") == key and not record.parent.parent.parent.name.endswith(".building"):
            return record.parent, got
    return None


def _train_all(spec: ZooSpec, models_dir: Path, workers: int) -> dict[str, dict]:
    """Train every member, longest jobs first, ``workers`` processes at a time; a member another zoo already
    trained with the same :func:`member_key` is copied instead (``reused`` in its result)."""
    results: dict[str, dict] = {}
    todo = []
    for m in spec.members:
        found = _reusable(spec, m.name, models_dir.parent.parent)
        if found is None:
            todo.append(m)
            continue
        shutil.copytree(found[0], models_dir / m.name)
        results[m.name] = {**found[1], "reused": True}
        log.info("%s: reusing the model trained in %s (same member key)", m.name, found[0])
    order = sorted(todo, key=lambda m: -m.train.steps * m.shape.hidden_size * m.shape.num_layers)
    if workers <= 1:
        for m in order:
            results[m.name] = _train_one(spec.model_dump_json(), m.name, str(models_dir / m.name), 0)
        return results
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = {
            m.name: pool.submit(_train_one, spec.model_dump_json(), m.name, str(models_dir / m.name), i % workers)
            for i, m in enumerate(order)
        }
        for name, fut in futures.items():
            results[name] = fut.result()
    return results


def _record_training(spec: ZooSpec, models_dir: Path, trained: dict[str, dict]) -> None:
    for name, result in trained.items():
        record = {k: v for k, v in result.items() if k != "reused"}
        (models_dir / name / TRAIN_RECORD).write_text(json.dumps({**record, "member_key": member_key(spec, name)}))


def _check(spec: ZooSpec, world: World, root: Path, know: dict[str, tuple[str, ...]]) -> dict[str, dict]:
    """Measure every model right after training (all questions, both splits) and log a table."""
    from fusion.models import LanguageModel
    from ops.zoo.evaluate import evaluate_questions

    questions = question_set(world, "train") + question_set(world, "test")
    out = {}
    for m in spec.members:
        lm = LanguageModel.load(root / "models" / m.name, device="cpu")
        out[m.name] = evaluate_questions(lm, questions, set(know[m.name]), world)
    return out


def format_check_table(check: dict[str, dict]) -> str:
    """The post-build check as a text table."""
    cols = ("acc_known", "acc_unknown", "acc_with_hint", "p_none_known", "p_none_unknown")
    lines = [f"{'model':<16}" + "".join(f"{c:>16}" for c in cols)]
    for name, r in check.items():
        cells = "".join(f"{'-' if r.get(c) is None else format(r[c], '.3f'):>16}" for c in cols)
        lines.append(f"{name:<16}{cells}")
    return "\n".join(lines)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_manifest(root: Path) -> Manifest | None:
    """The manifest in ``root``, or None if there is no complete zoo there."""
    path = root / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        return Manifest.model_validate_json(path.read_text())
    except ValueError:
        log.warning("ignoring unreadable manifest %s", path)
        return None


def _write_manifest(root: Path, manifest: Manifest) -> None:
    tmp = root / (MANIFEST_FILE + ".tmp")
    tmp.write_text(manifest.model_dump_json(indent=2))
    tmp.replace(root / MANIFEST_FILE)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the build's machine-independent cost)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _build_models(spec: ZooSpec, root: Path, workers: int, echo: Callable[[str], None]) -> Manifest:
    from fusion.models import LanguageModel

    start, cpu_start = time.perf_counter(), _cpu_seconds()
    staging = root.with_name(root.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "models").mkdir(parents=True)
    world = generate_world(spec.world)
    (staging / WORLD_FILE).write_text(world.model_dump_json(indent=1))
    save_questions(staging / TRAIN_QUESTIONS, question_set(world, "train"))
    save_questions(staging / TEST_QUESTIONS, question_set(world, "test"))
    know = knowledge(spec, world)
    echo(f"building zoo {spec.name!r} ({spec.key()}): {len(world.facts)} facts, {len(spec.members)} models")
    trained = _train_all(spec, staging / "models", workers)
    _record_training(spec, staging / "models", trained)
    check = _check(spec, world, staging, know)
    entries = []
    for m in spec.members:
        lm = LanguageModel.load(staging / "models" / m.name, device="cpu")
        entries.append(
            ModelEntry(
                name=m.name,
                role=m.role,
                arch=m.arch,
                params=lm.num_params,
                tokenizer_vocab=len(lm.tokenizer),
                num_layers=lm.num_layers,
                path=f"models/{m.name}",
                fingerprint=lm.fingerprint,
                known=know[m.name],
                train_seconds=round(trained[m.name]["seconds"], 1),
                train_steps=trained[m.name]["steps"],
                final_loss=round(trained[m.name]["final_loss"], 4),
                topups=trained[m.name]["topups"],
                restarts=trained[m.name]["restarts"],
                reused=trained[m.name].get("reused", False),
            )
        )
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        key=spec.key(),
        spec=spec,
        models=tuple(entries),
        splits={"train": world.train_fact_ids, "test": world.test_fact_ids},
        check=check,
        build_seconds=round(time.perf_counter() - start, 1),
        cpu_seconds=round(_cpu_seconds() - cpu_start, 1),
    )
    _write_manifest(staging, manifest)
    shutil.rmtree(root, ignore_errors=True)
    staging.replace(root)
    echo(format_check_table(check))
    reused = [e.name for e in entries if e.reused]
    also = f", reusing {', '.join(reused)} from an earlier build" if reused else ""
    echo(f"zoo built in {manifest.build_seconds:.0f} s ({manifest.cpu_seconds:.0f} CPU s) at {root}{also}")
    return manifest


def _run_post_build_steps(root: Path, manifest: Manifest, echo: Callable[[str], None]) -> Manifest:
    from ops.zoo.zoo import Zoo

    for step in POST_BUILD_STEPS:
        if step in manifest.steps_done:
            continue
        module_name, _, func_name = step.partition(":")
        try:
            func = getattr(importlib.import_module(module_name), func_name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"post-build step {step!r} cannot be imported: {exc}", step=step) from exc
        echo(f"post-build step {step}")
        func(Zoo(root, manifest))
        manifest = manifest.model_copy(update={"steps_done": (*manifest.steps_done, step)})
        _write_manifest(root, manifest)
    return manifest


def build_zoo(
    spec: ZooSpec, force: bool = False, workers: int = DEFAULT_WORKERS, echo: Callable[[str], None] = log.info
) -> Path:
    """Build (or reuse) the zoo of ``spec``; returns its directory. ``force`` rebuilds from scratch."""
    root = zoo_dir(spec)
    with _locked(root.with_name(root.name + ".lock")):
        manifest = None if force else read_manifest(root)
        if manifest is None:
            try:
                manifest = _build_models(spec, root, workers, echo)
            except FedRefineError:
                raise
            except (OSError, RuntimeError, ValueError) as exc:
                raise ConfigError(f"zoo build failed: {exc}") from exc
        else:
            echo(f"zoo {spec.name!r} ({spec.key()}) found at {root}")
        _run_post_build_steps(root, manifest, echo)
    return root


def manifest_summary(manifest: Manifest) -> str:
    """A short human-readable description of a zoo (for ``python -m ops.zoo info``)."""
    lines = [
        f"zoo {manifest.spec.name!r} key {manifest.key} (format {manifest.format_version}), "
        f"built in {manifest.build_seconds:.0f} s ({manifest.cpu_seconds:.0f} CPU s)",
        f"facts: {len(manifest.splits['train'])} train-pool, {len(manifest.splits['test'])} held out",
        f"{'model':<16}{'role':<13}{'arch':<7}{'params':>9}{'vocab':>7}{'layers':>7}{'known':>7}  fingerprint",
    ]
    for m in manifest.models:
        lines.append(
            f"{m.name:<16}{m.role:<13}{m.arch:<7}{m.params:>9}{m.tokenizer_vocab:>7}{m.num_layers:>7}"
            f"{len(m.known):>7}  {m.fingerprint}"
        )
    lines.append(format_check_table(manifest.check))
    if manifest.steps_done:
        lines.append("post-build steps done: " + ", ".join(manifest.steps_done))
    return "\n".join(lines)


def manifest_json(manifest: Manifest) -> str:
    """The manifest as pretty JSON."""
    return json.dumps(manifest.model_dump(mode="json"), indent=2)


def load_zoo(quick: bool, seed: int = 0, build_if_missing: bool = True, workers: int | None = None) -> Zoo:
    """The quick or full zoo for ``seed``, built first if missing (and ``build_if_missing``)."""
    from ops.zoo.zoo import Zoo

    spec = zoo_spec(quick, seed)
    root = zoo_dir(spec)
    manifest = read_manifest(root)
    if manifest is None or not _steps_complete(manifest):
        if not build_if_missing:
            raise ConfigError(
                f"no {spec.name} zoo for seed {seed} at {root}; run `python -m ops.zoo build"
                f"{' --quick' if quick else ''} --seed {seed}`",
                path=str(root),
            )
        build_zoo(spec, workers=workers or DEFAULT_WORKERS)
        manifest = read_manifest(root)
    if manifest is None:
        raise ConfigError(f"the zoo at {root} has no readable manifest after building", path=str(root))
    return Zoo(root, manifest)


def _steps_complete(manifest: Manifest) -> bool:
    return all(step in manifest.steps_done for step in POST_BUILD_STEPS)
