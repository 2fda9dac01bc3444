"""The console's command table: each command's words, arguments, help, the control request it
makes (vmc/technician.py and vmc/control.py answer it) and how its answer is shown.

Amounts are typed and shown in the currency's units (``1.30``; ``2`` is 2.00), as the
machine's display shows them; the control interface carries minor units.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from vmc.journal.reports import format_money

Request = dict[str, Any]
Answer = dict[str, Any]


class UsageError(ValueError):
    """The line does not fit the command's arguments: the message says how to type it."""


@dataclass
class Context:
    """What the console knows of the machine (from ``state`` at login), for arguments,
    completion and money."""

    decimals: int = 2
    currency: str = ""
    slots: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)

    def money(self, amount: int) -> str:
        return format_money(amount, self.decimals)

    def parse_money(self, text: str) -> int:
        try:
            value = Decimal(text.replace(",", "."))
        except InvalidOperation:
            raise UsageError(f"{text!r} is not an amount (like 1.30)") from None
        minor = value * (10**self.decimals)
        if minor != minor.to_integral_value() or minor < 0:
            raise UsageError(f"{text!r}: at most {self.decimals} decimals, not negative")
        return int(minor)


@dataclass(frozen=True)
class Command:
    words: tuple[str, ...]
    #: Argument names as shown in help: SLOT, DEVICE, on|off ... ; [N] is optional.
    args: tuple[str, ...]
    help: str
    build: Callable[[list[str], Context], Request]
    show: Callable[[Answer, Context], str]

    @property
    def name(self) -> str:
        return " ".join(self.words)

    @property
    def usage(self) -> str:
        return " ".join((*self.words, *self.args))


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{what}: a whole number, not {text!r}") from None


def _slot(text: str, ctx: Context) -> str:
    slot = text.upper()
    if ctx.slots and slot not in ctx.slots:
        raise UsageError(f"no slot {text!r} (slots: {' '.join(ctx.slots)})")
    return slot


def _json(answer: Answer, _ctx: Context) -> str:
    shown = {k: v for k, v in answer.items() if k != "ok"}
    return json.dumps(shown, indent=2, ensure_ascii=False)


def _done(answer: Answer, _ctx: Context) -> str:
    return "done"


def _show_status(answer: Answer, ctx: Context) -> str:
    s = answer["state"]
    lines = [
        f"phase {s['phase']}  credit {ctx.money(s['credit'])} {s['currency']}  "
        f"in service: {'yes' if s['in_service'] else 'no'}"
        + ("  (exact change only)" if s.get("exact_change_only") else ""),
        _show_faults(answer, ctx),
        "devices: "
        + (", ".join(f"{name} {state}" for name, state in s["devices"].items()) or "none"),
    ]
    mdb, cloud = s.get("mdb_link"), s.get("cloud_link")
    lines.append(f"mdb link: {mdb['state']} ({mdb['detail']})" if mdb else "mdb link: none")
    lines.append(
        f"cloud link: {cloud['state']} ({cloud['detail']})" if cloud else "cloud link: none"
    )
    if "qr" in s:
        lines.append(f"qr: {'offered' if s['qr'].get('available') else 'not offered'}")
    lines.append(_show_slots(answer, ctx))
    return "\r\n".join(lines)


def _show_faults(answer: Answer, _ctx: Context) -> str:
    faults = answer["state"]["faults"]
    if not faults:
        return "faults: none"
    return "faults:\r\n" + "\r\n".join(f"  {key}: {why}" for key, why in faults.items())


def _show_slots(answer: Answer, ctx: Context) -> str:
    rows = ["slot  price     stock  sale  name"]
    for slot in answer["state"]["slots"]:
        sale = "in" if slot["enabled"] else "out"
        rows.append(
            f"{slot['slot']:<5} {ctx.money(slot['price']):>8} "
            f"{slot['stock']:>3}/{slot['capacity']:<3} {sale:<4}  {slot['name']}"
        )
    return "\r\n".join(rows)


