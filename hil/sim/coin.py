"""A simulated MDB coin changer (levels 2 and 3): coin types, tubes with counts and capacity,
routing, DISPENSE and level-3 PAYOUT that take time, jams, the return lever and the manual
dispense button, with a ledger of every coin that physically moved.

The model (documented choices where the standard leaves room):

* Coins inserted while their type is disabled by COIN TYPE go back to the return cup and are
  reported as deposited with route "rejected"; unknown coins are slugs (``001xxxxx``).
  Accepted coins go to their tube while it is below capacity, else to the cashbox; ``insert``
  may force the route (``"route": "cashbox"|"tubes"``) and insert several coins one after
  another (``"count": N``): the first drops in at once, each next one just after a POLL has
  been answered, as coins a customer feeds in arrive at about the VMC's polling pace. So each
  is reported in its own POLL reply, byte-identical to the one before when nothing differs
  (unless ``batch_items`` gathers them, or a lost ACK makes two ride together).
* One POLL reply carries at most 16 bytes of activity items (MDB 4.2 §5.3, Z1-Z16).
* A DISPENSE or PAYOUT keeps the changer busy for ``payout_time_s``; its coins leave the tubes
  evenly over that time (evaluated lazily from the injectable clock, so a fake clock gives
  exact, repeatable behaviour). While busy every POLL carries 0x02 payout busy, PAYOUT STATUS
  answers a lone ACK and PAYOUT VALUE POLL the value paid since the last one; once done,
  PAYOUT VALUE POLL answers a lone ACK and PAYOUT STATUS the coins paid per type (cleared when
  the VMC ACKs it). A command that arrives while busy is queued behind the running one.
* PAYOUT chooses coins greedily, largest first (good enough for a simulated device; the VMC's
  own planner is not greedy). A tube that runs empty mid-payout makes the payout short.
* ``jam`` kinds: ``coin`` (inserted coins come back; status 0x0C), ``tube`` (payouts stop at
  once, or after ``after`` more coins; status 0x07), ``unplugged`` (the acceptor is unplugged:
  coins fall through to the return cup; status 0x06). A status is queued once when the
  condition starts; DIAGNOSTIC STATUS reports the conditions that are still present.
* RESET forgets COIN TYPE, FEATURE ENABLE and a running payout (physical jams stay).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from drivers.mdb.block import CommandReceived
from drivers.mdb.coin import (
    ADDRESS,
    COIN_TYPE,
    COIN_TYPES,
    DIAGNOSTIC_STATUS,
    DISPENSE,
    EXPANSION_ID,
    FEATURE_ENABLE,
    PAYOUT,
    PAYOUT_STATUS,
    PAYOUT_VALUE_POLL,
    POLL,
    SETUP,
    STATUS_ACCEPTOR_UNPLUGGED,
    STATUS_COIN_JAM,
    STATUS_ESCROW_REQUEST,
    STATUS_JUST_RESET,
    STATUS_PAYOUT_BUSY,
    STATUS_TUBE_JAM,
    TUBE_STATUS,
    ChangerFeature,
    CoinRoute,
    command_table,
)
from hil.sim.peripheral import SimPeripheral

#: Default time one DISPENSE/PAYOUT keeps the changer busy (real changers: ~0.2-0.3 s a coin).
DEFAULT_PAYOUT_TIME_S = 0.5
#: Manual dispense reports carry the count in 3 bits.
MAX_MANUAL_COUNT = 7
MAX_SLUGS_PER_ITEM = 0x1F
#: MDB 4.2 §5.3: a changer's POLL reply carries up to 16 bytes of activity (Z1-Z16).
CHANGER_MAX_POLL_BYTES = 16
#: Most coins one ``insert`` control request drops in one after another.
MAX_INSERT_COUNT = 255
#: ``insert``'s "route" values: where an accepted coin is made to go.
FORCED_ROUTES = {"cashbox": CoinRoute.CASHBOX, "tubes": CoinRoute.TUBES}

# --- reply encoders (changer -> VMC) ------------------------------------------------------


def mask_of(coin_types: Sequence[int]) -> int:
    return sum(1 << t for t in set(coin_types))


def encode_setup_reply(
    level: int, currency: int, scaling: int, decimals: int, routing: int, credits: Sequence[int]
) -> bytes:
    return (
        bytes((level,))
        + (currency & 0xFFFF).to_bytes(2, "big")
        + bytes((scaling, decimals))
        + (routing & 0xFFFF).to_bytes(2, "big")
        + bytes(credits[:COIN_TYPES])
    )


def encode_tube_status_reply(full: int, counts: Sequence[int]) -> bytes:
    return (full & 0xFFFF).to_bytes(2, "big") + bytes(min(c, 0xFF) for c in counts[:COIN_TYPES])


def _ascii_field(text: str, size: int) -> bytes:
    return text.encode("ascii", errors="replace")[:size].ljust(size, b" ")


def encode_expansion_id_reply(
    manufacturer: str, serial: str, model: str, version: int, features: int
) -> bytes:
    return (
        _ascii_field(manufacturer, 3)
        + _ascii_field(serial, 12)
        + _ascii_field(model, 12)
        + (version & 0xFFFF).to_bytes(2, "big")
        + (features & 0xFFFFFFFF).to_bytes(4, "big")
    )


def encode_diagnostics_reply(codes: Sequence[tuple[int, int]]) -> bytes:
    return b"".join(bytes((main, sub)) for main, sub in codes[:8])


def encode_payout_status_reply(counts: Sequence[int]) -> bytes:
    return bytes(min(c, 0xFF) for c in counts[:COIN_TYPES])


def encode_payout_value_reply(credit: int) -> bytes:
    return bytes((min(credit, 0xFF),))


def item_deposited(coin_type: int, route: CoinRoute, tube_count: int) -> bytes:
    return bytes((0x40 | int(route) << 4 | coin_type, min(tube_count, 0xFF)))


def item_dispensed_manually(coin_type: int, count: int, tube_count: int) -> bytes:
    return bytes((0x80 | (count & 0x07) << 4 | coin_type, min(tube_count, 0xFF)))


def item_slugs(count: int) -> bytes:
    return bytes((0x20 | min(count, MAX_SLUGS_PER_ITEM),))


# --- request decoders (VMC -> changer) ----------------------------------------------------


def decode_coin_type_request(data: bytes) -> tuple[int, int]:
    """(accept mask, manual dispense mask) from COIN TYPE's 4 data bytes."""
    return int.from_bytes(data[0:2], "big"), int.from_bytes(data[2:4], "big")


