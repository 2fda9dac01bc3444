"""The journal sync end to end, in-process: a real journal, the real link, a real mosquitto, the
stand-in backend (hil.backend) storing and acking, and a TCP proxy that the tests cut."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from hil.backend.service import BackendService
from hil.backend.store import BackendStore
from tests.mqtt_broker import Broker, mosquitto_binary
from tests.tcp_proxy import TcpProxy
from tests.test_cloud_link import MACHINE, cloud_config, wait_state
from vmc.cloud.link import CloudLink, LinkState, cancel_and_wait
from vmc.cloud.sync import JournalSync, batches
from vmc.journal import Journal

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")

WAIT_S = 60.0


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    with Broker(tmp_path / "broker") as running:
        yield running


@pytest.fixture
def proxy(broker: Broker) -> Iterator[TcpProxy]:
    with TcpProxy(broker.port) as running:
        yield running


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


def test_batches_respect_record_and_byte_limits() -> None:
    encoded = [(seq, b'{"seq":%d,"pad":"%s"}' % (seq, b"x" * 300)) for seq in range(1, 1201)]
    cut = batches("M", "J", encoded, max_records=500, max_bytes=64 * 1024)
    assert all(len(payload) <= 64 * 1024 for _f, _l, payload in cut)
    assert cut[0][0] == 1 and cut[-1][1] == 1200
    assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(cut))
    few = batches("M", "J", encoded[:10], max_records=500)
    assert len(few) == 1 and few[0][:2] == (1, 10)
    assert len(batches("M", "J", encoded[:10], max_records=3)) == 4


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