def _show_devices(answer: Answer, _ctx: Context) -> str:
    rows = []
    for d in answer["devices"]:
        rows.append(
            f"{d['device']}: {d['state']}  level {d['level']}  {d['manufacturer'] or '-'} "
            f"{d['model'] or '-'}  serial {d['serial'] or '-'}  sw {d['version']}"
            f"  accepting: {'yes' if d['accepting'] else 'no'}"
        )
        details = d["details"]
        if "features" in details:
            rows.append(f"  features: 0x{int(details['features']):08x}")
        for key in ("coin_values", "bill_values", "stacker_count", "stacker_full"):
            if key in details:
                rows.append(f"  {key}: {details[key]}")
    motor = answer["motor"]
    rows.append(f"motor board: {'present' if motor['present'] else 'none'} {motor['fault']}")
    return "\r\n".join(rows)


def _show_coins(answer: Answer, ctx: Context) -> str:
    rows = ["type  value    coins  journal  full"]
    for tube in answer["tubes"]:
        rows.append(
            f"{tube['coin_type']:<5} {ctx.money(tube['value']):>6} {tube['count']:>7}"
            f" {tube['journal']:>8}  {'yes' if tube['full'] else 'no'}"
        )
    rows.append(f"fill mode: {'on' if answer['fill_mode'] else 'off'}")
    return "\r\n".join(rows)


def _show_bills(answer: Answer, ctx: Context) -> str:
    return (
        f"stacker: {answer['device_count']} bills (validator), {answer['journal_count']} "
        f"(journal), worth {ctx.money(answer['value'])}" + ("  FULL" if answer["full"] else "")
    )


def _show_emptied(answer: Answer, ctx: Context) -> str:
    return (
        f"stacker emptied: {answer['count']} bills, {ctx.money(answer['value'])} journaled"
        f" (validator counted {answer['device_count']})"
    )


def _show_slot(answer: Answer, ctx: Context) -> str:
    sale = "in sale" if answer["enabled"] else "out of sale"
    return f"{answer['slot']}: price {ctx.money(answer['price'])}, stock {answer['stock']}, {sale}"


def _show_motor(answer: Answer, _ctx: Context) -> str:
    dropped = "a product dropped" if answer["dropped"] else "nothing dropped"
    return (
        f"{answer['slot']}: {answer['outcome']}, {dropped} ({answer['detail']}); "
        f"stock {answer['stock']}"
    )


def _show_payout(answer: Answer, ctx: Context) -> str:
    return (
        f"paid {answer['paid']} of {answer['wanted']} coins of type {answer['coin_type']}: "
        f"{ctx.money(answer['value'])}"
    )


def _show_tail(answer: Answer, _ctx: Context) -> str:
    rows = []
    for r in answer["records"]:
        source = r["source"]
        who = source["kind"] + (f":{source['user']}" if "user" in source else "")
        data = json.dumps(r["data"], separators=(",", ":"))
        rows.append(f"{r['seq']:>6} {r['ts']} {r['type']:<17} {who:<20} {data}")
    return "\r\n".join(rows) or "(no records)"


def _show_sync(answer: Answer, _ctx: Context) -> str:
    link = answer["cloud_link"]
    text = f"cloud link: {link['state']} ({link['detail']})" if link else "cloud link: none"
    text += (
        f"\r\njournal: last seq {answer['last_seq']}, acknowledged up to "
        f"{answer['acked_upto']}, {answer['backlog']} to send"
    )
    return text + ("\r\nresending now" if answer.get("forced") else "")


def _show_qr(answer: Answer, _ctx: Context) -> str:
    order = answer["order"]
    text = str(answer.get("text", "")).replace("\n", "\r\n")
    return f"{text}\r\norder {order['order_id']} slot {order['slot']} price {order['price']}"


def _args(count: int, usage: str) -> Callable[[list[str]], None]:
    def check(args: list[str]) -> None:
        if len(args) != count:
            raise UsageError(f"usage: {usage}")

    return check


