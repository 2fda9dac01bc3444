"""The service manager's notification protocol (sd_notify), written out: a datagram of
``KEY=VALUE`` lines to the AF_UNIX socket named in ``$NOTIFY_SOCKET`` (a path, or an abstract
address written with a leading ``@``), as systemd documents it in sd_notify(3).

Sending never blocks and never raises: the socket is non-blocking, and a manager that is gone
or a full queue only loses that one message (logged once, then at DEBUG). Without
``NOTIFY_SOCKET`` nothing is sent at all.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger("vmc.sd_notify")

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"


def notify_address(value: str) -> str | bytes | None:
    """The socket address for ``$NOTIFY_SOCKET``; None when it names no AF_UNIX socket
    (systemd also allows ``vsock:``, which a vending machine's board does not use)."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def watchdog_interval_s(env: Mapping[str, str], pid: int) -> float | None:
    """How often to ping: half of ``$WATCHDOG_USEC`` (sd_watchdog_enabled(3) recommends
    half), or None when there is no watchdog for this process (unset, not a positive number,
    or ``$WATCHDOG_PID`` names another process)."""
    try:
        usec = int(env.get(WATCHDOG_USEC_ENV, ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    watchdog_pid = env.get(WATCHDOG_PID_ENV)
    if watchdog_pid is not None:
        try:
            if int(watchdog_pid) != pid:
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000


class Notifier:
    """Sends notifications to the service manager, or nothing when there is none."""

    def __init__(self, address: str | bytes | None) -> None:
        self.address = address
        self._sock: socket.socket | None = None
        self._failing = False
        if address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> Notifier:
        value = (os.environ if env is None else env).get(NOTIFY_SOCKET_ENV, "")
        address = notify_address(value) if value else None
        if value and address is None:
            log.warning("NOTIFY_SOCKET is not an AF_UNIX address; not notifying", value=value)
        return cls(address)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, fields: Mapping[str, str]) -> bool:
        """Send one notification (e.g. ``{"READY": "1", "STATUS": "selling"}``); True when it
        went out. A newline in a value would start a new assignment: it becomes a space."""
        sock = self._sock
        if sock is None:
            return False
        text = "".join(f"{key}={value.replace(chr(10), ' ')}\n" for key, value in fields.items())
        try:
            sock.sendto(text.encode(), self.address)  # type: ignore[arg-type]
        except OSError as exc:  # gone, refused, queue full (EAGAIN): this message is lost
            if not self._failing:
                log.warning("service manager notification failed", error=str(exc))
                self._failing = True
            else:
                log.debug("service manager notification failed", error=str(exc))
            return False
        if self._failing:
            log.info("service manager notifications go through again")
            self._failing = False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
