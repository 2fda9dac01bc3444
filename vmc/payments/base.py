"""The one interface between the vend cycle and a way of paying.

The vend cycle (vmc/machine.py) sells one product the same way whatever pays for it::

    select → authorise → vend_intent → motor and drop check → sale + settle
                                                            → vend_failed + refund

A payment method is an :class:`Authoriser`: asked for one slot, it either refuses (a
:class:`Refusal` with a code the screen or the cloud can show) or hands back a
:class:`Payment`, the money promised for that one vend. The vend cycle journals the intent and
the outcome with the payment's method and references (order id, session id) and then tells the
payment how the vend ended:

* **settle** (the product fell; its ``sale`` record is durable): cash pays the change, a
  cashless reader would send VEND SUCCESS, QR has nothing left to do;
* **refund** (nothing fell; ``vend_failed`` and the payment's own ``refund_records`` are durable
  in one transaction): cash keeps the credit for another choice or the return button, QR leaves a
  ``refund`` record the backend turns into a wallet refund, a cashless reader would send VEND
  FAILURE (the reader returns the money) with a ``refund`` record naming its session.

The methods today: ``vmc/payments/cash.py`` (credit from coins and bills) and
``vmc/payments/qr.py`` (e-wallet orders confirmed by a signed ``vend`` command). A card reader
fits the same shape: ``authorise`` = VEND REQUEST until VEND APPROVED (or DENIED: a refusal),
``settle`` = VEND SUCCESS, ``refund`` = VEND FAILURE.

Every call here runs inside the vend-cycle actor, one at a time: a payment never races a coin,
a planogram change or another vend.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from vmc.errors import VmcError
from vmc.journal.records import LOCAL, Source

if TYPE_CHECKING:
    from vmc.planogram import Slot

RecordSpec = tuple[str, dict[str, Any]]


class Refusal(VmcError):
    """A customer request the machine turns down, with a code a screen can translate."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Phase(enum.Enum):
    """What the vend cycle is doing (STATE ``phase``)."""

    IDLE = "idle"
    VENDING = "vending"
    PAYING = "paying"


class Payment(ABC):
    """Money authorised for one vend of one slot at ``price`` (minor units).

    ``method`` is the journal's ``method`` (cash, card or qr); ``refs`` the ids the intent and
    outcome records name (``order_id``, ``session_id``); ``source`` who caused the vend (the
    signed command of a QR vend; the customer at the machine otherwise)."""

    method: ClassVar[str]

    def __init__(self, price: int, *, source: Source = LOCAL) -> None:
        self.price = price
        self.source = source

    @property
    def refs(self) -> dict[str, str]:
        return {}

    def sale_fields(self) -> dict[str, Any]:
        """What the ``sale`` record holds beyond intent id, slot, price, method and refs."""
        return {"paid": self.price, "change": 0}

    def refund_records(self, intent_id: str, reason: str) -> list[RecordSpec]:
        """Records journaled with ``vend_failed``, in the same transaction (a ``refund``)."""
        return []

    @abstractmethod
    async def settle(self) -> dict[str, Any]:
        """The product fell and its sale is durable: finish the payment. Returns what the
        answer to the customer (or the command) adds."""

    @abstractmethod
    async def refund(self, reason: str) -> dict[str, Any]:
        """Nothing fell and ``vend_failed`` (with ``refund_records``) is durable: give the money
        back the method's way. Returns what the answer adds."""


class Authoriser(Protocol):
    """A way of paying for one selection."""

    async def authorise(self, slot: Slot) -> Payment:
        """The payment for one vend of ``slot`` at its price, or raise :class:`Refusal`."""
        ...


class PaymentMethod(Protocol):
    """A payment method the vend cycle holds (``VendMachine.attach``): its name, a tick from
    the actor (timers: an order's expiry), and what it adds to STATE."""

    name: str

    async def tick(self) -> None: ...

    def snapshot(self) -> Mapping[str, Any]: ...
