"""A built zoo as a Python object: manifest, world, questions, and its models loaded on demand."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from bus.errors import ConfigError, ModelError
from fusion.models import LanguageModel
from fusion.prompts import Question
from ops.zoo.manifest import TEST_QUESTIONS, TRAIN_QUESTIONS, WORLD_FILE, Manifest, ModelEntry


class Zoo:
    """One built zoo on disk. ``zoo.model(name)`` loads a model; ``zoo.questions("test")`` the held-out set."""

    def __init__(self, root: Path, manifest: Manifest) -> None:
        self.root = Path(root)
        self.manifest = manifest

    def __repr__(self) -> str:
        return f"Zoo({self.manifest.spec.name!r}, key={self.manifest.key}, models={self.names})"

    @property
    def names(self) -> list[str]:
        """Model names, receiver first."""
        return [m.name for m in self.manifest.models]

    @property
    def receiver(self) -> str:
        """The receiver's name."""
        return next(m.name for m in self.manifest.models if m.role == "receiver")

    @property
    def transmitters(self) -> list[str]:
        """The transmitters' names."""
        return [m.name for m in self.manifest.models if m.role == "transmitter"]

    @property
    def self_check(self) -> float | None:
        """The receiver's self-check threshold (``fusion.refine``): ``DEFAULT_SELF_CHECK`` when it was trained to
        answer " none" on facts it does not know, else None (its P(none) would say nothing)."""
        from fusion.refine import DEFAULT_SELF_CHECK

        return DEFAULT_SELF_CHECK if self.manifest.spec.receiver.train.mixture.get("none", 0) > 0 else None

    def entry(self, name: str) -> ModelEntry:
        """The manifest entry of model ``name``."""
        for m in self.manifest.models:
            if m.name == name:
                return m
        raise ModelError(f"no model {name!r} in this zoo; it has {self.names}", name=name)

    def path(self, name: str) -> Path:
        """The checkpoint directory of model ``name`` (loadable with ``LanguageModel.load``)."""
        return self.root / self.entry(name).path

    def known(self, name: str) -> frozenset[str]:
        """Fact ids model ``name`` was trained on."""
        return frozenset(self.entry(name).known)

    def model(self, name: str, device: str | None = None) -> LanguageModel:
        """Load model ``name`` (a fresh instance each call)."""
        lm = LanguageModel.load(self.path(name), device=device)
        lm.name = name
        return lm

    def questions(self, split: str) -> list[Question]:
        """``"train"`` (fuser/gate training) or ``"test"`` (held out, evaluation only) questions."""
        from ops.zoo.world import load_questions

        files = {"train": TRAIN_QUESTIONS, "test": TEST_QUESTIONS}
        if split not in files:
            raise ConfigError(f"unknown split {split!r}; expected 'train' or 'test'", split=split)
        return load_questions(self.root / files[split])

    @cached_property
    def world(self):
        """The generated world (facts, entities, split)."""
        from ops.zoo.world import World

        return World.model_validate_json((self.root / WORLD_FILE).read_text())
