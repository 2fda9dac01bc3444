"""QR e-wallet payments (../shared/contracts/cloud-mqtt.md, "QR e-wallet flow"; docs/payments.md).

Two ways in, one vend cycle:

* **An order shown on the screen** (origin ``machine``). The customer picks a slot and chooses
  QR (control op ``qr_order``); the machine creates an order ``{order_id, slot, price,
  currency, qr, expires_at, ts}`` whose ``qr`` text comes from ``cloud.qr_url_template``,
  journals it (``order`` ``created``, the journal is what reaches the backend durably),
  publishes it on ``PREFIX/M/orders`` (live, through ``publish_order``) and shows the QR. The
  wallet pays the backend; the backend sends a signed ``vend``, accepted only for this pending,
  unexpired order with the same slot and price. The order expires after ``cloud.order_ttl_s``
  or is cancelled (the screen, or ``cancel_order``); either is journaled.
* **The static QR** (origin ``remote``): the customer chose and paid in the operator's web
  shop; the ``vend`` is accepted only when the machine is idle (no credit, no bill being
  decided, no payout to settle, no order shown, no vend), the slot is sellable and the price is
  the slot's price now; the machine journals the order (``created``, origin ``remote``) itself.

Either way the vend is ``VendMachine.vend_cycle`` with this method's payment: ``sale`` (method
``qr``, the order id), or ``vend_failed`` plus a ``refund`` ``{order_id, amount, currency,
reason}`` in the same transaction, which the backend turns into a wallet refund. The command's
result says how it ended (None: sold; ``vend_failed``; a refusal code).

QR payment is offered only while the cloud link is up (``link_up``): without it the backend
could never confirm a payment. While an order is shown the cash acceptors are off (a session of
the vend cycle); the rules for cash and QR together are in docs/payments.md.

Everything that changes an order runs inside the vend-cycle actor (``VendMachine.submit``), so
an order never races a coin, a vend or its own expiry.
"""

from __future__ import annotations

import asyncio
import base64
import io
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote

import qrcode
import structlog

from vmc.journal.records import LOCAL, Source, format_ts, remote_source
from vmc.log import bind_ids, bound_ids
from vmc.payments.base import Payment, RecordSpec, Refusal

if TYPE_CHECKING:
    from vmc.machine import VendMachine
    from vmc.planogram import Slot

log = structlog.get_logger("vmc.payments.qr")

#: Orders remembered after they closed, to answer a late ``vend`` ``order_expired`` rather
#: than ``unknown_order`` (the oldest closed ones are forgotten first; a day of a busy machine).
ORDERS_REMEMBERED: Final = 500
#: The QR image for the screen: pixels per module, and the quiet zone in modules (ISO/IEC
#: 18004 asks for 4).
QR_BOX_PX: Final = 8
QR_BORDER: Final = 4

# Result codes for the command processor (the contract's, and docs/commands.md).
UNKNOWN_ORDER: Final = "unknown_order"
ORDER_EXPIRED: Final = "order_expired"
INVALID: Final = "invalid"
UNAVAILABLE: Final = "unavailable"
VEND_FAILED: Final = "vend_failed"

PublishOrder = Callable[[Mapping[str, Any]], Awaitable[bool]]
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Order:
    """A QR order. ``state``: ``pending`` (shown, waiting for the payment), ``vending``,
    ``sold``, ``failed`` (vended, nothing fell: refunded), ``cancelled``, ``expired``,
    ``interrupted`` (a step of its vend failed: start-up recovery settles it)."""

    order_id: str
    slot: str
    price: int
    currency: str
    qr: str
    expires_at: datetime
    ts: datetime
    origin: str
    state: str = "pending"

    def payload(self) -> dict[str, Any]:
        """The contract's ``orders`` message."""
        return {
            "order_id": self.order_id,
            "slot": self.slot,
            "price": self.price,
            "currency": self.currency,
            "qr": self.qr,
            "expires_at": format_ts(self.expires_at),
            "ts": format_ts(self.ts),
        }


class QrPayment(Payment):
    """A vend paid by an order the backend confirmed."""

    method = "qr"

    def __init__(self, order: Order, source: Source) -> None:
        super().__init__(order.price, source=source)
        self.order = order

    @property
    def refs(self) -> dict[str, str]:
        return {"order_id": self.order.order_id}

    def refund_records(self, intent_id: str, reason: str) -> list[RecordSpec]:
        refund = {
            "intent_id": intent_id,
            "order_id": self.order.order_id,
            "amount": self.price,
            "currency": self.order.currency,
            "method": "qr",
            "reason": reason[:200] or "vend failed",
        }
        return [("refund", refund)]

    async def settle(self) -> dict[str, Any]:
        self.order.state = "sold"
        return {"order_id": self.order.order_id}

    async def refund(self, reason: str) -> dict[str, Any]:
        self.order.state = "failed"
        return {"order_id": self.order.order_id, "refund": self.price}


