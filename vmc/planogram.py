"""The planogram: what each slot sells, at what price, whether it is in sale, its capacity and
its stock; where those come from, and how they change while the machine runs.

Two sources set them (docs/vend-cycle.md, "The planogram"):

* the configuration file's ``[[slot]]`` tables, read at every start;
* changes made while the machine runs: signed cloud commands (``set_price``, ``set_inventory``,
  ``set_slot``, vmc/cloud/commands.py) and, later, the console.

The current planogram lives in the journal, as levels the records that change it move in the
same transaction (``price.<slot>.value``, ``disabled.<slot>.flag``, ``stock.<slot>.count``;
vmc/journal/records.py): a change is durable exactly when its record is, survives restarts, and
survives pruning (the levels keep what pruned records contributed). What the configuration file
said at the last start is kept beside the journal, in ``planogram-file.json``. At start, for
each slot and setting:

* never set in this journal (a new machine, a new slot, a new journal): the file's value;
* the file's value differs from the one it had at the last start (someone edited the file), or
  that record of the last start is missing: the file's value, journaled with source ``config``;
* otherwise the journal's value: a remote (or console) change is not undone by a restart.

Capacity comes from the file only. Stock comes from the file only the first time; afterwards
the journal owns it (refills and counts are ``set_inventory``, sales take one each).

Every function here runs inside the vend-cycle actor (``VendMachine.recover`` and
``VendMachine.change_slot``), so a change never races a vend; a vend in progress keeps the price
its ``vend_intent`` carries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from vmc.config import Config, SlotConfig
from vmc.journal import Journal, Record
from vmc.journal.records import CONFIG, disabled_level_name, price_level_name

log = logging.getLogger("vmc.planogram")

#: Beside the journal: the planogram as the configuration file gave it at the last start.
FILE_BASELINE: Final = "planogram-file.json"
#: The price range a change may set (the configuration's own range for ``slot.price``).
MIN_PRICE: Final = 1
MAX_PRICE: Final = 1_000_000

RecordSpec = tuple[str, dict[str, Any]]


@dataclass
class Slot:
    """One lane of the planogram, as sold now.

    ``enabled`` is the planogram's flag (durable). ``taken_out`` is why the machine took the lane
    out of sale by itself (a jammed or missing motor; "" when it did not): that lasts until a
    restart or until the lane is enabled again (``set_slot``)."""

    id: str
    row: int
    col: int
    price: int
    stock: int
    capacity: int
    enabled: bool
    name: str = ""
    taken_out: str = ""

    @property
    def in_sale(self) -> bool:
        return self.enabled and not self.taken_out

    @property
    def sellable(self) -> bool:
        return self.in_sale and self.stock > 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "slot": self.id,
            "name": self.name,
            "price": self.price,
            "stock": self.stock,
            "capacity": self.capacity,
            "enabled": self.in_sale,
            "sellable": self.sellable,
        }


def slots_from_config(config: Config) -> dict[str, Slot]:
    """The slots as the configuration file gives them (before the journal is read)."""
    return {s.id: _slot_from_config(s) for s in config.slots}


def _slot_from_config(slot: SlotConfig) -> Slot:
    return Slot(
        slot.id, slot.row, slot.col, slot.price, slot.stock, slot.capacity, slot.enabled, slot.name
    )


# --------------------------------------------------------------------------------------------
# Changes while running


@dataclass(frozen=True)
class SlotChange:
    """A change to one slot; ``None`` leaves a setting as it is. ``stock`` is the count after a
    refill or a count; ``enabled`` True also puts back a lane the machine took out of sale."""

    slot: str
    price: int | None = None
    enabled: bool | None = None
    stock: int | None = None


def check_change(slots: Mapping[str, Slot], change: SlotChange) -> tuple[str, str] | None:
    """Why ``change`` cannot be made, as (code, message); None when it can."""
    slot = slots.get(change.slot)
    if slot is None:
        return "unknown_slot", f"no slot {change.slot!r}"
    if change.price is not None and not MIN_PRICE <= change.price <= MAX_PRICE:
        return "invalid", f"price {change.price} outside {MIN_PRICE}..{MAX_PRICE}"
    if change.stock is not None and not 0 <= change.stock <= slot.capacity:
        return "invalid", f"count {change.stock} outside 0..{slot.capacity} (the capacity)"
    return None


def change_records(slot: Slot, change: SlotChange) -> list[RecordSpec]:
    """The records of ``change`` (journaled even when a value stays the same: the command or
    person asking is on the record)."""
    specs: list[RecordSpec] = []
    if change.price is not None:
        specs.append(("price_changed", {"slot": slot.id, "old": slot.price, "new": change.price}))
    if change.stock is not None:
        specs.append(
            ("inventory_changed", {"slot": slot.id, "old": slot.stock, "new": change.stock})
        )
    if change.enabled is not None:
        specs.append(
            ("slot_changed", {"slot": slot.id, "enabled": change.enabled, "old": slot.enabled})
        )
    return specs


def apply_change(slot: Slot, change: SlotChange) -> None:
    """Make ``change`` on the slot in memory, once its records are durable."""
    if change.price is not None:
        slot.price = change.price
    if change.stock is not None:
        slot.stock = change.stock
    if change.enabled is not None:
        slot.enabled = change.enabled
        slot.taken_out = ""


# --------------------------------------------------------------------------------------------
# Start-up


@dataclass(frozen=True)
class FileSettings:
    """What the configuration file says of one slot's settings."""

    price: int
    enabled: bool
    capacity: int

    def as_dict(self) -> dict[str, Any]:
        return {"price": self.price, "enabled": self.enabled, "capacity": self.capacity}


