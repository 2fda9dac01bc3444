"""The stand-in backend's operator side (hil/backend/operator.py): QR orders confirmed or
declined, remote operation from its command line, and the command line's options; end to end
with the daemon (a subprocess on its embedded simulators), a real mosquitto and the backend
(``python -m hil.backend serve``, a subprocess), the operator's commands run as a person would,
through ``python -m hil.backend``'s ``main``."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from hil.backend.__main__ import main
from hil.backend.commands import CommandSigner, body_of, load_settings, save_settings
from hil.backend.operator import AutoConfirm, Operator, OperatorError, _order_state
from hil.backend.store import BackendStore
from hil.harness import Daemon, wait_until, write_config
from tests.mqtt_broker import Broker, mosquitto_binary

MACHINE = "TEST-0001"  # hil.harness.write_config's machine id
WAIT_S = 30.0


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[dict[str, Any]]]:
    """``python -m hil.backend ARGV``: its exit code and its JSON lines."""
    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr().out
    return code, [json.loads(line) for line in out.splitlines() if line.strip()]


# --- without a broker ------------------------------------------------------------------------


def order_payload(order_id: str, expires_in_s: float = 60.0, slot: str = "A1") -> dict[str, Any]:
    expires = datetime.now(UTC) + timedelta(seconds=expires_in_s)
    return {
        "order_id": order_id,
        "slot": slot,
        "price": 100,
        "currency": "EUR",
        "qr": f"https://pay.example.com/M/{order_id}",
        "expires_at": expires.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "ts": "2026-11-22T22:40:00.000Z",
    }


def test_order_states() -> None:
    now = datetime.now(UTC)
    order = order_payload("o1")
    assert _order_state(order, None, None, now) == ("pending", None)
    assert _order_state(order, None, None, now + timedelta(seconds=61)) == ("expired", None)
    assert _order_state(order, None, "cancelled", now) == ("cancelled", "cancelled")
    vend = {"type": "vend", "result": None}
    assert _order_state(order, vend, None, now) == ("confirmed", None)
    vend_ok = {"type": "vend", "result": {"ok": True, "error": None}}
    assert _order_state(order, vend_ok, None, now) == ("sold", None)
    refused = {"type": "vend", "result": {"ok": False, "error": "order_expired"}}
    assert _order_state(order, refused, None, now) == ("refused", "order_expired")
    assert _order_state(order, vend_ok, "refund", now) == ("vend_failed", None)
    cancel = {"type": "cancel_order", "result": {"ok": True, "error": None}}
    assert _order_state(order, cancel, None, now) == ("cancelled", None)


def test_orders_are_pending_until_decided_and_found_by_prefix(tmp_path: Path) -> None:
    store = BackendStore(tmp_path)
    store.add_message("M", "orders", order_payload("aaaa1111"))
    store.add_message("M", "orders", order_payload("bbbb2222", slot="A2"))
    store.add_message("M", "orders", order_payload("cccc3333", expires_in_s=-1))
    operator = Operator(tmp_path, store)
    try:
        states = {o["order_id"]: o["state"] for o in operator.orders()}
        assert states == {"aaaa1111": "pending", "bbbb2222": "pending", "cccc3333": "expired"}
        # Without an id: the newest pending order; with one, a unique prefix does.
        assert operator.find_order(None, None)["order_id"] == "bbbb2222"
        order = operator.find_order(None, "aaaa")
        sent = operator.confirm(order)
        body = body_of(sent.envelope)
        assert {k: body[k] for k in ("type", "machine", "order_id", "slot", "price")} == {
            "type": "vend",
            "machine": "M",
            "order_id": "aaaa1111",
            "slot": "A1",
            "price": 100,
        }
        assert body["origin"] == "machine" and body["currency"] == "EUR"
        assert operator.find_order(None, "aaaa")["state"] == "confirmed"
        store.add_message("M", "cmd/result", {"cmd_id": sent.cmd_id, "ok": True, "error": None})
        assert operator.find_order(None, "aaaa")["state"] == "sold"
        declined = operator.decline(operator.find_order(None, "bbbb"))
        assert body_of(declined.envelope)["type"] == "cancel_order"
        assert operator.find_order(None, "bbbb")["state"] == "declined"
        with pytest.raises(OperatorError, match="no pending order"):
            operator.find_order(None, None)
        with pytest.raises(OperatorError, match="no order"):
            operator.find_order(None, "zzzz")
        # The signature verifies with the key the machine is given.
        assert (
            operator.signer.public_key_b64 == CommandSigner.load_or_create(tmp_path).public_key_b64
        )
    finally:
        operator.close()
        store.close()


def test_the_command_line_takes_its_options_before_or_after_the_subcommand(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = BackendStore(tmp_path)
    store.add_message("M", "orders", order_payload("aaaa1111", expires_in_s=-1))
    store.close()
    for argv in (["--state", str(tmp_path), "orders"], ["orders", "--state", str(tmp_path)]):
        code, lines = run_cli(capsys, *argv)
        assert code == 0 and [o["state"] for o in lines] == ["expired"]
    # An order that is not pending is not confirmed (nothing is sent: no broker here).
    assert main(["--state", str(tmp_path), "confirm", "aaaa"]) == 1
    assert "expired, not pending" in capsys.readouterr().err
    # `sign` takes the machine from backend.json, as serve saved it.
    save_settings(tmp_path, broker="127.0.0.1:1", prefix="vmc", machine="M")
    assert load_settings(tmp_path)["machine"] == "M"
    code, [envelope] = run_cli(capsys, "--state", str(tmp_path), "sign", "sync")
    assert code == 0 and body_of(envelope)["machine"] == "M"
    # No broker at the saved address: said so, exit 1.
    assert main(["--state", str(tmp_path), "set-price", "A1", "130", "--currency", "EUR"]) == 1
    assert "cannot reach the broker at 127.0.0.1:1" in capsys.readouterr().err


async def test_auto_confirm_sends_the_vend_of_a_pending_order_only(tmp_path: Path) -> None:
    class FakeService:
        def __init__(self) -> None:
            self.handlers: dict[str, Any] = {}
            self.published: list[tuple[str, str, dict[str, Any]]] = []

        def on(self, suffix: str, handler: Any) -> None:
            self.handlers[suffix] = handler

        async def publish_json(self, machine: str, suffix: str, payload: Any) -> None:
            self.published.append((machine, suffix, payload))

    store = BackendStore(tmp_path)
    operator = Operator(tmp_path, store)
    service = FakeService()
    AutoConfirm(service, operator, 0.05)
    try:
        for order_id in ("paid", "declined"):
            store.add_message("M", "orders", order_payload(order_id))
            service.handlers["orders"]("M", order_payload(order_id))
        operator.decline(operator.find_order("M", "declined"))  # the operator was quicker
        await asyncio.sleep(0.3)
        assert [
            (m, s, body_of(p)["type"], body_of(p)["order_id"]) for m, s, p in service.published
        ] == [("M", "cmd", "vend", "paid")]
        assert operator.find_order("M", "paid")["decision"]["sent_by"] == "auto"
    finally:
        operator.close()
        store.close()


# --- end to end: the daemon, mosquitto, the backend ----------------------------------------


class Rig:
    def __init__(self, daemon: Daemon, backend_dir: Path) -> None:
        self.daemon = daemon
        self.backend_dir = backend_dir
        self.state = ["--state", str(backend_dir)]

    def slot(self, slot: str) -> dict[str, Any]:
        found: dict[str, Any] = next(
            s for s in self.daemon.state()["state"]["slots"] if s["slot"] == slot
        )
        return found

    def qr_order(self, slot: str) -> dict[str, Any]:
        self.daemon.wait_state(lambda s: (s.get("qr") or {}).get("available") is True, "QR")
        shown = self.daemon.control({"op": "qr_order", "slot": slot})
        assert shown["ok"] is True, shown
        order: dict[str, Any] = shown["order"]
        return order

    def backend_order(self, order_id: str) -> dict[str, Any] | None:
        store = BackendStore(self.backend_dir)
        operator = Operator(self.backend_dir, store)
        try:
            return next((o for o in operator.orders() if o["order_id"] == order_id), None)
        finally:
            operator.close()
            store.close()

    def records(self, type: str) -> list[dict[str, Any]]:
        store = BackendStore(self.backend_dir)
        try:
            return store.records(MACHINE, types=[type])
        finally:
            store.close()


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed")
    work = tmp_path_factory.mktemp("operator")
    backend_dir = work / "backend"
    public_key = CommandSigner.load_or_create(backend_dir).public_key_b64
    with Broker(work / "broker") as broker:
        log = open(work / "backend.log", "ab")  # noqa: SIM115 - handed to the child
        backend = subprocess.Popen(
            [
                *(sys.executable, "-m", "hil.backend", "serve", "--broker", broker.url),
                *("--state", str(backend_dir), "--machine", MACHINE),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        state = work / "state"
        extra = "\n".join(
            [
                "[cloud]",
                "enabled = true",
                'host = "127.0.0.1"',
                f"port = {broker.port}",
                f'command_public_key = "{public_key}"',
            ]
        )
        daemon = Daemon(write_config(work / "vmc.toml", state, extra=extra), state)
        try:
            daemon.start()
            daemon.wait_state(
                lambda s: (s.get("cloud_link") or {}).get("state") == "up", "cloud link up"
            )
            wait_until(
                lambda: load_settings(backend_dir).get("broker") == broker.url,
                WAIT_S,
                "the backend's settings",
            )
            yield Rig(daemon, backend_dir)
        finally:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.stop()
            backend.terminate()
            backend.wait(10)


@pytest.mark.slow
def test_the_backend_confirms_a_qr_order_and_the_machine_sells(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    stock = rig.slot("A1")["stock"]
    order = rig.qr_order("A1")
    wait_until(lambda: rig.backend_order(order["order_id"]), WAIT_S, "the order at the backend")
    code, pending = run_cli(capsys, *rig.state, "orders", "--pending")
    assert code == 0 and [o["order_id"] for o in pending] == [order["order_id"]]
    # The wallet paid: the operator confirms the newest pending order.
    code, lines = run_cli(capsys, *rig.state, "confirm")
    assert code == 0, lines
    sent, answer = lines
    assert sent["type"] == "vend" and sent["order_id"] == order["order_id"]
    assert (sent["slot"], sent["price"], sent["origin"]) == ("A1", 100, "machine")
    assert answer["result"] == {"cmd_id": sent["cmd_id"], "ok": True, "error": None}
    rig.daemon.wait_state(lambda s: (s.get("qr") or {}).get("order") is None, "order closed")
    assert rig.slot("A1")["stock"] == stock - 1
    # The sale reaches the backend with the journal sync; the order shows sold.
    wait_until(
        lambda: any(r["data"].get("order_id") == order["order_id"] for r in rig.records("sale")),
        WAIT_S,
        "the QR sale synced",
    )
    sale = next(r for r in rig.records("sale") if r["data"].get("order_id") == order["order_id"])
    assert sale["data"]["method"] == "qr"
    code, [sales] = run_cli(capsys, *rig.state, "sales")
    assert sales["slots"]["A1"]["count"] >= 1
    found = rig.backend_order(order["order_id"])
    assert found is not None and found["state"] == "sold"
    # A second confirm of the same order is refused by the backend itself.
    assert main([*rig.state, "confirm", order["order_id"]]) == 1
    assert "sold, not pending" in capsys.readouterr().err


@pytest.mark.slow
def test_the_backend_declines_a_qr_order_and_the_machine_cancels_it(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    stock = rig.slot("A2")["stock"]
    order = rig.qr_order("A2")
    wait_until(lambda: rig.backend_order(order["order_id"]), WAIT_S, "the order at the backend")
    code, lines = run_cli(capsys, *rig.state, "decline", order["order_id"][:8])
    assert code == 0, lines
    assert lines[0]["type"] == "cancel_order" and lines[0]["order_id"] == order["order_id"]
    assert lines[1]["result"]["ok"] is True
    rig.daemon.wait_state(lambda s: (s.get("qr") or {}).get("order") is None, "order cancelled")
    assert rig.slot("A2")["stock"] == stock
    wait_until(
        lambda: any(
            r["data"].get("order_id") == order["order_id"] and r["data"]["state"] == "cancelled"
            for r in rig.records("order")
        ),
        WAIT_S,
        "the cancelled order synced",
    )
    found = rig.backend_order(order["order_id"])
    assert found is not None and found["state"] == "cancelled"
    # Confirmed anyway (--force): the machine refuses and the backend shows why.
    code, lines = run_cli(capsys, *rig.state, "confirm", order["order_id"], "--force")
    assert code == 1 and lines[1]["result"]["error"] == "order_expired"
    found = rig.backend_order(order["order_id"])
    assert found is not None and (found["state"], found["error"]) == ("refused", "order_expired")


@pytest.mark.slow
def test_remote_operation_from_the_command_line_reaches_state(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    code, lines = run_cli(capsys, *rig.state, "set-price", "A3", "130")
    assert code == 0 and lines[0]["currency"] == "EUR" and lines[1]["result"]["ok"] is True
    assert rig.slot("A3")["price"] == 130
    code, lines = run_cli(capsys, *rig.state, "slot-out", "B1")
    assert code == 0 and lines[1]["result"]["ok"] is True
    assert rig.slot("B1")["enabled"] is False
    code, lines = run_cli(capsys, *rig.state, "set-stock", "B1", "7")
    assert code == 0 and rig.slot("B1")["stock"] == 7
    code, lines = run_cli(capsys, *rig.state, "slot-in", "B1")
    assert code == 0 and rig.slot("B1")["enabled"] is True
    code, lines = run_cli(capsys, *rig.state, "send", "set_price", "slot=A3", "price=140")
    assert code == 1 and lines[1]["result"]["error"] == "invalid"  # no currency
    assert rig.slot("A3")["price"] == 130
    # The results, and the telemetry the backend keeps (stock).
    code, results = run_cli(capsys, *rig.state, "results")
    by_type = [(r["type"], r["result"]["ok"]) for r in results if r["result"]]
    assert ("set_price", True) in by_type and ("set_price", False) in by_type
    assert ("set_inventory", True) in by_type
    wait_until(
        lambda: any(
            s["slot"] == "A3" and s["price"] == 130
            for line in run_cli(capsys, *rig.state, "stock")[1]
            for s in line["slots"]
        ),
        WAIT_S,
        "the new price in the backend's telemetry",
    )
