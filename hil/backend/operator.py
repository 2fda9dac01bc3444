"""The stand-in backend's operator side: QR payments confirmed or declined, and the operator's
command line over the backend's store and a running backend.

QR orders. The machine publishes each order on ``PREFIX/M/orders``; the backend keeps it (the
store's ``orders`` messages) as **pending** until the operator, or the wallet in a real backend,
decides:

* ``confirm [ORDER_ID]``: the wallet paid; the backend sends the signed ``vend`` with origin
  ``machine`` and the order's slot, price and currency (without ORDER_ID: the newest pending
  order);
* ``decline [ORDER_ID]``: the wallet payment failed; the backend sends ``cancel_order``;
* ``serve --auto-confirm [--confirm-delay S]``: every order is confirmed S seconds (default 3)
  after it arrived, as a customer's wallet would pay it (the demo, ``scripts/run-sim``).

An order's state is worked out from what the backend has seen: ``pending`` (no decision,
not expired), ``expired`` (its ``expires_at`` passed with no decision), ``confirmed`` / ``declined``
(the command is out, no result yet), ``sold`` (the vend's result is ok; the ``sale`` record
arrives with the journal sync), ``refused`` (the machine refused the vend: ``error`` says why;
a real backend refunds the wallet), ``vend_failed`` (a ``refund`` record for the order arrived:
refund the wallet), ``cancelled`` (the machine's journal says the order was cancelled or
expired, or a ``cancel_order`` was answered).

Commands. Every command is signed with the key in the backend's state folder
(``command_key.pem``, hil/backend/commands.py) and published at QoS 1 on ``PREFIX/M/cmd`` by
the command line itself (paho, a short clean session), so nothing has to run besides the
broker; the running backend (``serve``) stores the ``cmd/result`` each command gets. Each
command sent is kept in ``operator.sqlite3`` (type, fields, who sent it), so ``results`` shows
commands with their results.

The broker, prefix and default machine come from ``--broker``, ``--prefix``, ``--machine`` or
else from ``backend.json`` in the state folder, which ``serve`` writes at start; the machine,
when neither names it, is the only one the backend has heard of. So with a backend serving
``state/backend``::

    python -m hil.backend --state state/backend set-price A1 130
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sqlite3
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from hil.backend.commands import (
    DEFAULT_TTL_S,
    CommandSigner,
    body_of,
    load_settings,
    parse_fields,
    shared_options,
    state_dir_of,
)
from hil.backend.store import BackendStore, now_ts

log = logging.getLogger("hil.backend.operator")

OPERATOR_DB: Final = "operator.sqlite3"
DEFAULT_BROKER: Final = "127.0.0.1:1883"
DEFAULT_PREFIX: Final = "vmc"
DEFAULT_CONFIRM_DELAY_S: Final = 3.0
#: How long the command line waits for a command's result (the running backend stores it).
DEFAULT_WAIT_S: Final = 10.0
RESULT_POLL_S: Final = 0.1

EXIT_OK: Final = 0
EXIT_REFUSED: Final = 1
EXIT_USAGE: Final = 2

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS commands (
    cmd_id TEXT PRIMARY KEY, machine TEXT NOT NULL, type TEXT NOT NULL,
    order_id TEXT, body TEXT NOT NULL, sent_by TEXT NOT NULL, sent_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS commands_order ON commands (order_id);
"""


# --- the broker ---------------------------------------------------------------------------


def split_broker(broker: str) -> tuple[str, int]:
    host, _, port = broker.rpartition(":")
    return host or "127.0.0.1", int(port)


# --- the operator's view -------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """A command the operator signed: where it goes and what to publish."""

    machine: str
    cmd_id: str
    envelope: dict[str, str]


class OperatorError(Exception):
    """Something the operator asked that cannot be done (no such order, not pending)."""


