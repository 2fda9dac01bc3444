"""The local control interface: how the customer's screen, the technician console and the
field-test rig act on the machine.

A unix stream socket (``control.socket``, default ``<state_dir>/control.sock``, mode 0660)
carrying JSON lines: one request object per line, one answer object per line. See
docs/control.md for the full reference. Requests:

* ``{"op": "state"}`` → ``{"ok": true, "state": {...}}``: credit, phase, faults, slots;
* ``{"op": "select", "slot": "A1"}`` → the vend's result, or ``{"ok": false, "error": code}``;
* ``{"op": "cancel"}`` → pays the credit back (the screen's return button);
* ``{"op": "subscribe"}`` → ``{"ok": true, "state": {...}}``, then one event object per line
  (``{"event": "credit", "credit": 150, ...}``) until the client disconnects;
* ``{"op": "ping"}`` → ``{"ok": true}``.

A bad line gets ``{"ok": false, "error": "bad_request", "message": ...}``; the connection stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
from typing import Any

import structlog

from vmc.machine import VendMachine

log = structlog.get_logger("vmc.control")

#: Longest request line accepted: requests are tiny; this bounds a misbehaving client.
MAX_LINE_BYTES = 16 * 1024
SOCKET_MODE = 0o660
#: At shutdown, how long client handlers get to finish after their connections are closed.
CLIENT_CLOSE_WAIT_S = 0.3


class ControlServer:
    """Serves the control interface on a unix socket."""

    def __init__(self, path: Path, machine: VendMachine) -> None:
        self.path = path
        self.machine = machine
        self._server: asyncio.AbstractServer | None = None
        self._clients: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(
            self._serve_client, path=str(self.path), limit=MAX_LINE_BYTES
        )
        os.chmod(self.path, SOCKET_MODE)
        log.info("control interface listening", socket=str(self.path))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self.machine.hub.publish({"event": "closing"})  # ends every subscriber's stream
            # Close each client's connection so its handler sees the end and returns by itself;
            # cancel only the ones still busy (a select that is vending) after a short wait.
            for writer in self._clients.values():
                writer.close()
            if self._clients:
                _done, busy = await asyncio.wait(self._clients, timeout=CLIENT_CLOSE_WAIT_S)
                for task in busy:
                    task.cancel()
                if busy:
                    await asyncio.wait(busy, timeout=CLIENT_CLOSE_WAIT_S)
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
        except (ConnectionError, BrokenPipeError, asyncio.IncompleteReadError):
            pass
        finally:
            self._clients.pop(task, None)
            writer.close()
            with contextlib.suppress(ConnectionError, BrokenPipeError):
                await writer.wait_closed()

    async def _answer(self, line: bytes) -> tuple[dict[str, Any], bool]:
        try:
            request = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _error("bad_request", f"not JSON: {exc}"), False
        if not isinstance(request, dict):
            return _error("bad_request", "a request is a JSON object"), False
        op = request.get("op")
        machine = self.machine
        if op == "ping":
            return {"ok": True}, False
        if op == "state":
            return {"ok": True, "state": machine.snapshot()}, False
        if op == "subscribe":
            return {"ok": True, "state": machine.snapshot()}, True
        if op == "select":
            slot = request.get("slot")
            if not isinstance(slot, str):
                return _error("bad_request", 'select needs "slot": a slot id'), False
            return await machine.select(slot), False
        if op == "cancel":
            return await machine.cancel(), False
        return _error("bad_request", f"unknown op {op!r}"), False

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
