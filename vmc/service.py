"""vmc under systemd: READY, STATUS, WATCHDOG and STOPPING (docs/service.md).

* READY=1 once the daemon is up (where it logs "vmc running": devices started, acceptors
  enabled on the wire or the reason they are not in STATUS).
* STATUS: one short line a person reads in ``systemctl status``, e.g.
  ``selling · credit 0.00 · coin ok, bill ok, reader offline · cloud up``; sent when it
  changes, looked at every ``STATUS_CHECK_S``.
* WATCHDOG=1 every ``$WATCHDOG_USEC``/2, and only after every health check answered within
  that interval: the event loop (it runs this), the journal writer thread (a read through its
  queue) and the MDB line process (a ping through its request queue). A stuck thread or a line
  process that stops answering withholds the ping and systemd restarts the daemon.
* STOPPING=1 when the shutdown starts; nothing more after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from drivers.errors import LinkClosed
from vmc.errors import VmcError
from vmc.journal import Journal, JournalClosed
from vmc.sd_notify import Notifier, watchdog_interval_s

log = structlog.get_logger("vmc.service")

#: How often the STATUS line is recomposed; it is sent only when it changed, so this is also
#: the most it is sent (a person reading ``systemctl status`` needs no finer than a second).
STATUS_CHECK_S = 1.0
#: Longest STATUS line: systemctl shows it on one line of a terminal.
STATUS_MAX_CHARS = 200
#: How the devices are called in the STATUS line.
DEVICE_LABELS = {"coin": "coin", "bill": "bill", "cashless": "reader"}


class PingableLine(Protocol):
    """The MDB line as the watchdog sees it (``drivers.mdb.line_process.LineProcessMaster``)."""

    link_up: bool

    async def ping(self, timeout_s: float) -> None:
        """A round trip through the line process's request queue."""


@dataclass(frozen=True)
class HealthCheck:
    """One part that must answer before a watchdog ping: ``probe()`` returns once it did."""

    name: str
    probe: Callable[[float], Awaitable[None]]


def journal_check(journal: Journal) -> HealthCheck:
    """A read through the writer thread's queue: it answers only when that thread takes jobs."""

    async def probe(_timeout_s: float) -> None:
        try:
            await journal.records(since_seq=journal.last_seq + 1, limit=1)
        except JournalClosed:
            raise
        except VmcError:
            pass  # an error from the writer thread is an answer: it is alive (health is STATUS)

    return HealthCheck("journal writer", probe)


def line_check(line: PingableLine) -> HealthCheck:
    """A ping through the line process. While the link is down (the port went away), the
    daemon's own reconnect loop is at work, bounded by its timeouts, and the machine is out of
    service (STATUS says so): a restart would not bring the port back, so that counts as alive."""

    async def probe(timeout_s: float) -> None:
        if line.link_up:
            with contextlib.suppress(LinkClosed):  # it went down just now: see above
                await line.ping(timeout_s)

    return HealthCheck("mdb line", probe)


def format_amount(amount: int, decimal_places: int) -> str:
    return f"{amount / 10**decimal_places:.{decimal_places}f}"


def status_line(snapshot: Mapping[str, Any], cloud: str | None) -> str:
    """The STATUS line from the vend cycle's snapshot and the cloud link's state (None when
    there is no cloud link)."""
    credit = int(snapshot.get("credit", 0))
    credit_text = "credit " + format_amount(credit, int(snapshot.get("decimal_places", 2)))
    if snapshot.get("in_service"):
        parts = ["selling", credit_text]
    else:
        faults: Mapping[str, str] = snapshot.get("faults", {})
        # The MDB link first: the devices' own faults follow from it while it is down.
        keys = sorted(faults, key=lambda key: key != "mdb")
        reasons = [_fault_text(key, faults[key]) for key in keys] or ["starting"]
        parts = ["out of service: " + "; ".join(reasons)]
        if credit:
            parts.append(credit_text)
    devices: Mapping[str, str] = snapshot.get("devices", {})
    if devices:
        parts.append(
            ", ".join(
                f"{DEVICE_LABELS.get(name, name)} {'ok' if state == 'ready' else state}"
                for name, state in devices.items()
            )
        )
    if cloud is not None:
        parts.append(f"cloud {cloud}")
    line = " · ".join(parts)
    return line if len(line) <= STATUS_MAX_CHARS else line[: STATUS_MAX_CHARS - 1] + "…"