def _build_set(field_name: str, usage: str) -> Callable[[list[str], Context], Request]:
    def build(args: list[str], ctx: Context) -> Request:
        _args(2, usage)(args)
        slot = _slot(args[0], ctx)
        if field_name == "price":
            return {"op": "set_slot", "slot": slot, "price": ctx.parse_money(args[1])}
        if field_name == "stock":
            return {"op": "set_slot", "slot": slot, "stock": _int(args[1], "COUNT")}
        if args[1] not in ("in", "out"):
            raise UsageError(f"usage: {usage}")
        return {"op": "set_slot", "slot": slot, "enabled": args[1] == "in"}

    return build


def _simple(op: str) -> Callable[[list[str], Context], Request]:
    def build(args: list[str], _ctx: Context) -> Request:
        if args:
            raise UsageError(f"{op}: no arguments")
        return {"op": op}

    return build


def _build_tail(args: list[str], _ctx: Context) -> Request:
    if len(args) > 1:
        raise UsageError("usage: journal tail [N]")
    return {"op": "journal_tail", "n": _int(args[0], "N") if args else 20}


def _build_reset(args: list[str], _ctx: Context) -> Request:
    _args(1, "reset DEVICE")(args)
    return {"op": "device_reset", "device": args[0].lower()}


def _build_fill(args: list[str], _ctx: Context) -> Request:
    if args not in (["on"], ["off"]):
        raise UsageError("usage: fill on|off")
    return {"op": "coin_fill", "on": args[0] == "on"}


def _build_payout(args: list[str], _ctx: Context) -> Request:
    _args(2, "payout TYPE COUNT")(args)
    return {
        "op": "coin_payout",
        "coin_type": _int(args[0], "TYPE"),
        "count": _int(args[1], "COUNT"),
    }


def _build_dex(args: list[str], _ctx: Context) -> Request:
    if args not in ([], ["reset"]):
        raise UsageError("usage: dex [reset]")
    return {"op": "dex", "reset": args == ["reset"]}


def _build_slot_op(op: str, usage: str) -> Callable[[list[str], Context], Request]:
    def build(args: list[str], ctx: Context) -> Request:
        _args(1, usage)(args)
        return {"op": op, "slot": _slot(args[0], ctx)}

    return build


