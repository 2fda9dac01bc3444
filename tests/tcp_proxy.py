"""A TCP proxy between the daemon and the broker that the tests steer: pass, blackhole, reset,
delay, slow drip, and refuse MQTT 5 (as a 3.1.1-only broker does).

It runs its own asyncio loop on a thread, so it serves in-process tests and daemon
subprocesses alike and is never slowed by the test's loop. Every method is thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

CHUNK = 16 * 1024
DRIP_STEP_S = 0.01
#: CONNACK in MQTT 3.1.1 form: return code 1, "unacceptable protocol version".
CONNACK_BAD_PROTOCOL = bytes([0x20, 0x02, 0x00, 0x01])


@dataclass
class Mode:
    blackhole: bool = False
    delay_s: float = 0.0
    drip_bytes_per_s: int = 0
    refuse_v5: bool = False
    refuse_connections: bool = False


def mqtt_protocol_level(first: bytes) -> int | None:
    """The protocol level of an MQTT CONNECT at the start of ``first`` (5 = MQTT 5)."""
    if not first or first[0] != 0x10:
        return None
    i = 1
    while i < len(first) and first[i] & 0x80:
        i += 1
    i += 1  # past the remaining length
    if len(first) < i + 2:
        return None
    (name_len,) = struct.unpack("!H", first[i : i + 2])
    level_at = i + 2 + name_len
    return first[level_at] if len(first) > level_at else None


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.mode = Mode()
        self.bytes_up = 0  # client → broker
        self.bytes_down = 0  # broker → client
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0

    # --- life cycle ------------------------------------------------------------------------

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._start()).result(10)
        return self

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self._close()).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._reset()

    # --- steering --------------------------------------------------------------------------

    def set(self, **fields: Any) -> None:
        """Replace the mode: ``set()`` passes everything through again."""
        self.mode = Mode(**fields)

    def reset(self) -> None:
        """Cut every open connection with a TCP RST (no FIN, no DISCONNECT)."""
        self._call(self._reset()).result(10)

    async def _reset(self) -> None:
        for writer in list(self._writers):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        self._writers.clear()

    # --- serving ---------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.mode.refuse_connections:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(
                self._pump(reader, up_writer, up=True, reply_to=writer),
                self._pump(up_reader, writer, up=False, reply_to=None),
            )
        except Exception:
            pass
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        up: bool,
        reply_to: asyncio.StreamWriter | None,
    ) -> None:
        first = True
        while True:
            data = await reader.read(CHUNK)
            if not data:
                writer.transport.abort()
                return
            mode = self.mode
            if first and up and reply_to is not None:
                first = False
                if mode.refuse_v5 and mqtt_protocol_level(data) == 5:
                    reply_to.write(CONNACK_BAD_PROTOCOL)
                    await reply_to.drain()
                    reply_to.close()
                    writer.transport.abort()
                    return
            if mode.blackhole:
                continue
            if up:
                self.bytes_up += len(data)
            else:
                self.bytes_down += len(data)
            if mode.delay_s:
                await asyncio.sleep(mode.delay_s)
            if mode.drip_bytes_per_s:
                step = max(1, int(mode.drip_bytes_per_s * DRIP_STEP_S))
                for i in range(0, len(data), step):
                    writer.write(data[i : i + step])
                    await writer.drain()
                    await asyncio.sleep(DRIP_STEP_S)
                continue
            writer.write(data)
            await writer.drain()
