"""What the vend cycle needs from the cash devices, in the machine's own terms.

The vend cycle speaks of money in minor units, coins by type and bills by type; these ports
translate to and from the MDB device classes in ``drivers`` (coin changer, bill validator), so
the vend logic never handles MDB bytes and a different changer (a hopper, a recycler) can be
added as another port.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Protocol

from drivers.errors import MdbError
from drivers.mdb.bill import BillValidator
from drivers.mdb.coin import DISPENSE_WAIT_S, MAX_DISPENSE_COUNT, CoinChanger
from drivers.mdb.device import DeviceState


class ChangerPort(Protocol):
    """A coin changer as the vend cycle uses it."""

    @property
    def ready(self) -> bool:
        """Started up and answering."""
        ...

    def tube_inventory(self) -> Mapping[int, tuple[int, int]]:
        """coin type → (value in minor units, coins that can be paid out of its tube)."""
        ...

    def coin_value(self, coin_type: int) -> int: ...

    async def refresh_tubes(self) -> None:
        """Read the tube counts from the device now."""
        ...

    async def dispense(self, coin_type: int, count: int) -> int:
        """Pay ``count`` coins of one type; return how many the tube counts show were paid.

        Raises ``drivers.errors.MdbError`` when the outcome cannot be known (device gone).
        """
        ...

    def set_accepting(self, accepting: bool) -> None: ...

    async def stop_accepting(self) -> None:
        """Disable every coin on the wire now and return once the changer took the command
        and has reported every coin it took before (those reach the vend cycle as ordinary
        coin events): no coin can then enter a tube while a payout's coins leave it."""
        ...

    async def tube_counts_now(self) -> Mapping[int, int]:
        """coin type → coins in its tube, as the changer answers TUBE STATUS now (not the
        running counts, which a late POLL item can set to an older value)."""
        ...

    @property
    def accepting(self) -> bool:
        """The changer is really enabled now (the last COIN TYPE enabled coins)."""
        ...

    async def settle_pending(self, timeout_s: float) -> Mapping[int, int] | None:
        """Coins (type → count) a payout whose end was not seen turned out to pay, once the
        changer can tell; ``{}`` when nothing is pending; None while it still cannot tell."""
        ...


class BillPort(Protocol):
    """A bill validator as the vend cycle uses it."""

    @property
    def ready(self) -> bool: ...

    async def escrow(self, stack: bool) -> None:
        """Stack (True) or return (False) the bill held in escrow. The outcome arrives later as a
        stacked/returned event from the device."""
        ...

    async def stacker_count(self) -> int | None:
        """Bills in the stacker, as the validator counts them (None if it does not say)."""
        ...

    def set_accepting(self, accepting: bool) -> None: ...

    @property
    def accepting(self) -> bool: ...


# --- the MDB implementations -------------------------------------------------------------


class PayoutOutcomeUnknown(MdbError):
    """A DISPENSE whose end the changer did not report in time: what it paid is not known yet.
    ``paid`` holds the coins earlier commands of the same call were confirmed to pay."""

    def __init__(self, message: str, paid: Mapping[int, int]) -> None:
        super().__init__(message)
        self.paid = dict(paid)


class MdbChanger:
    """``ChangerPort`` over an MDB coin changer (levels 2 and 3)."""

    def __init__(self, device: CoinChanger, dispense_wait_s: float = DISPENSE_WAIT_S) -> None:
        self.device = device
        self.dispense_wait_s = dispense_wait_s

    @property
    def ready(self) -> bool:
        d = self.device
        return d.state is DeviceState.READY and d.setup is not None and d.tubes is not None

    def tube_inventory(self) -> Mapping[int, tuple[int, int]]:
        return self.device.change_tubes()

    def coin_value(self, coin_type: int) -> int:
        return self.device.coin_value(coin_type)

    async def refresh_tubes(self) -> None:
        await self.device.tube_status()

    async def dispense(self, coin_type: int, count: int) -> int:
        """DISPENSE in commands of at most 15 coins (the count is 4 bits), each confirmed before
        the next; stops early when one pays short."""
        paid = 0
        while paid < count:
            chunk = min(count - paid, MAX_DISPENSE_COUNT)
            try:
                # Taken or not, the changer's status and tube counts will tell what was paid.
                with contextlib.suppress(MdbError):
                    await self.device.dispense(coin_type, chunk)
                result = await self.device.wait_payout_done(self.dispense_wait_s)
            except MdbError as exc:
                raise PayoutOutcomeUnknown(str(exc), {coin_type: paid}) from exc
            if not result.finished:
                raise PayoutOutcomeUnknown(
                    f"DISPENSE {chunk} x type {coin_type}: no end reported in "
                    f"{self.dispense_wait_s} s",
                    {coin_type: paid},
                )
            got = result.counts.get(coin_type, 0)
            paid += got
            if got < chunk:
                break
        return paid

    def set_accepting(self, accepting: bool) -> None:
        self.device.set_enabled(accepting)

    async def stop_accepting(self) -> None:
        await self.device.stop_accepting_now()
        # Whatever the changer took before the disable is reported (and credited) now, so
        # that the tube counts read next are ordered after every item it reported.
        await self.device.settle_activity()

    async def tube_counts_now(self) -> Mapping[int, int]:
        status = await self.device.tube_status()
        return {t: n for t, (_value, n) in self.device.change_tubes(status).items()}

    @property
    def accepting(self) -> bool:
        return self.device.accepting

    async def settle_pending(self, timeout_s: float) -> Mapping[int, int] | None:
        if not self.device.payout_pending:
            return {}
        try:
            result = await self.device.wait_payout_done(timeout_s)
        except MdbError:
            return None
        return result.counts if result.finished else None


class MdbBills:
    """``BillPort`` over an MDB bill validator (levels 1 and 2)."""

    def __init__(self, device: BillValidator) -> None:
        self.device = device

    @property
    def ready(self) -> bool:
        return self.device.state is DeviceState.READY and self.device.setup is not None

    async def escrow(self, stack: bool) -> None:
        await self.device.escrow(stack)

    async def stacker_count(self) -> int | None:
        status = await self.device.stacker()
        return status.count

    def set_accepting(self, accepting: bool) -> None:
        self.device.set_enabled(accepting)

    @property
    def accepting(self) -> bool:
        return self.device.accepting
