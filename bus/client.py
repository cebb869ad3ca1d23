"""nats-py's client with a receive path for megabyte messages: :class:`BusClient` and its :class:`BulkParser`.

``bus.connect.connect`` makes every agent's connection a :class:`BusClient`. Nothing on the wire changes; a reader
of ``Msg.data`` gets ``bytes`` below :data:`BULK_MESSAGE_BYTES` and a ``bytearray`` at or above it.
"""

from __future__ import annotations

import asyncio
import json
import logging

import nats.errors
from nats.aio.client import Client
from nats.protocol.parser import (
    AWAITING_CONTROL_LINE,
    AWAITING_MSG_PAYLOAD,
    CRLF_SIZE,
    ERR_RE,
    HMSG_RE,
    INFO_RE,
    MAX_CONTROL_LINE_SIZE,
    MSG_RE,
    OK_RE,
    PING_RE,
    PONG_RE,
    Parser,
)

log = logging.getLogger(__name__)

BULK_MESSAGE_BYTES = 64 * 1024  # a message's payload this big is read straight into a buffer of its own
READ_BYTES = 1024 * 1024  # bytes a BusClient's read loop takes from the socket at a time (nats-py: 32 KB)
_SLICE_BYTES = 4096  # a smaller payload is copied out of the parse buffer by slicing (cheaper than a view)
_CRLF = b"\r\n"

Buffer = bytes | bytearray | memoryview


