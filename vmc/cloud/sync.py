"""The journal is the outbox: its records go to the backend in batches, in seq order, and count
as synced only when the backend's ``journal/ack`` says so (a PUBACK only says the broker has
the batch).

* At every connection (so after every reconnect and every restart) sending starts again at the
  first unacknowledged seq: ``journal.acked_upto + 1``. Duplicates are expected; the backend
  drops them by ``(machine, journal, seq)``.
* A batch is ``{"machine": M, "journal": J, "records": [...]}`` with 1 to ``batch_records``
  (≤ 500) records in ascending seq and at most 64 KiB of payload (a batch is cut short to fit),
  published at QoS 1; at most ``max_in_flight`` batches are out without an ack.
* Nothing is read at start: each batch is read from SQLite (on the journal's own thread) when
  there is room to send it, so 100,000 unacknowledged records cost nothing until the link is
  up, and then never more than ``max_in_flight`` batches of memory.
* A new record wakes the sender at once (``Journal.on_append``).
* An ack is applied by ``Journal.ack``, which ignores stale, repeated, foreign-journal and
  beyond-the-last-seq acks. When no ack advances for ``ack_timeout_s`` while batches are out
  (the backend lost them, or restarted), sending starts again from the first unacknowledged
  seq.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import structlog

from vmc.cloud.link import MAX_PAYLOAD_BYTES, cancel_and_wait
from vmc.journal import Journal, Record

if TYPE_CHECKING:
    from vmc.cloud.link import Session

log = structlog.get_logger("vmc.cloud.sync")

#: Contract: 1 to 500 records per batch.
MAX_BATCH_RECORDS: Final = 500


def encode_record(wire: dict[str, Any]) -> bytes:
    return json.dumps(wire, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def batches(
    machine: str,
    journal_id: str,
    encoded: list[tuple[int, bytes]],
    *,
    max_records: int = MAX_BATCH_RECORDS,
    max_bytes: int = MAX_PAYLOAD_BYTES,
) -> list[tuple[int, int, bytes]]:
    """Cut ``(seq, encoded record)`` pairs (ascending) into payloads of at most
    ``max_records`` records and ``max_bytes`` bytes: ``(first seq, last seq, payload)``.
    A record too big for any batch on its own is sent alone (records are far smaller)."""
    head = (
        b'{"machine":'
        + json.dumps(machine).encode()
        + b',"journal":'
        + json.dumps(journal_id).encode()
        + b',"records":['
    )
    tail = b"]}"
    out: list[tuple[int, int, bytes]] = []
    parts: list[bytes] = []
    first = last = 0
    size = len(head) + len(tail)
    for seq, data in encoded:
        extra = len(data) + (1 if parts else 0)
        if parts and (len(parts) >= max_records or size + extra > max_bytes):
            out.append((first, last, head + b",".join(parts) + tail))
            parts, size = [], len(head) + len(tail)
            extra = len(data)
        if not parts:
            first = seq
        parts.append(data)
        last = seq
        size += extra
    if parts:
        out.append((first, last, head + b",".join(parts) + tail))
    return out


def _encode_batches(
    machine: str, journal_id: str, records: list[Record], max_records: int, max_bytes: int
) -> list[tuple[int, int, bytes]]:
    encoded = [(r.seq, encode_record(r.to_wire())) for r in records]
    return batches(machine, journal_id, encoded, max_records=max_records, max_bytes=max_bytes)


class JournalSync:
    """Sends the journal's unacknowledged records while the link is up; applies acks."""

    def __init__(
        self,
        journal: Journal,
        machine_id: str,
        *,
        batch_records: int = MAX_BATCH_RECORDS,
        max_in_flight: int = 4,
        ack_timeout_s: float = 60.0,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not 1 <= batch_records <= MAX_BATCH_RECORDS:
            raise ValueError("batch_records must be 1..500")
        self.journal = journal
        self.machine_id = machine_id
        self.batch_records = batch_records
        self.max_in_flight = max_in_flight
        self.ack_timeout_s = ack_timeout_s
        self.max_payload_bytes = max_payload_bytes
        self._clock = clock
        self._wake = asyncio.Event()
        self._rewind = False
        self._unsubscribe = journal.on_append(lambda _seq: self._wake.set())
        #: Counters for tests, the bench and telemetry.
        self.batches_sent = 0
        self.records_sent = 0
        self.resends = 0
        self.acks_applied = 0
        self.acks_ignored = 0

    def close(self) -> None:
        self._unsubscribe()

    def rewind(self) -> None:
        """Resend from the first unacknowledged seq (the ``sync`` command)."""
        self._rewind = True
        self._wake.set()

    async def on_ack(self, payload: bytes) -> bool:
        """A ``journal/ack`` message; True when it advanced the journal's ``acked_upto``."""
        try:
            ack = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError):
            ack = None
        if not isinstance(ack, dict):
            self.acks_ignored += 1
            log.debug("journal ack ignored: not a JSON object", size=len(payload))
            return False
        journal_id, upto = ack.get("journal"), ack.get("upto")
        if not isinstance(journal_id, str) or isinstance(upto, bool) or not isinstance(upto, int):
            self.acks_ignored += 1
            log.debug("journal ack ignored: bad fields", ack=str(ack)[:200])
            return False
        applied = await self.journal.ack(journal_id, upto)
        if applied:
            self.acks_applied += 1
            self._wake.set()
        else:
            self.acks_ignored += 1
            log.debug(
                "journal ack ignored: stale, repeated, foreign or beyond the last seq",
                journal=journal_id,
                upto=upto,
                acked_upto=self.journal.acked_upto,
            )
        return applied

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    async def run(self, session: Session) -> None:
        """Send while the connection lasts (cancelled when it ends)."""
        journal = self.journal
        cursor = journal.acked_upto + 1
        self._rewind = False
        in_flight: deque[int] = deque()  # last seq of each batch out without an ack
        publishing: set[asyncio.Task[None]] = set()
        deadline: float | None = None  # resend when no ack advanced by then
        seen_acked = journal.acked_upto
        if cursor <= journal.last_seq:
            log.info(
                "journal sync resumes",
                from_seq=cursor,
                unacked=journal.last_seq - journal.acked_upto,
            )

        def sent(task: asyncio.Task[None]) -> None:
            publishing.discard(task)
            self._wake.set()

        try:
            while True:
                self._wake.clear()
                for task in [t for t in publishing if t.done()]:
                    publishing.discard(task)
                    task.result()  # a lost connection ends the session here
                acked = journal.acked_upto
                if acked != seen_acked:
                    seen_acked = acked
                    deadline = self._now() + self.ack_timeout_s if in_flight else None
                while in_flight and in_flight[0] <= acked:
                    in_flight.popleft()
                if not in_flight:
                    deadline = None
                cursor = max(cursor, acked + 1)
                if self._rewind or (deadline is not None and self._now() >= deadline):
                    if not self._rewind:
                        log.warning(
                            "journal sync: no ack, sending again",
                            from_seq=acked + 1,
                            waited_s=self.ack_timeout_s,
                        )
                    self._rewind = False
                    self.resends += 1
                    cursor = acked + 1
                    in_flight.clear()
                    deadline = None
                room = self.max_in_flight - len(in_flight)
                if room > 0 and cursor <= journal.last_seq:
                    records = await journal.records(cursor, limit=self.batch_records * room)
                    # JSON of up to a few thousand records: off the loop (its lag budget is
                    # 5 ms at p99 during a drain).
                    cut = await asyncio.to_thread(
                        _encode_batches,
                        self.machine_id,
                        journal.journal_id,
                        records,
                        self.batch_records,
                        self.max_payload_bytes,
                    )
                    for first, last, payload in cut[:room]:
                        task = asyncio.create_task(session.publish("journal", payload, qos=1))
                        publishing.add(task)
                        task.add_done_callback(sent)
                        in_flight.append(last)
                        self.batches_sent += 1
                        self.records_sent += last - first + 1
                        cursor = last + 1
                        if deadline is None:
                            deadline = self._now() + self.ack_timeout_s
                    if not records:  # cannot happen: unacked records are never pruned
                        log.error("journal sync: records missing", from_seq=cursor)
                        cursor = journal.last_seq + 1
                    continue
                timeout = None if deadline is None else max(0.0, deadline - self._now())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
        finally:
            await cancel_and_wait(list(publishing))
