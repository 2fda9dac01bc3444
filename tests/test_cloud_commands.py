"""Signed cloud commands (vmc/cloud/commands.py): every refusal with its code, journaled as
``security`` and changing nothing; one result per command, kept durably until published; the
replay cache across restarts; the planogram commands through the real vend cycle.

Real Ed25519 keys (hil/backend/commands.py signs), a real journal and commands.sqlite3 in
tmp_path, a real VendMachine; time comes from the test's clock."""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from hil.backend.commands import CommandSigner
from tests.test_planogram import MACHINE_ID, Rig, make_config
from vmc.cloud.commands import MAX_PAYLOAD_BYTES, CommandProcessor

START = datetime(2026, 11, 22, 22, 40, tzinfo=UTC)
SIGNER = CommandSigner.generate()
FORGER = CommandSigner.generate()


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


class FakeQr:
    """Records what reaches the QR method; answers ``answer``."""

    def __init__(self, answer: str | None = None) -> None:
        self.answer = answer
        self.calls: list[tuple[Any, ...]] = []

    async def vend(
        self, order_id: str, slot: str, price: int, currency: str, origin: str, cmd_id: str
    ) -> str | None:
        self.calls.append(("vend", order_id, slot, price, currency, origin, cmd_id))
        return self.answer

    async def cancel_order(self, order_id: str, cmd_id: str) -> str | None:
        self.calls.append(("cancel_order", order_id, cmd_id))
        return self.answer


class Bench:
    """A running machine and a command processor on one state directory."""

    def __init__(self, rig: Rig, clock: Clock, qr: FakeQr | None = None) -> None:
        self.rig = rig
        self.clock = clock
        self.qr = qr
        self.syncs = 0
        self.processor: CommandProcessor

    async def open(self) -> Bench:
        self.processor = await CommandProcessor.open(
            self.rig.config,
            self.rig.journal,
            self.rig.machine,
            qr=self.qr,
            on_sync=self._sync,
            clock=self.clock,
        )
        return self

    def _sync(self) -> None:
        self.syncs += 1

    async def restart(self) -> None:
        await self.processor.close()
        await self.rig.restart()
        await self.open()

    async def close(self) -> None:
        await self.processor.close()
        await self.rig.stop()

    def payload(self, type: str, fields: dict[str, Any] | None = None, **options: Any) -> bytes:
        options.setdefault("now", self.clock.now)
        return SIGNER.payload(MACHINE_ID, type, fields, **options)

    async def send(self, payload: bytes) -> dict[str, Any]:
        """Hand ``payload`` over; the one result it queued."""
        before = len(self.processor.unpublished_results())
        await self.processor.handle(payload)
        results = self.processor.unpublished_results()
        assert len(results) == before + 1, results
        return results[-1]

    async def security(self) -> list[dict[str, Any]]:
        return [r.data for r in await self.rig.records("security")]

    async def publish_all(self) -> None:
        for result in self.processor.unpublished_results():
            await self.processor.mark_published(result["cmd_id"])


@pytest.fixture
async def bench(tmp_path: Path) -> Any:
    config = make_config(tmp_path, public_key=SIGNER.public_key_b64)
    rig = await Rig(tmp_path, config).start()
    bench = await Bench(rig, Clock()).open()
    try:
        yield bench
    finally:
        await bench.close()


def set_price(price: int = 180, slot: str = "A1") -> tuple[str, dict[str, Any]]:
    return "set_price", {"slot": slot, "price": price, "currency": "EUR"}


async def assert_refused(
    bench: Bench, payload: bytes, code: str, cmd_id: str | None
) -> dict[str, Any]:
    """Refused with ``code``, one security record naming it, nothing changed."""
    before = bench.rig.journal.last_seq
    slots = bench.rig.machine.snapshot()["slots"]
    result = await bench.send(payload)
    assert result == {"cmd_id": cmd_id, "ok": False, "error": code}
    new = [r for r in await bench.rig.journal.records(since_seq=before + 1)]
    assert [r.type for r in new] == ["security"]
    assert new[0].data["code"] == code
    assert new[0].data.get("cmd_id") == cmd_id
    assert bench.rig.machine.snapshot()["slots"] == slots
    return new[0].data


