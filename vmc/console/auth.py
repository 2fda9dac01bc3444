"""The console's PIN: only a salted scrypt hash is in the configuration (``console.pin_hash``,
printed by ``vmc console hash-pin``), and wrong PINs lock the console for growing delays.

The lockout is kept by the daemon (``PinGuard`` behind the ``console_login`` control op), so a
serial line and every terminal share it: restarting ``vmc console`` does not reset it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

#: scrypt cost (RFC 7914): n = 2**14, r = 8, p = 1 is the interactive-login setting of the
#: RFC's section 2 and Python's docs; about 16 MiB and tens of milliseconds on a board's CPU.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
#: The memory bound handed to scrypt: 128 * n * r bytes plus headroom.
SCRYPT_MAXMEM = 64 * 1024 * 1024
#: A PIN is 4 to 12 digits: what a keypad or a serial terminal lets a technician type.
MIN_PIN_DIGITS = 4
MAX_PIN_DIGITS = 12


class PinError(ValueError):
    """A PIN that is not 4 to 12 digits, or a configured hash that cannot be read."""


def check_pin_shape(pin: str) -> None:
    if not (pin.isascii() and pin.isdigit() and MIN_PIN_DIGITS <= len(pin) <= MAX_PIN_DIGITS):
        raise PinError(f"a PIN is {MIN_PIN_DIGITS} to {MAX_PIN_DIGITS} digits")


def _scrypt(pin: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        pin.encode(), salt=salt, n=n, r=r, p=p, maxmem=SCRYPT_MAXMEM, dklen=HASH_BYTES
    )


def hash_pin(pin: str) -> str:
    """``scrypt:N:r:p:<salt hex>:<hash hex>``, the value for ``console.pin_hash``."""
    check_pin_shape(pin)
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(pin, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"scrypt:{SCRYPT_N}:{SCRYPT_R}:{SCRYPT_P}:{salt.hex()}:{digest.hex()}"


def verify_pin(pin: str, stored: str) -> bool:
    """Whether ``pin`` matches ``stored`` (a ``hash_pin`` value); False for an empty hash.
    CPU-bound (scrypt): call it off the event loop."""
    if not stored:
        return False
    try:
        kind, n, r, p, salt, digest = stored.split(":")
        if kind != "scrypt":
            raise ValueError(kind)
        expected = bytes.fromhex(digest)
        got = _scrypt(pin, bytes.fromhex(salt), int(n), int(r), int(p))
    except ValueError as exc:
        raise PinError(f"console.pin_hash cannot be read: {exc}") from None
    return hmac.compare_digest(got, expected)


@dataclass(frozen=True)
class Verdict:
    """A login attempt's outcome: ``ok``; else ``locked`` (refused unchecked, the console is
    locked) or a wrong PIN; ``retry_after_s``: how long until the next try is looked at;
    ``lockout_started``: this failure locked the console."""

    ok: bool
    locked: bool = False
    retry_after_s: float = 0.0
    failures: int = 0
    lockout_started: bool = False


class PinGuard:
    """Counts wrong PINs; after ``max_failures`` in a row the console is locked for
    ``lockout_s``, and each further wrong PIN after a lockout locks it for twice as long as the
    last, up to ``lockout_max_s``. A right PIN clears it all. ``clock``: seconds, monotonic
    (tests hand in their own)."""

    def __init__(
        self,
        pin_hash: str,
        *,
        max_failures: int,
        lockout_s: float,
        lockout_max_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pin_hash = pin_hash
        self.max_failures = max_failures
        self.lockout_s = lockout_s
        self.lockout_max_s = lockout_max_s
        self._clock = clock
        self.failures = 0
        self.locked_until = 0.0
        self._last_lockout_s = 0.0

    def locked_for(self) -> float:
        """Seconds the console stays locked (0 when not locked)."""
        return max(0.0, self.locked_until - self._clock())

    def before_check(self) -> Verdict | None:
        """A refusal when locked (the PIN is then not even checked), else None."""
        left = self.locked_for()
        if left > 0:
            return Verdict(ok=False, locked=True, retry_after_s=left, failures=self.failures)
        return None

    def record(self, right: bool) -> Verdict:
        """Count one checked attempt."""
        if right:
            self.failures = 0
            self._last_lockout_s = 0.0
            self.locked_until = 0.0
            return Verdict(ok=True)
        self.failures += 1
        if self.failures < self.max_failures:
            return Verdict(ok=False, failures=self.failures)
        delay = (
            self.lockout_s
            if self._last_lockout_s == 0.0
            else min(self._last_lockout_s * 2, self.lockout_max_s)
        )
        self._last_lockout_s = delay
        self.locked_until = self._clock() + delay
        return Verdict(ok=False, retry_after_s=delay, failures=self.failures, lockout_started=True)
