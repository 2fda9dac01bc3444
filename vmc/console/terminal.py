"""``vmc console --config FILE``: the console in a terminal, a client of the running daemon's
control socket (``control.socket``). The terminal is put in raw mode while it runs (the line
editor echoes), and restored on the way out; stdin that is not a terminal (a pipe) is read
as it comes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import termios
import tty
from pathlib import Path
from typing import Any

from vmc.config import Config
from vmc.console.session import Session

#: How long one control request may take: a motor test or a payout is seconds (the vend
#: cycle's turn and drop timeouts, the changer's payout), never minutes.
REQUEST_TIMEOUT_S = 60.0
#: Answers are at most a report or a journal tail; the socket's own limit is for requests.
ANSWER_LIMIT_BYTES = 4 * 1024 * 1024


class _Stdio:
    """``ByteStream`` over stdin and stdout."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader

    async def read(self) -> bytes:
        return await self.reader.read(256)

    async def write(self, data: bytes) -> None:
        os.write(sys.stdout.fileno(), data)


class _SocketCaller:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        if self._conn is None:
            self._conn = await asyncio.open_unix_connection(
                str(self.path), limit=ANSWER_LIMIT_BYTES
            )
        reader, writer = self._conn
        writer.write(json.dumps(request).encode() + b"\n")
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            await writer.drain()
            line = await reader.readline()
        if not line:
            self._conn = None
            raise ConnectionError("the daemon closed the control socket")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        if self._conn is not None:
            self._conn[1].close()


async def run_terminal(config: Config) -> int:
    """One session on stdin/stdout; exit status 0 after a logout, 1 if the daemon is gone."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    caller = _SocketCaller(Path(config.control.socket))
    session = Session(
        _Stdio(reader), caller, line="terminal", idle_logout_s=config.console.idle_logout_s
    )
    try:
        await caller({"op": "ping"})  # is the daemon there, before the PIN is asked
        ended = await session.run()
    except (OSError, ConnectionError) as exc:
        why = f"vmc console: cannot reach the daemon at {caller.path}: {exc}"
        os.write(sys.stdout.fileno(), f"\r\n{why}\r\n".encode())
        return 1
    finally:
        caller.close()
    # Ended.DROPPED here is stdin closing (Ctrl-D at the PIN, a pipe that ended): not an error.
    del ended
    return 0


def main(config: Config) -> int:
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    try:
        if saved is not None:
            tty.setraw(fd)
        return asyncio.run(run_terminal(config))
    finally:
        if saved is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(fd, termios.TCSADRAIN, saved)
