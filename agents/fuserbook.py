"""The receiver's fusers and translators: which transmitter models it can read, loaded on first use, and how it says so.

Fusers come from a ``fusion.registry.FuserRegistry`` directory (rescanned on every heartbeat, so a fuser
trained while the receiver runs is used from the next query on) or are handed in directly (tests). The list
travels as typed ``bus.schemas.FuserSpec`` entries in the receiver's heartbeats and queries.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bus.errors import FuserError
from bus.schemas import MAX_FUSERS, FuserSpec
from fusion.c2c import transmitter_tail
from fusion.fuser import PairFuser
from fusion.registry import FuserRegistry

log = logging.getLogger(__name__)


class FuserBook:
    """Pair fusers from transmitter models into one receiver model, by transmitter fingerprint."""

    def __init__(
        self, receiver_fp: str, root: str | Path | None = None, fusers: Mapping[str, PairFuser] | None = None
    ) -> None:
        self.receiver_fp = receiver_fp
        self.registry = FuserRegistry(root) if root else None
        self.loaded: dict[str, PairFuser] = dict(fusers or {})

    kind = "fuser"  # the registry entries this book reads

    def fingerprints(self) -> list[str]:
        """Transmitter fingerprints there is a fuser for."""
        fps = set(self.loaded)
        if self.registry is not None:
            fps |= {t for t, r in self.registry.pairs(self.kind) if r == self.receiver_fp}
        return sorted(fps)

    def _load(self, fingerprint: str) -> Any:
        assert self.registry is not None
        return self.registry.load(fingerprint, self.receiver_fp)

    def get(self, fingerprint: str) -> Any:
        """The fuser for that transmitter model (loaded once), or None."""
        if fingerprint not in self.loaded and self.registry is not None:
            try:
                self.loaded[fingerprint] = self._load(fingerprint)
            except FuserError as exc:
                log.debug("no %s: %s", self.kind, exc)
                return None
        return self.loaded.get(fingerprint)

    def specs(self) -> tuple[FuserSpec, ...] | None:
        """One :class:`FuserSpec` per pair (None when there are too many to list: the gate then plans everyone)."""
        fps = self.fingerprints()
        if len(fps) > MAX_FUSERS:
            return None
        return tuple(self._spec(fp) for fp in fps)

    def _spec(self, fingerprint: str) -> FuserSpec:
        fuser = self.get(fingerprint)
        tail = transmitter_tail(fuser) if isinstance(fuser, PairFuser) else None
        return FuserSpec(transmitter_fingerprint=fingerprint, tail_tokens=tail or None)


class TranslatorBook(FuserBook):
    """Cache translators into one receiver model (``fusion.translate``), by transmitter fingerprint: the book a
    receiver reads for ``translate`` asks (the same registry directory holds both)."""

    kind = "translator"

    def _load(self, fingerprint: str) -> Any:
        assert self.registry is not None
        return self.registry.load_translator(fingerprint, self.receiver_fp)

    def _spec(self, fingerprint: str) -> FuserSpec:
        """The receiver's own model is read only whole (its cache is re-rotated, not translated: a missing layer has
        nothing to stand in for it), so its streams keep every layer (``bus.policy``: ``whole``)."""
        identity = bool(getattr(getattr(self.get(fingerprint), "cfg", None), "identity", False))
        return FuserSpec(transmitter_fingerprint=fingerprint, whole=identity)


def whole_models(specs: Sequence[FuserSpec] | None) -> set[str]:
    """The transmitter fingerprints whose caches a receiver reads only whole (every layer or none)."""
    return {spec.transmitter_fingerprint for spec in specs or () if spec.whole}


def listed_fusers(specs: Sequence[FuserSpec] | None) -> dict[str, int | None] | None:
    """A receiver's fuser list -> {transmitter fingerprint: tail tokens or None}; None if it lists none."""
    if specs is None:
        return None
    return {spec.transmitter_fingerprint: spec.tail_tokens for spec in specs}
