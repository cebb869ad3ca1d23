"""The zoo's manifest (``manifest.json``) and where zoos live on disk."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from ops.zoo.spec import ZooSpec

MANIFEST_FILE = "manifest.json"
WORLD_FILE = "world.json"
TRAIN_QUESTIONS = "train.jsonl"  # questions on train-pool facts: fusers and the gate may train on these
TEST_QUESTIONS = "test.jsonl"  # questions on held-out facts: evaluation only
HOME_ENV = "FEDREFINE_HOME"  # overrides <repo>/.cache


class ModelEntry(BaseModel):
    """One trained model of the zoo."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    role: str  # "receiver" | "transmitter"
    arch: str
    params: int
    tokenizer_vocab: int
    num_layers: int
    path: str  # relative to the zoo directory
    fingerprint: str
    known: tuple[str, ...]  # fact ids this model was trained on
    train_seconds: float
    train_steps: int = 0  # including top-up steps and fresh starts
    final_loss: float
    topups: int = 0  # extra phases because it missed a target after training
    restarts: int = 0  # fresh starts with another seed because top-ups were not enough
    reused: bool = False  # copied from an earlier build that trained the same member (its train_seconds are from then)


class Manifest(BaseModel):
    """Everything a user of the zoo needs to find its parts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: int
    key: str
    spec: ZooSpec
    models: tuple[ModelEntry, ...]
    splits: dict[str, tuple[str, ...]]  # "train" / "test" -> fact ids
    check: dict[str, dict]  # model name -> metrics measured right after training
    build_seconds: float  # wall time
    cpu_seconds: float = 0.0  # CPU time of the builder and its training processes
    steps_done: tuple[str, ...] = ()  # post-build steps that have completed


def cache_root() -> Path:
    """``$FEDREFINE_HOME`` or ``<repo>/.cache``."""
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / ".cache"


def zoo_dir(spec: ZooSpec) -> Path:
    """Where the zoo of this spec is (or will be) stored."""
    return cache_root() / "zoo" / spec.key()