class Operator:
    """Orders, commands and results over the backend's state folder (store, key, log)."""

    def __init__(self, state_dir: Path, store: BackendStore | None = None) -> None:
        self.state_dir = state_dir
        self._own_store = store is None
        self.store = store or BackendStore(state_dir)
        self.signer = CommandSigner.load_or_create(state_dir)
        self.db = sqlite3.connect(
            state_dir / OPERATOR_DB, isolation_level=None, check_same_thread=False, timeout=10
        )
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()
        if self._own_store:
            self.store.close()

    # --- commands --------------------------------------------------------------------------

    def command(
        self,
        machine: str,
        type: str,
        fields: Mapping[str, Any] | None = None,
        *,
        sent_by: str = "cli",
        ttl_s: float = DEFAULT_TTL_S,
    ) -> Sent:
        """Sign a command and keep it in the log (before it is published, so its result can
        always be matched)."""
        envelope = self.signer.envelope(machine, type, fields, ttl_s=ttl_s)
        body = body_of(envelope)
        order_id = body.get("order_id")
        self.db.execute(
            "INSERT INTO commands VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                body["cmd_id"],
                machine,
                type,
                order_id if isinstance(order_id, str) else None,
                envelope["body"],
                sent_by,
                now_ts(),
            ),
        )
        return Sent(machine, body["cmd_id"], envelope)

    def results(self, machine: str | None = None) -> dict[str, dict[str, Any]]:
        """Every ``cmd/result`` seen, by cmd_id (the first one: a redelivery repeats it)."""
        out: dict[str, dict[str, Any]] = {}
        for message in self.store.messages(machine, "cmd/result"):
            payload = message["payload"]
            cmd_id = payload.get("cmd_id")
            if isinstance(cmd_id, str):
                out.setdefault(cmd_id, {**payload, "received_at": message["received_at"]})
        return out

    def result(self, cmd_id: str) -> dict[str, Any] | None:
        for message in self.store.messages(None, "cmd/result"):
            if message["payload"].get("cmd_id") == cmd_id:
                payload: dict[str, Any] = message["payload"]
                return payload
        return None

    def commands(self, machine: str | None = None) -> list[dict[str, Any]]:
        """The commands sent, oldest first, each with its result (or None) and the results of
        commands this backend did not send (``type`` None)."""
        results = self.results(machine)
        rows = self.db.execute(
            "SELECT cmd_id, machine, type, body, sent_by, sent_at FROM commands "
            "WHERE ? IS NULL OR machine = ? ORDER BY rowid",
            (machine, machine),
        ).fetchall()
        out = []
        for cmd_id, row_machine, type_, body, sent_by, sent_at in rows:
            fields = {
                k: v
                for k, v in json.loads(body).items()
                if k not in ("cmd_id", "machine", "type", "issued_at", "expires_at")
            }
            result = results.pop(cmd_id, None)
            out.append(
                {
                    "cmd_id": cmd_id,
                    "machine": row_machine,
                    "type": type_,
                    "fields": fields,
                    "sent_by": sent_by,
                    "sent_at": sent_at,
                    "result": _plain_result(result),
                }
            )
        for cmd_id, result in results.items():
            out.append(
                {
                    "cmd_id": cmd_id,
                    "machine": machine,
                    "type": None,
                    "result": _plain_result(result),
                }
            )
        return out

    # --- orders ----------------------------------------------------------------------------

    def orders(self, machine: str | None = None) -> list[dict[str, Any]]:
        """Every QR order the machines published, oldest first, with its state."""
        results = self.results(machine)
        decisions: dict[str, dict[str, Any]] = {}
        for cmd_id, type_, order_id, sent_by, sent_at in self.db.execute(
            "SELECT cmd_id, type, order_id, sent_by, sent_at FROM commands "
            "WHERE order_id IS NOT NULL AND type IN ('vend', 'cancel_order') ORDER BY rowid"
        ):
            decisions[order_id] = {
                "cmd_id": cmd_id,
                "type": type_,
                "sent_by": sent_by,
                "sent_at": sent_at,
                "result": _plain_result(results.get(cmd_id)),
            }
        journaled: dict[str, str] = {}
        for record in self.store.records(machine, types=["order", "sale", "refund"]):
            data = record["data"]
            order_id = data.get("order_id")
            if not isinstance(order_id, str):
                continue
            if record["type"] == "order":
                journaled[order_id] = str(data.get("state"))
            else:
                journaled[order_id] = record["type"]
        now = datetime.now(UTC)
        out = []
        for message in self.store.messages(machine, "orders"):
            order = message["payload"]
            order_id = str(order.get("order_id"))
            decision = decisions.get(order_id)
            state, error = _order_state(order, decision, journaled.get(order_id), now)
            out.append(
                {
                    "machine": message["machine"],
                    **{
                        k: order.get(k)
                        for k in ("order_id", "slot", "price", "currency", "expires_at")
                    },
                    "state": state,
                    "error": error,
                    "received_at": message["received_at"],
                    "decision": decision,
                }
            )
        return out

    def find_order(self, machine: str | None, order_id: str | None) -> dict[str, Any]:
        """An order by id (or a unique prefix of it); without one, the newest pending order."""
        orders = self.orders(machine)
        if order_id is None:
            pending = [o for o in orders if o["state"] == "pending"]
            if not pending:
                raise OperatorError("no pending order")
            return pending[-1]
        found = [o for o in orders if str(o["order_id"]).startswith(order_id)]
        if not found:
            raise OperatorError(f"no order {order_id}")
        if len({o["order_id"] for o in found}) > 1:
            raise OperatorError(f"{order_id} names more than one order")
        return found[-1]

    def confirm(self, order: Mapping[str, Any], *, sent_by: str = "cli") -> Sent:
        """The signed ``vend`` for a paid order (origin machine, the order's slot and price)."""
        return self.command(
            str(order["machine"]),
            "vend",
            {
                "order_id": order["order_id"],
                "slot": order["slot"],
                "price": order["price"],
                "currency": order["currency"],
                "origin": "machine",
            },
            sent_by=sent_by,
        )

    def decline(self, order: Mapping[str, Any], *, sent_by: str = "cli") -> Sent:
        return self.command(
            str(order["machine"]), "cancel_order", {"order_id": order["order_id"]}, sent_by=sent_by
        )


