"""The daemon's side of the console login (the ``console_login``, ``console_logout`` and
``console_status`` control ops, vmc/technician.py): the PIN checked off the event loop, the
lockout shared by every line (``PinGuard``), and the ``security`` records."""

from __future__ import annotations

import asyncio
from typing import Any

from vmc.config import ConsoleConfig
from vmc.console.auth import PinError, PinGuard, verify_pin
from vmc.journal import Journal, Source


def _error(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"ok": False, "error": code, "message": message, **extra}


class ConsoleLogin:
    def __init__(
        self, config: ConsoleConfig, journal: Journal, *, guard: PinGuard | None = None
    ) -> None:
        self.config = config
        self.journal = journal
        self.guard = guard or PinGuard(
            config.pin_hash,
            max_failures=config.max_failures,
            lockout_s=config.lockout_s,
            lockout_max_s=config.lockout_max_s,
        )
        #: The lockout (its end) whose refused tries were journaled already.
        self._locked_noted = 0.0
        #: One PIN check at a time: parallel tries on many connections must not all pass the
        #: lockout check before the first wrong one is counted.
        self._lock = asyncio.Lock()

    async def login(self, pin: str, line: str, source: Source) -> dict[str, Any]:
        """``{"ok": true, "user"}``, or ``wrong_pin``, ``locked`` (with ``retry_after_s``),
        ``no_pin``."""
        if not self.config.pin_hash:
            return _error("no_pin", "no console.pin_hash is configured: nobody can log in")
        async with self._lock:
            return await self._check(pin, line, source)

    async def _check(self, pin: str, line: str, source: Source) -> dict[str, Any]:
        guard = self.guard
        refused = guard.before_check()
        if refused is not None:
            # One record per lockout: tries sent while locked (a script on the line) must not
            # fill the journal; the lockout itself bounds the wrong PINs that are checked.
            if self._locked_noted != guard.locked_until:
                self._locked_noted = guard.locked_until
                await self._security("console_login_locked", f"{line}: tried while locked", source)
            return _error("locked", "the console is locked", retry_after_s=refused.retry_after_s)
        try:
            right = await asyncio.to_thread(verify_pin, pin, self.config.pin_hash)
        except PinError as exc:
            return _error("no_pin", str(exc))
        verdict = guard.record(right)
        if verdict.ok:
            await self._security("console_login", f"{line}: logged in", source)
            return {"ok": True, "user": source["user"]}
        detail = f"{line}: wrong PIN ({verdict.failures} in a row)"
        await self._security("console_pin_failed", detail, source)
        if verdict.lockout_started:
            locked = f"locked for {verdict.retry_after_s:g} s"
            await self._security("console_lockout", f"{line}: {locked}", source)
            return _error("locked", f"wrong PIN; {locked}", retry_after_s=verdict.retry_after_s)
        return _error("wrong_pin", "wrong PIN", retry_after_s=0.0)

    async def logout(self, line: str, reason: str, source: Source) -> None:
        await self._security("console_logout", f"{line}: {reason}", source)

    def status(self) -> dict[str, Any]:
        """Whether the console is locked and for how long (a screen can show it)."""
        return {
            "pin_set": bool(self.config.pin_hash),
            "locked_for_s": self.guard.locked_for(),
            "failures": self.guard.failures,
        }

    async def _security(self, what: str, detail: str, source: Source) -> None:
        await self.journal.append("security", {"what": what, "detail": detail[:200]}, source=source)
