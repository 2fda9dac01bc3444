"""Starting the MDB line process (drivers/mdb/line_child.py), early if the caller can.

The line process needs a Python start and its own imports before it opens the port (~0.1 s on
the development board), and the daemon needs ~0.3 s of imports before it could start it. A
caller that knows the line's settings before those imports (``vmc run``, right after reading
its configuration) calls :func:`prespawn`; the ``LineProcessMaster`` that later asks for a child
with the same settings takes that one over (:func:`take_prespawned`) instead of starting
another, so the two starts overlap. One that is never taken is killed at exit.

An early child can also start the devices' start-up while the daemon imports (``EarlyDevice``):
the bus reset where the link carries one, each device's RESET, then its POLLs at its interval
until it answers with something (JUST RESET), which waits for the daemon as an autopoll result
(drivers/mdb/autopoll.py). The daemon's device then goes on from there
(``MdbDevice.start_up``) instead of sending its own RESET.

This module imports nothing heavy: it runs before the daemon's imports.
"""

from __future__ import annotations

import atexit
import contextlib
import socket
import subprocess
import sys
from dataclasses import dataclass

#: The child's entry point.
CHILD_MODULE = "drivers.mdb.line_child"
#: The log level number of TRACE (below DEBUG): every byte on the line.
TRACE_LEVEL = 5


@dataclass(frozen=True)
class LineSettings:
    """What the child is started with (its socket aside)."""

    kind: str
    port: str
    slack_s: float
    log_level: int
    pcap: str = ""
    realtime_priority: int | None = None

    def argv(self, fd: int) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            CHILD_MODULE,
            "--fd",
            str(fd),
            "--kind",
            self.kind,
            "--port",
            self.port,
            "--slack-s",
            str(self.slack_s),
            "--log-level",
            str(self.log_level),
        ]
        if self.pcap:
            argv += ["--pcap", self.pcap]
        if self.realtime_priority:
            argv += ["--realtime-priority", str(self.realtime_priority)]
        return argv


@dataclass(frozen=True)
class EarlyDevice:
    """One device to RESET and POLL before the daemon is up."""

    address: int  # the device's MDB address; RESET is command 0 (MDB 4.2, every device)
    poll_cmd: int  # its POLL command (0x03, or 0x02 for a cashless reader)
    every_s: float  # its POLL interval

    def as_arg(self) -> str:
        return f"{self.address}:{self.poll_cmd}:{self.every_s}"

    @classmethod
    def from_arg(cls, text: str) -> EarlyDevice:
        address, poll_cmd, every_s = text.split(":")
        return cls(int(address), int(poll_cmd), float(every_s))


#: The POLL command of each device the daemon drives (MDB 4.2: the cashless reader's is 0x12).
POLL_COMMANDS = {"coin": 0x03, "bill": 0x03, "cashless": 0x02}
#: Their addresses (mdb.md "Wire"), as the device classes name them.
DEVICE_ADDRESSES = {"coin": 0x08, "bill": 0x30, "cashless": 0x10}


@dataclass
class Prespawned:
    settings: LineSettings
    process: subprocess.Popen[bytes]
    parent_sock: socket.socket


_waiting: Prespawned | None = None


def prespawn(settings: LineSettings, early: tuple[EarlyDevice, ...] = ()) -> None:
    """Start the line process now; the first master asking for ``settings`` takes it over.
    ``early``: the devices it starts up as far as their JUST RESET meanwhile."""
    global _waiting
    if _waiting is not None:
        return
    parent_sock, child_sock = socket.socketpair()
    argv = settings.argv(child_sock.fileno())
    for device in early:
        argv += ["--early", device.as_arg()]
    try:
        process = subprocess.Popen(
            argv,
            pass_fds=(child_sock.fileno(),),
            stdin=subprocess.DEVNULL,
        )
    except OSError:
        parent_sock.close()
        return  # the master starts its own child, and reports the error then
    finally:
        child_sock.close()
    _waiting = Prespawned(settings, process, parent_sock)
    atexit.register(_kill_unclaimed)


def take_prespawned(settings: LineSettings) -> Prespawned | None:
    """The child started early with exactly ``settings``, once; None otherwise (a child with
    other settings is stopped: nobody will use it)."""
    global _waiting
    waiting, _waiting = _waiting, None
    if waiting is None:
        return None
    if waiting.settings != settings or waiting.process.poll() is not None:
        _stop(waiting)
        return None
    return waiting


def _stop(waiting: Prespawned) -> None:
    waiting.parent_sock.close()  # the child sees EOF and stops
    with contextlib.suppress(OSError):
        waiting.process.kill()
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        waiting.process.wait(timeout=1.0)


def _kill_unclaimed() -> None:
    global _waiting
    waiting, _waiting = _waiting, None
    if waiting is not None:
        _stop(waiting)
