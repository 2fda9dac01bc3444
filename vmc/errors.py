"""Exception root for the machine side (``vmc``).

``drivers`` has its own root (``drivers.errors.DriverError``); ``vmc`` code raises subclasses of
``VmcError`` so the daemon and CLI can tell a machine-level failure from a programming error.
"""

from __future__ import annotations

from pathlib import Path


class VmcError(Exception):
    """Root of every vmc error."""


class ConfigError(VmcError):
    """A configuration value that is missing, of the wrong type, out of range or not allowed.

    ``key`` is the dotted path of the offending value (``mdb.coin.poll_interval_ms``,
    ``slot[3].price``); ``expected`` says what would have been accepted; ``found`` describes what
    was there instead.
    """

    def __init__(self, key: str, expected: str, found: str) -> None:
        super().__init__(f"{key}: expected {expected}, found {found}")
        self.key = key
        self.expected = expected
        self.found = found


class ConfigFileError(ConfigError):
    """A configuration file that cannot be read, is not UTF-8 or is not valid TOML.

    ``key`` is the file's path, so the message reads like any other configuration error.
    """

    def __init__(self, path: Path, expected: str, found: str) -> None:
        super().__init__(str(path), expected, found)
        self.path = path