# --- refusals ---------------------------------------------------------------------------------


async def test_an_accepted_set_price_answers_ok_and_changes_the_price(bench: Bench) -> None:
    payload = bench.payload(*set_price(180), cmd_id="c-1")
    assert await bench.send(payload) == {"cmd_id": "c-1", "ok": True, "error": None}
    assert bench.rig.slot("A1")["price"] == 180
    changed = (await bench.rig.records("price_changed"))[-1]
    assert changed.source == {"kind": "remote", "cmd_id": "c-1"}
    assert await bench.security() == []


async def test_a_forged_command_is_refused(bench: Bench) -> None:
    payload = FORGER.payload(MACHINE_ID, *set_price(), cmd_id="f-1", now=bench.clock.now)
    await assert_refused(bench, payload, "bad_signature", "f-1")


async def test_a_tampered_body_is_refused(bench: Bench) -> None:
    envelope = SIGNER.envelope(MACHINE_ID, *set_price(180), cmd_id="t-1", now=bench.clock.now)
    envelope["body"] = envelope["body"].replace("180", "1")
    await assert_refused(bench, json.dumps(envelope).encode(), "bad_signature", "t-1")


async def test_a_signature_that_is_not_base64_or_too_short_is_refused(bench: Bench) -> None:
    envelope = SIGNER.envelope(MACHINE_ID, *set_price(), cmd_id="s-1", now=bench.clock.now)
    await assert_refused(
        bench, json.dumps({**envelope, "sig": "!!"}).encode(), "bad_signature", "s-1"
    )
    await assert_refused(
        bench, json.dumps({**envelope, "sig": "AAAA"}).encode(), "bad_signature", "s-1"
    )


async def test_an_expired_command_is_refused(bench: Bench) -> None:
    payload = bench.payload(*set_price(), cmd_id="e-1", ttl_s=60)
    bench.clock.now += timedelta(seconds=61)
    await assert_refused(bench, payload, "expired", "e-1")


async def test_a_command_issued_beyond_the_skew_is_refused(bench: Bench) -> None:
    skew = bench.rig.config.cloud.command_skew_s
    ahead = bench.clock.now + timedelta(seconds=skew + 1)
    await assert_refused(
        bench, bench.payload(*set_price(), cmd_id="k-1", now=ahead), "expired", "k-1"
    )
    within = bench.clock.now + timedelta(seconds=skew - 1)
    ok = await bench.send(bench.payload(*set_price(), cmd_id="k-2", now=within))
    assert ok["ok"]


async def test_too_long_a_validity_window_is_refused(bench: Bench) -> None:
    payload = bench.payload(*set_price(), cmd_id="w-1", ttl_s=301)
    await assert_refused(bench, payload, "invalid", "w-1")
    assert (await bench.send(bench.payload(*set_price(), cmd_id="w-2", ttl_s=300)))["ok"]


async def test_a_command_for_another_machine_is_refused(bench: Bench) -> None:
    payload = SIGNER.payload("OTHER", *set_price(), cmd_id="m-1", now=bench.clock.now)
    await assert_refused(bench, payload, "wrong_machine", "m-1")


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[]", "not an object"),
        (b'{"body": "{}"}', "no sig"),
        (b'{"body": 1, "sig": "AAAA"}', "body not a string"),
    ],
)
async def test_a_malformed_envelope_is_refused(bench: Bench, payload: bytes, why: str) -> None:
    await assert_refused(bench, payload, "invalid", None)


async def test_a_body_that_is_not_json_is_refused(bench: Bench) -> None:
    await assert_refused(bench, json.dumps(SIGNER.sign("{not json")).encode(), "invalid", None)


