"""The transaction journal (issue 3): durable SQLite records of every money movement and sale,
crash recovery, lifetime counters, retention, reports. See ``docs/journal.md``."""

from vmc.journal.clock import Clock, SystemClock
from vmc.journal.reading import CounterMismatch
from vmc.journal.records import (
    LOCAL,
    RECORD_TYPES,
    IntentError,
    JournalClosed,
    JournalCorrupt,
    JournalError,
    JournalUnavailable,
    Record,
    RecordInvalid,
    SchemaTooNew,
    Source,
    console_source,
    counter_deltas,
    level_deltas,
    remote_source,
)
from vmc.journal.recovery import (
    DeviceFacts,
    customer_credit,
    reconcile_devices,
    resolve_open_intents,
    stock_levels,
)
from vmc.journal.store import DEFAULT_MIN_FREE_BYTES, HEALTH_PROBE_INTERVAL_S, Journal

__all__ = [
    "DEFAULT_MIN_FREE_BYTES",
    "HEALTH_PROBE_INTERVAL_S",
    "LOCAL",
    "RECORD_TYPES",
    "Clock",
    "CounterMismatch",
    "DeviceFacts",
    "IntentError",
    "Journal",
    "JournalClosed",
    "JournalCorrupt",
    "JournalError",
    "JournalUnavailable",
    "Record",
    "RecordInvalid",
    "SchemaTooNew",
    "Source",
    "SystemClock",
    "console_source",
    "counter_deltas",
    "customer_credit",
    "level_deltas",
    "reconcile_devices",
    "remote_source",
    "resolve_open_intents",
    "stock_levels",
]
