"""What a ``--model`` argument names, turned into a Hugging Face directory that loads in seconds.

``--model`` takes a tiny random model name (``tiny-qwen3`` ...), a Hugging Face checkpoint directory
(``config.json`` and safetensors), or a ``.gguf`` file. A GGUF is dequantized by transformers once (tens of
seconds) and saved as a float safetensors directory under ``<cache>/models/converted/<sha256[:16]>/``, keyed by
the file's content, so the second start reads the copy (``FEDREFINE_HOME`` moves ``<cache>``, default
``<repo>/.cache``). A converted directory holds ``fedrefine-source.json`` naming the file it came from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from bus.errors import ModelError

log = logging.getLogger(__name__)

HOME_ENV = "FEDREFINE_HOME"  # overrides <repo>/.cache
SOURCE_FILE = "fedrefine-source.json"  # in a converted directory: where it came from
HASH_CHUNK = 8 * 1024 * 1024  # bytes read at a time when fingerprinting a GGUF file
_HASH_MEMO = "sha256-memo.json"  # (path, size, mtime) -> sha256, so a 250 MB file is hashed once


def cache_root() -> Path:
    """``$FEDREFINE_HOME`` or ``<repo>/.cache``."""
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[1] / ".cache"


def models_dir() -> Path:
    """Where real checkpoints live: ``make real`` places GGUF files here, conversions go under ``converted/``."""
    return cache_root() / "models"


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (remembered per path, size and modification time)."""
    memo_path = models_dir() / _HASH_MEMO
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    memo[key] = h.hexdigest()
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(memo, indent=1))
        os.replace(tmp, memo_path)
    except OSError as exc:  # a read-only cache only costs a re-hash next time
        log.debug("cannot remember the hash of %s: %s", path, exc)
    return memo[key]


def converted_dir(gguf: Path) -> Path:
    """Where the float copy of a GGUF file lives (whether or not it exists yet)."""
    return models_dir() / "converted" / file_sha256(gguf)[:16]


def is_converted(directory: Path) -> bool:
    """Whether ``directory`` is a finished conversion (written last, so a crash mid-way leaves none)."""
    return (directory / SOURCE_FILE).is_file()


def convert_gguf(gguf: str | os.PathLike[str]) -> Path:
    """The float safetensors directory of a GGUF file, converting it on first use."""
    path = Path(gguf).expanduser()
    if not path.is_file():
        raise ModelError(f"no GGUF file at {str(gguf)!r}", path=str(gguf))
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{str(gguf)!r} is not a GGUF file (no GGUF magic)", path=str(gguf))
    out = converted_dir(path)
    if is_converted(out):
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    log.info("converting %s to a float checkpoint (once; later starts read %s)", path.name, out)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"transformers cannot read the GGUF file {str(gguf)!r}: {exc}", path=str(gguf)) from exc
    # transformers refuses to save a model it still marks as GGUF-quantized; rebuild it as a plain float model.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config = AutoConfig.for_model(**config.to_dict())
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    staging = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    source = {"gguf": str(path.resolve()), "sha256": file_sha256(path), "seconds": round(time.perf_counter() - t0, 1)}
    (staging / SOURCE_FILE).write_text(json.dumps(source, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
    log.info("converted %s in %.1f s", path.name, time.perf_counter() - t0)
    return out


def resolve_checkpoint(name_or_path: str | os.PathLike[str]) -> Path:
    """A loadable Hugging Face directory for a ``.gguf`` file or a checkpoint directory (``ModelError`` else)."""
    key = str(name_or_path)
    path = Path(key).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return convert_gguf(path)
    if not path.exists():
        raise ModelError(
            f"no model at {key!r}: give a .gguf file, a Hugging Face checkpoint directory or a tiny model name",
            path=key,
        )
    if path.is_file():
        raise ModelError(f"{key!r} is a file but not a .gguf model", path=key)
    if not (path / "config.json").is_file():
        raise ModelError(f"{key!r} is not a Hugging Face checkpoint directory (no config.json)", path=key)
    return path