@pytest.mark.parametrize(
    ("type", "fields"),
    [
        ("set_price", {"slot": "A1", "price": "180", "currency": "EUR"}),
        ("set_price", {"slot": "A1", "price": True, "currency": "EUR"}),
        ("set_price", {"slot": "A1", "price": 0, "currency": "EUR"}),
        ("set_price", {"slot": "A1", "price": 180, "currency": "USD"}),
        ("set_price", {"slot": "A1", "price": 180}),
        ("set_price", {"slot": "Z9", "price": 180, "currency": "EUR"}),
        ("set_price", {"slot": "A1", "price": 180, "currency": "EUR", "extra": 1}),
        ("set_inventory", {"slot": "A1", "count": 11}),
        ("set_inventory", {"slot": "A1", "count": -1}),
        ("set_slot", {"slot": "A1", "enabled": "no"}),
        ("vend", {"order_id": "o1", "slot": "A1", "price": 150, "currency": "EUR"}),
        ("vend", {"order_id": "o1", "slot": "A1", "price": 150, "currency": "EUR", "origin": "x"}),
        ("cancel_order", {"order_id": ""}),
        ("reboot", {}),
        ("dex", {}),
    ],
)
async def test_wrong_fields_or_an_unknown_type_are_refused(
    bench: Bench, type: str, fields: dict[str, Any]
) -> None:
    await assert_refused(bench, bench.payload(type, fields, cmd_id="v-1"), "invalid", "v-1")


async def test_wrong_base_field_types_are_refused(bench: Bench) -> None:
    body = SIGNER.body(MACHINE_ID, *set_price(), cmd_id="b-1", now=bench.clock.now)
    for broken in (
        {**body, "cmd_id": 7},
        {**body, "machine": None},
        {**body, "issued_at": "yesterday"},
        {**body, "expires_at": 1_700_000_000},
    ):
        cmd_id = broken["cmd_id"] if isinstance(broken["cmd_id"], str) else None
        await assert_refused(bench, json.dumps(SIGNER.sign(broken)).encode(), "invalid", cmd_id)


async def test_an_oversize_payload_is_refused_without_reading_it(bench: Bench) -> None:
    body = SIGNER.body(MACHINE_ID, "sync", {}, cmd_id="o-1", now=bench.clock.now)
    body["pad"] = "x" * MAX_PAYLOAD_BYTES
    record = await assert_refused(bench, json.dumps(SIGNER.sign(body)).encode(), "invalid", None)
    assert "bytes" in record["detail"] and len(record["detail"]) <= 200
    assert bench.syncs == 0


async def test_a_machine_without_a_public_key_refuses_everything(tmp_path: Path) -> None:
    rig = await Rig(tmp_path, make_config(tmp_path)).start()
    bench = await Bench(rig, Clock()).open()
    try:
        await assert_refused(
            bench, bench.payload(*set_price(), cmd_id="n-1"), "bad_signature", "n-1"
        )
    finally:
        await bench.close()


# --- replays and redeliveries -----------------------------------------------------------------


async def test_a_redelivered_command_gets_its_original_result_and_acts_once(bench: Bench) -> None:
    payload = bench.payload("set_inventory", {"slot": "A1", "count": 9}, cmd_id="r-1")
    first = await bench.send(payload)
    assert first == {"cmd_id": "r-1", "ok": True, "error": None}
    # Delivered again before its result was published: the waiting result answers both.
    await bench.processor.handle(payload)
    assert bench.processor.unpublished_results() == [first]
    await bench.publish_all()
    # Delivered again after it was published, and after it expired: its original result again.
    bench.clock.now += timedelta(seconds=600)
    assert await bench.send(payload) == first
    assert len(await bench.rig.records("inventory_changed")) == 3  # A1 and B2 at start, r-1 once
    assert await bench.security() == []


async def test_a_refused_command_delivered_again_gets_its_first_refusal(bench: Bench) -> None:
    payload = SIGNER.payload("OTHER", *set_price(), cmd_id="r-2", now=bench.clock.now)
    first = await bench.send(payload)
    await bench.publish_all()
    assert await bench.send(payload) == first
    assert len(await bench.security()) == 1


