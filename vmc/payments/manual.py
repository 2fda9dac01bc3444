"""Cash handled by a technician, not a customer (the console's ``payout`` and ``bills``):
a tube paid out by hand, and the bills in the stacker since the cash box was last emptied.
Neither is customer money: a technician's payout is a ``cash_out`` of reason ``manual``,
which the customer's credit never counts (vmc/journal/recovery.py)."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import structlog

from vmc.cash import ChangerPort, PayoutOutcomeUnknown
from vmc.journal import Journal, Source
from vmc.payments.base import Phase, Refusal

if TYPE_CHECKING:
    from vmc.machine import VendMachine

log = structlog.get_logger("vmc.machine")


async def pay_out_tube(
    machine: VendMachine, changer: ChangerPort, coin_type: int, count: int, source: Source
) -> dict[str, Any]:
    """DISPENSE ``count`` coins of one tube (run by the actor, the machine idle): a
    ``payout_intent`` with the tube counts, then a ``cash_out`` of reason ``manual``. An outcome
    the changer cannot tell leaves the intent open: start-up recovery settles it from the tube
    counts, as for any payout."""
    journal = machine.journal
    machine.set_phase(Phase.PAYING)
    try:
        # As for change: acceptance off and every coin reported journaled before the counts.
        await changer.stop_accepting()
        await machine.absorb_device_events()
        tubes = await changer.tube_counts_now()
        held = tubes.get(coin_type, 0)
        if count > held:
            raise Refusal("invalid", f"the tube of coin type {coin_type} holds {held}")
        value = changer.coin_value(coin_type)
        intent_id = uuid.uuid4().hex
        await journal.append(
            "payout_intent",
            {
                "intent_id": intent_id,
                "amount": value * count,
                "reason": "manual",
                "tubes": {str(t): n for t, n in tubes.items()},
            },
            source=source,
        )
        try:
            paid = await changer.dispense(coin_type, count)
        except PayoutOutcomeUnknown as exc:
            log.error("technician payout outcome unknown", intent_id=intent_id, error=str(exc))
            message = f"payout outcome unknown ({exc}); the next start settles it"
            return {"ok": False, "error": "fault", "message": message}
        await journal.append(
            "cash_out",
            {
                "intent_id": intent_id,
                "amount": value * paid,
                "reason": "manual",
                "coins": {str(coin_type): paid},
                "final": True,
            },
            source=source,
        )
    finally:
        machine.set_phase(Phase.IDLE)
    return {
        "ok": True,
        "coin_type": coin_type,
        "wanted": count,
        "paid": paid,
        "value": value * paid,
    }


async def stacker_position(journal: Journal) -> tuple[int, int]:
    """The journal's own stacker count and the value of those bills: stacked since the last
    ``cash_removed``."""
    levels = await journal.levels()
    counters = await journal.counters()
    value = counters.get("cash_in.bill.stacker.value", 0) - counters.get(
        "cash_removed.bill.value", 0
    )
    return levels.get("stacker.count", 0), value
