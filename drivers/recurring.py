"""One log for a condition that recurs: its first failure at WARNING, the repeats at DEBUG, the
recovery at INFO.

A link that is down, a device that does not answer, a journal that cannot be written: each is
retried for as long as it lasts, and each retry fails again. The operator wants two lines (it
broke, why; it works again, after how many failures), not one per retry; the repeats stay
available at DEBUG. This is the only implementation of that rule in the project: the daemon's
code (``vmc``, structlog) and the drivers (stdlib ``logging``) both use it. It lives in
``drivers`` because ``drivers`` must not import ``vmc``; ``vmc.log`` re-exports it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

__all__ = ["FailureLog", "FieldLogger"]


class FieldLogger(Protocol):
    """A logger whose ``log`` takes the event's fields as keywords (structlog's bound loggers)."""

    def log(self, level: int, event: str | None = None, *args: Any, **kw: Any) -> Any: ...


class FailureLog:
    """The log of one recurring condition.

    ``failed(event, **fields)`` logs at WARNING the first time, at DEBUG while the condition
    lasts (with ``failures``, the count so far); ``recovered(event, **fields)`` logs at INFO once,
    only after a failure, with the number of failures it ended. ``logger`` is a structlog bound
    logger (fields become the event's keys) or a ``logging.Logger`` (fields go as ``extra``,
    which the daemon's log renders as keys too). Safe to call from several threads (the
    journal's writer thread reports through one).
    """

    def __init__(self, logger: FieldLogger | logging.Logger) -> None:
        self._logger = logger
        self._failures = 0
        self._lock = threading.Lock()

    @property
    def failing(self) -> bool:
        """A failure was logged and no recovery since."""
        return self._failures > 0

    @property
    def failures(self) -> int:
        """Failures since the last recovery (0 when not failing)."""
        return self._failures

    def failed(self, event: str, **fields: Any) -> bool:
        """Log a failure; True when it is the first (logged at WARNING)."""
        with self._lock:
            self._failures += 1
            count = self._failures
        if count == 1:
            self._emit(logging.WARNING, event, fields)
        else:
            self._emit(logging.DEBUG, event, {**fields, "failures": count})
        return count == 1

    def recovered(self, event: str, **fields: Any) -> bool:
        """Log the recovery at INFO if the condition was failing; True when it was."""
        with self._lock:
            count, self._failures = self._failures, 0
        if count == 0:
            return False
        self._emit(logging.INFO, event, {**fields, "failures": count})
        return True

    def _emit(self, level: int, event: str, fields: dict[str, Any]) -> None:
        logger = self._logger
        if isinstance(logger, logging.Logger):
            if logger.isEnabledFor(level):
                # "%s" keeps a literal % in the event from being taken as a format.
                logger.log(level, "%s", event, extra=fields)
            return
        logger.log(level, event, **fields)
