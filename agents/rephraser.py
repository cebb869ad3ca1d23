"""Rephraser agent (receiver side): q -> q' with personal details removed, reworded by the receiver's model.

``python -m agents.rephraser --model RECEIVER_MODEL --nats URL [--receiver-id ID] [--rules-only]``

Request/reply on ``fr.rephrase.<receiver_id>`` (a receiver-side subject: only receiver-side identities may
publish or subscribe there): the request is the user's :class:`~bus.schemas.Ask` with ``ask_id`` set to the
query id; the reply is the :class:`~bus.schemas.Query` of q' that the receiver then publishes, or an
:class:`~bus.schemas.ErrorReply`. The work is ``privacy.rephrase.rephrase`` with the receiver's model, the
same call ``fusion.refine.refine(private=True)`` makes in process.
"""

from __future__ import annotations

if __name__ == "__main__":  # flags first: --help and a bad flag answer before torch is imported
    from agents.cli import main

    raise SystemExit(main("rephraser"))

import logging
import time
from collections.abc import Sequence

from nats.aio.msg import Msg

from agents import cli
from agents.base import Agent, decode
from agents.config import RephraserConfig
from bus.errors import PrivacyError, SchemaError
from bus.schemas import Ask, ErrorReply, Query
from fusion.models import LanguageModel
from privacy.rephrase import rephrase

log = logging.getLogger(__name__)


class RephraserAgent(Agent):
    """Serves rephrase requests for one receiver (or for every receiver)."""

    role = "rephraser"

    def __init__(self, cfg: RephraserConfig, model: LanguageModel | None = None) -> None:
        super().__init__(cfg)
        self.cfg: RephraserConfig = cfg
        self.model = None
        if not cfg.rules_only:
            self.model = model if model is not None else cfg.load_model()
            self.model_fingerprint = self.model.fingerprint
        self.served = 0

    def capabilities(self) -> tuple[str, ...]:
        """How it rephrases, and for whom."""
        how = "rules" if self.model is None else "model"
        return (f"rephrase:{how}", f"receiver:{self.cfg.receiver_id or '*'}")

    def counters(self) -> dict[str, int]:
        """Questions rephrased, and refused."""
        return {**self.count, "served": self.served}

    async def setup(self) -> None:
        """Rephrase requests, in a queue group so several rephrasers share the load."""
        rid = self.cfg.receiver_id
        subject = self.subjects.rephrase(rid) if rid else f"{self.subjects.prefix}.rephrase.*"
        await self.listen(subject, self._on_request, queue=f"{self.cfg.prefix}-rephrasers", intake=True)

    async def _on_request(self, msg: Msg) -> None:
        receiver_id = self.subjects.parse(msg.subject).receiver_id
        try:
            ask = decode(msg, Ask)
            if ask.ask_id is None:
                raise SchemaError("a rephrase request needs ask_id (the query id)")
        except SchemaError as exc:
            await self.respond(msg, ErrorReply(code="bad_request", message=str(exc)[:500]))
            raise
        self.spawn(self._serve(msg, ask, receiver_id or ""), name=f"rephrase-{ask.ask_id}", query_id=ask.ask_id)

    async def _serve(self, msg: Msg, ask: Ask, receiver_id: str) -> None:
        deadline = time.time() + ask.deadline_s
        t0 = time.perf_counter()
        try:
            result = await self.compute(rephrase, ask.question, self.model)
        except PrivacyError as exc:
            self.count["errors"] += 1
            await self.respond(msg, ErrorReply(code="bad_request", message=str(exc)[:500], query_id=ask.ask_id))
            return
        assert ask.ask_id is not None
        query = Query(
            query_id=ask.ask_id,
            receiver_id=receiver_id,
            text=result.text,
            options=ask.options,
            deadline_unix=deadline,
        )
        await self.respond(msg, query)
        self.served += 1
        took_ms = 1000 * (time.perf_counter() - t0)
        self.latency.add(took_ms)
        await self.tracer.emit(ask.ask_id, "rephrase", ms=took_ms, peer=receiver_id or None, detail=result.method)
        log.info("rephrased %s by %s; %d personal detail(s) removed", ask.ask_id, result.method, len(result.removed))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m agents.rephraser``."""
    return cli.main("rephraser", argv)