def decode_dispense_request(data: bytes) -> tuple[int, int]:
    """(coin type, count) from DISPENSE's data byte."""
    return data[0] & 0x0F, data[0] >> 4


def decode_feature_enable_request(data: bytes) -> int:
    """Feature bits from FEATURE ENABLE's 4 bytes after the sub-command."""
    return int.from_bytes(data[0:4], "big")


def decode_payout_request(data: bytes) -> int:
    """Scaled value to pay from PAYOUT's byte after the sub-command."""
    return data[0]


# --- the simulated device -----------------------------------------------------------------


@dataclass(slots=True)
class SimCoin:
    """One coin type of the simulated changer; ``value`` in minor units."""

    value: int
    routable: bool = True  # has a tube
    count: int = 0  # coins in the tube
    capacity: int = 0  # tube capacity (full at this count)


#: A euro changer: 5c..1 EUR have tubes, 2 EUR goes to the cashbox.
DEFAULT_COINS: tuple[SimCoin, ...] = (
    SimCoin(5, True, 40, 100),
    SimCoin(10, True, 40, 100),
    SimCoin(20, True, 30, 80),
    SimCoin(50, True, 20, 60),
    SimCoin(100, True, 10, 50),
    SimCoin(200, False),
)


@dataclass(slots=True)
class _Scheduled:
    at: float  # clock time the coin leaves its tube
    coin_type: int
    alternative: bool  # part of a level-3 PAYOUT (counted for PAYOUT STATUS)


@dataclass(slots=True)
class _Inserted:
    tubes: int = 0
    cashbox: int = 0
    rejected: int = 0


