"""Fusers (and gating networks) on disk, keyed by the fingerprints of the models they were trained for.

Each is a directory of two files: ``config.json`` (what it is, for which models, its shape, version and
training facts) and ``model.safetensors`` (its weights)::

    fuser-<transmitter fp>-to-<receiver fp>/config.json
        {"format": "fedrefine.fuser", "version": 2, "transmitter": fp, "receiver": fp,
         "config": {...FuserConfig...}, "layer_map": [...], "params": n, "bytes": n, "meta": {...}}
    gate-<receiver fp>/config.json
        {"format": "fedrefine.gate", "version": 2, "receiver": fp, "config": {...}, "profiles": {...}, ...}

Loading checks the format, the version and the pair; a wrong pair, a missing or damaged file or another
version is a ``FuserError`` with one clear line. A directory is written under a temporary name and renamed,
so a reader never sees half of one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bus.errors import FuserError
from fusion.fuser import FuserConfig, PairFuser

log = logging.getLogger(__name__)

FUSER_FORMAT = "fedrefine.fuser"
GATE_FORMAT = "fedrefine.gate"
FORMAT_VERSION = 2  # 2: a directory of config.json + model.safetensors (1 was one torch.save file)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_FP = re.compile(r"^[0-9a-f]{4,64}$")


def check_fp(fp: str, side: str) -> str:
    if not isinstance(fp, str) or not _FP.match(fp):
        raise FuserError(f"bad {side} fingerprint {fp!r}: expected lowercase hex", side=side)
    return fp


def write_module(path: str | Path, config: dict[str, Any], state: dict[str, torch.Tensor]) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into directory ``path`` (replacing it atomically)."""
    path = Path(path)
    staging = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    save_file(tensors, str(staging / WEIGHTS_FILE))
    (staging / CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    old = path.with_name(path.name + f".old{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(staging, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def read_module(path: str | Path, expected_format: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and weights at directory ``path`` after checking format and version (``FuserError`` otherwise)."""
    path = Path(path)
    if path.is_file():
        raise FuserError(
            f"{path} is a file; a {expected_format} is a directory of {CONFIG_FILE} and {WEIGHTS_FILE} "
            f"(version {FORMAT_VERSION}; rebuild files of version 1)",
            path=str(path),
        )
    if not (path / CONFIG_FILE).is_file():
        raise FuserError(f"no {expected_format} at {path} (no {CONFIG_FILE})", path=str(path))
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise FuserError(f"{path / CONFIG_FILE} is not readable JSON ({exc})", path=str(path)) from exc
    if not isinstance(config, dict) or config.get("format") != expected_format:
        raise FuserError(f"{path} is not a {expected_format}", path=str(path))
    if config.get("version") != FORMAT_VERSION:
        raise FuserError(
            f"{path} is {expected_format} version {config.get('version')!r}; this code reads version {FORMAT_VERSION}",
            path=str(path),
            version=config.get("version"),
        )
    try:
        state = load_file(str(path / WEIGHTS_FILE))
    except (OSError, SafetensorError, ValueError) as exc:
        raise FuserError(f"{path / WEIGHTS_FILE} is missing or corrupt ({exc})", path=str(path)) from exc
    return config, state


def check_pair(
    path: str | Path, config: dict[str, Any], transmitter_fp: str | None, receiver_fp: str | None, what: str
) -> None:
    """``FuserError`` when a module on disk was made for another model pair than the one given."""
    for side, want in (("transmitter", transmitter_fp), ("receiver", receiver_fp)):
        if want is not None and config.get(side) != want:
            raise FuserError(
                f"{path} is a {what} for {side} {config.get(side)}, not {want}: wrong model pair",
                path=str(path),
                side=side,
            )


def module_size(module: torch.nn.Module, dtype: torch.dtype = torch.float16) -> tuple[int, int]:
    """``(parameters, bytes)`` of a module's weights stored at ``dtype``."""
    params = sum(p.numel() for p in module.parameters())
    return params, params * torch.finfo(dtype).bits // 8


def pair_config(
    fmt: str, module: torch.nn.Module, transmitter_fp: str, receiver_fp: str, meta: dict | None, **extra: Any
) -> dict[str, Any]:
    """The ``config.json`` of a pair module (a fuser or a translator): format, version, both fingerprints, its
    config, size and meta, and any ``extra`` fields."""
    params, nbytes = module_size(module)
    return {
        "format": fmt,
        "version": FORMAT_VERSION,
        "transmitter": check_fp(transmitter_fp, "transmitter"),
        "receiver": check_fp(receiver_fp, "receiver"),
        "config": module.cfg.to_dict(),
        **extra,
        "params": params,
        "bytes_fp16": nbytes,
        "meta": dict(meta or {}),
    }


def save_fuser(
    fuser: PairFuser, path: str | Path, transmitter_fp: str, receiver_fp: str, meta: dict[str, Any] | None = None
) -> Path:
    """Write a fuser directory with both fingerprints, its config, layer map, size and a format version."""
    config = pair_config(FUSER_FORMAT, fuser, transmitter_fp, receiver_fp, meta, layer_map=list(fuser.layer_map))
    return write_module(path, config, fuser.state_dict())


def load_fuser(
    path: str | Path, transmitter_fp: str | None = None, receiver_fp: str | None = None
) -> tuple[PairFuser, dict[str, Any]]:
    """A fuser (in eval mode) and its meta; ``FuserError`` if it was trained for another pair than the one given."""
    config, state = read_module(path, FUSER_FORMAT)
    check_pair(path, config, transmitter_fp, receiver_fp, "fuser")
    try:
        fuser = PairFuser(FuserConfig(**config["config"]))
        fuser.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise FuserError(f"{path} holds a fuser this code cannot rebuild: {exc}", path=str(path)) from exc
    meta = dict(config.get("meta", {}))
    meta.update(
        transmitter=config["transmitter"],
        receiver=config["receiver"],
        params=config.get("params"),
        bytes_fp16=config.get("bytes_fp16"),
    )
    return fuser.eval(), meta


class FuserRegistry:
    """A directory of fusers, one subdirectory per (transmitter fingerprint -> receiver fingerprint), and gates."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path_for(self, transmitter_fp: str, receiver_fp: str) -> Path:
        """Where the fuser of this pair lives."""
        t, r = check_fp(transmitter_fp, "transmitter"), check_fp(receiver_fp, "receiver")
        return self.root / f"fuser-{t}-to-{r}"

    def gate_path(self, receiver_fp: str) -> Path:
        """Where the gating network of this receiver lives."""
        return self.root / f"gate-{check_fp(receiver_fp, 'receiver')}"

    def has(self, transmitter_fp: str, receiver_fp: str) -> bool:
        """Whether a fuser for this pair is saved."""
        return (self.path_for(transmitter_fp, receiver_fp) / CONFIG_FILE).is_file()

    def has_gate(self, receiver_fp: str) -> bool:
        """Whether a gating network for this receiver is saved."""
        return (self.gate_path(receiver_fp) / CONFIG_FILE).is_file()

    def save(self, fuser: PairFuser, transmitter_fp: str, receiver_fp: str, meta: dict[str, Any] | None = None) -> Path:
        """Save the fuser of this pair (replacing any older one)."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = save_fuser(fuser, self.path_for(transmitter_fp, receiver_fp), transmitter_fp, receiver_fp, meta)
        log.info("saved fuser %s -> %s at %s", transmitter_fp, receiver_fp, path)
        return path

    def load(self, transmitter_fp: str, receiver_fp: str) -> PairFuser:
        """The fuser of this pair; ``FuserError`` if none is saved or the directory is for another pair."""
        path = self._saved(self.path_for(transmitter_fp, receiver_fp), "fuser", transmitter_fp, receiver_fp)
        return load_fuser(path, transmitter_fp, receiver_fp)[0]

    def meta(self, transmitter_fp: str, receiver_fp: str) -> dict[str, Any]:
        """The training facts saved with this pair's fuser."""
        return load_fuser(self.path_for(transmitter_fp, receiver_fp), transmitter_fp, receiver_fp)[1]

    def translator_path(self, transmitter_fp: str, receiver_fp: str) -> Path:
        """Where the cache translator of this pair lives (``fusion.translate``)."""
        t, r = check_fp(transmitter_fp, "transmitter"), check_fp(receiver_fp, "receiver")
        return self.root / f"translator-{t}-to-{r}"

    def load_translator(self, transmitter_fp: str, receiver_fp: str):
        """The translator of this pair; ``FuserError`` if none is saved or the directory is for another pair."""
        from fusion.translate import load_translator

        path = self._saved(self.translator_path(transmitter_fp, receiver_fp), "translator", transmitter_fp, receiver_fp)
        return load_translator(path, transmitter_fp, receiver_fp)[0]

    def _saved(self, path: Path, what: str, transmitter_fp: str, receiver_fp: str) -> Path:
        """``path`` when something is saved there, else the ``FuserError`` that none is."""
        if not path.exists():
            raise FuserError(
                f"no {what} for transmitter {transmitter_fp} -> receiver {receiver_fp} in {self.root}",
                transmitter=transmitter_fp,
                receiver=receiver_fp,
            )
        return path

    def pairs(self, kind: str = "fuser") -> list[tuple[str, str]]:
        """``(transmitter_fp, receiver_fp)`` of every saved fuser (``kind="translator"``: translator)."""
        out = []
        for path in sorted(self.root.glob(f"{kind}-*-to-*")):
            if (path / CONFIG_FILE).is_file():
                t, _, r = path.name.removeprefix(f"{kind}-").partition("-to-")
                out.append((t, r))
        return out
