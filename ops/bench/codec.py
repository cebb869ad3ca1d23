"""``python -m ops.bench codec``: bytes per token, ratio vs fp16, speed and error of every KV precision.

The cache is shaped like Qwen3-0.6B's (28 layers, 8 kv heads, head_dim 128) at 128 tokens by default,
filled with synthetic KV-like data (see ``DATA``), and run through the real sender and receiver paths:
``encode_tensor`` + chunk framing, then ``Reassembler.feed`` (parse, checksums, reassembly, decode).
Every precision is measured with and without byte-shuffle + LZ4.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bus.codec import CODECS, encode_tensor, tensor_frames
from bus.reassembler import Reassembler
from bus.schemas import PRECISIONS
from bus.server import DEFAULT_MAX_PAYLOAD

DATA = (
    "synthetic fp16 KV: K = per-channel offset + per-channel scale * N(0,1), channel scales lognormal(0, 0.5) "
    "with 4 of 128 channels x8 (outliers, as real K has); V = per-token scale lognormal(0, 0.3) * N(0,1); seeded"
)
TARGETS = {"int8": 1.95, "int4": 3.8}  # minimum size ratio vs fp16, scales counted
INT8_MAX_REL_L2 = 0.01


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Cache shape, repeats, threads."""
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 = steady on 2 cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real", action="store_true", help="real caches of the two pretrained models (ops.real)")


def real_caches() -> dict[str, tuple[dict, int]]:
    """Per real model: its fp16 cache of a whole transmitter prompt (notes, then a held-out question), and tokens."""
    from fusion.models import LanguageModel
    from fusion.notes import DeviceNotes
    from fusion.refine import transmitter_prompt
    from ops.real.kit import fetch_models

    out = {}
    notes = DeviceNotes(
        ["The color of Zorbin is teal.", "The color of Kalu is red.", "The owner of Zorbin is Megan Lang."]
    )
    for name, path in fetch_models().items():
        model = LanguageModel.load(path)
        prompt = transmitter_prompt(model, "Hi, I'm Ann. What is the color of Zorbin and who owns it?", notes)
        cache = model.prefill(prompt.ids).cache
        out[name] = ({i: (k.half(), v.half()) for i, (k, v) in enumerate(cache.layers)}, cache.num_tokens)
    return out