class _Paid:
    """The authoriser of one confirmed order: the payment is already made."""

    def __init__(self, order: Order, source: Source) -> None:
        self.order = order
        self.source = source

    async def authorise(self, slot: Slot) -> Payment:
        return QrPayment(self.order, self.source)


class QrPayments:
    """The QR payment method: orders for the screen, ``vend`` and ``cancel_order`` for the
    command processor (``vmc.cloud.commands.QrOrders``). Attaches itself to ``machine``.

    ``publish_order(payload) -> bool`` publishes on ``PREFIX/M/orders`` (the link's
    ``publish_json``; None: not published live, the journal still carries it); ``link_up()``
    says whether the cloud link is up; ``clock`` gives the time (UTC; tests move it)."""

    name = "qr"

    def __init__(
        self,
        machine: VendMachine,
        *,
        link_up: Callable[[], bool],
        publish_order: PublishOrder | None = None,
        clock: Clock = utc_now,
    ) -> None:
        self.machine = machine
        self.config = machine.config
        self.journal = machine.journal
        self.link_up = link_up
        self.publish_order = publish_order
        self.clock = clock
        self.pending: Order | None = None
        self._orders: dict[str, Order] = {}
        self._publishing: set[asyncio.Task[None]] = set()
        machine.attach(self)

    # --- the screen (control interface) ------------------------------------------------------

    async def create_order(self, slot_id: str) -> dict[str, Any]:
        """``qr_order``: the order, its QR as a PNG (base64) and as text, or a refusal."""
        answer: dict[str, Any] = await self.machine.submit(lambda: self._create(slot_id))
        if not answer.get("ok"):
            return answer
        png, text = await asyncio.to_thread(render_qr, answer["order"]["qr"])
        return {**answer, "png": base64.b64encode(png).decode("ascii"), "text": text}

    async def cancel_pending(self) -> dict[str, Any]:
        """``qr_cancel``: the customer closes the QR screen."""
        answer: dict[str, Any] = await self.machine.submit(self._cancel_pending)
        return answer

    # --- the command processor (QrOrders) ----------------------------------------------------

    async def vend(
        self, order_id: str, slot: str, price: int, currency: str, origin: str, cmd_id: str
    ) -> str | None:
        source = remote_source(cmd_id)
        if origin == "remote":
            work = lambda: self._vend_remote(order_id, slot, price, currency, source)  # noqa: E731
        else:
            work = lambda: self._vend_order(order_id, slot, price, currency, source)  # noqa: E731
        answer: dict[str, Any] = await self.machine.submit(work)
        return _result(answer)

    async def cancel_order(self, order_id: str, cmd_id: str) -> str | None:
        answer: dict[str, Any] = await self.machine.submit(
            lambda: self._cancel_order(order_id, remote_source(cmd_id))
        )
        return _result(answer)

    # --- the vend cycle's side (PaymentMethod) -----------------------------------------------

    async def tick(self) -> None:
        await self._expire_due()

    def snapshot(self) -> dict[str, Any]:
        """STATE ``qr``: offered now, and the order shown."""
        pending = self.pending
        return {
            "available": self.link_up(),
            "order": None if pending is None else pending.payload(),
        }

    async def close(self) -> None:
        """At shutdown: stop live publishes still waiting (the journal carries the orders)."""
        for task in list(self._publishing):
            task.cancel()
        if self._publishing:
            await asyncio.wait(self._publishing, timeout=1.0)

    # --- inside the actor --------------------------------------------------------------------

    async def _create(self, slot_id: str) -> dict[str, Any]:
        machine = self.machine
        machine.touch()
        await self._expire_due()
        if not self.link_up():
            raise Refusal(
                "qr_unavailable",
                "QR payment needs the network and the machine is offline: please pay with cash",
            )
        slot = machine.check_selection(slot_id)
        if machine.credit > 0:
            raise Refusal(
                "cash_credit",
                f"{machine.credit} credit is on the machine: choose with it, or take it back "
                "(return button) before paying by QR",
            )
        if self.pending is not None:  # another pick replaces the order shown
            await self._close(self.pending, "cancelled", "replaced", LOCAL)
        now = self.clock()
        order = Order(
            order_id=uuid.uuid4().hex,
            slot=slot.id,
            price=slot.price,
            currency=self.config.machine.currency,
            qr="",
            expires_at=now + timedelta(seconds=self.config.cloud.order_ttl_s),
            ts=now,
            origin="machine",
        )
        order.qr = self.qr_text(order)
        bind_ids(order_id=order.order_id)  # for this step of the actor
        await self.journal.append(
            "order",
            {
                "order_id": order.order_id,
                "slot": order.slot,
                "price": order.price,
                "state": "created",
                "currency": order.currency,
                "origin": "machine",
                "qr": order.qr,
                "expires_at": format_ts(order.expires_at),
            },
        )
        self._remember(order)
        self.pending = order
        machine.set_session(self.name, f"QR order {order.order_id}")
        payload = order.payload()
        machine.publish("order", state="created", **payload)
        self._publish_live(payload)
        log.info("QR order created", order_id=order.order_id, slot=order.slot, price=order.price)
        return {"ok": True, "order": payload}

    async def _cancel_pending(self) -> dict[str, Any]:
        await self._expire_due()
        order = self.pending
        if order is None:
            raise Refusal("no_order", "no QR order is shown")
        await self._close(order, "cancelled", "customer", LOCAL)
        return {"ok": True, "order_id": order.order_id, "state": order.state}

    async def _cancel_order(self, order_id: str, source: Source) -> dict[str, Any]:
        await self._expire_due()
        order = self._orders.get(order_id)
        if order is None:
            return _error(UNKNOWN_ORDER, f"no order {order_id} on this machine")
        if order.state == "pending":
            await self._close(order, "cancelled", "backend", source)
            return {"ok": True}
        if order.state in ("cancelled", "expired"):
            return {"ok": True}  # closed already: nothing more to do
        return _error(INVALID, f"order {order_id} was vended ({order.state})")

    async def _vend_order(
        self, order_id: str, slot_id: str, price: int, currency: str, source: Source
    ) -> dict[str, Any]:
        """A ``vend`` with origin ``machine``: only for the pending, unexpired order."""
        await self._expire_due()
        order = self._orders.get(order_id)
        if order is None or order.origin != "machine":
            log.warning("vend for an unknown order", order_id=order_id)
            return _error(UNKNOWN_ORDER, f"no order {order_id} on this machine")
        if order.state != "pending":
            log.warning("vend for an order no longer pending", order_id=order_id, state=order.state)
            return _error(ORDER_EXPIRED, f"order {order_id} is {order.state}")
        if (slot_id, price, currency) != (order.slot, order.price, order.currency):
            # Not this order's terms: refused, and the customer's order stays shown.
            log.warning(
                "vend does not match its order",
                order_id=order_id,
                slot=slot_id,
                price=price,
                order_slot=order.slot,
                order_price=order.price,
            )
            return _error(INVALID, "slot, price or currency differ from the order's")
        return await self._vend(order, source)

    async def _vend_remote(
        self, order_id: str, slot_id: str, price: int, currency: str, source: Source
    ) -> dict[str, Any]:
        """A ``vend`` with origin ``remote`` (the static QR): only when the machine is idle,
        the slot sellable and the price the slot's price now. Every refusal is ``invalid``
        (the contract's code for a command whose content cannot be accepted); the log says
        which check failed."""
        machine = self.machine
        await self._expire_due()
        slot = machine.slots.get(slot_id)
        why = ""
        if order_id in self._orders:
            why = f"order id {order_id} is in use"
        elif not machine.idle():
            why = "the machine is in use (credit, an order shown, a vend or a payout)"
        elif slot is None or not slot.sellable:
            why = f"slot {slot_id} is not sellable"
        elif price != slot.price or currency != self.config.machine.currency:
            why = f"price {price} {currency} is not the slot's {slot.price}"
        else:
            try:
                machine.check_selection(slot_id)
            except Refusal as exc:
                why = f"{exc.code}: {exc}"
        if why or slot is None:
            log.warning("remote vend refused", order_id=order_id, slot=slot_id, why=why)
            return _error(INVALID, why)
        now = self.clock()
        order = Order(order_id, slot.id, price, currency, "", now, now, "remote")
        await self.journal.append(
            "order",
            {
                "order_id": order_id,
                "slot": slot.id,
                "price": price,
                "state": "created",
                "currency": currency,
                "origin": "remote",
            },
            source=source,
        )
        self._remember(order)
        return await self._vend(order, source)

    async def _vend(self, order: Order, source: Source) -> dict[str, Any]:
        with bound_ids(order_id=order.order_id):
            return await self._vend_order_now(order, source)

    async def _vend_order_now(self, order: Order, source: Source) -> dict[str, Any]:
        machine = self.machine
        order.state = "vending"
        try:
            answer: dict[str, Any] = await machine.vend_cycle(order.slot, _Paid(order, source))
        except Refusal as exc:
            # Checked before the intent: nothing was vended. The order is closed; the result
            # tells the backend to refund the wallet.
            log.warning("QR vend cannot be made now", order_id=order.order_id, code=exc.code)
            await self._close(order, "cancelled", exc.code, source)
            return _error(UNAVAILABLE, f"{exc.code}: {exc}")
        finally:
            if order.state == "vending":
                order.state = "interrupted"  # a step failed: recovery settles the intent
            if self.pending is order:
                self.pending = None
                machine.set_session(self.name, None)
        log.info("QR vend done", order_id=order.order_id, state=order.state)
        if answer.get("ok"):
            return {"ok": True}
        return _error(VEND_FAILED, str(answer.get("message", "")))

    async def _expire_due(self) -> None:
        order = self.pending
        if order is not None and order.state == "pending" and self.clock() >= order.expires_at:
            await self._close(order, "expired", "timeout", LOCAL)

    async def _close(self, order: Order, state: str, reason: str, source: Source) -> None:
        """Journal an order ``cancelled`` or ``expired``; it is no longer shown."""
        bind_ids(order_id=order.order_id)  # for this step of the actor
        await self.journal.append(
            "order",
            {
                "order_id": order.order_id,
                "slot": order.slot,
                "price": order.price,
                "state": state,
                "reason": reason[:200],
            },
            source=source,
        )
        order.state = state
        if self.pending is order:
            self.pending = None
            self.machine.set_session(self.name, None)
        self.machine.publish("order", state=state, order_id=order.order_id, reason=reason)
        log.info("QR order closed", order_id=order.order_id, state=state, reason=reason)

    # --- helpers -----------------------------------------------------------------------------

    def qr_text(self, order: Order) -> str:
        """``cloud.qr_url_template`` filled in; ``{amount}`` is the price in minor units (the
        contract's money), every value URL-quoted."""
        values = {
            "machine": self.config.machine.id,
            "order_id": order.order_id,
            "slot": order.slot,
            "amount": str(order.price),
            "currency": order.currency,
        }
        return self.config.cloud.qr_url_template.format(
            **{k: quote(v, safe="") for k, v in values.items()}
        )

    def _remember(self, order: Order) -> None:
        self._orders[order.order_id] = order
        if len(self._orders) > ORDERS_REMEMBERED:
            for order_id, known in list(self._orders.items()):
                if known.state not in ("pending", "vending"):
                    del self._orders[order_id]
                    break

    def _publish_live(self, payload: dict[str, Any]) -> None:
        """Publish on ``orders`` without holding the actor (the link may wait for its PUBACK)."""
        if self.publish_order is None:
            return
        publish = self.publish_order

        async def send() -> None:
            try:
                if not await publish(payload):
                    log.info("order not published live; the journal carries it", **payload)
            except (OSError, ValueError) as exc:
                log.warning("order publish failed; the journal carries it", error=str(exc))

        task = asyncio.get_running_loop().create_task(send())
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)


def render_qr(text: str) -> tuple[bytes, str]:
    """The QR code of ``text``: a PNG (pillow) for the screen, and text for a terminal (two
    modules per character row, with half blocks)."""
    code = qrcode.QRCode(
        error_correction=qrcode.constants.ERROR_CORRECT_M, box_size=QR_BOX_PX, border=QR_BORDER
    )
    code.add_data(text)
    code.make(fit=True)
    out = io.BytesIO()
    code.make_image().save(out, format="PNG")
    terminal = io.StringIO()
    code.print_ascii(out=terminal, invert=True)
    return out.getvalue(), terminal.getvalue()


def _error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": code, "message": message}


def _result(answer: Mapping[str, Any]) -> str | None:
    """A job's answer as a command result: None when done, else its code (a step that failed
    on the journal or a device: ``unavailable``)."""
    if answer.get("ok"):
        return None
    code = str(answer.get("error"))
    return UNAVAILABLE if code == "fault" else code
