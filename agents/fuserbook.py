"""The receiver's fusers: which transmitter models it can fuse, loaded on first use, and how it says so.

Fusers come from a ``fusion.registry.FuserRegistry`` directory (rescanned on every heartbeat, so a fuser
trained while the receiver runs is used from the next query on) or are handed in directly (tests).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from bus.errors import FuserError
from fusion.c2c import transmitter_tail
from fusion.fuser import PairFuser
from fusion.registry import FuserRegistry

log = logging.getLogger(__name__)

FUSERS_CAPABILITY = "fusers"  # a receiver that lists its fusers says so with this capability
FUSER_PREFIX = "fuser:"  # then one capability per transmitter fingerprint it can fuse
TAIL_MARK = "@"  # "fuser:<fp>@<n>": that fuser reads only the transmitter's last n tokens (plain: the whole cache)
MAX_FUSER_CAPABILITIES = 60  # more pairs than this are not listed in heartbeats (the gate then plans them all)


class FuserBook:
    """Pair fusers from transmitter models into one receiver model, by transmitter fingerprint."""

    def __init__(
        self, receiver_fp: str, root: str | Path | None = None, fusers: Mapping[str, PairFuser] | None = None
    ) -> None:
        self.receiver_fp = receiver_fp
        self.registry = FuserRegistry(root) if root else None
        self.loaded: dict[str, PairFuser] = dict(fusers or {})

    def fingerprints(self) -> list[str]:
        """Transmitter fingerprints there is a fuser for."""
        fps = set(self.loaded)
        if self.registry is not None:
            fps |= {t for t, r in self.registry.pairs() if r == self.receiver_fp}
        return sorted(fps)

    def get(self, fingerprint: str) -> PairFuser | None:
        """The fuser for that transmitter model (loaded once), or None."""
        if fingerprint not in self.loaded and self.registry is not None:
            try:
                self.loaded[fingerprint] = self.registry.load(fingerprint, self.receiver_fp)
            except FuserError as exc:
                log.debug("no fuser: %s", exc)
                return None
        return self.loaded.get(fingerprint)

    def capabilities(self) -> tuple[str, ...]:
        """``fusers`` and one ``fuser:<fp>[@<tail>]`` per pair (none when there are too many to list)."""
        fps = self.fingerprints()
        if len(fps) > MAX_FUSER_CAPABILITIES:
            return ()
        listed = []
        for fp in fps:
            fuser = self.get(fp)
            tail = transmitter_tail(fuser) if fuser is not None else None
            listed.append(FUSER_PREFIX + fp + (f"{TAIL_MARK}{tail}" if tail else ""))
        return (FUSERS_CAPABILITY, *listed)


def listed_fusers(capabilities: Sequence[str]) -> dict[str, int | None] | None:
    """A receiver's heartbeat capabilities -> {transmitter fingerprint: tail tokens or None}; None if it lists none."""
    if FUSERS_CAPABILITY not in capabilities:
        return None
    out: dict[str, int | None] = {}
    for cap in capabilities:
        if not cap.startswith(FUSER_PREFIX):
            continue
        fp, _, tail = cap.removeprefix(FUSER_PREFIX).partition(TAIL_MARK)
        out[fp] = int(tail) if tail.isdigit() and int(tail) > 0 else None
    return out
