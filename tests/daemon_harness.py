"""The daemon harness lives in ``hil.harness`` (the crash campaign and benches use it too)."""

from hil.harness import (
    CALL_TIMEOUT_S,
    DEFAULT_SLOTS,
    START_TIMEOUT_S,
    Daemon,
    ExternalSims,
    JsonLineClient,
    call,
    journal_records,
    wait_until,
    write_config,
)

__all__ = [
    "CALL_TIMEOUT_S",
    "DEFAULT_SLOTS",
    "START_TIMEOUT_S",
    "Daemon",
    "ExternalSims",
    "JsonLineClient",
    "call",
    "journal_records",
    "wait_until",
    "write_config",
]
