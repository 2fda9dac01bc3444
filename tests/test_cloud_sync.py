"""The journal sync end to end, in-process: a real journal, the real link, a real mosquitto, the
stand-in backend (hil.backend) storing and acking, and a TCP proxy that the tests cut."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hil.backend.service import BackendService
from hil.backend.store import BackendStore
from tests.mqtt_broker import Broker, mosquitto_binary
from tests.tcp_proxy import TcpProxy
from tests.test_cloud_link import MACHINE, cloud_config, wait_state
from vmc.cloud.link import CloudLink, LinkState, cancel_and_wait
from vmc.cloud.sync import JournalSync, encode_record
from vmc.journal import Journal

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")

WAIT_S = 60.0


@pytest.fixture
async def backend(broker: Broker, tmp_path: Path) -> AsyncIterator[BackendService]:
    store = BackendStore(tmp_path / "backend")
    service = BackendService(store, "127.0.0.1", broker.port)
    task = asyncio.create_task(service.run())
    await asyncio.wait_for(service.connected.wait(), WAIT_S)
    yield service
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    store.close()


async def append(journal: Journal, count: int) -> None:
    done = 0
    while done < count:
        n = min(250, count - done)
        await journal.append_many([("inventory_changed", _inv(done + i)) for i in range(n)])
        done += n


def _inv(i: int) -> dict[str, Any]:
    return {"slot": "A1", "old": i % 10, "new": (i + 1) % 10}


def make_link(journal: Journal, port: int, **overrides: Any) -> tuple[CloudLink, JournalSync]:
    config = cloud_config(port, **overrides)
    sync = JournalSync(
        journal,
        MACHINE,
        batch_records=config.batch_records,
        max_in_flight=config.max_in_flight,
        ack_timeout_s=config.ack_timeout_s,
    )
    return CloudLink(config, MACHINE, boot_id=journal.boot_id, sync=sync), sync


async def until_synced(journal: Journal, store: BackendStore, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while journal.acked_upto < journal.last_seq:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"acked_upto {journal.acked_upto} of {journal.last_seq}; backend has "
                f"{store.acked_upto(MACHINE, journal.journal_id)}"
            )
        await asyncio.sleep(0.05)


def check_backend(journal: Journal, store: BackendStore) -> None:
    """Every record arrived once (after dedup), in order, intact."""
    got = store.records(MACHINE, journal.journal_id)
    assert [r["seq"] for r in got] == list(range(1, journal.last_seq + 1))
    assert store.acked_upto(MACHINE, journal.journal_id) == journal.last_seq


async def test_long_offline_period_then_everything_once_in_order(
    broker: Broker, backend: BackendService, tmp_path: Path
) -> None:
    journal = await Journal.open(tmp_path / "state")
    try:
        broker.stop()
        link, sync = make_link(journal, broker.port)
        task = asyncio.create_task(link.run())
        await append(journal, 2000)  # made while the broker is down
        await asyncio.sleep(0.5)
        assert link.state is not LinkState.UP and journal.acked_upto == 0
        broker.start()
        await until_synced(journal, backend.store)
        check_backend(journal, backend.store)
        assert sync.batches_sent >= 5  # 2001 records: batches of at most 500
        # New records go at once.
        await journal.append("inventory_changed", _inv(1))
        await until_synced(journal, backend.store, 5.0)
        check_backend(journal, backend.store)
        await link.stop()
        await task
    finally:
        await journal.close()


async def test_link_cut_at_random_instants_during_sync(
    broker: Broker, proxy: TcpProxy, backend: BackendService, tmp_path: Path
) -> None:
    """Blackhole, reset, delay and slow drip at random instants while 3,000 records drain and
    more are made: every record arrives in order and once after dedup."""
    rng = random.Random(8)
    journal = await Journal.open(tmp_path / "state")
    try:
        await append(journal, 3000)
        link, _sync = make_link(
            journal, proxy.port, batch_records=200, max_in_flight=3, ack_timeout_s=2.0
        )
        task = asyncio.create_task(link.run())
        modes: list[dict[str, Any]] = [
            {"blackhole": True},
            {"delay_s": 0.05},
            {"drip_bytes_per_s": 20_000},
        ]
        for round_no in range(8):
            await asyncio.sleep(rng.uniform(0.05, 0.6))
            await journal.append("inventory_changed", _inv(round_no))
            action = rng.choice(["reset", "mode", "mode"])
            if action == "reset":
                proxy.reset()
            else:
                proxy.set(**rng.choice(modes))
                await asyncio.sleep(rng.uniform(0.2, 1.0))
                if rng.random() < 0.5:
                    proxy.reset()
                proxy.set()
        proxy.set()
        await until_synced(journal, backend.store)
        check_backend(journal, backend.store)
        await link.stop()
        await task
    finally:
        await journal.close()


async def test_broker_restart_mid_sync(
    broker: Broker, backend: BackendService, tmp_path: Path
) -> None:
    journal = await Journal.open(tmp_path / "state")
    try:
        await append(journal, 3000)
        link, _sync = make_link(journal, broker.port, batch_records=100, max_in_flight=2)
        task = asyncio.create_task(link.run())
        while journal.acked_upto < 500:  # noqa: ASYNC110 - the writer thread sets it
            await asyncio.sleep(0.01)
        broker.restart()
        await until_synced(journal, backend.store)
        check_backend(journal, backend.store)
        assert link.connections >= 2
        await link.stop()
        await task
    finally:
        await journal.close()


async def test_restart_mid_sync_resends_from_first_unacked(
    broker: Broker, backend: BackendService, tmp_path: Path
) -> None:
    """The link (and journal) go away mid-sync without a goodbye, as in a kill; the next run
    resends from the first unacknowledged seq."""
    journal = await Journal.open(tmp_path / "state")
    await append(journal, 2000)
    link, _sync = make_link(journal, broker.port, batch_records=100, max_in_flight=2)
    task = asyncio.create_task(link.run())
    deadline = time.monotonic() + WAIT_S
    while journal.acked_upto < 300:
        assert time.monotonic() < deadline, (link.status, _sync.batches_sent, backend.batches)
        await asyncio.sleep(0.01)
    await cancel_and_wait([task])  # no stop(): no offline status, the connection just drops
    acked = journal.acked_upto
    await journal.close()
    assert 0 < acked < 2001

    journal = await Journal.open(tmp_path / "state")  # a new run: boot record 2002
    try:
        assert acked <= journal.acked_upto < 2001  # an ack may land while it closes
        link, _sync = make_link(journal, broker.port)
        task = asyncio.create_task(link.run())
        await until_synced(journal, backend.store)
        check_backend(journal, backend.store)
        await link.stop()
        await task
    finally:
        await journal.close()


async def test_stale_repeated_foreign_and_bad_acks_change_nothing(
    broker: Broker, backend: BackendService, tmp_path: Path
) -> None:
    journal = await Journal.open(tmp_path / "state")
    try:
        await append(journal, 99)  # seqs 1..100 with the boot record
        backend.acking = False
        link, sync = make_link(journal, broker.port)
        task = asyncio.create_task(link.run())
        await wait_state(link, LinkState.UP)
        j = journal.journal_id
        assert await sync.on_ack(f'{{"journal": "{j}", "upto": 40}}'.encode()) is True
        assert journal.acked_upto == 40
        for bad in [
            f'{{"journal": "{j}", "upto": 40}}',  # repeated
            f'{{"journal": "{j}", "upto": 10}}',  # stale
            '{"journal": "another-journal", "upto": 90}',  # foreign
            f'{{"journal": "{j}", "upto": 101}}',  # beyond the last seq
            f'{{"journal": "{j}", "upto": true}}',
            f'{{"journal": "{j}", "upto": "90"}}',
            '{"upto": 90}',
            "[1, 2]",
            "not json",
        ]:
            assert await sync.on_ack(bad.encode()) is False, bad
            assert journal.acked_upto == 40, bad
        # Through the broker too: a foreign ack published on the topic changes nothing.
        await backend.publish_json(MACHINE, "journal/ack", {"journal": "x", "upto": 99})
        await backend.publish_json(MACHINE, "journal/ack", {"journal": j, "upto": 5})
        deadline = time.monotonic() + 10
        while sync.acks_ignored < 11 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        assert sync.acks_ignored == 11 and journal.acked_upto == 40
        await link.stop()
        await task
    finally:
        await journal.close()
    # The journal keeps it across a restart.
    journal = await Journal.open(tmp_path / "state")
    try:
        assert journal.acked_upto == 40
    finally:
        await journal.close()


async def test_wire_batch_is_the_records_wire_json_within_the_limits(tmp_path: Path) -> None:
    """SQLite builds exactly the bytes of ``encode_record(record.to_wire())``, joined by commas,
    cut at the record and byte limits; a record over the byte limit comes alone."""
    journal = await Journal.open(tmp_path / "state")
    try:
        await append(journal, 1200)
        odd = 'Ä"\\\n\t\x01\x7f😀 € \u2028'  # quotes, escapes, control characters, non-ASCII
        await journal.append("credit", {"amount": 5, "reason": odd})
        records = await journal.records(1, limit=5000)
        assert records[-1].data["reason"] == odd

        def expected(first: int, count: int) -> bytes:
            return b",".join(encode_record(r.to_wire()) for r in records[first - 1 :][:count])

        whole = await journal.wire_batch(1, 5000, 10**9)
        assert whole is not None
        assert (whole.first, whole.last, whole.count) == (1, 1202, 1202)
        assert whole.body == expected(1, 1202)
        tail = await journal.wire_batch(1202, 500, 10**9)
        assert tail is not None and json.loads(tail.body)["data"]["reason"] == odd

        by_count = await journal.wire_batch(7, 3, 10**9)
        assert by_count is not None and (by_count.first, by_count.last) == (7, 9)
        assert by_count.body == expected(7, 3)

        cap = 64 * 1024 - 100
        by_bytes = await journal.wire_batch(5, 500, cap)
        assert by_bytes is not None and by_bytes.first == 5 and by_bytes.count < 500
        assert by_bytes.body == expected(5, by_bytes.count)
        assert len(by_bytes.body) <= cap < len(expected(5, by_bytes.count + 1))

        alone = await journal.wire_batch(3, 500, 10)
        assert alone is not None and (alone.first, alone.count) == (3, 1)
        assert alone.body == expected(3, 1)
        assert await journal.wire_batch(1203, 500, cap) is None
    finally:
        await journal.close()


class CapturingSession:
    """A connection that takes every publish and never gets an ack (nor a PUBACK wait)."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self.published = asyncio.Event()

    async def publish(self, suffix: str, payload: bytes, *, qos: int, **_: Any) -> None:
        assert suffix == "journal" and qos == 1
        self.payloads.append(payload)
        self.published.set()