@dataclass(slots=True)
class _PaidOut:
    command: int = 0
    manual: int = 0


@dataclass(slots=True)
class _Reported:
    """Coins reported in POLL replies the VMC ACKed; ``value`` in minor units."""

    count: int = 0
    value: int = 0

    def add(self, count: int, value: int) -> None:
        self.count += count
        self.value += value

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "value": self.value}


class CoinChangerSim(SimPeripheral):
    """A coin changer on the simulated bus (see the module docstring for the model).

    Controls (``control({"cmd": ...})``): ``insert`` {coin_type} or {value}, route?, count?;
    ``lever``;
    ``manual_dispense`` {coin_type, count=1}; ``set_tube`` {coin_type, count, capacity?};
    ``jam`` {kind: coin|tube|unplugged, after?}; ``clear_jam`` {kind?};
    ``set_payout_time`` {seconds}.
    """

    NAME = "coin"
    ADDRESS = ADDRESS
    POLL_CMD = POLL.command
    JUST_RESET_ITEM = bytes((STATUS_JUST_RESET,))
    MAX_POLL_BYTES = CHANGER_MAX_POLL_BYTES

    def __init__(
        self,
        *,
        level: int = 3,
        currency: int = 0x1978,
        scaling: int = 5,
        decimals: int = 2,
        coins: Sequence[SimCoin] = DEFAULT_COINS,
        payout_time_s: float = DEFAULT_PAYOUT_TIME_S,
        manufacturer: str = "SIM",
        serial: str = "000000000001",
        model: str = "COINSIM",
        version: int = 0x0100,
        features: ChangerFeature = ChangerFeature.ALTERNATIVE_PAYOUT
        | ChangerFeature.EXTENDED_DIAGNOSTICS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if level not in (2, 3):
            raise ValueError(f"level must be 2 or 3, not {level}")
        if not 1 <= scaling <= 0xFF:
            raise ValueError(f"scaling must be 1..255, not {scaling}")
        if not 0 <= decimals <= 9:
            raise ValueError(f"decimals must be 0..9, not {decimals}")
        if not 1 <= len(coins) <= COIN_TYPES:
            raise ValueError(f"between 1 and {COIN_TYPES} coin types, not {len(coins)}")
        for coin_type, coin in enumerate(coins):
            if coin.value % scaling or not 1 <= coin.value // scaling < 0xFF:
                raise ValueError(f"coin type {coin_type}: value {coin.value} not a credit byte")
            if coin.routable and not 0 <= coin.count <= coin.capacity <= 0xFF:
                raise ValueError(f"coin type {coin_type}: need 0 <= count <= capacity <= 255")
        self.level = level
        self.currency = currency
        self.scaling = scaling
        self.decimals = decimals
        self.coins = [
            SimCoin(c.value, c.routable, c.count if c.routable else 0, c.capacity) for c in coins
        ]
        self.payout_time_s = payout_time_s
        self.manufacturer = manufacturer
        self.serial = serial
        self.model = model
        self.version = version
        self.features = features
        self.clock = clock
        # Set-up from the VMC (forgotten on RESET).
        self.accept_mask = 0
        self.manual_mask = 0
        self.features_enabled = 0
        # Payout in progress.
        self._schedule: list[_Scheduled] = []
        self._busy_until = 0.0
        self._payout_counts = [0] * len(self.coins)  # for PAYOUT STATUS
        self._payout_unreported = 0  # scaled units, for PAYOUT VALUE POLL
        self._on_ack: Callable[[], None] | None = None
        # Physical conditions (survive RESET).
        self.coin_jam = False
        self.tube_jam = False
        self.tube_jam_after: int | None = None
        self.acceptor_unplugged = False
        # Ledger.
        self._inserted = [_Inserted() for _ in self.coins]
        self._paid = [_PaidOut() for _ in self.coins]
        self._slugs = 0
        self._returned_value = 0  # coins that went back to the cup (other than slugs)
        # What the VMC was told: items whose POLL reply it ACKed.
        self._acked_deposited = _Reported()
        self._acked_dispensed_manually = _Reported()
        # Coins of an ``insert`` with count still in the customer's hand: (type, forced route).
        self.coins_waiting: deque[tuple[int | None, CoinRoute | None]] = deque()
        super().__init__(command_table(level))

    # --- helpers -----------------------------------------------------------------------

    def credit(self, coin_type: int) -> int:
        return self.coins[coin_type].value // self.scaling

    @property
    def routing_mask(self) -> int:
        return mask_of([t for t, c in enumerate(self.coins) if c.routable])

    @property
    def full_mask(self) -> int:
        return mask_of(
            [t for t, c in enumerate(self.coins) if c.routable and c.count >= c.capacity]
        )

    def busy(self) -> bool:
        with self.lock:
            self._advance()
            return self.clock() < self._busy_until

    def _advance(self) -> None:
        """Pay the scheduled coins whose time has come."""
        now = self.clock()
        while self._schedule and self._schedule[0].at <= now:
            step = self._schedule.pop(0)
            coin = self.coins[step.coin_type]
            if self.tube_jam:
                self._stop_payout(now)
                return
            if coin.count == 0:
                continue  # the tube ran empty: this coin is not paid
            coin.count -= 1
            self._paid[step.coin_type].command += 1
            if step.alternative:
                self._payout_counts[step.coin_type] += 1
                self._payout_unreported += self.credit(step.coin_type)
            if self.tube_jam_after is not None:
                self.tube_jam_after -= 1
                if self.tube_jam_after <= 0:
                    self.tube_jam_after = None
                    self._set_tube_jam(step.at)

    def _stop_payout(self, now: float) -> None:
        self._schedule.clear()
        self._busy_until = min(self._busy_until, now)

    def _set_tube_jam(self, now: float) -> None:
        self.tube_jam = True
        self.queue_item(bytes((STATUS_TUBE_JAM,)))
        self._stop_payout(now)

    def _start_payout(self, coin_types: Sequence[int], alternative: bool) -> None:
        """Schedule coins to leave evenly over one payout time, after any running payout."""
        now = self.clock()
        start = max(now, self._busy_until)
        self._busy_until = start + self.payout_time_s
        step = self.payout_time_s / max(1, len(coin_types))
        for i, coin_type in enumerate(coin_types):
            self._schedule.append(_Scheduled(start + step * (i + 1), coin_type, alternative))
        if self.tube_jam:  # nothing moves; say why again
            self._stop_payout(now)
            self.queue_item(bytes((STATUS_TUBE_JAM,)))

    def _greedy(self, credit: int) -> list[int]:
        order = sorted(
            (t for t, c in enumerate(self.coins) if c.routable and c.count > 0),
            key=lambda t: -self.coins[t].value,
        )
        out: list[int] = []
        left = credit
        for coin_type in order:
            n = min(self.coins[coin_type].count, left // self.credit(coin_type))
            out.extend([coin_type] * n)
            left -= n * self.credit(coin_type)
        return out

    def _diagnostic_codes(self) -> list[tuple[int, int]]:
        codes: list[tuple[int, int]] = []
        if self.acceptor_unplugged:
            codes.append((0x11, 0x00))
        if self.coin_jam:
            codes.append((0x11, 0x30))
        if self.tube_jam:
            codes.append((0x14, 0x00))
        if not codes:
            codes.append((0x03, 0x00) if self.accept_mask else (0x06, 0x00))
        return codes

    # --- the bus side ------------------------------------------------------------------

    def on_reset(self) -> None:
        self.accept_mask = 0
        self.manual_mask = 0
        self.features_enabled = 0
        self._schedule.clear()
        self._busy_until = 0.0
        self._payout_counts = [0] * len(self.coins)
        self._payout_unreported = 0
        self._on_ack = None

    def answer(self, command: CommandReceived) -> bytes | None:
        with self.lock:
            self._advance()
            is_poll = command.addr_cmd & 0x07 == self.POLL_CMD
            if is_poll:
                busy_item = bytes((STATUS_PAYOUT_BUSY,))
                if self.clock() < self._busy_until and busy_item not in self.poll_items:
                    self.queue_item(busy_item)
            reply = super().answer(command)
            if is_poll and self.coins_waiting:
                # The customer's next coin drops in after this POLL was answered.
                self._insert_one(*self.coins_waiting.popleft())
            return reply

    def on_items_acked(self, items: list[bytes]) -> None:
        for item in items:
            first = item[0]
            coin_type = first & 0x0F
            if coin_type >= len(self.coins) or len(item) < 2:
                continue
            value = self.coins[coin_type].value
            if first & 0x80:  # 1yyyxxxx: coins dispensed manually, yyy of them
                count = first >> 4 & MAX_MANUAL_COUNT
                self._acked_dispensed_manually.add(count, count * value)
            elif first & 0xC0 == 0x40 and CoinRoute(first >> 4 & 0x03) in (
                CoinRoute.CASHBOX,
                CoinRoute.TUBES,
            ):
                self._acked_deposited.add(1, value)

    def on_data_acked(self, data: bytes) -> None:
        action, self._on_ack = self._on_ack, None
        if action is not None:
            action()

    def handle(self, command: CommandReceived) -> bytes | None:
        self._on_ack = None
        found = self.table.lookup(command.block)
        data = command.data
        if found is SETUP:
            credits = [self.credit(t) for t in range(len(self.coins))]
            return encode_setup_reply(
                self.level, self.currency, self.scaling, self.decimals, self.routing_mask, credits
            )
        if found is TUBE_STATUS:
            return encode_tube_status_reply(self.full_mask, [c.count for c in self.coins])
        if found is COIN_TYPE:
            self.accept_mask, self.manual_mask = decode_coin_type_request(data)
            return b""
        if found is DISPENSE:
            coin_type, count = decode_dispense_request(data)
            if coin_type < len(self.coins) and self.coins[coin_type].routable and count:
                self._start_payout([coin_type] * count, alternative=False)
            return b""
        return self._expansion(found, data[1:])

    def _expansion(self, found: object, payload: bytes) -> bytes | None:
        busy = self.clock() < self._busy_until
        if found is EXPANSION_ID:
            return encode_expansion_id_reply(
                self.manufacturer, self.serial, self.model, self.version, int(self.features)
            )
        if found is FEATURE_ENABLE:
            self.features_enabled = decode_feature_enable_request(payload) & int(self.features)
            return b""
        if found is PAYOUT:
            self._start_payout(self._greedy(decode_payout_request(payload)), alternative=True)
            return b""
        if found is PAYOUT_STATUS:
            if busy:
                return b""
            counts = list(self._payout_counts)

            def clear() -> None:
                self._payout_counts = [0] * len(self.coins)

            self._on_ack = clear
            return encode_payout_status_reply(counts)
        if found is PAYOUT_VALUE_POLL:
            if not busy:
                return b""
            credit = min(self._payout_unreported, 0xFF)

            def reported() -> None:
                self._payout_unreported -= credit

            self._on_ack = reported
            return encode_payout_value_reply(credit)
        if found is DIAGNOSTIC_STATUS:
            return encode_diagnostics_reply(self._diagnostic_codes())
        return None

    # --- controls ----------------------------------------------------------------------

    def control(self, request: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self._advance()
            cmd = request.get("cmd")
            if cmd == "insert":
                return self._insert(request)
            if cmd == "lever":
                self.queue_item(bytes((STATUS_ESCROW_REQUEST,)))
                return {"queued": "escrow request"}
            if cmd == "manual_dispense":
                return self._manual_dispense(self._coin_type(request), int(request.get("count", 1)))
            if cmd == "set_tube":
                return self._set_tube(request)
            if cmd == "jam":
                return self._jam(str(request["kind"]), request.get("after"))
            if cmd == "clear_jam":
                kind = request.get("kind")
                if kind in (None, "coin"):
                    self.coin_jam = False
                if kind in (None, "tube"):
                    self.tube_jam = False
                    self.tube_jam_after = None
                if kind in (None, "unplugged"):
                    self.acceptor_unplugged = False
                return self._conditions()
            if cmd == "set_payout_time":
                seconds = float(request["seconds"])
                if seconds < 0:
                    raise ValueError(f"payout time must not be negative: {seconds}")
                self.payout_time_s = seconds
                return {"payout_time_s": seconds}
            raise KeyError(f"{self.NAME}: unknown control {cmd!r}")

    def _coin_type(self, request: dict[str, Any]) -> int:
        coin_type = int(request["coin_type"])
        if not 0 <= coin_type < len(self.coins):
            raise ValueError(f"no coin type {coin_type}")
        return coin_type

    def _conditions(self) -> dict[str, Any]:
        return {
            "coin_jam": self.coin_jam,
            "tube_jam": self.tube_jam,
            "tube_jam_after": self.tube_jam_after,
            "acceptor_unplugged": self.acceptor_unplugged,
        }

    def _insert(self, request: dict[str, Any]) -> dict[str, Any]:
        if "coin_type" in request:
            coin_type: int | None = self._coin_type(request)
        else:
            value = int(request["value"])
            coin_type = next((t for t, c in enumerate(self.coins) if c.value == value), None)
        count = int(request.get("count", 1))
        if not 1 <= count <= MAX_INSERT_COUNT:
            raise ValueError(f"insert: count must be 1..{MAX_INSERT_COUNT}, not {count}")
        forced = request.get("route")
        if forced is not None and forced not in FORCED_ROUTES:
            raise ValueError(f"insert: route must be one of {sorted(FORCED_ROUTES)}: {forced!r}")
        route = FORCED_ROUTES[forced] if forced is not None else None
        if route is CoinRoute.TUBES:
            if coin_type is None or not self.coins[coin_type].routable:
                raise ValueError("insert: that coin has no tube to be routed to")
            coin = self.coins[coin_type]
            if coin.count + count > coin.capacity:
                room = coin.capacity - coin.count
                raise ValueError(f"insert: tube {coin_type} has room for {room} coin(s) only")
        answer = self._insert_one(coin_type, route)
        self.coins_waiting.extend([(coin_type, route)] * (count - 1))
        if "count" in request:
            answer["waiting"] = len(self.coins_waiting)
        return answer

    def _insert_one(self, coin_type: int | None, forced: CoinRoute | None) -> dict[str, Any]:
        """One coin dropped into the acceptor; ``forced``: where it goes if accepted."""
        if self.acceptor_unplugged or self.coin_jam:
            if coin_type is not None:
                self._returned_value += self.coins[coin_type].value
                self._inserted[coin_type].rejected += 1
            why = "acceptor unplugged" if self.acceptor_unplugged else "coin jam"
            return {"result": "returned", "reason": why}
        if coin_type is None:
            self._slugs += 1
            self.queue_item(item_slugs(1))
            return {"result": "slug"}
        coin = self.coins[coin_type]
        if not self.accept_mask >> coin_type & 1:
            route = CoinRoute.REJECTED
            self._inserted[coin_type].rejected += 1
            self._returned_value += coin.value
        elif forced is CoinRoute.CASHBOX:
            route = CoinRoute.CASHBOX
            self._inserted[coin_type].cashbox += 1
        elif coin.routable and coin.count < coin.capacity:
            route = CoinRoute.TUBES
            coin.count += 1
            self._inserted[coin_type].tubes += 1
        else:
            route = CoinRoute.CASHBOX
            self._inserted[coin_type].cashbox += 1
        self.queue_item(item_deposited(coin_type, route, coin.count))
        return {"result": route.name.lower(), "coin_type": coin_type, "tube_count": coin.count}

    def _manual_dispense(self, coin_type: int, count: int) -> dict[str, Any]:
        if not 1 <= count <= MAX_MANUAL_COUNT:
            raise ValueError(f"manual dispense count must be 1..{MAX_MANUAL_COUNT}")
        coin = self.coins[coin_type]
        if not self.manual_mask >> coin_type & 1:
            return {"result": "disabled"}
        paid = min(count, coin.count)
        if paid == 0:
            return {"result": "empty"}
        coin.count -= paid
        self._paid[coin_type].manual += paid
        self.queue_item(item_dispensed_manually(coin_type, paid, coin.count))
        return {"result": "dispensed", "count": paid, "tube_count": coin.count}

    def _set_tube(self, request: dict[str, Any]) -> dict[str, Any]:
        coin = self.coins[self._coin_type(request)]
        if not coin.routable:
            raise ValueError("that coin type has no tube")
        capacity = int(request.get("capacity", coin.capacity))
        count = int(request["count"])
        if not 0 <= count <= capacity <= 0xFF:
            raise ValueError("need 0 <= count <= capacity <= 255")
        coin.count, coin.capacity = count, capacity
        return {"count": count, "capacity": capacity}

    def _jam(self, kind: str, after: Any) -> dict[str, Any]:
        if kind == "coin":
            self.coin_jam = True
            self.queue_item(bytes((STATUS_COIN_JAM,)))
        elif kind == "tube":
            if after is None or int(after) <= 0:
                self._set_tube_jam(self.clock())
            else:
                self.tube_jam_after = int(after)
        elif kind == "unplugged":
            self.acceptor_unplugged = True
            self.queue_item(bytes((STATUS_ACCEPTOR_UNPLUGGED,)))
        else:
            raise ValueError(f"unknown jam kind {kind!r} (coin, tube, unplugged)")
        return self._conditions()

    # --- what physically happened ------------------------------------------------------

    def ledger(self) -> dict[str, Any]:
        with self.lock:
            self._advance()
            value_in = sum(
                (i.tubes + i.cashbox) * c.value
                for i, c in zip(self._inserted, self.coins, strict=True)
            )
            value_out = sum(
                (p.command + p.manual) * c.value
                for p, c in zip(self._paid, self.coins, strict=True)
            )
            return {
                "inserted": {
                    str(t): {"tubes": i.tubes, "cashbox": i.cashbox, "rejected": i.rejected}
                    for t, i in enumerate(self._inserted)
                },
                "slugs": self._slugs,
                "paid_out": {
                    str(t): {"command": p.command, "manual": p.manual}
                    for t, p in enumerate(self._paid)
                },
                "tubes": {str(t): c.count for t, c in enumerate(self.coins) if c.routable},
                "deposited": {
                    "count": sum(i.tubes + i.cashbox for i in self._inserted),
                    "value": value_in,
                },
                "acked_deposited": self._acked_deposited.as_dict(),
                "acked_dispensed_manually": self._acked_dispensed_manually.as_dict(),
                "coins_waiting": len(self.coins_waiting),
                "value_in": value_in,
                "value_out": value_out,
                "value_returned": self._returned_value,
                "busy": self.clock() < self._busy_until,
            }

    # --- what survives a power cycle ---------------------------------------------------

    def physical_state(self) -> dict[str, Any]:
        with self.lock:
            self._advance()
            return {
                "tubes": {
                    str(t): {"count": c.count, "capacity": c.capacity}
                    for t, c in enumerate(self.coins)
                    if c.routable
                },
                "coin_jam": self.coin_jam,
                "tube_jam": self.tube_jam,
                "acceptor_unplugged": self.acceptor_unplugged,
            }

    def load_physical_state(self, state: dict[str, Any]) -> None:
        with self.lock:
            tubes = state.get("tubes", {})
            for key, tube in tubes.items():
                coin_type = int(key)
                if not 0 <= coin_type < len(self.coins) or not self.coins[coin_type].routable:
                    raise ValueError(f"saved state: coin type {key} has no tube here")
                count, capacity = int(tube["count"]), int(tube["capacity"])
                if not 0 <= count <= capacity <= 0xFF:
                    raise ValueError(f"saved state: tube {key}: need 0 <= count <= capacity <= 255")
                self.coins[coin_type].count = count
                self.coins[coin_type].capacity = capacity
            self.coin_jam = bool(state.get("coin_jam", False))
            self.tube_jam = bool(state.get("tube_jam", False))
            self.acceptor_unplugged = bool(state.get("acceptor_unplugged", False))
            # A condition still present at power-up is reported again after JUST RESET.
            for present, status in (
                (self.acceptor_unplugged, STATUS_ACCEPTOR_UNPLUGGED),
                (self.coin_jam, STATUS_COIN_JAM),
                (self.tube_jam, STATUS_TUBE_JAM),
            ):
                if present:
                    self.queue_item(bytes((status,)))
