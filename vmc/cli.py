"""The ``vmc`` command: ``vmc run``, ``vmc check-config``, ``vmc journal ...``, ``vmc --version``.

Exit codes: 0 success, 2 bad configuration or usage (argparse uses 2 too), otherwise whatever
the daemon returns.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from vmc.config import LOG_FORMATS, LOG_LEVEL_NUMBERS, LOG_LEVELS, Config, load_config
from vmc.errors import ConfigError

__all__ = ["EXIT_CONFIG", "EXIT_INTERRUPTED", "EXIT_OK", "build_parser", "main"]

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention

# Optional command groups: module name and the function that adds its sub-commands.
_PLUGINS = (
    ("vmc.journal.cli", "add_journal_commands"),
    ("vmc.console.cli", "add_console_commands"),
    ("vmc.dex.cli", "add_dex_commands"),
)


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vmc")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


class _VersionAction(argparse.Action):
    """``--version``: the package's version, looked up only when asked for. Reading package
    metadata scans every folder on the path: tens of ms of every daemon start otherwise
    (bench/footprint.py)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        print(f"vmc {_package_version()}")
        parser.exit()


def _report_config_error(error: ConfigError) -> int:
    print(f"config error: {error}", file=sys.stderr)
    return EXIT_CONFIG


def _cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as error:
        return _report_config_error(error)
    print(json.dumps(config.redacted(), indent=2, ensure_ascii=False))
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as error:
        return _report_config_error(error)
    level = args.log_level or config.log.level
    # First of all, before this process imports anything heavy (asyncio, structlog, the daemon).
    _prespawn_line(config, LOG_LEVEL_NUMBERS[level])
    import asyncio

    # Deferred import: keep check-config free of logging set-up and of the daemon.
    from vmc.log import configure_logging

    configure_logging(level, args.log_format or config.log.format)
    # The daemon module is imported by name so this file type-checks on its own; its contract
    # is ``async def run(config: Config) -> int``.
    daemon = importlib.import_module("vmc.daemon")
    run_daemon: Callable[[Config], Coroutine[Any, Any, int]] = daemon.run
    try:
        return asyncio.run(run_daemon(config))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _prespawn_line(config: Config, log_level: int) -> None:
    """Start the MDB line process before the daemon's imports, so the two overlap (issue 9
    footprint: start to first POLL); the daemon's line master takes it over. Only for a real
    port: a simulated machine's port exists only once the daemon has started its simulator."""
    from drivers.mdb.line_spawn import (
        DEVICE_ADDRESSES,
        POLL_COMMANDS,
        TRACE_LEVEL,
        EarlyDevice,
        LineSettings,
        prespawn,
    )

    mdb = config.mdb
    devices = {"coin": mdb.coin, "bill": mdb.bill, "cashless": mdb.cashless}
    if mdb.simulate or not mdb.port or not any(dev.enabled for dev in devices.values()):
        return
    # The line process also starts the devices up as far as their JUST RESET meanwhile.
    early = tuple(
        EarlyDevice(DEVICE_ADDRESSES[name], POLL_COMMANDS[name], dev.poll_interval_ms / 1000.0)
        for name, dev in devices.items()
        if dev.enabled
    )
    prespawn(
        LineSettings(
            kind=mdb.link,
            port=mdb.port,
            slack_s=mdb.timing_slack_ms / 1000.0,
            # As the line master will ask: what configure_logging sets (drivers.mdb inherits).
            log_level=TRACE_LEVEL if mdb.trace else log_level,
            pcap=str(mdb.pcap or ""),
            realtime_priority=mdb.realtime_priority,
        ),
        early,
    )


def _add_plugins(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for module_name, function_name in _PLUGINS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            # Only a missing plugin module is tolerated; a broken one must be seen.
            parts = module_name.split(".")
            if error.name not in {".".join(parts[:n]) for n in range(2, len(parts) + 1)}:
                raise
            continue
        add_commands: Callable[[argparse._SubParsersAction[Any]], None] = getattr(
            module, function_name
        )
        add_commands(subparsers)


def build_parser(*, plugins: bool = True) -> argparse.ArgumentParser:
    """The argument parser of the ``vmc`` command, with every available sub-command (without
    the plugins' when ``plugins`` is false)."""
    parser = argparse.ArgumentParser(
        prog="vmc", description="Controller daemon for smart vending machines."
    )
    parser.add_argument("--version", action=_VersionAction, help="show the version and exit")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = subparsers.add_parser("run", help="run the daemon", description="Run the daemon.")
    run.add_argument("--config", required=True, type=Path, metavar="FILE", help="TOML file")
    run.add_argument("--log-level", choices=LOG_LEVELS, help="override log.level")
    run.add_argument("--log-format", choices=LOG_FORMATS, help="override log.format")
    run.set_defaults(handler=_cmd_run)

    check = subparsers.add_parser(
        "check-config",
        help="validate a configuration file",
        description=(
            "Validate a configuration file and print the effective configuration as JSON, "
            "secrets redacted. Exits 2 on the first problem, naming the key."
        ),
    )
    check.add_argument("file", type=Path, metavar="FILE", help="TOML file")
    check.set_defaults(handler=_cmd_check_config)

    if plugins:
        _add_plugins(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``vmc`` command line; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # ``vmc run`` needs none of the plugins' commands, and importing them (the journal's
    # reports, the DEX service, ...) would delay its MDB line process (_prespawn_line).
    parser = build_parser(plugins=argv[:1] != ["run"])
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)
