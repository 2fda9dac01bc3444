"""Where the journal gets its times: the ``Clock`` protocol and the real ``SystemClock``."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    """Where the journal gets its times; tests inject their own."""

    def wall(self) -> datetime:
        """Wall-clock time, timezone-aware UTC (may jump: no RTC, late NTP)."""
        ...

    def monotonic_ns(self) -> int:
        """A monotonic clock in nanoseconds, as ``time.monotonic_ns``."""
        ...


class SystemClock:
    """The real clocks."""

    def wall(self) -> datetime:
        return datetime.now(UTC)

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()
