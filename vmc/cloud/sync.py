"""The journal is the outbox: its records go to the backend in batches, in seq order, and count
as synced only when the backend's ``journal/ack`` says so (a PUBACK only says the broker has
the batch).

* At every connection (so after every reconnect and every restart) sending starts again at the
  first unacknowledged seq: ``journal.acked_upto + 1``. Duplicates are expected; the backend
  drops them by ``(machine, journal, seq)``.
* A batch is ``{"machine": M, "journal": J, "records": [...]}`` with 1 to ``batch_records``
  (≤ 500) records in ascending seq and at most 64 KiB of payload (a batch is cut short to fit),
  published at QoS 1; at most ``max_in_flight`` batches are out without an ack
  (``cloud.max_in_flight``: enough to cover the ack's round trip, so the backend never waits
  for the machine).
* Nothing is read at start: each batch is read when there is room to send it, so 100,000
  unacknowledged records cost nothing until the link is up, and then never more than
  ``max_in_flight`` batches of memory.
* Nothing heavy runs on the event loop: :meth:`Journal.wire_batch` has SQLite build a batch's
  bytes on a read-only connection and a thread of its own (the GIL released meanwhile, the
  writer's queue not in the way); the loop adds the envelope and hands the bytes to paho.
* A new record wakes the sender at once (``Journal.on_append``).
* An ack frees its batches' room in the window as soon as it arrives (the backend has the
  records; that is what counts); making it durable here (``Journal.ack``: a commit on the
  journal's writer) runs behind, and the acks that arrive meanwhile are folded into one
  commit (acks are cumulative). Stale, repeated, foreign-journal and beyond-the-last-seq acks
  are ignored. When no ack advances for ``ack_timeout_s`` while batches are out (the backend
  lost them, or restarted), sending starts again from the first unacknowledged seq.
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
from vmc.journal import Journal, JournalClosed, JournalUnavailable
from vmc.log import FailureLog

if TYPE_CHECKING:
    from vmc.cloud.link import Session

log = structlog.get_logger("vmc.cloud.sync")

#: Contract: 1 to 500 records per batch.
MAX_BATCH_RECORDS: Final = 500


def encode_record(wire: dict[str, Any]) -> bytes:
    """A record's wire form as the sync sends it (``Journal.wire_batch`` builds the same bytes
    in SQLite; the tests compare the two)."""
    return json.dumps(wire, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def envelope(machine: str, journal_id: str) -> tuple[bytes, bytes]:
    """The bytes before and after the comma-joined records of a batch."""
    head = (
        b'{"machine":'
        + json.dumps(machine, ensure_ascii=False).encode()
        + b',"journal":'
        + json.dumps(journal_id, ensure_ascii=False).encode()
        + b',"records":['
    )
    return head, b"]}"


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
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
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
        #: The highest ``upto`` the backend acked (durable here once ``journal.acked_upto``
        #: reaches it).
        self._backend_upto = journal.acked_upto
        self._saver: asyncio.Task[None] | None = None
        #: Counters for tests, the bench and telemetry.
        self.batches_sent = 0
        self.records_sent = 0
        self.resends = 0
        self._no_ack_log = FailureLog(log)
        self.acks_applied = 0
        self.acks_ignored = 0

    def close(self) -> None:
        self._unsubscribe()
        if self._saver is not None:
            self._saver.cancel()

    def rewind(self) -> None:
        """Resend from the first unacknowledged seq (the ``sync`` command)."""
        self._rewind = True
        self._wake.set()

    @property
    def acked(self) -> int:
        """The highest seq the backend acked (perhaps not yet durable here)."""
        return max(self._backend_upto, self.journal.acked_upto)

    def ack_received(self, payload: bytes) -> bool:
        """A ``journal/ack`` message, on the loop, without waiting: True when it advanced.
        The window moves at once; ``Journal.ack`` follows on a task of its own."""
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
        journal = self.journal
        if journal_id != journal.journal_id or not self.acked < upto <= journal.last_seq:
            self.acks_ignored += 1
            log.debug(
                "journal ack ignored: stale, repeated, foreign or beyond the last seq",
                journal=journal_id,
                upto=upto,
                acked_upto=self.acked,
            )
            return False
        self._backend_upto = upto
        self.acks_applied += 1
        self._wake.set()
        if self._saver is None or self._saver.done():
            self._saver = asyncio.create_task(self._save(), name="journal-ack-save")
        return True

    async def on_ack(self, payload: bytes) -> bool:
        """:meth:`ack_received`, then wait until the journal holds the ack durably."""
        applied = self.ack_received(payload)
        saver = self._saver
        if applied and saver is not None:
            await asyncio.shield(saver)
        return applied

    async def _save(self) -> None:
        """Make the backend's acks durable in the journal: one commit for whatever arrived
        while the previous one ran."""
        journal = self.journal
        while journal.acked_upto < self._backend_upto:
            try:
                await journal.ack(journal.journal_id, self._backend_upto)
            except (JournalClosed, JournalUnavailable) as exc:
                # Not lost: the records are resent after a restart, and the backend acks again.
                log.debug("journal ack not saved", upto=self._backend_upto, error=str(exc))
                return

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    async def run(self, session: Session) -> None:
        """Send while the connection lasts (cancelled when it ends)."""
        journal = self.journal
        head, tail = envelope(self.machine_id, journal.journal_id)
        records_bytes = self.max_payload_bytes - len(head) - len(tail)
        cursor = self.acked + 1
        self._rewind = False
        in_flight: deque[int] = deque()  # last seq of each batch out without an ack
        publishing: set[asyncio.Task[None]] = set()
        deadline: float | None = None  # resend when no ack advanced by then
        seen_acked = self.acked
        if cursor <= journal.last_seq:
            log.info("journal sync resumes", from_seq=cursor, unacked=journal.last_seq - cursor + 1)

        def sent(task: asyncio.Task[None]) -> None:
            publishing.discard(task)
            self._wake.set()

        try:
            while True:
                self._wake.clear()
                for task in [t for t in publishing if t.done()]:
                    publishing.discard(task)
                    task.result()  # a lost connection ends the session here
                acked = self.acked
                if acked != seen_acked:
                    seen_acked = acked
                    self._no_ack_log.recovered("journal sync: acks again", acked=acked)
                    deadline = self._now() + self.ack_timeout_s if in_flight else None
                while in_flight and in_flight[0] <= acked:
                    in_flight.popleft()
                if not in_flight:
                    deadline = None
                cursor = max(cursor, acked + 1)
                if self._rewind or (deadline is not None and self._now() >= deadline):
                    if not self._rewind:
                        # A backend that stays silent: said once, then at DEBUG each time.
                        self._no_ack_log.failed(
                            "journal sync: no ack, sending again",
                            from_seq=acked + 1,
                            waited_s=self.ack_timeout_s,
                        )
                    self._rewind = False
                    self.resends += 1
                    cursor = acked + 1
                    in_flight.clear()
                    deadline = None
                if len(in_flight) < self.max_in_flight and cursor <= journal.last_seq:
                    batch = await journal.wire_batch(cursor, self.batch_records, records_bytes)
                    if batch is None or batch.first != cursor:  # unacked records are kept
                        log.error("journal sync: records missing", from_seq=cursor)
                        cursor = journal.last_seq + 1
                        continue
                    task = asyncio.create_task(
                        session.publish("journal", head + batch.body + tail, qos=1)
                    )
                    publishing.add(task)
                    task.add_done_callback(sent)
                    in_flight.append(batch.last)
                    self.batches_sent += 1
                    self.records_sent += batch.count
                    cursor = batch.last + 1
                    if deadline is None:
                        deadline = self._now() + self.ack_timeout_s
                    continue
                timeout = None if deadline is None else max(0.0, deadline - self._now())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
        finally:
            await cancel_and_wait(list(publishing))
