"""``vmc console --config FILE`` (the console in a terminal) and ``vmc console hash-pin`` (the
value for ``console.pin_hash``)."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path
from typing import Any

from vmc.config import load_config
from vmc.console.auth import PinError, hash_pin
from vmc.errors import ConfigError

EXIT_OK = 0
EXIT_USAGE = 2


def _read_pin() -> str:
    if sys.stdin.isatty():
        pin = getpass.getpass("new PIN: ")
        if getpass.getpass("again: ") != pin:
            raise PinError("the two PINs differ")
        return pin
    return sys.stdin.readline().strip()  # a script pipes the PIN in


def _cmd_console(args: argparse.Namespace) -> int:
    if args.action == "hash-pin":
        try:
            print(hash_pin(_read_pin()))
        except PinError as exc:
            print(f"vmc console hash-pin: {exc}", file=sys.stderr)
            return EXIT_USAGE
        return EXIT_OK
    if args.config is None:
        print("vmc console: --config FILE is required", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return EXIT_USAGE
    from vmc.console.terminal import main

    return main(config)


def add_console_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser(
        "console",
        help="the technician console in this terminal",
        description=(
            "The technician console in this terminal, talking to the running daemon's control "
            "socket (PIN asked). 'vmc console hash-pin' reads a PIN and prints the value for "
            "console.pin_hash."
        ),
    )
    parser.add_argument("action", nargs="?", choices=["hash-pin"], help="print a PIN's hash")
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML file")
    parser.set_defaults(handler=_cmd_console)
