"""``python -m hil.backend``: the stand-in backend and its operator's command line.

    python -m hil.backend serve --broker 127.0.0.1:1883 --state DIR [--machine M] [--prefix vmc]
    python -m hil.backend status  --state DIR [--machine M]
    python -m hil.backend sales   --state DIR [--machine M]
    python -m hil.backend stock   --state DIR [--machine M]
    python -m hil.backend records --state DIR [--machine M] [--type T ...] [--limit N]

(``--broker`` and ``--machine`` before the subcommand work too, as
``python -m hil.backend --broker HOST:PORT --machine M --state DIR`` = ``serve``.)

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
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hil.backend.service import serve
from hil.backend.store import BackendStore

Handler = Callable[[argparse.Namespace], int]

#: Modules that add subcommands (each has ``add_arguments``), in help order.
PROVIDERS = ["hil.backend.__main__", "hil.backend.commands"]


def _state_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state", "--state-dir", dest="state_dir", type=Path, required=True)
    parser.add_argument("--machine", default=None, help="one machine (default: every machine)")


def add_arguments(subparsers: Any) -> dict[str, Handler]:
    """This module's own subcommands: serve and the read-only reports."""
    run = subparsers.add_parser("serve", help="run the backend against a broker")
    run.add_argument("--broker", default=None, help="HOST:PORT (default 127.0.0.1:1883)")
    run.add_argument("--prefix", default="vmc")
    _state_args(run)
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
    host, _, port = (args.broker or "127.0.0.1:1883").rpartition(":")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.state_dir, host or "127.0.0.1", int(port), args.prefix))
    return 0


def _machines(store: BackendStore, only: str | None) -> list[str]:
    return [only] if only else store.machines()


def cmd_status(args: argparse.Namespace) -> int:
    store = BackendStore(args.state_dir)
    for machine in _machines(store, args.machine):
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
    store = BackendStore(args.state_dir)
    for machine in _machines(store, args.machine):
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
    store = BackendStore(args.state_dir)
    for machine in _machines(store, args.machine):
        telemetry = store.latest(machine, "telemetry") or {}
        print(json.dumps({"machine": machine, "slots": telemetry.get("slots") or []}))
    return 0


def cmd_records(args: argparse.Namespace) -> int:
    store = BackendStore(args.state_dir)
    for record in store.records(args.machine, types=args.types, limit=args.limit):
        print(json.dumps(record))
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Handler]]:
    parser = argparse.ArgumentParser(prog="python -m hil.backend", description=__doc__)
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
    if argv and argv[0].startswith("--") and argv[0] != "--help":  # the short form: serve
        argv.insert(0, "serve")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
