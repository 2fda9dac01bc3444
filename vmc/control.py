"""The local control interface: how the customer's screen, the technician console and the
field-test rig act on the machine.

A unix stream socket (``control.socket``, default ``<state_dir>/control.sock``, mode 0660)
carrying JSON lines: one request object per line, one answer object per line. See
docs/control.md for the full reference. Requests:

* ``{"op": "state"}`` → ``{"ok": true, "state": {...}}``: credit, phase, faults, slots;
* ``{"op": "select", "slot": "A1"}`` → the vend's result, or ``{"ok": false, "error": code}``;
* ``{"op": "cancel"}`` → pays the credit back (the screen's return button);
* ``{"op": "qr_order", "slot": "A1"}`` → a QR e-wallet order for that slot: the order, its QR
  as a PNG (base64) and as text, or a refusal (``qr_unavailable`` while the cloud link is down);
* ``{"op": "qr_cancel"}`` → cancels the QR order shown;
* ``{"op": "subscribe"}`` → ``{"ok": true, "state": {...}}``, then one event object per line
  (``{"event": "credit", "credit": 150, ...}``) until the client disconnects;
* ``{"op": "ping"}`` → ``{"ok": true}``.

A bad line gets ``{"ok": false, "error": "bad_request", "message": ...}``; the connection stays,
except after a line longer than ``MAX_LINE_BYTES``: that one is answered, then the connection is
closed (the rest of the long line could not be told from the next request).

When the daemon stops: ``refuse_requests`` first (``select``, ``cancel`` and ``subscribe`` get
``{"ok": false, "error": "closing"}``; ``state`` and ``ping`` are still answered), then ``close``:
subscribers get the ``closing`` event and their stream ends after it; a request still waiting
for the machine (a vend that did not finish in the stop budget) gets ``closing`` too; then every
connection is closed. A client handler is never cancelled while it can still answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import structlog

from vmc.machine import VendMachine
from vmc.technician import Technician

log = structlog.get_logger("vmc.control")

#: Longest request line accepted: requests are tiny; this bounds a misbehaving client.
MAX_LINE_BYTES = 16 * 1024
SOCKET_MODE = 0o660
#: At shutdown, how long client handlers get to write their last line (a subscriber its
#: ``closing`` event, a waiting request its ``closing`` answer) and end by themselves.
CLIENT_CLOSE_WAIT_S = 0.3

T = TypeVar("T")

#: Ops of the QR payment method.
QR_OPS = ("qr_order", "qr_cancel")

CLOSING_UNFINISHED = (
    "the daemon stopped before this request finished; the journal holds what was done and "
    "the next start settles the rest (a vend that did not finish keeps the credit)"
)


class ControlServer:
    """Serves the control interface on a unix socket."""

    def __init__(
        self,
        path: Path,
        machine: VendMachine,
        *,
        extra_state: Callable[[], Mapping[str, Any]] | None = None,
        technician: Technician | None = None,
    ) -> None:
        self.path = path
        self.machine = machine
        #: The technician's ops (vmc/technician.py), when the daemon set them up.
        self.technician = technician
        self._extra_state = extra_state
        self._server: asyncio.AbstractServer | None = None
        self._clients: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        #: Clients answering a request or streaming events (the others wait for a line).
        self._busy: set[asyncio.Task[None]] = set()
        self._refusing: str | None = None
        self._closing = asyncio.Event()

    def state(self) -> dict[str, Any]:
        """STATE: the machine's snapshot and what the daemon adds (``mdb_link``,
        ``cloud_link``)."""
        state = self.machine.snapshot()
        if self._extra_state is not None:
            state.update(self._extra_state())
        return state

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(
            self._serve_client, path=str(self.path), limit=MAX_LINE_BYTES
        )
        os.chmod(self.path, SOCKET_MODE)
        log.info("control interface listening", socket=str(self.path))

    def refuse_requests(self, reason: str) -> None:
        """From now on ``select``, ``cancel`` and ``subscribe`` are answered ``closing``."""
        self._refusing = reason

    async def close(self) -> None:
        if self._refusing is None:
            self._refusing = "the daemon is stopping"
        if self._server is not None:
            self._server.close()  # no new connections
            self._closing.set()  # requests still waiting are answered "closing"
            self.machine.hub.publish({"event": "closing"})  # ends every subscriber's stream
            # Busy handlers write their last line and return by themselves.
            busy = set(self._busy)
            if busy:
                _done, busy = await asyncio.wait(busy, timeout=CLIENT_CLOSE_WAIT_S)
            # The others wait for a request line: closing their connection ends them.
            for task, writer in list(self._clients.items()):
                if task not in busy:
                    writer.close()
            if self._clients:
                _done, stuck = await asyncio.wait(self._clients, timeout=CLIENT_CLOSE_WAIT_S)
                for task in stuck:
                    self._clients[task].close()
                    task.cancel()  # the handler ends quietly when cancelled
                if stuck:
                    await asyncio.wait(stuck, timeout=CLIENT_CLOSE_WAIT_S)
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients[task] = writer
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # longer than MAX_LINE_BYTES
                    await _send(writer, _error("bad_request", "request line too long"))
                    break
                if not line:
                    break
                if not line.strip():
                    continue
                self._busy.add(task)
                try:
                    answer, subscribe = await self._answer(line)
                except Exception as exc:  # a machine bug must not take the socket down
                    request = line[:200].decode(errors="replace")
                    log.exception("control request failed", request=request)
                    answer, subscribe = _error("internal", f"{type(exc).__name__}: {exc}"), False
                await _send(writer, answer)
                if subscribe:
                    await self._stream_events(writer)
                    break
                self._busy.discard(task)
                if self._closing.is_set():
                    break
        except (ConnectionError, BrokenPipeError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Only close() cancels a handler, as a last resort, once its connection is closed.
            # Ending quietly keeps asyncio's stream callback from logging a traceback.
            pass
        finally:
            self._busy.discard(task)
            self._clients.pop(task, None)
            writer.close()
            with contextlib.suppress(ConnectionError, BrokenPipeError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _unless_closing(self, work: Awaitable[T]) -> T | None:
        """``work``'s result, or None if the daemon closes the interface first (``work`` is
        then cancelled: the machine's step goes on until the machine itself is stopped)."""
        job = asyncio.ensure_future(work)
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({job, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
        if job.done():
            return job.result()
        job.cancel()
        return None

    async def _answer(self, line: bytes) -> tuple[dict[str, Any], bool]:
        try:
            request = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _error("bad_request", f"not JSON: {exc}"), False
        if not isinstance(request, dict):
            return _error("bad_request", "a request is a JSON object"), False
        return await self.handle(request)

    async def call(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request answered in-process, as over the socket (the in-daemon serial console);
        ``subscribe`` is not available this way."""
        if request.get("op") == "subscribe":
            return _error("bad_request", "subscribe needs a socket connection")
        try:
            answer, _subscribe = await self.handle(request)
        except Exception as exc:  # as on the socket: a bug answers, it does not stop the caller
            log.exception("control request failed", request=str(request.get("op"))[:50])
            return _error("internal", f"{type(exc).__name__}: {exc}")
        return answer

    async def handle(self, request: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """The answer to one request object, and whether the client now subscribes."""
        op = request.get("op")
        machine = self.machine
        if op == "ping":
            return {"ok": True}, False
        if op == "state":
            return {"ok": True, "state": self.state()}, False
        if self.technician is not None and op in Technician.OPS:
            if self._refusing is not None:
                return _error("closing", self._refusing), False
            answer = await self._unless_closing(self.technician.handle(op, request))
            return answer if answer is not None else _error("closing", CLOSING_UNFINISHED), False
        if op not in ("subscribe", "select", "cancel", *QR_OPS):
            return _error("bad_request", f"unknown op {op!r}"), False
        if self._refusing is not None:
            return _error("closing", self._refusing), False
        if op == "subscribe":
            return {"ok": True, "state": self.state()}, True
        if op in QR_OPS:
            return await self._qr(op, request), False
        if op == "select":
            slot = request.get("slot")
            if not isinstance(slot, str):
                return _error("bad_request", 'select needs "slot": a slot id'), False
            result = await self._unless_closing(machine.select(slot))
        else:
            result = await self._unless_closing(machine.cancel())
        if result is None:
            log.info("control request not finished before the stop", op=op)
            return _error("closing", CLOSING_UNFINISHED), False
        return result, False

    async def _qr(self, op: str, request: Mapping[str, Any]) -> dict[str, Any]:
        """``qr_order`` and ``qr_cancel``, answered by the QR payment method (vmc/payments/qr.py)
        the daemon attached to the machine."""
        qr = self.machine.methods.get("qr")
        # Imported here: only a machine that offers QR loads it (qrcode, PIL: bench/footprint.py);
        # when ``qr`` is set, the module is loaded already.
        from vmc.payments.qr import QrPayments

        if not isinstance(qr, QrPayments):
            return _error("qr_unavailable", "QR payment is not set up on this machine")
        if op == "qr_order":
            slot = request.get("slot")
            if not isinstance(slot, str):
                return _error("bad_request", 'qr_order needs "slot": a slot id')
            result = await self._unless_closing(qr.create_order(slot))
        else:
            result = await self._unless_closing(qr.cancel_pending())
        if result is None:
            return _error("closing", CLOSING_UNFINISHED)
        return result

    async def _stream_events(self, writer: asyncio.StreamWriter) -> None:
        queue = self.machine.hub.subscribe()
        try:
            while True:
                event = await queue.get()
                await _send(writer, event)
                if event.get("event") == "closing":
                    return
        finally:
            self.machine.hub.unsubscribe(queue)


def _error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": code, "message": message}


async def _send(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
    writer.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
    await writer.drain()
