"""Fusers (and gating networks) on disk, keyed by the fingerprints of the models they were trained for.

A file is ``torch.save`` of a plain dict (tensors, strings, numbers only, so ``torch.load(weights_only=True)``
reads it safely)::

    {"format": "fedrefine.fuser", "version": 1, "transmitter": fp, "receiver": fp,
     "config": {...FuserConfig...}, "state": state_dict, "meta": {...training facts...}}

Loading checks the format, the version and the pair; a wrong pair, a corrupt file or another version is
a ``FuserError`` with one clear line.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from bus.errors import FuserError
from fusion.fuser import FuserConfig, PairFuser

log = logging.getLogger(__name__)

FUSER_FORMAT = "fedrefine.fuser"
GATE_FORMAT = "fedrefine.gate"
FORMAT_VERSION = 1  # bump when the saved dict or the module layout changes
_FP = re.compile(r"^[0-9a-f]{4,64}$")


def _check_fp(fp: str, side: str) -> str:
    if not isinstance(fp, str) or not _FP.match(fp):
        raise FuserError(f"bad {side} fingerprint {fp!r}: expected lowercase hex", side=side)
    return fp


def write_blob(path: Path, blob: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    torch.save(blob, tmp)
    os.replace(tmp, path)  # atomic: a reader never sees half a file
    return path


def read_blob(path: str | Path, expected_format: str) -> dict[str, Any]:
    """The saved dict at ``path`` after checking its format and version (``FuserError`` otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise FuserError(f"no {expected_format} file at {path}", path=str(path))
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a damaged pickle/zip
        raise FuserError(
            f"{path} is corrupt or not a {expected_format} file ({type(exc).__name__})", path=str(path)
        ) from exc
    if not isinstance(blob, dict) or blob.get("format") != expected_format:
        raise FuserError(f"{path} is not a {expected_format} file", path=str(path))
    if blob.get("version") != FORMAT_VERSION:
        raise FuserError(
            f"{path} is {expected_format} version {blob.get('version')!r}; this code reads version {FORMAT_VERSION}",
            path=str(path),
            version=blob.get("version"),
        )
    return blob


def save_fuser(
    fuser: PairFuser, path: str | Path, transmitter_fp: str, receiver_fp: str, meta: dict[str, Any] | None = None
) -> Path:
    """Write a fuser with both fingerprints, its config and a format version."""
    blob = {
        "format": FUSER_FORMAT,
        "version": FORMAT_VERSION,
        "transmitter": _check_fp(transmitter_fp, "transmitter"),
        "receiver": _check_fp(receiver_fp, "receiver"),
        "config": fuser.cfg.to_dict(),
        "state": {k: v.detach().cpu().clone() for k, v in fuser.state_dict().items()},
        "meta": dict(meta or {}),
    }
    return write_blob(Path(path), blob)


def load_fuser(
    path: str | Path, transmitter_fp: str | None = None, receiver_fp: str | None = None
) -> tuple[PairFuser, dict[str, Any]]:
    """A fuser (in eval mode) and its meta; ``FuserError`` if it was trained for another pair than the one given."""
    blob = read_blob(path, FUSER_FORMAT)
    for side, want in (("transmitter", transmitter_fp), ("receiver", receiver_fp)):
        if want is not None and blob.get(side) != want:
            raise FuserError(
                f"{path} is a fuser for {side} {blob.get(side)}, not {want}: wrong model pair",
                path=str(path),
                side=side,
            )
    try:
        fuser = PairFuser(FuserConfig(**blob["config"]))
        fuser.load_state_dict(blob["state"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise FuserError(f"{path} holds a fuser this code cannot rebuild: {exc}", path=str(path)) from exc
    meta = dict(blob.get("meta", {}))
    meta.update(transmitter=blob["transmitter"], receiver=blob["receiver"])
    return fuser.eval(), meta


class FuserRegistry:
    """A directory of fusers, one file per (transmitter fingerprint -> receiver fingerprint), and gates per receiver."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path_for(self, transmitter_fp: str, receiver_fp: str) -> Path:
        """Where the fuser of this pair lives."""
        t, r = _check_fp(transmitter_fp, "transmitter"), _check_fp(receiver_fp, "receiver")
        return self.root / f"fuser-{t}-to-{r}.pt"

    def gate_path(self, receiver_fp: str) -> Path:
        """Where the gating network of this receiver lives."""
        return self.root / f"gate-{_check_fp(receiver_fp, 'receiver')}.pt"

    def has(self, transmitter_fp: str, receiver_fp: str) -> bool:
        """Whether a fuser for this pair is saved."""
        return self.path_for(transmitter_fp, receiver_fp).is_file()

    def save(self, fuser: PairFuser, transmitter_fp: str, receiver_fp: str, meta: dict[str, Any] | None = None) -> Path:
        """Save the fuser of this pair (replacing any older one)."""
        path = save_fuser(fuser, self.path_for(transmitter_fp, receiver_fp), transmitter_fp, receiver_fp, meta)
        log.info("saved fuser %s -> %s at %s", transmitter_fp, receiver_fp, path)
        return path

    def load(self, transmitter_fp: str, receiver_fp: str) -> PairFuser:
        """The fuser of this pair; ``FuserError`` if none is saved or the file is for another pair."""
        path = self.path_for(transmitter_fp, receiver_fp)
        if not path.is_file():
            raise FuserError(
                f"no fuser for transmitter {transmitter_fp} -> receiver {receiver_fp} in {self.root}",
                transmitter=transmitter_fp,
                receiver=receiver_fp,
            )
        return load_fuser(path, transmitter_fp, receiver_fp)[0]

    def meta(self, transmitter_fp: str, receiver_fp: str) -> dict[str, Any]:
        """The training facts saved with this pair's fuser."""
        return load_fuser(self.path_for(transmitter_fp, receiver_fp), transmitter_fp, receiver_fp)[1]

    def pairs(self) -> list[tuple[str, str]]:
        """``(transmitter_fp, receiver_fp)`` of every saved fuser."""
        out = []
        for path in sorted(self.root.glob("fuser-*-to-*.pt")):
            t, _, r = path.stem.removeprefix("fuser-").partition("-to-")
            out.append((t, r))
        return out