class BulkParser(Parser):
    """A parser of the NATS client protocol that copies a message's payload once.

    nats-py's parser gathers a payload in its parse buffer, then copies it out twice (a slice, then ``bytes``): for a
    megabyte KV frame read 32 KB at a time, that and the moves of asyncio's stream buffer are four copies after the
    socket's. Here a ``MSG`` payload of :data:`BULK_MESSAGE_BYTES` or more goes into a ``bytearray`` of its size as it
    arrives (what the parse buffer already holds, then each read straight into it), and that buffer is the message's
    ``data``; a smaller payload is copied out of the parse buffer once, as ``bytes``. Headers (``HMSG``) are
    ``bytes`` as in nats-py. Every operation (``MSG``, ``HMSG``, ``+OK``, ``-ERR``, ``PING``, ``PONG``, ``INFO``)
    dispatches to the client as nats-py's parser does, with its regular expressions; ``data`` is a ``bytes`` or a
    ``bytearray`` (both buffers: readers take either).
    """

    def reset(self) -> None:
        """Drop any partial message (nats-py resets the parser on every reconnect)."""
        super().reset()
        self._bulk: bytearray | None = None
        self._filled = 0

    async def parse(self, data: Buffer = b"") -> None:
        """Feed bytes read from the socket; dispatches every message and operation they complete."""
        if self._bulk is not None:
            bulk, view = self._bulk, memoryview(data)
            take = min(len(view), len(bulk) - self._filled)
            bulk[self._filled : self._filled + take] = view[:take]
            self._filled += take
            if self._filled < len(bulk):
                return
            self._bulk = None
            data = view[take:]
            await self._deliver_bulk(bulk)
        buf = self.buf
        buf.extend(data)
        while buf:
            if self.state == AWAITING_CONTROL_LINE:
                match = MSG_RE.match(buf)  # the common case first
                if match is None:
                    if not await self._operation():
                        return  # a control line split across reads
                    continue
                subject, sid, _, reply, size = match.groups()
                try:
                    self.msg_arg = {"subject": subject, "sid": int(sid), "reply": reply or b""}
                except ValueError as exc:
                    raise nats.errors.ProtocolError("nats: malformed MSG") from exc
                self.needed, self.header_needed = int(size), 0
                del buf[: match.end()]
                self.state = AWAITING_MSG_PAYLOAD
            needed, headers = self.needed, self.header_needed
            if needed >= BULK_MESSAGE_BYTES and not headers:
                bulk = bytearray(needed + CRLF_SIZE)
                take = min(len(buf), len(bulk))
                bulk[:take] = memoryview(buf)[:take]
                del buf[:take]
                if take < len(bulk):
                    self._bulk, self._filled = bulk, take
                    return
                await self._deliver_bulk(bulk)
            elif len(buf) >= needed + CRLF_SIZE:
                if needed < _SLICE_BYTES and not headers:  # a slice and a copy cost less than a view here
                    hdr, payload = None, bytes(buf[:needed])
                else:
                    view = memoryview(buf)
                    hdr = bytes(view[:headers]) if headers else None
                    payload = bytes(view[headers:needed])
                    view.release()  # before the buffer shrinks
                del buf[: needed + CRLF_SIZE]
                self.state, self.header_needed = AWAITING_CONTROL_LINE, 0
                args = self.msg_arg
                await self.nc._process_msg(args["sid"], args["subject"], args["reply"], payload, hdr)
            else:
                return  # a payload still arriving

    async def _operation(self) -> bool:
        """Parse a control line other than ``MSG`` at the start of the buffer; False if it is not all there yet."""
        buf = self.buf
        if match := HMSG_RE.match(buf):
            try:
                subject, sid, _, reply, headers, size = match.groups()
                self.msg_arg = {"subject": subject, "sid": int(sid), "reply": reply or b""}
                self.header_needed, self.needed = int(headers), int(size)
            except (TypeError, ValueError) as exc:
                raise nats.errors.ProtocolError("nats: malformed HMSG") from exc
            del buf[: match.end()]
            self.state = AWAITING_MSG_PAYLOAD
        elif match := OK_RE.match(buf):
            del buf[: match.end()]
        elif match := ERR_RE.match(buf):
            error = (match.group(1) or b"").decode().lower()  # before the buffer moves under the match
            del buf[: match.end()]
            await self.nc._process_err(error)
        elif match := PING_RE.match(buf):
            del buf[: match.end()]
            await self.nc._process_ping()
        elif match := PONG_RE.match(buf):
            del buf[: match.end()]
            await self.nc._process_pong()
        elif match := INFO_RE.match(buf):
            info = json.loads(match.group(1).decode())
            del buf[: match.end()]
            await self.nc._process_info(info)
        elif len(buf) < MAX_CONTROL_LINE_SIZE and _CRLF in buf:
            raise nats.errors.ProtocolError("nats: unknown protocol")
        else:
            return False
        return True

    async def _deliver_bulk(self, bulk: bytearray) -> None:
        if bulk[-CRLF_SIZE:] != _CRLF:
            raise nats.errors.ProtocolError("nats: malformed MSG")
        del bulk[-CRLF_SIZE:]  # the end of the buffer: no copy
        self.state = AWAITING_CONTROL_LINE
        args = self.msg_arg
        await self.nc._process_msg(args["sid"], args["subject"], args["reply"], bulk, None)


class BusClient(Client):
    """nats-py's client with a receive path for megabyte messages: :class:`BulkParser`, and a read loop that takes
    up to :data:`READ_BYTES` from the socket at a time (nats-py asks for 32 KB, so a 1 MB message is 32 reads, parse
    calls and memory moves in asyncio's stream buffer). Read size only bounds a read: a small message is parsed as
    soon as it arrives. What nats-py's loop does on an error (end of stream, protocol error, socket error), this one
    does too."""

    def __init__(self) -> None:
        super().__init__()
        self._ps = BulkParser(self)

    async def _read_loop(self) -> None:
        while True:
            transport = self._transport
            if self.is_closed or self.is_reconnecting or transport is None:
                return
            try:
                if transport.at_eof():
                    eof = nats.errors.UnexpectedEOF()
                    await self._error_cb(eof)
                    await self._process_op_err(eof)
                    return
                await self._ps.parse(await transport.read(READ_BYTES))
            except nats.errors.ProtocolError:
                await self._process_op_err(nats.errors.ProtocolError())
                return
            except OSError as exc:
                await self._process_op_err(exc)
                return
            except asyncio.CancelledError:  # closing: nats-py cancels this task
                return
            except Exception:
                log.exception("nats client %s: read loop failed", self.options.get("name"))
                return
