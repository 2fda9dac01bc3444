"""``python -m hil.backend``: the stand-in backend and its operator's command line.

    python -m hil.backend serve --broker 127.0.0.1:1883 --state DIR [--machine M] [--prefix vmc]
                                [--auto-confirm [--confirm-delay S]]
    python -m hil.backend status  --state DIR [--machine M]
    python -m hil.backend sales   --state DIR [--machine M]
    python -m hil.backend stock   --state DIR [--machine M]
    python -m hil.backend records --state DIR [--machine M] [--type T ...] [--limit N]
    python -m hil.backend public-key|sign ...                   (hil/backend/commands.py)
    python -m hil.backend set-price|slot-out|slot-in|set-stock|confirm|decline|send|orders|
                          results ...                           (hil/backend/operator.py)

``--state``, ``--machine``, ``--broker`` and ``--prefix`` go before or after the subcommand
(``python -m hil.backend --state DIR set-price A1 130``); with no subcommand it is ``serve``
(``python -m hil.backend --broker HOST:PORT --state DIR``). ``serve`` saves its broker, prefix
and machine in ``DIR/backend.json``, so the operator's commands need only ``--state`` (and so
does ``serve`` started again: it takes what it saved unless told otherwise).

Subcommands come from providers: modules with ``add_arguments(subparsers) -> {name:
handler(args) -> exit code}``. ``PROVIDERS`` lists them; a provider that is not there (yet) is
skipped, so hil/backend/commands.py adds its subcommands without any change here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import json
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

from hil.backend.commands import load_settings, save_settings, shared_options, state_dir_of
from hil.backend.operator import (
    DEFAULT_BROKER,
    DEFAULT_CONFIRM_DELAY_S,
    DEFAULT_PREFIX,
    split_broker,
)
from hil.backend.service import serve
from hil.backend.store import BackendStore

Handler = Callable[[argparse.Namespace], int]

#: Modules that add subcommands (each has ``add_arguments``), in help order.
PROVIDERS = ["hil.backend.__main__", "hil.backend.commands", "hil.backend.operator"]


def _state_args(parser: argparse.ArgumentParser) -> None:
    shared_options(parser)


def add_arguments(subparsers: Any) -> dict[str, Handler]:
    """This module's own subcommands: serve and the read-only reports."""
    run = subparsers.add_parser("serve", help="run the backend against a broker")
    _state_args(run)
    run.add_argument(
        "--auto-confirm",
        action="store_true",
        help="confirm every QR order (send its vend) as a wallet paying it would",
    )
    run.add_argument(
        "--confirm-delay",
        type=float,
        default=DEFAULT_CONFIRM_DELAY_S,
        metavar="S",
        help=f"seconds from the order to its auto-confirm (default {DEFAULT_CONFIRM_DELAY_S:g})",
    )
    for name, text in (
        ("status", "each machine's last status and telemetry summary"),
        ("sales", "sales per slot and in total"),
        ("stock", "per-slot stock, price and enabled flag from the last telemetry"),
        ("records", "the stored journal records as JSON lines"),
    ):
        sub = subparsers.add_parser(name, help=text)
        _state_args(sub)
        if name == "records":
            sub.add_argument("--type", action="append", default=[], dest="types")
            sub.add_argument("--limit", type=int, default=1_000_000)
    return {
        "serve": cmd_serve,
        "status": cmd_status,
        "sales": cmd_sales,
        "stock": cmd_stock,
        "records": cmd_records,
    }


def cmd_serve(args: argparse.Namespace) -> int:
    state_dir = state_dir_of(args)
    saved = load_settings(state_dir)  # a restart needs no options again
    broker = getattr(args, "broker", None) or saved.get("broker") or DEFAULT_BROKER
    prefix = getattr(args, "prefix", None) or saved.get("prefix") or DEFAULT_PREFIX
    machine = getattr(args, "machine", None) or saved.get("machine")
    host, port = split_broker(str(broker))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    save_settings(state_dir, broker=f"{host}:{port}", prefix=str(prefix), machine=machine)
    auto = args.confirm_delay if args.auto_confirm else None
    # SIGTERM ends it as Ctrl-C does (scripts/run-sim stops it so).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(state_dir, host, port, prefix, auto_confirm_s=auto))
    return 0


def _machines(store: BackendStore, only: str | None) -> list[str]:
    return [only] if only else store.machines()


def cmd_status(args: argparse.Namespace) -> int:
    store = BackendStore(state_dir_of(args))
    for machine in _machines(store, getattr(args, "machine", None)):
        status = store.latest(machine, "status") or {}
        telemetry = store.latest(machine, "telemetry") or {}
        journals = store.journals(machine)
        print(
            json.dumps(
                {
                    "machine": machine,
                    "online": status.get("online"),
                    "status": status,
                    "in_service": telemetry.get("in_service"),
                    "faults": telemetry.get("faults"),
                    "unacked": (telemetry.get("journal") or {}).get("unacked"),
                    "telemetry_ts": telemetry.get("ts"),
                    "journals": journals,
                }
            )
        )
    return 0


def cmd_sales(args: argparse.Namespace) -> int:
    store = BackendStore(state_dir_of(args))
    for machine in _machines(store, getattr(args, "machine", None)):
        per_slot: dict[str, dict[str, int]] = {}
        for record in store.records(machine, types=["sale"]):
            data = record["data"]
            slot = per_slot.setdefault(str(data.get("slot")), {"count": 0, "amount": 0})
            slot["count"] += 1
            slot["amount"] += int(data.get("price", 0))
        total = {
            "count": sum(s["count"] for s in per_slot.values()),
            "amount": sum(s["amount"] for s in per_slot.values()),
        }
        print(json.dumps({"machine": machine, "slots": per_slot, "total": total}))
    return 0


def cmd_stock(args: argparse.Namespace) -> int:
    store = BackendStore(state_dir_of(args))
    for machine in _machines(store, getattr(args, "machine", None)):
        telemetry = store.latest(machine, "telemetry") or {}
        print(json.dumps({"machine": machine, "slots": telemetry.get("slots") or []}))
    return 0


def cmd_records(args: argparse.Namespace) -> int:
    store = BackendStore(state_dir_of(args))
    for record in store.records(getattr(args, "machine", None), types=args.types, limit=args.limit):
        print(json.dumps(record))
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Handler]]:
    parser = argparse.ArgumentParser(
        prog="python -m hil.backend",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    shared_options(parser, top=True)
    subparsers = parser.add_subparsers(dest="command")
    handlers: dict[str, Handler] = {}
    for name in PROVIDERS:
        if name == "hil.backend.__main__":
            handlers.update(add_arguments(subparsers))
            continue
        if importlib.util.find_spec(name) is None:
            continue
        handlers.update(importlib.import_module(name).add_arguments(subparsers))
    return parser, handlers


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, handlers = build_parser()
    if argv and not any(a in handlers or a in ("-h", "--help") for a in argv):
        argv.append("serve")  # the short form: options only
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
