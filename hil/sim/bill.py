"""A simulated MDB bill validator (address 0x30), level 1 or 2.

It behaves like the physical thing as far as the VMC can see: bill types with values, an
escrow position (a bill waits there for ESCROW and goes back to the customer by itself after
an escrow timeout), a stacker with a capacity, BILL TYPE enable and escrow masks, jams on the
way to the stacker, a removable cash box. Replies are built with ``drivers.mdb.bill``'s own
encoders, so the simulator and the VMC share one definition of every byte.

Standing conditions (jammed 0x05, cash box out 0x08, disabled 0x09) are reported in every POLL
while they hold, as real validators do; one-shot items (routing, rejected, invalid escrow) are
queued once and kept until the VMC ACKs them (``SimPeripheral``).

A POLL reply carries at most 16 bytes of activity items (MDB 4.2 §6.3, Z1-Z16).

Controls (``control``; JSON objects, arguments beside ``cmd``):
``insert`` {bill_type} or {value}, count?; ``jam`` {now?}; ``clear_jam``
{bill: "stacked"|"returned"}; ``remove_cashbox``; ``replace_cashbox`` {emptied?};
``set_escrow_timeout`` {seconds|null}.

``insert`` with ``count`` N is a customer feeding N bills one after another: the first is
offered at once, each next one just after a POLL has been answered and only while the escrow
position is free (the one before was stacked or returned), so each still goes through escrow
and each is reported in a POLL reply of its own; without ``count`` one bill is offered at
once, as before (and refused while another waits in escrow).
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from drivers.errors import FramingError
from drivers.mdb.bill import (
    ATTEMPTS_FLAG,
    ATTEMPTS_MASK,
    BILL_ADDRESS,
    BILL_TYPE,
    ESCROW,
    EXPANSION_ID_L1,
    EXPANSION_ID_L2,
    FEATURE_ENABLE,
    MAX_BILL_TYPES,
    POLL,
    SECURITY,
    SETUP,
    STACKER,
    STACKER_COUNT_MASK,
    STATUS_BILL_REJECTED,
    STATUS_CASHBOX_OUT,
    STATUS_DISABLED,
    STATUS_INVALID_ESCROW,
    STATUS_JAMMED,
    STATUS_JUST_RESET,
    BillIdentity,
    BillRoute,
    BillSetup,
    BillTypeSetting,
    StackerStatus,
    attempts_item,
    decode_escrow,
    decode_features,
    decode_mask16,
    routing_item,
    status_item,
    table_for_level,
)
from drivers.mdb.block import CommandReceived
from hil.sim.peripheral import SimPeripheral

#: Euro notes 5..100 with a scaling of 100 (cents): credit 5 × 100 = 500 cents.
DEFAULT_CREDITS = (5, 10, 20, 50, 100)
DEFAULT_SCALING = 100
DEFAULT_CURRENCY = 0x1978  # BCD, leading 1: ISO 4217 978 (EUR)
DEFAULT_STACKER_CAPACITY = 500
#: How long a bill waits in escrow before the validator hands it back by itself. Validators
#: differ (and some wait for ever); 30 s is this simulator's default, set per test.
DEFAULT_ESCROW_TIMEOUT_S: float | None = 30.0
DEFAULT_IDENTITY = BillIdentity("SIM", "000000000001", "BILL-SIM", 0x0100)

#: Standing conditions, in the order they are reported in a POLL.
_STANDING = (STATUS_JAMMED, STATUS_CASHBOX_OUT, STATUS_DISABLED)
#: MDB 4.2 §6.3: a validator's POLL reply carries up to 16 bytes of activity (Z1-Z16).
VALIDATOR_MAX_POLL_BYTES = 16
#: Most bills one ``insert`` control request feeds in.
MAX_INSERT_COUNT = 100
#: Route bits (``1yyyxxxx``) of a bill routing item, and the bill type bits.
ROUTING_FLAG = 0x80
ROUTE_BITS = 0x70
BILL_TYPE_BITS = 0x0F


class BillValidatorSim(SimPeripheral):
    """A bill validator at level 1 or 2 with escrow, stacker, jams and a removable cash box."""

    NAME: ClassVar[str] = "bill"
    ADDRESS: ClassVar[int] = BILL_ADDRESS
    POLL_CMD: ClassVar[int] = POLL.command
    JUST_RESET_ITEM: ClassVar[bytes] = status_item(STATUS_JUST_RESET)
    MAX_POLL_BYTES: ClassVar[int] = VALIDATOR_MAX_POLL_BYTES

    def __init__(
        self,
        *,
        level: int = 2,
        bill_credits: Sequence[int] = DEFAULT_CREDITS,
        scaling: int = DEFAULT_SCALING,
        currency_code: int = DEFAULT_CURRENCY,
        decimals: int = 2,
        stacker_capacity: int = DEFAULT_STACKER_CAPACITY,
        security_levels: int | None = None,
        escrow_capable: bool = True,
        identity: BillIdentity = DEFAULT_IDENTITY,
        features: int = 0,
        escrow_timeout_s: float | None = DEFAULT_ESCROW_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if level not in (1, 2):
            raise ValueError(f"bill validator level must be 1 or 2, not {level}")
        if len(bill_credits) > MAX_BILL_TYPES or not all(0 <= c <= 0xFF for c in bill_credits):
            raise ValueError("bill_credits: at most 16 credit bytes, each 0..255")
        if not 1 <= scaling <= 0xFFFF:
            raise ValueError(f"scaling must be 1..65535, not {scaling}")
        if not 0 <= stacker_capacity <= STACKER_COUNT_MASK:
            raise ValueError(f"stacker_capacity must be 0..{STACKER_COUNT_MASK}")
        known = sum(1 << t for t, c in enumerate(bill_credits) if c)
        self.level = level
        self.setup_reply = BillSetup(
            level=level,
            currency_code=currency_code,
            scaling=scaling,
            decimals=decimals,
            stacker_capacity=stacker_capacity,
            # MDB 4.2 §6: a validator without security levels reports "high" for every type.
            security_levels=known if security_levels is None else security_levels,
            escrow_capable=escrow_capable,
            credits=tuple(bill_credits),
        )
        self.identity = dataclasses.replace(identity, features=None)
        self.features = features
        self.escrow_timeout_s = escrow_timeout_s
        self._clock = clock
        # Physical state that survives a RESET.
        self.cashbox_in = True
        self.stacker_count = 0
        self.jam_armed = False
        self.jammed = False
        self.jammed_bill: int | None = None
        # Set-up state that a RESET clears (on_reset).
        self.enable_mask = 0
        self.escrow_mask = 0
        self.security_mask = 0
        self.features_enabled = 0
        self.escrow_bill: int | None = None
        self.escrow_since = 0.0
        self._attempts_pending = 0
        # Ledger: what physically happened, per bill type.
        self.inserted = [0] * MAX_BILL_TYPES
        self.stacked = [0] * MAX_BILL_TYPES
        self.returned = [0] * MAX_BILL_TYPES
        self.rejected = [0] * MAX_BILL_TYPES
        self.unrecognised = 0
        self.attempts_while_disabled = 0
        self.value_stacked = 0
        self.bills_emptied = 0
        # What the VMC was told: stacked bills whose POLL reply it ACKed.
        self.acked_stacked_count = 0
        self.acked_stacked_value = 0
        # Bills the customer holds ready (``insert`` with count), fed as the escrow frees.
        self.bills_waiting: deque[int] = deque()
        super().__init__(table_for_level(level))

    # --- state helpers (call with the lock held) -------------------------------------------

    @property
    def stacker_full(self) -> bool:
        return self.stacker_count >= self.setup_reply.stacker_capacity

    @property
    def accepting(self) -> bool:
        """Would a bill be taken in now (some type enabled, nothing in the way)?"""
        return bool(
            self.enable_mask & self.setup_reply.known_types_mask
            and self.cashbox_in
            and not self.jammed
            and not self.stacker_full
        )

    def _standing(self) -> list[int]:
        holds = {
            STATUS_JAMMED: self.jammed,
            STATUS_CASHBOX_OUT: not self.cashbox_in,
            STATUS_DISABLED: not self.accepting,
        }
        return [code for code in _STANDING if holds[code]]

    def _before_poll(self) -> None:
        """Time-driven changes and standing statuses, just before a POLL is answered.

        Only appends to the item queue: items at its head may be in flight (sent, not ACKed).
        """
        if (
            self.escrow_bill is not None
            and self.escrow_timeout_s is not None
            and self._clock() - self.escrow_since >= self.escrow_timeout_s
        ):
            bill, self.escrow_bill = self.escrow_bill, None
            self._return(bill)
        for code in self._standing():
            item = status_item(code)
            if item not in self.poll_items:
                self.poll_items.append(item)
        if self._attempts_pending and not any(
            len(i) == 1 and i[0] & ATTEMPTS_MASK == ATTEMPTS_FLAG for i in self.poll_items
        ):
            self.poll_items.append(attempts_item(self._attempts_pending))
            self._attempts_pending = 0

    def _drop_stale_standing(self) -> None:
        """Forget queued standing statuses that no longer hold. Only from ``handle``: any
        command other than POLL ends the in-flight POLL reply (``SimPeripheral.answer``)."""
        holds = {status_item(c) for c in self._standing()}
        stale = {status_item(c) for c in _STANDING} - holds
        self.poll_items = [i for i in self.poll_items if i not in stale]

    def _stack(self, bill: int) -> None:
        self.stacker_count += 1
        self.stacked[bill] += 1
        self.value_stacked += self.setup_reply.value_of(bill)
        self.queue_item(routing_item(BillRoute.STACKED, bill))

    def _return(self, bill: int) -> None:
        self.returned[bill] += 1
        self.queue_item(routing_item(BillRoute.RETURNED, bill))

    def _to_stacker(self, bill: int) -> str:
        if not self.cashbox_in or self.stacker_full:
            self._return(bill)  # nowhere to put it: hand it back
            return "returned"
        if self.jam_armed:
            self.jam_armed = False
            self.jammed = True
            self.jammed_bill = bill
            return "jammed"
        self._stack(bill)
        return "stacked"

    def _escrow_command(self, stack: bool) -> None:
        bill = self.escrow_bill
        if bill is None:
            self.queue_item(status_item(STATUS_INVALID_ESCROW))
            return
        self.escrow_bill = None
        if stack:
            self._to_stacker(bill)
        else:
            self._return(bill)

    def _feed_one_waiting(self) -> str | None:
        """Offer the customer's next waiting bill if the escrow position is free."""
        if self.bills_waiting and self.escrow_bill is None:
            return self.insert(self.bills_waiting.popleft())
        return None

    def _type_of_value(self, value: int) -> int | None:
        matches = [
            t
            for t, c in enumerate(self.setup_reply.credits)
            if c and c * self.setup_reply.scaling == value
        ]
        enabled = [t for t in matches if self.enable_mask >> t & 1]
        candidates = enabled or matches
        return candidates[0] if candidates else None

    def insert(self, bill_type: int | None) -> str:
        """A customer offers a bill of ``bill_type`` (None: one the validator cannot identify).
        Returns what the validator did with it."""
        with self.lock:
            if bill_type is None or self.setup_reply.credit_of(bill_type) == 0:
                self.unrecognised += 1
                self.queue_item(status_item(STATUS_BILL_REJECTED))
                return "unrecognised"
            self.inserted[bill_type] += 1
            if not self.accepting:
                self.rejected[bill_type] += 1
                self.attempts_while_disabled += 1
                self._attempts_pending += 1
                return "refused while disabled"
            if self.escrow_bill is not None:
                # The slot is blocked by the bill in escrow: this one comes straight back.
                self.rejected[bill_type] += 1
                self.queue_item(status_item(STATUS_BILL_REJECTED))
                return "rejected: escrow occupied"
            if not self.enable_mask >> bill_type & 1:
                self.rejected[bill_type] += 1
                self.queue_item(routing_item(BillRoute.DISABLED_REJECTED, bill_type))
                return "type disabled"
            if self.escrow_mask >> bill_type & 1 and self.setup_reply.escrow_capable:
                self.escrow_bill = bill_type
                self.escrow_since = self._clock()
                self.queue_item(routing_item(BillRoute.ESCROW, bill_type))
                return "escrow"
            return self._to_stacker(bill_type)

    # --- SimPeripheral ---------------------------------------------------------------------

    def on_items_acked(self, items: list[bytes]) -> None:
        for item in items:
            first = item[0]
            if first & ROUTING_FLAG and first & ROUTE_BITS == int(BillRoute.STACKED) << 4:
                self.acked_stacked_count += 1
                self.acked_stacked_value += self.setup_reply.value_of(first & BILL_TYPE_BITS)

    def on_reset(self) -> None:
        self.enable_mask = 0
        self.escrow_mask = 0
        self.security_mask = 0
        self.features_enabled = 0
        self._attempts_pending = 0
        if self.escrow_bill is not None:
            # A validator that resets hands the escrowed bill back; its report is lost with
            # the rest of the queue, and the VMC learns of it only as JUST RESET.
            self.returned[self.escrow_bill] += 1
            self.escrow_bill = None

    def answer(self, command: CommandReceived) -> bytes | None:
        with self.lock:
            is_poll = command.addr_cmd & 0x07 == self.POLL_CMD and not self.faults.unplugged
            if is_poll:
                self._before_poll()
            reply = super().answer(command)
            if is_poll:
                # The customer's next bill goes in after this POLL was answered.
                self._feed_one_waiting()
            return reply

    def handle(self, command: CommandReceived) -> bytes | None:
        with self.lock:
            try:
                return self._handle(command)
            finally:
                self._drop_stale_standing()

    def _handle(self, command: CommandReceived) -> bytes | None:
        cmd = command.addr_cmd & 0x07
        data = command.data
        try:
            if cmd == SETUP.command:
                return self.setup_reply.encode()
            if cmd == SECURITY.command:
                self.security_mask = decode_mask16(data)
                return b""
            if cmd == BILL_TYPE.command:
                setting = BillTypeSetting.decode(data)
                self.enable_mask, self.escrow_mask = setting.enable_mask, setting.escrow_mask
                return b""
            if cmd == ESCROW.command:
                self._escrow_command(decode_escrow(data))
                return b""
            if cmd == STACKER.command:
                return StackerStatus(self.stacker_full, self.stacker_count).encode()
            if cmd == EXPANSION_ID_L1.command and data:
                return self._expansion(data[0], data[1:])
        except FramingError:
            return None  # a payload we cannot take: stay silent, as a real validator would
        return None

    def _expansion(self, sub: int, payload: bytes) -> bytes | None:
        if sub == EXPANSION_ID_L1.sub:
            return self.identity.encode()
        if self.level < 2:
            return None
        if sub == EXPANSION_ID_L2.sub:
            return dataclasses.replace(self.identity, features=self.features).encode()
        if sub == FEATURE_ENABLE.sub:
            self.features_enabled = decode_features(payload) & self.features
            return b""
        return None

    def control(self, request: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            cmd = request.get("cmd")
            if cmd == "insert":
                return self._control_insert(request)
            if cmd == "jam":
                if request.get("now"):
                    self.jammed = True
                else:
                    self.jam_armed = True
                return {"jammed": self.jammed, "jam_armed": self.jam_armed}
            if cmd == "clear_jam":
                return self._control_clear_jam(request)
            if cmd == "remove_cashbox":
                self.cashbox_in = False
                return {"cashbox_in": False}
            if cmd == "replace_cashbox":
                self.cashbox_in = True
                if request.get("emptied", True):
                    self.bills_emptied += self.stacker_count
                    self.stacker_count = 0
                return {"cashbox_in": True, "stacker_count": self.stacker_count}
            if cmd == "set_escrow_timeout":
                seconds = request.get("seconds")
                if seconds is not None and (
                    not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds < 0
                ):
                    raise ValueError(
                        f"set_escrow_timeout: seconds must be >= 0 or null: {seconds!r}"
                    )
                self.escrow_timeout_s = None if seconds is None else float(seconds)
                return {"escrow_timeout_s": self.escrow_timeout_s}
            return super().control(request)

    def _control_insert(self, request: dict[str, Any]) -> dict[str, Any]:
        bill_type: int | None
        if "bill_type" in request:
            bill_type = request["bill_type"]
            if not isinstance(bill_type, int) or not 0 <= bill_type < MAX_BILL_TYPES:
                raise ValueError(f"insert: bill_type must be 0..15: {bill_type!r}")
        elif "value" in request:
            value = request["value"]
            if not isinstance(value, int):
                raise ValueError(f"insert: value must be an integer (minor units): {value!r}")
            bill_type = self._type_of_value(value)
        else:
            raise ValueError("insert needs bill_type or value")
        if "count" not in request:
            return {"bill_type": bill_type, "outcome": self.insert(bill_type)}
        count = request["count"]
        if not isinstance(count, int) or not 1 <= count <= MAX_INSERT_COUNT:
            raise ValueError(f"insert: count must be 1..{MAX_INSERT_COUNT}: {count!r}")
        if bill_type is None:
            raise ValueError("insert: count needs a bill the validator knows")
        self.bills_waiting.extend([bill_type] * count)
        outcome = self._feed_one_waiting()
        return {
            "bill_type": bill_type,
            "outcome": "waiting" if outcome is None else outcome,
            "waiting": len(self.bills_waiting),
        }

    def _control_clear_jam(self, request: dict[str, Any]) -> dict[str, Any]:
        where = request.get("bill", "stacked")
        if where not in ("stacked", "returned"):
            raise ValueError(f"clear_jam: bill must be 'stacked' or 'returned': {where!r}")
        bill = self.jammed_bill
        self.jammed = False
        self.jam_armed = False
        self.jammed_bill = None
        if bill is not None:
            if where == "stacked":
                self._stack(bill)
            else:
                self._return(bill)
        return {"bill_type": bill, "bill": where if bill is not None else None}

    def ledger(self) -> dict[str, Any]:
        with self.lock:
            types = range(len(self.setup_reply.credits))
            return {
                "inserted": {str(t): self.inserted[t] for t in types},
                "stacked": {str(t): self.stacked[t] for t in types},
                "returned": {str(t): self.returned[t] for t in types},
                "rejected": {str(t): self.rejected[t] for t in types},
                "unrecognised": self.unrecognised,
                "attempts_while_disabled": self.attempts_while_disabled,
                "in_escrow": self.escrow_bill,
                "jammed_bill": self.jammed_bill,
                "stacker_count": self.stacker_count,
                "bills_emptied": self.bills_emptied,
                "value_stacked": self.value_stacked,
                "stacked_total": {"count": sum(self.stacked), "value": self.value_stacked},
                "acked_stacked": {
                    "count": self.acked_stacked_count,
                    "value": self.acked_stacked_value,
                },
                "bills_waiting": len(self.bills_waiting),
            }

    # --- what survives a power cycle -------------------------------------------------------

    def physical_state(self) -> dict[str, Any]:
        with self.lock:
            return {
                "stacker_count": self.stacker_count,
                "cashbox_in": self.cashbox_in,
                "jammed": self.jammed,
                "jammed_bill": self.jammed_bill,
            }

    def load_physical_state(self, state: dict[str, Any]) -> None:
        with self.lock:
            count = int(state.get("stacker_count", 0))
            if not 0 <= count <= STACKER_COUNT_MASK:
                raise ValueError(f"saved state: stacker_count {count} out of range")
            jammed_bill = state.get("jammed_bill")
            if jammed_bill is not None and not 0 <= int(jammed_bill) < MAX_BILL_TYPES:
                raise ValueError(f"saved state: jammed_bill {jammed_bill!r} out of range")
            self.stacker_count = count
            self.cashbox_in = bool(state.get("cashbox_in", True))
            self.jammed = bool(state.get("jammed", False))
            self.jammed_bill = None if jammed_bill is None else int(jammed_bill)

    def status(self) -> dict[str, Any]:
        with self.lock:
            out = super().status()
            out["bill"] = {
                "level": self.level,
                "enable_mask": self.enable_mask,
                "escrow_mask": self.escrow_mask,
                "security_mask": self.security_mask,
                "features_enabled": self.features_enabled,
                "accepting": self.accepting,
                "in_escrow": self.escrow_bill,
                "escrow_timeout_s": self.escrow_timeout_s,
                "jammed": self.jammed,
                "jam_armed": self.jam_armed,
                "cashbox_in": self.cashbox_in,
                "stacker_count": self.stacker_count,
                "stacker_full": self.stacker_full,
                "bills_waiting": len(self.bills_waiting),
            }
            return out