COMMANDS: tuple[Command, ...] = (
    Command(("help",), ("[COMMAND]",), "list the commands, or explain one", _simple("help"), _json),
    Command(
        ("status",),
        (),
        "phase, credit, faults, devices, links, slots",
        _simple("state"),
        _show_status,
    ),
    Command(
        ("faults",),
        (),
        "why the machine is not taking money, if it is not",
        _simple("state"),
        _show_faults,
    ),
    Command(
        ("slots",), (), "price, stock and sale state of every slot", _simple("state"), _show_slots
    ),
    Command(
        ("devices",),
        (),
        "MDB devices: identity, level, features, levels",
        _simple("devices"),
        _show_devices,
    ),
    Command(
        ("reset",),
        ("DEVICE",),
        "reset one MDB device (coin, bill, cashless); only when idle",
        _build_reset,
        _done,
    ),
    Command(
        ("coins",),
        (),
        "coin tube levels (changer and journal), fill mode",
        _simple("coins"),
        _show_coins,
    ),
    Command(
        ("fill",),
        ("on|off",),
        "fill mode: coins inserted go to the tubes as a fill, not credit",
        _build_fill,
        _done,
    ),
    Command(
        ("payout",),
        ("TYPE", "COUNT"),
        "pay COUNT coins of coin TYPE out of its tube",
        _build_payout,
        _show_payout,
    ),
    Command(
        ("bills",),
        (),
        "bill stacker count (validator and journal) and its value",
        _simple("bills"),
        _show_bills,
    ),
    Command(
        ("bills", "empty"),
        (),
        "the cash box was emptied: journal it, reset the count",
        _simple("bills_emptied"),
        _show_emptied,
    ),
    Command(
        ("motor", "test"),
        ("SLOT",),
        "turn a slot's motor once (no money; a drop takes one off the stock)",
        _build_slot_op("motor_test", "motor test SLOT"),
        _show_motor,
    ),
    Command(
        ("price",),
        ("SLOT", "AMOUNT"),
        "set a slot's price (like 1.30)",
        _build_set("price", "price SLOT AMOUNT"),
        _show_slot,
    ),
    Command(
        ("stock",),
        ("SLOT", "COUNT"),
        "set a slot's stock after a refill or a count",
        _build_set("stock", "stock SLOT COUNT"),
        _show_slot,
    ),
    Command(
        ("slot",),
        ("SLOT", "in|out"),
        "put a slot in or out of sale",
        _build_set("enabled", "slot SLOT in|out"),
        _show_slot,
    ),
    Command(
        ("journal", "tail"), ("[N]",), "the last N journal records (20)", _build_tail, _show_tail
    ),
    Command(
        ("journal", "report"),
        (),
        "sales, cash position, stock, sync backlog",
        _simple("journal_report"),
        lambda a, _c: str(a["text"]).replace("\n", "\r\n"),
    ),
    Command(("sync",), (), "the cloud link and what is left to send", _simple("sync"), _show_sync),
    Command(
        ("sync", "force"),
        (),
        "resend what the backend has not acknowledged, now",
        _simple("sync_force"),
        _show_sync,
    ),
    Command(
        ("qr",),
        ("SLOT",),
        "a test QR order for a slot, shown as a text QR",
        _build_slot_op("qr_order", "qr SLOT"),
        _show_qr,
    ),
    Command(("qr", "cancel"), (), "cancel the QR order shown", _simple("qr_cancel"), _json),
    Command(
        ("config",),
        (),
        "the effective configuration, secrets redacted",
        _simple("config"),
        lambda a, _c: json.dumps(a["config"], indent=2).replace("\n", "\r\n"),
    ),
    Command(("logout",), (), "end the session", _simple("logout"), _done),
    Command(
        ("dex",),
        ("[reset]",),
        "the EVA-DTS audit report; with reset the interim counters start anew",
        _build_dex,
        lambda a, _c: str(a["report"]).strip(),
    ),
)


def find(words: Sequence[str]) -> tuple[Command, list[str]] | None:
    """The command a line's words name (the longest match) and the rest as arguments."""
    best: tuple[Command, list[str]] | None = None
    for command in COMMANDS:
        n = len(command.words)
        named = tuple(w.lower() for w in words[:n]) == command.words
        # The longest match: "qr cancel" is its own command, "qr A1" is qr with an argument.
        if named and (best is None or n > len(best[0].words)):
            best = (command, list(words[n:]))
    return best


def help_text(topic: Sequence[str]) -> str:
    if topic:
        found = find(topic)
        if found is None:
            raise UsageError(f"no command {' '.join(topic)!r}: type help")
        return f"{found[0].usage}\r\n  {found[0].help}"
    width = max(len(c.usage) for c in COMMANDS)
    return "\r\n".join(f"{c.usage:<{width}}  {c.help}" for c in COMMANDS) + (
        "\r\nTab completes commands and slot names; Ctrl-U erases the line, Ctrl-C drops it."
    )


def complete(text: str, ctx: Context) -> list[str]:
    """Candidate lines for Tab: command words, then slot names, device names or choices."""
    words = text.split(" ")
    done, last = words[:-1], words[-1]
    prefix = " ".join(done) + (" " if done else "")
    options: set[str] = set()
    for command in COMMANDS:
        names = list(command.words)
        # After the command's own words come its arguments.
        for arg in command.args:
            names.append(arg)
        if len(done) >= len(names):
            continue
        if any(w.lower() != n for w, n in zip(done, command.words, strict=False)):
            continue
        position = len(done)
        if position < len(command.words):
            options.add(command.words[position])
            continue
        arg = names[position]
        if arg == "SLOT":
            options.update(ctx.slots)
        elif arg == "DEVICE":
            options.update(ctx.devices)
        elif "|" in arg:
            options.update(arg.split("|"))
    return [prefix + o for o in sorted(options) if o.lower().startswith(last.lower())]
