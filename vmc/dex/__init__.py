"""EVA-DTS audit data (issue 9, point 4): the DEX/UCS report built from the journal's counters
and records, read with or without reset, and the RS-232 DEX port a route technician's handheld
reads it from. See ``docs/dex.md``."""

from vmc.dex.crc import crc16_arc
from vmc.dex.service import AuditReading, DexError, build_dex_report, read_audit, reset_audit

__all__ = [
    "AuditReading",
    "DexError",
    "build_dex_report",
    "crc16_arc",
    "read_audit",
    "reset_audit",
]