async def test_a_replayed_cmd_id_is_refused_also_after_a_restart(bench: Bench) -> None:
    assert (await bench.send(bench.payload(*set_price(180), cmd_id="r-3")))["ok"]
    await bench.publish_all()
    await bench.restart()
    bench.clock.now += timedelta(seconds=5)
    again = bench.payload(*set_price(100), cmd_id="r-3")  # the same cmd_id, another body
    await assert_refused(bench, again, "replayed", "r-3")
    assert bench.rig.slot("A1")["price"] == 180


async def test_a_cmd_id_refused_before_may_be_sent_again(bench: Bench) -> None:
    await bench.send(bench.payload(*set_price(0), cmd_id="r-4"))
    assert (await bench.send(bench.payload(*set_price(170), cmd_id="r-4")))["ok"]


# --- results ----------------------------------------------------------------------------------


async def test_unpublished_results_survive_a_restart_until_marked_published(bench: Bench) -> None:
    ok = await bench.send(bench.payload(*set_price(180), cmd_id="p-1"))
    refused = await bench.send(SIGNER.payload("OTHER", "sync", cmd_id="p-2", now=START))
    unreadable = await bench.send(b"garbage")
    await bench.restart()
    assert bench.processor.unpublished_results() == [ok, refused, unreadable]
    assert bench.processor.results_changed.is_set()
    await bench.processor.mark_published("p-1")
    await bench.processor.mark_published("None")  # str(None), as the link passes it
    await bench.restart()
    assert bench.processor.unpublished_results() == [refused]
    await bench.processor.mark_published("p-2")
    assert bench.processor.unpublished_results() == []


async def test_results_changed_is_set_when_a_result_is_queued(bench: Bench) -> None:
    bench.processor.results_changed.clear()
    await bench.send(bench.payload("sync", cmd_id="y-1"))
    assert bench.processor.results_changed.is_set()
    assert bench.syncs == 1


async def test_a_command_cut_by_a_crash_is_answered_interrupted_not_run_again(
    bench: Bench,
) -> None:
    payload = bench.payload(*set_price(180), cmd_id="x-1")
    # As if the daemon died after marking the command accepted and before acting on it.
    digest = hashlib.sha256(json.loads(payload)["body"].encode()).hexdigest()
    await bench.processor.store.begin(digest, "x-1", START.timestamp() + 3600)
    await bench.restart()
    assert bench.processor.unpublished_results() == [
        {"cmd_id": "x-1", "ok": False, "error": "interrupted"}
    ]
    await bench.publish_all()
    assert await bench.send(payload) == {"cmd_id": "x-1", "ok": False, "error": "interrupted"}
    assert bench.rig.slot("A1")["price"] == 150


# --- the other types --------------------------------------------------------------------------


async def test_set_inventory_and_set_slot(bench: Bench) -> None:
    assert (await bench.send(bench.payload("set_inventory", {"slot": "B2", "count": 6})))["ok"]
    assert (await bench.send(bench.payload("set_slot", {"slot": "B2", "enabled": False})))["ok"]
    assert bench.rig.slot("B2")["stock"] == 6 and not bench.rig.slot("B2")["enabled"]
    await bench.restart()
    assert bench.rig.slot("B2")["stock"] == 6 and not bench.rig.slot("B2")["enabled"]


async def test_vend_without_qr_orders(bench: Bench) -> None:
    vend = {"order_id": "o-1", "slot": "A1", "price": 150, "currency": "EUR"}
    machine = bench.payload("vend", {**vend, "origin": "machine"}, cmd_id="q-1")
    await assert_refused(bench, machine, "unknown_order", "q-1")
    remote = bench.payload("vend", {**vend, "origin": "remote"}, cmd_id="q-2")
    await assert_refused(bench, remote, "invalid", "q-2")
    cancel = bench.payload("cancel_order", {"order_id": "o-1"}, cmd_id="q-3")
    await assert_refused(bench, cancel, "unknown_order", "q-3")
    assert bench.rig.motor.turns == []