def _plain_result(result: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if result is None:
        return None
    return {"ok": result.get("ok"), "error": result.get("error")}


def _parse_time(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    with contextlib.suppress(ValueError):
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    return None


def _order_state(
    order: Mapping[str, Any],
    decision: Mapping[str, Any] | None,
    journaled: str | None,
    now: datetime,
) -> tuple[str, str | None]:
    """(state, error) of an order: see the module's docstring."""
    if journaled == "refund":
        return "vend_failed", None
    if journaled == "sale":
        return "sold", None
    if decision is not None:
        result = decision["result"]
        vend = decision["type"] == "vend"
        if result is None:
            return ("confirmed" if vend else "declined"), None
        if result["ok"]:
            return ("sold" if vend else "cancelled"), None
        return ("refused" if vend else "declined"), result["error"]
    if journaled in ("cancelled", "expired"):
        return "cancelled", journaled
    expires = _parse_time(order.get("expires_at"))
    if expires is not None and now > expires:
        return "expired", None
    return "pending", None


# --- serve: auto-confirm --------------------------------------------------------------------


class AutoConfirm:
    """Confirms every order ``delay_s`` after it arrived (a customer's wallet paying), unless
    the operator decided or the order closed meanwhile. Hooked on the service's orders."""

    def __init__(self, service: Any, operator: Operator, delay_s: float) -> None:
        self.service = service
        self.operator = operator
        self.delay_s = delay_s
        self._tasks: set[asyncio.Task[None]] = set()
        service.on("orders", self._on_order)

    def _on_order(self, machine: str, payload: dict[str, Any]) -> None:
        order_id = payload.get("order_id")
        if not isinstance(order_id, str):
            return
        task = asyncio.get_running_loop().create_task(self._confirm_later(machine, order_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _confirm_later(self, machine: str, order_id: str) -> None:
        await asyncio.sleep(self.delay_s)
        try:
            order = self.operator.find_order(machine, order_id)
        except OperatorError:
            return
        if order["state"] != "pending":
            log.info("backend: order %s is %s: not auto-confirmed", order_id, order["state"])
            return
        sent = self.operator.confirm(order, sent_by="auto")
        try:
            await self.service.publish_json(machine, "cmd", sent.envelope)
        except Exception as exc:  # the link is down: the order will expire on the machine
            log.warning("backend: vend for order %s not sent: %s", order_id, exc)
            return
        log.info(
            "backend: order %s paid (auto-confirm): vend %s sent for slot %s",
            order_id,
            sent.cmd_id,
            order["slot"],
        )


# --- the command line ------------------------------------------------------------------------

Handler = Callable[[argparse.Namespace], int]


def add_arguments(subparsers: Any) -> dict[str, Handler]:
    """The operator's subcommands for ``python -m hil.backend`` (hil/backend/__main__.py)."""
    handlers: dict[str, Handler] = {}

    def sub(name: str, text: str, handler: Handler, *, sends: bool = True) -> Any:
        parser = subparsers.add_parser(name, help=text, description=text)
        shared_options(parser)
        if sends:
            parser.add_argument(
                "--wait",
                type=float,
                default=DEFAULT_WAIT_S,
                help="seconds to wait for the command's result (0: do not wait)",
            )
        handlers[name] = handler
        return parser

    p = sub("set-price", "change a slot's price (set_price)", cmd_set_price)
    p.add_argument("slot")
    p.add_argument("price", type=int, help="in the currency's minor unit (130 = 1.30)")
    p.add_argument("--currency", default=None, help="default: the machine's, from telemetry")
    sub("slot-out", "take a slot out of sale (set_slot enabled=false)", cmd_slot_out).add_argument(
        "slot"
    )
    sub("slot-in", "put a slot back in sale (set_slot enabled=true)", cmd_slot_in).add_argument(
        "slot"
    )
    p = sub("set-stock", "the stock after a refill or a count (set_inventory)", cmd_set_stock)
    p.add_argument("slot")
    p.add_argument("count", type=int)
    p = sub("confirm", "a QR order was paid: send its vend", cmd_confirm)
    p.add_argument("order_id", nargs="?", help="id or a unique prefix (default: newest pending)")
    p.add_argument("--force", action="store_true", help="send even when not pending")
    p = sub("decline", "a QR order's payment failed: send cancel_order", cmd_decline)
    p.add_argument("order_id", nargs="?", help="id or a unique prefix (default: newest pending)")
    p.add_argument("--force", action="store_true", help="send even when not pending")
    p = sub("send", "sign any command and send it", cmd_send)
    p.add_argument("--ttl", type=float, default=DEFAULT_TTL_S, help="seconds (default 60)")
    p.add_argument("type", help="vend, cancel_order, set_price, set_inventory, set_slot, sync, dex")
    p.add_argument("fields", nargs="*", help="field=value (JSON where it parses)")
    p = sub("orders", "the QR orders and their state", cmd_orders, sends=False)
    p.add_argument("--pending", action="store_true", help="only the pending ones")
    sub("results", "the commands sent and the results seen", cmd_results, sends=False)
    return handlers


def _machine(args: argparse.Namespace, operator: Operator) -> str:
    machine = getattr(args, "machine", None) or load_settings(operator.state_dir).get("machine")
    if machine:
        return str(machine)
    known = operator.store.machines()
    if len(known) == 1:
        return known[0]
    raise SystemExit(
        "--machine M is required: "
        + (f"the backend knows {', '.join(known)}" if known else "the backend knows no machine")
    )


def _broker(args: argparse.Namespace, state_dir: Path) -> tuple[str, int, str]:
    settings = load_settings(state_dir)
    broker = getattr(args, "broker", None) or settings.get("broker") or DEFAULT_BROKER
    prefix = getattr(args, "prefix", None) or settings.get("prefix") or DEFAULT_PREFIX
    host, port = split_broker(str(broker))
    return host, port, str(prefix)


def publish_once(host: str, port: int, topic: str, payload: bytes, timeout_s: float = 10.0) -> None:
    """Publish one message at QoS 1 and return once the broker has it (PUBACK); a short clean
    session of its own. Raises OSError when the broker cannot be reached or does not answer."""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="")
    deadline = time.monotonic() + timeout_s
    client.connect(host, port, keepalive=max(5, int(timeout_s)))
    try:
        info = client.publish(topic, payload, qos=1)
        while not info.is_published():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no PUBACK from {host}:{port} within {timeout_s:g} s")
            if client.loop(0.1) not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN):
                raise ConnectionError(f"the broker at {host}:{port} closed the connection")
    finally:
        client.disconnect()


def publish(args: argparse.Namespace, operator: Operator, sent: Sent) -> int:
    """Publish a signed command; print it, then its result when it comes within ``--wait``.
    Exit 0 when the machine accepted it (or no result came), 1 when it refused it."""
    host, port, prefix = _broker(args, operator.state_dir)
    topic = f"{prefix}/{sent.machine}/cmd"
    try:
        publish_once(host, port, topic, json.dumps(sent.envelope).encode())
    except OSError as exc:
        print(f"cannot reach the broker at {host}:{port}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    body = body_of(sent.envelope)
    fields = {k: v for k, v in body.items() if k not in ("issued_at", "expires_at")}
    print(json.dumps({"sent": topic, **fields}), flush=True)
    wait_s = float(getattr(args, "wait", 0.0))
    if wait_s <= 0:
        return EXIT_OK
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        result = operator.result(sent.cmd_id)
        if result is not None:
            print(json.dumps({"result": result}))
            return EXIT_OK if result.get("ok") else EXIT_REFUSED
        time.sleep(RESULT_POLL_S)
    print(
        f"no result within {wait_s:g} s (is the backend serving {operator.state_dir}, "
        "and the machine online?): `results` shows it when it comes",
        file=sys.stderr,
    )
    return EXIT_OK


def _run(args: argparse.Namespace, work: Callable[[Operator], int]) -> int:
    operator = Operator(state_dir_of(args))
    try:
        return work(operator)
    except OperatorError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_REFUSED
    finally:
        operator.close()


def _send(args: argparse.Namespace, type: str, fields: dict[str, Any], ttl_s: float) -> int:
    def work(operator: Operator) -> int:
        machine = _machine(args, operator)
        return publish(args, operator, operator.command(machine, type, fields, ttl_s=ttl_s))

    return _run(args, work)


def _currency(operator: Operator, machine: str, slot: str) -> str:
    telemetry = operator.store.latest(machine, "telemetry") or {}
    for item in telemetry.get("slots") or []:
        if item.get("slot") == slot and item.get("currency"):
            return str(item["currency"])
    currency = telemetry.get("currency")
    if not currency:
        raise OperatorError("no telemetry from the machine yet: give --currency")
    return str(currency)


def cmd_set_price(args: argparse.Namespace) -> int:
    def work(operator: Operator) -> int:
        machine = _machine(args, operator)
        currency = args.currency or _currency(operator, machine, args.slot)
        fields = {"slot": args.slot, "price": args.price, "currency": currency}
        return publish(args, operator, operator.command(machine, "set_price", fields))

    return _run(args, work)


def cmd_slot_out(args: argparse.Namespace) -> int:
    return _send(args, "set_slot", {"slot": args.slot, "enabled": False}, DEFAULT_TTL_S)


def cmd_slot_in(args: argparse.Namespace) -> int:
    return _send(args, "set_slot", {"slot": args.slot, "enabled": True}, DEFAULT_TTL_S)


def cmd_set_stock(args: argparse.Namespace) -> int:
    return _send(args, "set_inventory", {"slot": args.slot, "count": args.count}, DEFAULT_TTL_S)


def cmd_send(args: argparse.Namespace) -> int:
    return _send(args, args.type, parse_fields(args.fields), args.ttl)


def _decide(args: argparse.Namespace, confirm: bool) -> int:
    def work(operator: Operator) -> int:
        machine = getattr(args, "machine", None)
        order = operator.find_order(machine, args.order_id)
        if order["state"] != "pending" and not args.force:
            raise OperatorError(
                f"order {order['order_id']} is {order['state']}, not pending (--force sends "
                "the command anyway)"
            )
        sent = operator.confirm(order) if confirm else operator.decline(order)
        return publish(args, operator, sent)

    return _run(args, work)


def cmd_confirm(args: argparse.Namespace) -> int:
    return _decide(args, confirm=True)


def cmd_decline(args: argparse.Namespace) -> int:
    return _decide(args, confirm=False)


def cmd_orders(args: argparse.Namespace) -> int:
    def work(operator: Operator) -> int:
        for order in operator.orders(getattr(args, "machine", None)):
            if args.pending and order["state"] != "pending":
                continue
            print(json.dumps(order))
        return EXIT_OK

    return _run(args, work)


def cmd_results(args: argparse.Namespace) -> int:
    def work(operator: Operator) -> int:
        for command in operator.commands(getattr(args, "machine", None)):
            print(json.dumps(command))
        return EXIT_OK

    return _run(args, work)
