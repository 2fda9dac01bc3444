"""One console session on a byte stream (a serial line, a terminal): the PIN, then commands
until logout, idle time or a dropped line.

The session is a client of the control interface: ``call`` sends one request and returns its
answer, in-process for the serial console inside the daemon (``ControlServer.call``) or over
the control socket for ``vmc console``. The PIN is checked, and wrong tries counted and locked
out, by the daemon (``console_login``), so every line shares one lockout.
"""

from __future__ import annotations

import asyncio
import enum
import shlex
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog

from vmc.console.commands import Context, UsageError, complete, find, help_text
from vmc.console.lineedit import CRLF, Key, LineEditor

log = structlog.get_logger("vmc.console")

Caller = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

PIN_PROMPT = "PIN: "
COMMAND_PROMPT = "vmc> "
#: The PIN prompt waits this long for a key before it starts afresh (a half-typed PIN left on
#: an unattended line is forgotten); the command prompt uses ``console.idle_logout_s``.
PIN_IDLE_S = 60.0


class ByteStream(Protocol):
    async def read(self) -> bytes:
        """The next bytes typed; ``b""`` when the line dropped."""
        ...

    async def write(self, data: bytes) -> None:
        """Send bytes (a dropped line swallows them)."""
        ...


class Ended(enum.Enum):
    LOGOUT = "logout"
    IDLE = "idle"
    DROPPED = "line dropped"


class Session:
    def __init__(
        self,
        stream: ByteStream,
        call: Caller,
        *,
        line: str,
        idle_logout_s: float,
        user: str | None = None,
    ) -> None:
        self.stream = stream
        self.call = call
        self.line = line
        self.idle_logout_s = idle_logout_s
        self.user = user
        self.ctx = Context()
        self.editor = LineEditor(lambda text: complete(text, self.ctx))
        self._pending = b""

    def _who(self) -> dict[str, Any]:
        return {"line": self.line} | ({"user": self.user} if self.user else {})

    async def _say(self, text: str) -> None:
        await self.stream.write(text.replace("\r\n", "\n").replace("\n", "\r\n").encode() + CRLF)

    async def _entry(self, prompt: str, *, secret: bool, idle_s: float) -> str | Key | Ended:
        """The next line typed at ``prompt``; ``Ended.IDLE`` after ``idle_s`` without a key."""
        await self.stream.write(self.editor.start(prompt, secret=secret))
        while True:
            while self._pending:
                byte, self._pending = self._pending[0], self._pending[1:]
                echo, entry = self.editor.key(byte)
                if echo:
                    await self.stream.write(echo)
                if entry is not None:
                    return entry
            try:
                async with asyncio.timeout(idle_s):
                    data = await self.stream.read()
            except TimeoutError:
                return Ended.IDLE
            if not data:
                return Ended.DROPPED
            self._pending = data

    async def run(self) -> Ended:
        """Log in, then serve commands; returns how the session ended."""
        await self._say(f"\r\nvmc technician console ({self.line})")
        ended = await self._login()
        if ended is not None:
            return ended
        ended = await self._commands()
        await self._logout(ended)
        return ended

    async def _login(self) -> Ended | None:
        while True:
            entry = await self._entry(PIN_PROMPT, secret=True, idle_s=PIN_IDLE_S)
            if entry is Ended.DROPPED:
                return Ended.DROPPED
            if entry is Ended.IDLE:
                await self.stream.write(CRLF)  # the half-typed PIN is forgotten
                continue
            if isinstance(entry, Key) or entry == "":
                continue
            assert isinstance(entry, str)
            answer = await self.call({"op": "console_login", "pin": entry, **self._who()})
            if answer.get("ok"):
                self.user = str(answer.get("user", self.user or ""))
                await self._load_context()
                await self._say(f"logged in as {self.user}; type help for the commands")
                return None
            if answer.get("error") == "locked":
                await self._say(f"locked: try again in {_seconds(answer['retry_after_s'])} s")
            elif answer.get("error") == "wrong_pin":
                await self._say("wrong PIN")
            else:
                await self._say(f"cannot log in: {answer.get('message', answer)}")

    async def _load_context(self) -> None:
        answer = await self.call({"op": "state"})
        state = answer.get("state", {})
        self.ctx.decimals = int(state.get("decimal_places", 2))
        self.ctx.currency = str(state.get("currency", ""))
        self.ctx.slots = [s["slot"] for s in state.get("slots", [])]
        devices = await self.call({"op": "devices"})
        self.ctx.devices = [d["device"] for d in devices.get("devices", [])]

    async def _logout(self, ended: Ended) -> None:
        if ended is Ended.IDLE:
            await self._say("\r\nlogged out (idle)")
        elif ended is Ended.LOGOUT:
            await self._say("logged out")
        try:
            await self.call({"op": "console_logout", "reason": ended.value, **self._who()})
        except (OSError, ConnectionError) as exc:  # the daemon went away meanwhile
            log.warning("console logout not journaled", error=str(exc))

    async def _commands(self) -> Ended:
        while True:
            entry = await self._entry(COMMAND_PROMPT, secret=False, idle_s=self.idle_logout_s)
            if isinstance(entry, Ended):
                return entry
            if entry is Key.END:
                return Ended.LOGOUT
            if isinstance(entry, Key) or not entry.strip():
                continue
            if await self._run_line(entry) is Ended.LOGOUT:
                return Ended.LOGOUT

    async def _run_line(self, text: str) -> Ended | None:
        try:
            words = shlex.split(text)
        except ValueError as exc:
            await self._say(f"cannot read that: {exc}")
            return None
        found = find(words)
        if found is None:
            await self._say(f"unknown command {words[0]!r}: type help")
            return None
        command, args = found
        try:
            if command.name == "help":
                await self._say(help_text(args))
                return None
            if command.name == "logout":
                return Ended.LOGOUT
            request = command.build(args, self.ctx)
        except UsageError as exc:
            await self._say(str(exc))
            return None
        answer = await self.call({**request, **self._who()})
        if not answer.get("ok"):
            await self._say(f"refused: {answer.get('error')}: {answer.get('message', '')}")
            return None
        await self._say(command.show(answer, self.ctx))
        return None


def _seconds(value: float) -> str:
    """Seconds as a person reads them: ``0.5``, ``2``, ``30``."""
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}".rstrip("0").rstrip(".")