async def test_vend_and_cancel_reach_the_qr_orders(tmp_path: Path) -> None:
    rig = await Rig(tmp_path, make_config(tmp_path, public_key=SIGNER.public_key_b64)).start()
    qr = FakeQr()
    bench = await Bench(rig, Clock(), qr).open()
    try:
        vend = {"order_id": "o-2", "slot": "A1", "price": 150, "currency": "EUR"}
        result = await bench.send(bench.payload("vend", {**vend, "origin": "remote"}, cmd_id="q-4"))
        assert result == {"cmd_id": "q-4", "ok": True, "error": None}
        qr.answer = "order_expired"
        result = await bench.send(bench.payload("cancel_order", {"order_id": "o-2"}, cmd_id="q-5"))
        assert result == {"cmd_id": "q-5", "ok": False, "error": "order_expired"}
        assert qr.calls == [
            ("vend", "o-2", "A1", 150, "EUR", "remote", "q-4"),
            ("cancel_order", "o-2", "q-5"),
        ]
        assert await bench.security() == []  # the QR method journals its own outcomes
    finally:
        await bench.close()


async def test_a_remote_price_change_during_a_vend_leaves_its_price(bench: Bench) -> None:
    await bench.rig.insert(100, 50)
    bench.rig.motor.hold = True
    vend = asyncio.create_task(bench.rig.machine.select("A1"))
    await asyncio.wait_for(bench.rig.motor.turning.wait(), 5)
    command = asyncio.create_task(bench.send(bench.payload(*set_price(300), cmd_id="d-1")))
    await asyncio.sleep(0.05)
    assert not command.done()
    bench.rig.motor.release.set()
    assert (await asyncio.wait_for(vend, 5))["price"] == 150
    assert (await asyncio.wait_for(command, 5))["ok"]
    assert (await bench.rig.records("sale"))[-1].data["price"] == 150
    assert bench.rig.slot("A1")["price"] == 300


async def test_a_remote_price_change_during_a_session_keeps_the_credit(bench: Bench) -> None:
    await bench.rig.insert(100, 50)
    assert (await bench.send(bench.payload(*set_price(200), cmd_id="d-2")))["ok"]
    assert bench.rig.machine.credit == 150
    assert (await bench.rig.machine.select("A1"))["error"] == "insufficient_credit"
    await bench.rig.insert(50)
    assert (await bench.rig.machine.select("A1"))["price"] == 200


async def test_a_flood_of_refused_commands_is_journaled_as_a_summary(bench: Bench) -> None:
    """Junk on the command topic cannot fill the disk: per window the first refusals are
    journaled one by one, the rest counted and journaled as one record when the window is
    over; every command still gets its result."""
    from vmc.cloud.commands import REFUSAL_WINDOW_S, REFUSALS_JOURNALED_PER_WINDOW

    extra = 12
    for i in range(REFUSALS_JOURNALED_PER_WINDOW + extra):
        forged = FORGER.payload(MACHINE_ID, *set_price(), cmd_id=f"junk-{i}", now=bench.clock.now)
        result = await bench.send(forged)
        assert result == {"cmd_id": f"junk-{i}", "ok": False, "error": "bad_signature"}
    records = await bench.security()
    assert len(records) == REFUSALS_JOURNALED_PER_WINDOW
    assert {r["what"] for r in records} == {"command refused"}

    bench.clock.now += timedelta(seconds=REFUSAL_WINDOW_S)
    result = await bench.send(bench.payload("set_price", {"slot": "A1"}, cmd_id="late-1"))
    assert result == {"cmd_id": "late-1", "ok": False, "error": "invalid"}
    records = await bench.security()
    assert len(records) == REFUSALS_JOURNALED_PER_WINDOW + 2
    summary = records[REFUSALS_JOURNALED_PER_WINDOW]
    assert summary["what"] == "commands refused"
    assert summary["detail"].startswith(f"{extra} more refused")
    assert "bad_signature 12" in summary["detail"]
    assert records[-1]["what"] == "command refused"  # a new window: one by one again

    # What a window counted is journaled when the daemon stops, too.
    for i in range(REFUSALS_JOURNALED_PER_WINDOW):
        await bench.send(FORGER.payload(MACHINE_ID, *set_price(), cmd_id=f"more-{i}"))
    await bench.restart()
    last = (await bench.security())[-1]
    assert last["what"] == "commands refused" and last["detail"].startswith("1 more refused")