def baseline_path(journal: Journal) -> Path:
    """Where the file's planogram at the last start is kept (beside the journal)."""
    return journal.path.parent / FILE_BASELINE


def read_baseline(path: Path, journal_id: str) -> dict[str, FileSettings]:
    """The file's planogram at the last start with this journal; empty when unknown (missing,
    unreadable, or written for another journal: a wiped journal starts from the file)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("%s unreadable (%s): the configuration file's planogram applies", path, exc)
        return {}
    if not isinstance(data, dict) or data.get("journal") != journal_id:
        return {}
    result: dict[str, FileSettings] = {}
    slots = data.get("slots")
    if not isinstance(slots, dict):
        return {}
    for slot_id, item in slots.items():
        try:
            price, enabled, capacity = item["price"], item["enabled"], item["capacity"]
        except (TypeError, KeyError):
            continue
        if isinstance(price, int) and isinstance(enabled, bool) and isinstance(capacity, int):
            result[str(slot_id)] = FileSettings(price, enabled, capacity)
    return result


def write_baseline(path: Path, journal_id: str, slots: Mapping[str, FileSettings]) -> None:
    """Replace the baseline atomically and durably (a crash leaves the old or the new file)."""
    text = json.dumps(
        {"journal": journal_id, "slots": {k: v.as_dict() for k, v in sorted(slots.items())}},
        indent=1,
    )
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        out.write(text + "\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def restore(journal: Journal, config: Config, slots: Mapping[str, Slot]) -> list[Record]:
    """Start-up: set ``slots`` (built from the file) to the current planogram by the rules of
    the module docstring; journal what the file changed (source ``config``, one transaction),
    then remember the file's planogram. Returns the records written.

    A crash between the records and the baseline only applies the file's values again at the
    next start, and they are the journal's values by then: no record, same result."""
    levels = await journal.levels()
    path = baseline_path(journal)
    before = await asyncio.to_thread(read_baseline, path, journal.journal_id)
    specs: list[RecordSpec] = []
    files: dict[str, FileSettings] = {}
    for slot in slots.values():
        file = FileSettings(slot.price, slot.enabled, slot.capacity)
        files[slot.id] = file
        specs.extend(_restore_slot(slot, file, before.get(slot.id), levels))
    records = await journal.append_many(specs, source=CONFIG)
    for record in records:
        log.info("planogram from the configuration file: %s %s", record.type, record.data)
    try:
        await asyncio.to_thread(write_baseline, path, journal.journal_id, files)
    except OSError as exc:
        # Not a reason to stop selling: the next start applies the file's values again.
        log.error("cannot write %s: %s", path, exc)
        with contextlib.suppress(OSError):
            path.with_name(path.name + ".tmp").unlink()
    return records


def _restore_slot(
    slot: Slot, file: FileSettings, last: FileSettings | None, levels: Mapping[str, int]
) -> list[RecordSpec]:
    """Set one slot from the journal's levels and the file; the records the file's changes
    need."""
    specs: list[RecordSpec] = []
    stock_name = f"stock.{slot.id}.count"
    if stock_name in levels:
        slot.stock = levels[stock_name]
    known_price = levels.get(price_level_name(slot.id))
    if known_price is None:
        # First start of this slot with this journal: the file's settings become the journal's.
        specs.append(("price_changed", {"slot": slot.id, "old": 0, "new": file.price}))
        if not file.enabled:
            specs.append(("slot_changed", {"slot": slot.id, "enabled": False, "old": True}))
        if stock_name not in levels:
            specs.append(("inventory_changed", {"slot": slot.id, "old": 0, "new": slot.stock}))
        return specs
    if stock_name not in levels:  # a journal that had a price but never a stock record
        specs.append(("inventory_changed", {"slot": slot.id, "old": 0, "new": slot.stock}))
    journal_enabled = levels.get(disabled_level_name(slot.id), 0) <= 0
    if last is None or last.price != file.price:
        if known_price != file.price:
            specs.append(
                ("price_changed", {"slot": slot.id, "old": known_price, "new": file.price})
            )
    else:
        slot.price = known_price
    enabled_from_file = last is None or last.enabled != file.enabled
    capacity_changed = last is not None and last.capacity != file.capacity
    if not enabled_from_file:
        slot.enabled = journal_enabled
    if (enabled_from_file and journal_enabled != file.enabled) or capacity_changed:
        data: dict[str, Any] = {"slot": slot.id, "enabled": slot.enabled, "old": journal_enabled}
        if capacity_changed:
            data["capacity"] = file.capacity
        specs.append(("slot_changed", data))
    if slot.stock > slot.capacity:
        log.warning(
            "slot %s holds %d, more than its capacity %d", slot.id, slot.stock, slot.capacity
        )
    return specs
