"""A control socket for simulators running as their own process.

JSON lines over a unix socket: each request is one JSON object on a line, each answer one JSON
object on a line: ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``.

Requests:
* ``{"cmd": "status"}`` / ``{"cmd": "ledger"}``: every device's status / ledger, by name;
* ``{"cmd": "drop_link", "seconds": S}``: the port disappears for S seconds (``SimBus``);
* ``{"cmd": "link"}``: whether the port is up, its path or URL, how often it was dropped;
* ``{"device": NAME, "cmd": "fault", <Faults fields>}``: set faults (``garbage`` as hex);
* ``{"device": NAME, "cmd": "reset_itself"}``: an unsolicited reset;
* ``{"device": NAME, "cmd": "flush"}``: send the POLL items held back by ``batch_items``;
* ``{"device": NAME, "cmd": ..., ...}``: anything else goes to that device's ``control``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hil.sim.peripheral import Faults, SimPeripheral

if TYPE_CHECKING:  # the bus imports this module (write_link_file)
    from hil.sim.bus import SimBus

#: Longest request line accepted (a control request is small).
MAX_REQUEST_BYTES = 64 * 1024
CLIENT_TIMEOUT_S = 5.0


def apply_faults(faults: Faults, request: dict[str, Any]) -> None:
    """Check every field first, then set them all: a bad request changes nothing."""
    values: dict[str, Any] = {}
    for key, value in request.items():
        if key in ("cmd", "device"):
            continue
        if key not in Faults.__dataclass_fields__:
            raise KeyError(f"unknown fault {key!r}")
        kind = type(getattr(faults, key))
        if key == "garbage":
            value = bytes.fromhex(value)
        elif kind is bool:
            if value not in (True, False):  # 1 and 0 too
                raise ValueError(f"fault {key!r} takes true or false, not {value!r}")
            value = bool(value)
        else:
            value = kind(value)
            if value < 0:
                raise ValueError(f"fault {key!r} must not be negative: {value}")
        values[key] = value
    for key, value in values.items():
        setattr(faults, key, value)


def dispatch(
    peripherals: list[SimPeripheral], request: dict[str, Any], bus: SimBus | None = None
) -> Any:
    """Answer one control request. ``bus``: the bus serving ``peripherals``, for the link
    controls and to save the physical state (``--state``) after the request."""
    try:
        return _dispatch(peripherals, request, bus)
    finally:
        if bus is not None:
            bus.save_state()  # outside every device's lock: the save takes each in turn


def _dispatch(peripherals: list[SimPeripheral], request: dict[str, Any], bus: SimBus | None) -> Any:
    cmd = request.get("cmd")
    if cmd == "status":
        return {p.NAME: p.status() for p in peripherals}
    if cmd == "ledger":
        return {p.NAME: p.ledger() for p in peripherals}
    if cmd in ("drop_link", "link") and "device" not in request:
        if bus is None:
            raise KeyError(f"{cmd}: no bus to control here")
        if cmd == "link":
            return bus.link_status()
        return bus.drop_link(float(request["seconds"]))
    name = request.get("device")
    matches = [p for p in peripherals if name == p.NAME]
    if not matches:
        raise KeyError(f"no simulated device named {name!r}")
    device = matches[0]
    with device.lock:
        if cmd == "fault":
            apply_faults(device.faults, request)
            return device.faults.as_dict()
        if cmd == "reset_itself":
            device.reset_itself()
            return {}
        if cmd == "flush":
            return {"queued": device.flush()}
        return device.control(request)


Handler = Callable[[dict[str, Any]], Any]


class ControlServer:
    """Serves JSON-line control requests on a unix socket, one thread per client."""

    def __init__(self, path: Path | str, handler: Handler) -> None:
        self.path = Path(path)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        outer = self

        class _Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                for line in self.rfile:
                    if len(line) > MAX_REQUEST_BYTES:
                        answer: dict[str, Any] = {"ok": False, "error": "request too long"}
                    else:
                        answer = outer._answer(line)
                    self.wfile.write(json.dumps(answer).encode() + b"\n")
                    self.wfile.flush()

        self._handler = handler
        self._server = socketserver.ThreadingUnixStreamServer(str(self.path), _Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="sim-control", daemon=True
        )

    def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("a request is a JSON object")
            return {"ok": True, "result": self._handler(request)}
        except Exception as exc:  # any bad request gets an answer, never kills the server
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class JsonLineClient:
    """One blocking connection to a JSON-lines unix socket (a simulator's control socket, the
    daemon's control interface): one request line, one answer line."""

    def __init__(self, path: Path | str, timeout_s: float = CLIENT_TIMEOUT_S) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout_s)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rwb")

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        self.file.write(json.dumps(request).encode() + b"\n")
        self.file.flush()
        return self.read()

    def read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise ConnectionError("socket closed")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()

    def __enter__(self) -> JsonLineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ControlClient(JsonLineClient):
    """A simulator's control socket: returns ``result``, raises on ``ok: false``."""

    def call(self, request: dict[str, Any]) -> Any:  # type: ignore[override]
        answer = super().call(request)
        if not answer.get("ok"):
            raise RuntimeError(answer.get("error", "simulator refused the request"))
        return answer.get("result")


async def call_async(
    path: Path | str, request: dict[str, Any], timeout_s: float = CLIENT_TIMEOUT_S
) -> dict[str, Any]:
    """One request on a JSON-lines control socket from asyncio: the whole answer object."""
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_unix_connection(str(path))
        try:
            writer.write(json.dumps(request).encode() + b"\n")
            await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
            await writer.wait_closed()
    answer = json.loads(line)
    if not isinstance(answer, dict):
        raise ValueError(f"control answer is not an object: {line!r}")
    return answer


def write_link_file(path: Path | str, port: str) -> None:
    """Publish the port path atomically, so a reader never sees half a name."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(port + "\n")
    os.replace(tmp, path)