async def test_batches_follow_the_contract_and_the_window_bound(tmp_path: Path) -> None:
    """Without acks the sync sends ``max_in_flight`` batches and stops; each batch is a
    contract payload (≤ 500 records, ≤ 64 KiB, ascending seq from the first unacked); an ack
    opens the window at once, before the journal has saved it."""
    journal = await Journal.open(tmp_path / "state")
    sync = JournalSync(journal, MACHINE, max_in_flight=3)
    session = CapturingSession()
    task = asyncio.create_task(sync.run(session))  # type: ignore[arg-type]
    try:
        await append(journal, 4000)
        deadline = time.monotonic() + WAIT_S
        while len(session.payloads) < 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        assert len(session.payloads) == 3  # the window is full
        seqs: list[int] = []
        for payload in session.payloads:
            assert len(payload) <= 64 * 1024
            batch = json.loads(payload)
            assert batch["machine"] == MACHINE and batch["journal"] == journal.journal_id
            assert 1 <= len(batch["records"]) <= 500
            seqs += [r["seq"] for r in batch["records"]]
        assert seqs == list(range(1, len(seqs) + 1))

        # Acks free the window as they arrive; the journal saves them behind, folded.
        saved: list[int] = []
        real_ack = journal.ack

        async def counting_ack(journal_id: str, upto: int) -> bool:
            saved.append(upto)
            return await real_ack(journal_id, upto)

        journal.ack = counting_ack  # type: ignore[method-assign]
        j = journal.journal_id
        for upto in (100, 200, seqs[-1]):
            assert sync.ack_received(f'{{"journal": "{j}", "upto": {upto}}}'.encode())
        assert sync.acked == seqs[-1]
        assert not sync.ack_received(f'{{"journal": "{j}", "upto": 150}}'.encode())  # stale
        while len(session.payloads) < 6:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        while journal.acked_upto < seqs[-1]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert saved[-1] == seqs[-1] and len(saved) <= 2  # 3 acks, at most 2 commits
        following = json.loads(session.payloads[3])["records"][0]["seq"]
        assert following == seqs[-1] + 1
    finally:
        await cancel_and_wait([task])
        sync.close()
        await journal.close()


async def test_startup_with_100k_unacked_is_as_quick_as_with_none(tmp_path: Path) -> None:
    """Nothing loads the backlog at start: opening the journal and starting the link and sync
    (to a broker that is not there) take as long with 100,000 unacknowledged records as with
    none."""
    big = tmp_path / "big"
    journal = await Journal.open(big)
    done = 0
    while done < 100_000:
        await journal.append_many([("inventory_changed", _inv(i)) for i in range(500)])
        done += 500
    await journal.close()

    async def start(state: Path) -> float:
        began = time.perf_counter()
        journal = await Journal.open(state)
        link, sync = make_link(journal, 1)  # nothing listens on port 1
        task = asyncio.create_task(link.run())
        await asyncio.sleep(0)  # the link task has started
        elapsed = time.perf_counter() - began
        await link.stop()
        await task
        sync.close()
        backlog = journal.backlog
        await journal.close()
        assert backlog == (100_001 if state == big else 0) + 1
        return elapsed

    empty = await start(tmp_path / "empty")
    full = await start(big)
    assert full < 2 * empty + 1.0, f"with 100,000 unacked: {full:.3f} s, empty: {empty:.3f} s"