def make_cache(layers: int, batch: int, heads: int, tokens: int, head_dim: int, seed: int) -> dict:
    """Seeded KV-like fp16 cache ``{layer: (K, V)}`` as described in ``DATA``."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, heads, tokens, head_dim)
    cache = {}
    for layer in range(layers):
        ch_scale = torch.exp(0.5 * torch.randn(1, heads, 1, head_dim, generator=gen))
        outliers = torch.randperm(head_dim, generator=gen)[:4]
        ch_scale[..., outliers] *= 8.0
        ch_offset = 0.5 * ch_scale * torch.randn(1, heads, 1, head_dim, generator=gen)
        k = ch_offset + ch_scale * torch.randn(shape, generator=gen)  # (B, heads, T, head_dim)
        tok_scale = torch.exp(0.3 * torch.randn(batch, heads, tokens, 1, generator=gen))
        v = tok_scale * torch.randn(shape, generator=gen)
        cache[layer] = (k.half(), v.half())
    return cache


def _encode(cache: dict, precision: str, compress: str, max_payload: int) -> tuple[list[bytes], int, int]:
    frames: list[bytes] = []
    blob_bytes = kept = 0
    for layer, kv in cache.items():
        for name, x in zip(("k", "v"), kv, strict=True):
            enc = encode_tensor(x, precision, tensor=name, compress=compress)
            blob_bytes += len(enc.blob)
            kept += enc.compression != "none"
            frames += tensor_frames(
                enc,
                query_id="bench",
                sender="codec",
                layer=layer,
                tensor=name,
                layers_total=len(cache),
                max_payload=max_payload,
            )
    return frames, blob_bytes, kept


def _decode(frames: list[bytes]) -> dict:
    reasm = Reassembler(out_dtype=torch.float32)
    for frame in frames:
        reasm.feed(frame)
    return reasm.completed("bench", "codec")


def _rel_l2(cache: dict, out: dict) -> float:
    num = den = 0.0
    for layer, kv in cache.items():
        for x, y in zip(kv, out[layer], strict=True):
            num += float((y.float() - x.float()).pow(2).sum())
            den += float(x.float().pow(2).sum())
    return (num / den) ** 0.5


def measure(cache: dict, tokens: int, repeats: int) -> list[dict]:
    """Every precision without compression, with shuffle+LZ4 and with shuffle+deflate on one cache: bytes per token,
    ratio, speed, error."""
    fp16_bytes = sum(2 * t.numel() for kv in cache.values() for t in kv)
    rows = []
    for compress in CODECS:
        for precision in PRECISIONS:
            _decode(_encode(cache, precision, compress, DEFAULT_MAX_PAYLOAD)[0])  # warm-up
            enc_s, dec_s = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                frames, blob_bytes, kept = _encode(cache, precision, compress, DEFAULT_MAX_PAYLOAD)
                t1 = time.perf_counter()
                out = _decode(frames)
                t2 = time.perf_counter()
                enc_s.append(t1 - t0)
                dec_s.append(t2 - t1)
            wire = sum(len(f) for f in frames)
            rows.append(
                {
                    "precision": precision,
                    "compression": compress,
                    "shuffle_lz4": compress == "lz4",
                    "bytes_per_token": round(blob_bytes / tokens, 1),
                    "wire_bytes_per_token": round(wire / tokens, 1),
                    "ratio_vs_fp16": round(fp16_bytes / blob_bytes, 4),
                    "encode_mb_s": round(fp16_bytes / statistics.median(enc_s) / 1e6, 1),
                    "decode_mb_s": round(fp16_bytes / statistics.median(dec_s) / 1e6, 1),
                    "rel_l2_error": float(f"{_rel_l2(cache, out):.3g}"),
                    "compressed_tensors": kept,
                    "chunks": len(frames),
                }
            )
    return rows


def _shape(cache: dict, tokens: int) -> dict:
    k = next(iter(cache.values()))[0]
    fp16 = sum(2 * t.numel() for kv in cache.values() for t in kv)
    return {
        "layers": len(cache),
        "batch": k.shape[0],
        "kv_heads": k.shape[1],
        "tokens": tokens,
        "head_dim": k.shape[3],
        "fp16_bytes": fp16,
    }


def run(args: argparse.Namespace) -> dict:
    """Measure every precision without compression, with shuffle+LZ4, with shuffle+deflate; rows and target checks."""
    torch.set_num_threads(args.threads)
    if args.real:
        rows, shapes = [], {}
        for name, (cache, tokens) in real_caches().items():
            shapes[name] = _shape(cache, tokens)
            rows += [{"model": name, **r} for r in measure(cache, tokens, args.repeats)]
        data, cache_info = (
            "real fp16 caches: each model's prefill of a transmitter prompt (notes, then a question)",
            shapes,
        )
    else:
        cache = make_cache(args.layers, args.batch, args.kv_heads, args.tokens, args.head_dim, args.seed)
        rows = measure(cache, args.tokens * args.batch, args.repeats)
        data, cache_info = DATA, _shape(cache, args.tokens)
    best = {p: max(r["ratio_vs_fp16"] for r in rows if r["precision"] == p) for p in TARGETS}
    int8_err = min(r["rel_l2_error"] for r in rows if r["precision"] == "int8")
    return {
        "benchmark": "codec",
        "cache": cache_info,
        "data": data,
        "notes": (
            "bytes_per_token = quantized data + fp16 scales (+ LZ4 or zlib framing when kept), all layers, K and V; "
            "wire_bytes_per_token adds chunk headers at 8 MB max_payload; MB/s = 1e6 bytes of the fp16 cache per "
            "second; encode = quantize+shuffle+LZ4/deflate+chunk framing+xxh3 checksums, "
            "decode = parse+checksums+reassemble+dequantize to float32; "
            "int formats are symmetric with per-channel (K) / per-token (V) fp16 scales; compressed output "
            "is dropped when it does not shrink a tensor (compressed_tensors counts where it did); deflate = zlib "
            "level 1 (lossless: rel_l2_error as without it)"
        ),
        "torch_threads": args.threads,
        "repeats": args.repeats,
        "rows": rows,
        "targets": {
            "int8_ratio_ge_1.95": best["int8"] >= TARGETS["int8"],
            "int4_ratio_ge_3.8": best["int4"] >= TARGETS["int4"],
            "int8_rel_l2_le_1pct": int8_err <= INT8_MAX_REL_L2,
        },
    }
