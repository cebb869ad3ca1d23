"""A transmitter and a client written from docs/PROTOCOL.md alone (raw nats-py, JSON dicts, frames from
``tests.bus.frame_spec``; no ``bus`` or ``agents`` code) join a federation of reference agents and are used.

The transmitter's model is the session's tiny-llama (running a model is the implementer's business, not the
protocol's); everything it says on the bus it builds by the doc's rules.
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
import torch
import xxhash
from nats.aio.client import Client

from bus.connect import close
from fusion.models import LanguageModel
from fusion.refine import refine
from tests.agents.conftest import QUESTIONS, Fleet
from tests.bus.frame_spec import blob_hash, sealed

ME = "t9"


def norm(text: str) -> str:
    return " ".join(text.split())


def shared_prompt(text: str, options: list[str]) -> str:
    """Section 3, step 4: P."""
    lettered = " ".join(f"{letter}) {norm(o)}" for letter, o in zip("ABCD", options, strict=True))
    return f"Q: {norm(text)} {lettered}\nAnswer:"


def query_digest(query: dict) -> int:
    """Section 4, Query digest."""
    fields = [query["query_id"], query["receiver_id"], query["text"], *query["options"]]
    return xxhash.xxh3_64_intdigest("\x1f".join(fields).encode())


class OutsiderTransmitter:
    """Heartbeats, offers on every query, streams fp16 frames of what a plan names."""

    def __init__(self, nc: Client, prefix: str, model: LanguageModel, fingerprint: str) -> None:
        self.nc, self.prefix, self.model, self.fingerprint = nc, prefix, model, fingerprint
        self.held: dict[str, tuple[dict, list]] = {}  # query id -> (query, cache layers)
        self.streams = 0

    async def presence(self) -> None:
        beat = {"kind": "presence", "schema_version": 3, "role": "transmitter", "agent_id": ME}
        beat |= {"model_fingerprint": self.fingerprint, "interval_s": 0.5, "capabilities": ["kv", "fp16"]}
        while True:
            await self.nc.publish(
                f"{self.prefix}.presence.transmitter.{ME}", json.dumps(beat | {"sent_unix": time.time()}).encode()
            )
            await asyncio.sleep(0.5)

    async def on_query(self, msg) -> None:
        query = json.loads(msg.data)
        prompt = shared_prompt(query["text"], query["options"])
        pre = self.model.prefill(prompt)  # the implementer's model: its cache of P, its logits, its token spans
        ids = [self.model.tokenizer.encode(t, add_special_tokens=False) for t in (" A", " B", " C", " D", " none")]
        dist = torch.softmax(pre.logits.float()[[i[0] for i in ids]], dim=-1)  # the five answer tokens
        p_none, p_top = float(dist[4]), float(dist[:4].max())
        entropy = float(-(dist * dist.clamp_min(1e-12).log()).sum())
        k0 = pre.cache.layers[0][0]
        offer = {
            "kind": "offer",
            "query_id": query["query_id"],
            "transmitter_id": ME,
            "query_digest": query_digest(query),
            "model_fingerprint": self.fingerprint,
            "n_tokens": k0.shape[2],
            "n_layers": len(pre.cache.layers),
            "kv_heads": k0.shape[1],
            "head_dim": k0.shape[3],
            "confidence": 1 - p_none,
            "precisions": ["fp16"],
            "p_none": p_none,
            "p_top": p_top,
            "entropy": entropy,
            "offsets": [list(span) for span in pre.offsets],
        }
        self.held[query["query_id"]] = (query, pre.cache.layers)
        await self.nc.publish(f"{self.prefix}.offer.{query['query_id']}.{ME}", json.dumps(offer).encode())

    async def on_plan(self, msg) -> None:
        plan = json.loads(msg.data)
        query, layers = self.held.pop(plan["query_id"], (None, None))
        if query is None or plan["receiver_id"] != query["receiver_id"] or plan["query_digest"] != query_digest(query):
            return
        for entry in plan["entries"]:
            if entry["transmitter_id"] != ME or entry.get("inline"):
                continue
            assert entry["precision"] == "fp16"
            subject = f"{self.prefix}.kv.{query['receiver_id']}.{query['query_id']}.{ME}"
            for layer in entry["layers"]:
                for name, tensor in zip("kv", layers[layer], strict=True):
                    cut = tensor[:, :, -entry["tokens"] :, :] if entry.get("tokens") else tensor
                    await self.nc.publish(
                        subject, self.frame(query["query_id"], layer, name, cut, len(entry["layers"]))
                    )
            self.streams += 1

    def frame(self, query_id: str, layer: int, tensor: str, values: torch.Tensor, layers_total: int) -> bytes:
        """One fp16 tensor as one frame (section 6): little-endian, uncompressed, one chunk."""
        blob = values.detach().cpu().numpy().astype("<f2").tobytes()
        fields = {
            "schema_version": 1,
            "tensor": tensor,
            "layer": layer,
            "precision": "fp16",
            "dtype": "float32",
            "scale_axis": "none",
            "scale_dtype": None,
            "shuffle": False,
            "compression": "none",
            "layers_total": layers_total,
            "chunk": 0,
            "n_chunks": 1,
            "chunk_size": len(blob),
            "shape": list(values.shape),
            "raw_bytes": len(blob),
            "blob_bytes": len(blob),
            "blob_hash": blob_hash([blob], query_id, ME, layer, tensor),
            "query_id": query_id,
            "sender": ME,
        }
        return sealed(fields, blob)


async def ask_raw(nc: Client, prefix: str, question) -> dict:
    """A client by the doc: an Ask as JSON, a request with the recommended timeout (deadline + 5 s)."""
    ask = {"kind": "ask", "schema_version": 3, "question": question.stem, "options": list(question.options)}
    reply = await nc.request(f"{prefix}.ask", json.dumps(ask | {"deadline_s": 5.0}).encode(), timeout=10.0)
    return json.loads(reply.data)


@pytest.mark.slow
async def test_an_outsider_transmitter_and_client_interoperate_with_the_reference(fleet: Fleet) -> None:
    world = fleet.world
    model = world.models["tiny-llama"]
    await fleet.receiver()
    await fleet.gate(trained=False)  # uniform weights: the outsider's empty summary does not change its weight
    nc = await fleet.connect(ME, role="transmitter")
    client = await fleet.connect("client")
    outsider = OutsiderTransmitter(nc, fleet.prefix, model, model.fingerprint)
    await nc.subscribe(f"{fleet.prefix}.query.*", cb=outsider.on_query)
    await nc.subscribe(f"{fleet.prefix}.plan.*.*", cb=outsider.on_plan)
    beating = asyncio.create_task(outsider.presence())
    try:
        await fleet.wait_roster("gate", "transmitter", {ME})
        for q in QUESTIONS[:2]:
            answer = await ask_raw(client, fleet.prefix, q)
            assert answer["kind"] == "answer", answer
            ref = refine(q, world.receiver, {ME: model}, mode="c2c-uniform", fusers=world.fusers(), precision="fp16")
            assert [u["transmitter_id"] for u in answer["used"]] == [ME]
            assert {u["transmitter_id"]: u["layers"] for u in answer["used"]} == ref.used
            assert answer["choice"] == ref.answer and np.allclose(answer["probs"], ref.probs, atol=1e-5)
        assert outsider.streams == 2
    finally:
        beating.cancel()
        await close(nc)
        await close(client)
