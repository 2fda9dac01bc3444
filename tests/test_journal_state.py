"""Hypothesis state machine over a real journal file: appends, intents, acks, prunes, clock
jumps and reopens. After every step: seq gap-free and never reused, nothing unacknowledged or
open ever pruned, counters never decrease and always equal the recomputation."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.test_journal_support import FREE_RECORDS, FakeClock, ids, vend_intent
from vmc.journal import IntentError, Journal, counter_deltas
from vmc.journal.records import Record, merge_deltas


class JournalMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="vmc-journal-sm-"))
        self.clock = FakeClock()
        self.journal: Journal | None = None
        self.appended: dict[int, Record] = {}  # every record ever confirmed, by seq
        self.acked = 0
        self.open_intents: dict[str, int] = {}  # intent id -> seq of its vend_intent
        self.pruned: set[int] = set()
        self.last_counters: dict[str, int] = {}
        self.journal_id = ""

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    @property
    def j(self) -> Journal:
        assert self.journal is not None
        return self.journal

    def _confirm(self, records: list[Record]) -> None:
        for record in records:
            assert record.seq not in self.appended
            self.appended[record.seq] = record

    async def _open(self) -> None:
        self.journal = await Journal.open(self.dir, clock=self.clock)
        self.journal_id = self.journal.journal_id
        (boot,) = [r for r in await self.journal.records(self.journal.last_seq) if r.type == "boot"]
        self._confirm([boot])

    @initialize()
    def start(self) -> None:
        self.run(self._open())

    @rule(item=FREE_RECORDS)
    def append(self, item: tuple[str, dict[str, Any]]) -> None:
        self._confirm([self.run(self.j.append(*item))])

    @rule(items=st.lists(FREE_RECORDS, min_size=1, max_size=4))
    def append_many(self, items: list[tuple[str, dict[str, Any]]]) -> None:
        records = self.run(self.j.append_many(items))
        assert [r.seq for r in records] == list(range(records[0].seq, records[0].seq + len(items)))
        self._confirm(records)

    @rule(intent_id=ids, price=st.integers(0, 500))
    def open_vend(self, intent_id: str, price: int) -> None:
        record = self.run(self.j.append("vend_intent", vend_intent(intent_id, "B7", price)))
        self._confirm([record])
        self.open_intents[intent_id] = record.seq

    @precondition(lambda self: self.open_intents)
    @rule(data=st.data(), ok=st.booleans())
    def close_vend(self, data: st.DataObject, ok: bool) -> None:
        intent_id = data.draw(st.sampled_from(sorted(self.open_intents)))
        base = {"intent_id": intent_id, "slot": "B7", "price": 1, "method": "cash"}
        if ok:
            record = self.run(self.j.append("sale", {**base, "paid": 1}))
        else:
            record = self.run(self.j.append("vend_failed", {**base, "reason": "jam"}))
        self._confirm([record])
        del self.open_intents[intent_id]

    @rule(intent_id=ids)
    def outcome_without_intent_is_refused(self, intent_id: str) -> None:
        before = self.j.last_seq
        try:
            self.run(self.j.append("escrow_returned", {"intent_id": intent_id}))
        except IntentError:
            pass
        else:
            raise AssertionError("an outcome without an open intent was accepted")
        assert self.j.last_seq == before

    @rule(
        kind=st.sampled_from(["stale", "repeat", "some", "all", "all", "beyond", "foreign"]),
        data=st.data(),
    )
    def ack(self, kind: str, data: st.DataObject) -> None:
        last = max(self.appended)
        upto = {
            "stale": max(self.acked - 1, 0),
            "repeat": self.acked,
            "some": data.draw(st.integers(self.acked, last)),
            "all": last,
            "beyond": last + 1,
            "foreign": last,
        }[kind]
        foreign = kind == "foreign"
        journal_id = "0" * 32 if foreign else self.journal_id
        ok = self.run(self.j.ack(journal_id, upto))
        expected = not foreign and self.acked < upto <= max(self.appended)
        assert ok == expected
        if ok:
            self.acked = upto
        assert self.j.acked_upto == self.acked

    @rule(days=st.integers(-40, 40))
    def clock_jumps(self, days: int) -> None:
        self.clock.advance(days=days)

    @rule(retention=st.integers(0, 30), wait=st.integers(0, 40))
    def prune(self, retention: int, wait: int) -> None:
        self.clock.advance(days=wait)
        self.run(self.j.prune(self.clock.wall(), retention))
        retained = {r.seq for r in self.run(self.j.records(1, 1_000_000))}
        gone = set(self.appended) - retained
        for seq in gone - self.pruned:
            assert seq <= self.acked, "pruned an unacknowledged record"
        for seq in self.open_intents.values():
            assert seq in retained, "pruned an open intent"
        self.pruned |= gone

    @rule()
    def reopen(self) -> None:
        self.run(self.j.close())
        self.run(self._open())
        assert self.j.journal_id == self.journal_id
        assert self.j.acked_upto == self.acked

    @invariant()
    def seq_gap_free_and_nothing_lost(self) -> None:
        if self.journal is None:
            return
        last = max(self.appended)
        assert sorted(self.appended) == list(range(1, last + 1))
        assert self.j.last_seq == last
        retained = self.run(self.j.records(1, 1_000_000))
        for record in retained:
            assert self.appended[record.seq] == record
        assert {r.seq for r in retained} | self.pruned == set(self.appended)

    @invariant()
    def counters_agree_and_never_decrease(self) -> None:
        if self.journal is None:
            return
        counters = self.run(self.j.counters())
        expected: dict[str, int] = {}
        for record in self.appended.values():
            merge_deltas(expected, counter_deltas(record))
        assert counters == {k: v for k, v in expected.items() if v}
        for name, value in self.last_counters.items():
            assert counters.get(name, 0) >= value
        self.last_counters = counters
        assert self.run(self.j.verify_counters()) == []

    def teardown(self) -> None:
        try:
            if self.journal is not None:
                self.run(self.journal.close())
        finally:
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)


JournalMachine.TestCase.settings = settings(
    max_examples=20,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_journal_state_machine = JournalMachine.TestCase
