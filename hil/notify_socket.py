"""The receiving end of sd_notify, as systemd holds it: an AF_UNIX datagram socket whose address
goes into the daemon's ``NOTIFY_SOCKET``. For tests and for the systemctl stand-in
(hil/systemctl.py); it keeps every message with the time it arrived."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: Largest datagram read; a notification is a few hundred bytes.
MAX_DATAGRAM_BYTES = 4096
#: How long one look for new datagrams waits while a caller waits for a condition.
DRAIN_STEP_S = 0.1


@dataclass(frozen=True)
class Notification:
    at: float  # time.monotonic() when it arrived
    fields: dict[str, str]


def parse(datagram: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in datagram.decode(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value
    return fields


class NotifySocket:
    """A bound datagram socket: ``address`` is what NOTIFY_SOCKET says (``@name`` when abstract)."""

    def __init__(self, path: Path | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        if path is None:
            name = f"vmc-notify-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind(b"\0" + name.encode())
            self.address = "@" + name
        else:
            self.sock.bind(str(path))
            self.address = str(path)
        self._path = path
        self.received: list[Notification] = []

    def drain(self, wait_s: float = 0.0) -> list[Notification]:
        """Read what has arrived, waiting at most ``wait_s`` for the first one."""
        new: list[Notification] = []
        if wait_s > 0:
            self.sock.settimeout(wait_s)
        else:
            self.sock.setblocking(False)
        while True:
            try:
                datagram = self.sock.recv(MAX_DATAGRAM_BYTES)
            except (BlockingIOError, TimeoutError):
                break
            new.append(Notification(time.monotonic(), parse(datagram)))
            self.sock.setblocking(False)
        self.received += new
        return new

    def wait_for(
        self,
        predicate: Callable[[Notification], bool],
        timeout_s: float,
        what: str,
        since: int = 0,
    ) -> Notification:
        """The first notification at index ``since`` or later of ``received`` (arriving ones
        included) for which ``predicate`` holds; AssertionError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        index = since
        while True:
            while index < len(self.received):
                note = self.received[index]
                index += 1
                if predicate(note):
                    return note
            left = deadline - time.monotonic()
            if left <= 0:
                statuses = [n.fields["STATUS"] for n in self.received if "STATUS" in n.fields]
                raise AssertionError(
                    f"no {what} within {timeout_s} s; STATUS lines so far: {statuses}"
                )
            self.drain(min(left, DRAIN_STEP_S))

    def close(self) -> None:
        self.sock.close()
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()