def _fault_text(key: str, reason: str) -> str:
    if key == "mdb":
        return "mdb link down"
    if key == "stopping":
        return "stopping"
    return f"{key}: {reason}" if reason else key


def reporter_from_environment(
    status: Callable[[], str], journal: Journal, line: PingableLine | None
) -> ServiceReporter:
    """The reporter for this process: ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC``/``$WATCHDOG_PID``."""
    checks = [journal_check(journal)]
    if line is not None:
        checks.append(line_check(line))
    return ServiceReporter(
        Notifier.from_environment(),
        watchdog_interval_s=watchdog_interval_s(os.environ, os.getpid()),
        status=status,
        checks=checks,
    )


class ServiceReporter:
    """Tells the service manager how the daemon is; does nothing without ``NOTIFY_SOCKET``."""

    def __init__(
        self,
        notifier: Notifier,
        *,
        watchdog_interval_s: float | None,
        status: Callable[[], str],
        checks: Sequence[HealthCheck] = (),
    ) -> None:
        self.notifier = notifier
        self.watchdog_interval_s = watchdog_interval_s
        self._status = status
        self._checks = list(checks)
        self._last_status = ""
        self._stopping = False
        self._withheld: str | None = None  # why the last ping was withheld, while it is
        #: Watchdog pings sent (for the log and tests).
        self.pings = 0

    @property
    def enabled(self) -> bool:
        return self.notifier.enabled

    def add_check(self, check: HealthCheck) -> None:
        self._checks.append(check)

    def ready(self) -> None:
        self._last_status = self._safe_status()
        self.notifier.send({"READY": "1", "STATUS": self._last_status})
        log.info(
            "service manager told: ready",
            status=self._last_status,
            watchdog_s=self.watchdog_interval_s,
        )

    def stopping(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self.notifier.send({"STOPPING": "1", "STATUS": "stopping"})

    def close(self) -> None:
        self.notifier.close()

    async def run(self) -> None:
        """Status updates, and the watchdog when systemd asked for one; until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._status_updates(), name="service-status")
            if self.watchdog_interval_s is not None:
                group.create_task(self._watchdog(self.watchdog_interval_s), name="watchdog")

    async def _status_updates(self) -> None:
        while not self._stopping:
            await asyncio.sleep(STATUS_CHECK_S)
            line = self._safe_status()
            if line != self._last_status and not self._stopping:
                self._last_status = line
                self.notifier.send({"STATUS": line})

    def _safe_status(self) -> str:
        try:
            return self._status()
        except Exception as exc:  # a bug here must not stop the watchdog or the daemon
            log.warning("status line failed", error=repr(exc))
            return "status unavailable"

    async def _watchdog(self, interval_s: float) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            started = loop.time()
            # Each check gets the interval: one that takes longer makes the ping late anyway.
            problems = await asyncio.gather(*(self._probe(c, interval_s) for c in self._checks))
            problem = "; ".join(p for p in problems if p)
            if self._stopping:
                return
            if not problem:
                if self.notifier.send({"WATCHDOG": "1"}):
                    self.pings += 1
                if self._withheld is not None:
                    log.info("watchdog: every part answers again; pinging")
                    self._withheld = None
            elif problem != self._withheld:
                log.warning("watchdog: ping withheld", problem=problem)
                self._withheld = problem
            await asyncio.sleep(max(0.0, started + interval_s - loop.time()))

    @staticmethod
    async def _probe(check: HealthCheck, timeout_s: float) -> str | None:
        try:
            async with asyncio.timeout(timeout_s):
                await check.probe(timeout_s)
        except TimeoutError:
            return f"{check.name}: no answer within {timeout_s:g} s"
        except JournalClosed:
            return f"{check.name}: closed"
        return None
