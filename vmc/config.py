"""The daemon's configuration: one strict TOML file, read once at start.

Every section is a frozen dataclass. Each field declares, in one line, its type, its default and
the checker that validates and converts the raw TOML value; a generic reader walks those
declarations, so adding a key means adding one line to a dataclass. The reader refuses unknown
keys at every level and reports the first problem as a :class:`~vmc.errors.ConfigError` naming
the dotted key (``mdb.coin.poll_interval_ms``, ``slot[3].price``), what was expected and what
was found. Checks that involve more than one field live in each section's ``_finish`` hook.

Relative paths are resolved against the directory holding the configuration file.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import difflib
import json
import os
import re
import string
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from vmc.errors import ConfigError, ConfigFileError

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "LOG_LEVEL_NUMBERS",
    "QR_TEMPLATE_FIELDS",
    "CloudConfig",
    "Config",
    "ConfigError",
    "ConfigFileError",
    "ControlConfig",
    "JournalConfig",
    "LogConfig",
    "MachineConfig",
    "MdbConfig",
    "MdbDeviceConfig",
    "MotorConfig",
    "SlotConfig",
    "VendConfig",
    "describe",
    "load_config",
    "parse_config",
]

LOG_LEVELS = ("trace", "debug", "info", "warning", "error")
#: Their numbers in ``logging`` (trace: below DEBUG, every byte on the MDB line).
LOG_LEVEL_NUMBERS: Mapping[str, int] = {
    "trace": 5,
    "debug": 10,
    "info": 20,
    "warning": 30,
    "error": 40,
}
LOG_FORMATS = ("auto", "json", "journal", "console")
MDB_LINKS = ("uart", "stream")
MOTOR_DRIVERS = ("vmc96",)
# The placeholders a QR order URL may use; the cloud link fills them per order.
QR_TEMPLATE_FIELDS = ("machine", "order_id", "amount", "currency", "slot")
# A static QR code is printed on the machine, so only the machine is known when it is made.
STATIC_QR_TEMPLATE_FIELDS = ("machine",)
DEFAULT_STATE_DIR = "/var/lib/vmc"
CONTROL_SOCKET_NAME = "control.sock"
# sockaddr_un.sun_path is 108 bytes on Linux, one of them the terminating NUL (unix(7)).
UNIX_SOCKET_PATH_MAX_BYTES = 107
ED25519_PUBLIC_KEY_BYTES = 32  # RFC 8032 §5.1.5: an Ed25519 public key is 32 octets

# ISO 4217 numeric codes of currencies a vending machine is likely to take. A known alpha code
# with a different numeric code is refused, because the default numeric code (978, EUR) would
# otherwise silently follow a changed alpha code. Unknown alpha codes are accepted as written.
KNOWN_CURRENCY_NUMBERS: Mapping[str, int] = {
    "AUD": 36,
    "BRL": 986,
    "CAD": 124,
    "CHF": 756,
    "CNY": 156,
    "CZK": 203,
    "DKK": 208,
    "EUR": 978,
    "GBP": 826,
    "HUF": 348,
    "INR": 356,
    "JPY": 392,
    "KRW": 410,
    "MXN": 484,
    "NOK": 578,
    "NZD": 554,
    "PLN": 985,
    "RON": 946,
    "SEK": 752,
    "SGD": 702,
    "TRY": 949,
    "UAH": 980,
    "USD": 840,
    "ZAR": 710,
}

_FOUND_TEXT_MAX = 60  # characters of a found string quoted in an error message


# --------------------------------------------------------------------------------------------
# Describing what was found
# --------------------------------------------------------------------------------------------


def describe(value: object) -> str:
    """Say what a raw configuration value is, in TOML terms, for an error message."""
    if isinstance(value, bool):
        return f"{'true' if value else 'false'} (boolean)"
    if isinstance(value, int):
        try:
            return f"{value} (integer)"
        except ValueError:  # beyond sys.get_int_max_str_digits()
            return f"an integer of {value.bit_length()} bits"
    if isinstance(value, float):
        return f"{value!r} (float)"
    if isinstance(value, str):
        text = value if len(value) <= _FOUND_TEXT_MAX else value[:_FOUND_TEXT_MAX] + "..."
        return f"{json.dumps(text, ensure_ascii=False)} (string)"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return f"an array of {len(value)} item{'s' if len(value) != 1 else ''}"
    if isinstance(value, dt.datetime):
        return f"{value.isoformat()} (datetime)"
    if isinstance(value, dt.date):
        return f"{value.isoformat()} (date)"
    if isinstance(value, dt.time):
        return f"{value.isoformat()} (time)"
    try:
        text = repr(value)
    except Exception:  # a foreign object's broken __repr__ must not hide the config error
        text = "?"
    if len(text) > _FOUND_TEXT_MAX:
        text = text[:_FOUND_TEXT_MAX] + "..."
    return f"{text} ({type(value).__name__})"


NOTHING = "nothing (the key is missing)"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# --------------------------------------------------------------------------------------------
# Field checkers: each validates one raw TOML value and converts it to its Python form
# --------------------------------------------------------------------------------------------


class _NotGiven:
    """Marker for a checker that has no stand-in value for an absent key."""


_NOT_GIVEN = _NotGiven()


@dataclass
class _Context:
    """What checkers need beyond the value: where the file lives and where state goes."""

    base_dir: Path
    state_dir: Path = Path(DEFAULT_STATE_DIR)


class _Check:
    """Base of the field checkers.

    ``expected`` is the human description used in error messages. ``when_absent`` is a raw
    value to check in place of a missing key (for values derived from other sections, such as
    the control socket under the state directory); when it is not given, a missing key takes
    the dataclass default, or is an error when there is none.
    """

    expected: str = "a value"
    when_absent: object = _NOT_GIVEN

    def convert(self, key: str, value: object, ctx: _Context) -> Any:
        raise NotImplementedError

    def reject(self, key: str, value: object) -> ConfigError:
        return ConfigError(key, self.expected, describe(value))


class _Integer(_Check):
    def __init__(self, low: int, high: int) -> None:
        self.low = low
        self.high = high
        self.expected = f"an integer from {low} to {high}"

    def convert(self, key: str, value: object, ctx: _Context) -> int:
        # bool is an int subclass in Python; TOML keeps them apart and so do we.
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.reject(key, value)
        if not self.low <= value <= self.high:
            raise self.reject(key, value)
        return value


class _Number(_Check):
    def __init__(self, low: float, high: float) -> None:
        self.low = low
        self.high = high
        self.expected = f"a number from {low:g} to {high:g}"

    def convert(self, key: str, value: object, ctx: _Context) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.reject(key, value)
        # Compare before converting: a huge integer does not fit a float; NaN fails both tests.
        if not self.low <= value <= self.high:
            raise self.reject(key, value)
        return float(value)


class _Boolean(_Check):
    expected = "true or false"

    def convert(self, key: str, value: object, ctx: _Context) -> bool:
        if not isinstance(value, bool):
            raise self.reject(key, value)
        return value


class _Choice(_Check):
    def __init__(self, options: tuple[str, ...]) -> None:
        self.options = options
        self.expected = "one of " + ", ".join(json.dumps(option) for option in options)

    def convert(self, key: str, value: object, ctx: _Context) -> str:
        if not isinstance(value, str) or value not in self.options:
            raise self.reject(key, value)
        return value


class _Pattern(_Check):
    def __init__(self, pattern: str, expected: str) -> None:
        self.pattern = re.compile(pattern)
        self.expected = expected

    def convert(self, key: str, value: object, ctx: _Context) -> str:
        if not isinstance(value, str) or self.pattern.fullmatch(value) is None:
            raise self.reject(key, value)
        return value


class _Text(_Check):
    """Free text up to a length; ``printable`` refuses control characters (display text)."""

    def __init__(self, max_chars: int, *, printable: bool = True) -> None:
        self.max_chars = max_chars
        self.printable = printable
        kind = "printable " if printable else ""
        self.expected = f"a {kind}string of at most {max_chars} characters"

    def convert(self, key: str, value: object, ctx: _Context) -> str:
        if not isinstance(value, str) or len(value) > self.max_chars or "\x00" in value:
            raise self.reject(key, value)
        if self.printable and not value.isprintable():
            raise self.reject(key, value)
        return value


def _resolve(ctx: _Context, text: str) -> Path:
    # Lexical normalisation only: the file may name a directory that does not exist yet.
    return Path(os.path.normpath(ctx.base_dir / text))


def _is_path_text(value: object) -> bool:
    if not isinstance(value, str) or "\x00" in value or len(value) > 4096:
        return False
    try:
        os.fsencode(value)
    except UnicodeEncodeError:  # a lone surrogate cannot become a file name
        return False
    return True


class _FilePath(_Check):
    """A filesystem path; with ``optional``, ``""`` means none and becomes ``None``."""

    def __init__(self, *, optional: bool) -> None:
        self.optional = optional
        self.expected = 'a file path, or "" for none' if optional else "a non-empty file path"

    def convert(self, key: str, value: object, ctx: _Context) -> Path | None:
        if not isinstance(value, str) or not _is_path_text(value):
            raise self.reject(key, value)
        if value == "":
            if self.optional:
                return None
            raise self.reject(key, value)
        return _resolve(ctx, value)


class _StateDir(_Check):
    """The state directory; later checkers place the control socket under it."""

    expected = "a non-empty directory path"
    when_absent = DEFAULT_STATE_DIR

    def convert(self, key: str, value: object, ctx: _Context) -> Path:
        if not isinstance(value, str) or not _is_path_text(value) or value == "":
            raise self.reject(key, value)
        ctx.state_dir = _resolve(ctx, value)
        return ctx.state_dir


class _ControlSocket(_Check):
    expected = (
        f'a unix socket path of at most {UNIX_SOCKET_PATH_MAX_BYTES} bytes, or "" for '
        f"<state_dir>/{CONTROL_SOCKET_NAME}"
    )
    when_absent = ""

    def convert(self, key: str, value: object, ctx: _Context) -> Path:
        if not isinstance(value, str) or not _is_path_text(value):
            raise self.reject(key, value)
        path = ctx.state_dir / CONTROL_SOCKET_NAME if value == "" else _resolve(ctx, value)
        if len(os.fsencode(path)) > UNIX_SOCKET_PATH_MAX_BYTES:
            raise ConfigError(key, self.expected, f"{describe(str(path))}, too long")
        return path


_SOCKET_URL = re.compile(
    r"socket://(?P<host>[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>[0-9]{1,5})"
)


class _SerialPort(_Check):
    """A serial device path or ``socket://host:port``; ``""`` means not given (``None``)."""

    expected = 'a serial device path or socket://host:port, or "" when simulated'

    def convert(self, key: str, value: object, ctx: _Context) -> str | None:
        if not isinstance(value, str) or not _is_path_text(value):
            raise self.reject(key, value)
        if value == "":
            return None
        if "://" in value:
            match = _SOCKET_URL.fullmatch(value)
            if match is None or not 1 <= int(match["port"]) <= 65535:
                raise self.reject(key, value)
            return value
        return str(_resolve(ctx, value))


class _Base64Key(_Check):
    expected = (
        f'a base64 Ed25519 public key ({ED25519_PUBLIC_KEY_BYTES} bytes decoded), or "" for none'
    )

    def convert(self, key: str, value: object, ctx: _Context) -> str:
        if not isinstance(value, str):
            raise self.reject(key, value)
        if value == "":
            return value
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise self.reject(key, value) from None
        if len(raw) != ED25519_PUBLIC_KEY_BYTES:
            raise ConfigError(key, self.expected, f"{describe(value)}, {len(raw)} bytes decoded")
        return value


class _Template(_Check):
    """A ``str.format`` template that may use only the named placeholders, each plain.

    Format specs and conversions are refused: a spec such as ``{amount:999999999}`` would make
    filling the template allocate without bound, and nothing needs them.
    """

    def __init__(self, allowed: tuple[str, ...]) -> None:
        self.allowed = allowed
        names = ", ".join("{" + name + "}" for name in allowed)
        self.expected = f"a non-empty template using only the plain placeholders {names}"

    def convert(self, key: str, value: object, ctx: _Context) -> str:
        if not isinstance(value, str) or value == "" or len(value) > 2000:
            raise self.reject(key, value)
        try:
            parsed = list(string.Formatter().parse(value))
        except ValueError as exc:
            raise ConfigError(key, self.expected, f"{describe(value)} ({exc})") from None
        for _literal, name, spec, conversion in parsed:
            if name is None:
                continue
            if name not in self.allowed:
                shown = "{" + name + "}" if name else "a positional {}"
                raise ConfigError(key, self.expected, f"{describe(value)} using {shown}")
            if spec or conversion:
                suffix = (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
                shown = "{" + name + suffix + "}"
                raise ConfigError(key, self.expected, f"{describe(value)} using {shown}")
        return value


_S = TypeVar("_S", bound="_Section")


class _Table(_Check):
    """A nested TOML table read into the section dataclass ``cls``.

    ``defaults`` overrides the dataclass defaults for this one place (the three MDB devices
    share one class but not their defaults); ``when_absent`` is the table to read when the
    key is missing (``{}`` means every key takes its default).
    """

    def __init__(
        self,
        cls: type[_Section],
        *,
        when_absent: Mapping[str, object] | _NotGiven = _NOT_GIVEN,
        defaults: Mapping[str, object] | None = None,
    ) -> None:
        self.cls = cls
        self.when_absent = dict(when_absent) if isinstance(when_absent, Mapping) else when_absent
        self.defaults = dict(defaults or {})
        self.expected = f"a table of {cls.DESCRIPTION}"

    def convert(self, key: str, value: object, ctx: _Context) -> _Section:
        return _read_table(self.cls, key, value, ctx, self.defaults, self.expected)


class _TableArray(_Check):
    """An array of tables (``[[slot]]``); element ``i`` is named ``key[i]`` in errors."""

    when_absent: object = ()

    def __init__(self, cls: type[_Section]) -> None:
        self.cls = cls
        self.expected = f"an array of tables of {cls.DESCRIPTION}"

    def convert(self, key: str, value: object, ctx: _Context) -> tuple[_Section, ...]:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(key, f"{self.expected} ([[{key}]])", describe(value))
        item_expected = f"a table of {self.cls.DESCRIPTION}"
        return tuple(
            _read_table(self.cls, f"{key}[{index}]", item, ctx, {}, item_expected)
            for index, item in enumerate(value)
        )


def _spec(check: _Check, *, key: str | None = None, secret: bool = False) -> dict[str, Any]:
    """Field metadata: the checker, the TOML key when it differs, and whether it is secret."""
    return {"check": check, "key": key, "secret": secret}


# --------------------------------------------------------------------------------------------
# The generic reader
# --------------------------------------------------------------------------------------------


class _Section:
    """Base of the section dataclasses: a description and an optional cross-field check."""

    DESCRIPTION: ClassVar[str] = "settings"

    def _finish(self, key: str) -> None:
        """Check rules that involve several fields; ``key`` is this table's dotted name."""


def _toml_key(f: dataclasses.Field[Any]) -> str:
    name = f.metadata.get("key")
    return name if isinstance(name, str) else f.name


def _read_table(
    cls: type[_S],
    key: str,
    value: object,
    ctx: _Context,
    defaults: Mapping[str, object],
    expected: str,
) -> _S:
    if not isinstance(value, Mapping):
        raise ConfigError(key or "(top level)", expected, describe(value))
    specs = {_toml_key(f): f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for name in value:
        if not isinstance(name, str):
            raise ConfigError(key or "(top level)", "only string keys", describe(name))
        if name not in specs:
            raise _unknown_key(_join(key, name), key, name, tuple(specs))
    merged = {**defaults, **value}
    values: dict[str, Any] = {}
    for name, f in specs.items():
        check = f.metadata["check"]
        assert isinstance(check, _Check)
        dotted = _join(key, name)
        if name in merged:
            values[f.name] = check.convert(dotted, merged[name], ctx)
        elif not isinstance(check.when_absent, _NotGiven):
            values[f.name] = check.convert(dotted, check.when_absent, ctx)
        elif f.default is not dataclasses.MISSING:
            values[f.name] = f.default
        else:
            raise ConfigError(dotted, check.expected, NOTHING)
    section = cls(**values)
    section._finish(key)
    return section


def _unknown_key(dotted: str, table: str, name: str, known: tuple[str, ...]) -> ConfigError:
    where = f"[{table}]" if table else "the top level"
    expected = f"a key known in {where}: {', '.join(known)}"
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        expected += f" (did you mean {close[0]}?)"
    return ConfigError(dotted, expected, "an unknown key")


# --------------------------------------------------------------------------------------------
# The sections
# --------------------------------------------------------------------------------------------

_CHECK_POLL_INTERVAL = _Integer(20, 1000)
#: ``mdb.idle_poll_interval_ms`` unless configured: the slow end of the cadence real VMCs
#: POLL at (mdb.md "Timing": every 100-200 ms per device).
DEFAULT_IDLE_POLL_INTERVAL_MS = 200
#: SCHED_FIFO priority of the MDB line process unless configured (``mdb.realtime_priority``).
DEFAULT_REALTIME_PRIORITY = 10


@dataclass(frozen=True, kw_only=True)
class MachineConfig(_Section):
    """``[machine]``: identity, currency and where the journal and control socket live."""

    DESCRIPTION: ClassVar[str] = "machine settings"

    # The id becomes an MQTT topic level, so no '/', '+', '#' or spaces.
    id: str = field(
        metadata=_spec(
            _Pattern(r"[A-Za-z0-9_-]{1,64}", "an id of 1 to 64 letters, digits, '_' or '-'")
        )
    )
    currency: str = field(
        default="EUR",
        metadata=_spec(_Pattern(r"[A-Z]{3}", "an ISO 4217 code of 3 upper-case letters")),
    )
    currency_numeric: int = field(default=978, metadata=_spec(_Integer(1, 999)))
    decimal_places: int = field(default=2, metadata=_spec(_Integer(0, 4)))
    state_dir: Path = field(metadata=_spec(_StateDir()))

    def _finish(self, key: str) -> None:
        known = KNOWN_CURRENCY_NUMBERS.get(self.currency)
        if known is not None and known != self.currency_numeric:
            raise ConfigError(
                _join(key, "currency_numeric"),
                f"{known} (the ISO 4217 number of {self.currency})",
                describe(self.currency_numeric),
            )


@dataclass(frozen=True, kw_only=True)
class LogConfig(_Section):
    """``[log]``: level (``trace`` is below ``debug``) and output format."""

    DESCRIPTION: ClassVar[str] = "log settings"

    level: str = field(default="info", metadata=_spec(_Choice(LOG_LEVELS)))
    # auto: JSON lines with syslog level prefixes when stdout is journald ("journal"), a
    # readable console format on a terminal, JSON lines otherwise (docs/logging.md).
    format: str = field(default="auto", metadata=_spec(_Choice(LOG_FORMATS)))


@dataclass(frozen=True, kw_only=True)
class MdbDeviceConfig(_Section):
    """``[mdb.coin]``, ``[mdb.bill]``, ``[mdb.cashless]``: whether to use a device, how often
    to poll it."""

    DESCRIPTION: ClassVar[str] = "MDB device settings"

    enabled: bool = field(default=True, metadata=_spec(_Boolean()))
    poll_interval_ms: int = field(default=100, metadata=_spec(_CHECK_POLL_INTERVAL))


@dataclass(frozen=True, kw_only=True)
class MdbConfig(_Section):
    """``[mdb]``: the MDB link (how the 9th bit travels, which port) and its devices."""

    DESCRIPTION: ClassVar[str] = "MDB settings"

    link: str = field(default="stream", metadata=_spec(_Choice(MDB_LINKS)))
    port: str | None = field(default=None, metadata=_spec(_SerialPort()))
    simulate: bool = field(default=False, metadata=_spec(_Boolean()))
    sim_timing: bool = field(default=False, metadata=_spec(_Boolean()))
    pcap: Path | None = field(default=None, metadata=_spec(_FilePath(optional=True)))
    trace: bool = field(default=False, metadata=_spec(_Boolean()))
    timing_slack_ms: float = field(default=2.0, metadata=_spec(_Number(0, 50)))
    # SCHED_FIFO priority of the MDB line process (0: the normal scheduler). The benchmark met
    # its ACK-turnaround targets on a loaded machine only with it; needs LimitRTPRIO (or
    # CAP_SYS_NICE), which systemd/vmc.service grants, and is skipped with a log line without.
    realtime_priority: int = field(
        default=DEFAULT_REALTIME_PRIORITY, metadata=_spec(_Integer(0, 99))
    )
    # While nobody is at the machine (no credit, no vend, no payment session), the devices'
    # idle POLLs go at this interval where it is longer than their own (0: at their own). The
    # first coin's credit then shows up to this much later; real VMCs POLL every 100-200 ms
    # (mdb.md "Timing"). An idle line's CPU share is mostly its POLLs' wake-ups
    # (docs/footprint.md).
    idle_poll_interval_ms: int = field(
        default=DEFAULT_IDLE_POLL_INTERVAL_MS, metadata=_spec(_Integer(0, 1000))
    )
    # An absent device table means the device is not used.
    coin: MdbDeviceConfig = field(
        metadata=_spec(_Table(MdbDeviceConfig, when_absent={"enabled": False}))
    )
    bill: MdbDeviceConfig = field(
        metadata=_spec(
            _Table(
                MdbDeviceConfig,
                when_absent={"enabled": False},
                defaults={"poll_interval_ms": 150},
            )
        )
    )
    cashless: MdbDeviceConfig = field(
        metadata=_spec(
            _Table(MdbDeviceConfig, when_absent={"enabled": False}, defaults={"enabled": False})
        )
    )

    def _finish(self, key: str) -> None:
        if self.simulate:
            # The simulators speak the PARMRK byte stream over a pty; the daemon never guesses.
            if self.link != "stream":
                raise ConfigError(
                    _join(key, "link"),
                    f'"stream" when {_join(key, "simulate")} = true',
                    describe(self.link),
                )
            return
        _require_port(key, self.port, "a serial device path or socket://host:port")
        if self.link == "uart" and self.port is not None and "://" in self.port:
            raise ConfigError(
                _join(key, "port"),
                'a serial device path when link = "uart" (socket:// needs link = "stream")',
                describe(self.port),
            )


def _require_port(key: str, port: str | None, what: str) -> None:
    if port is None:
        raise ConfigError(
            _join(key, "port"), f"{what} (required unless {_join(key, 'simulate')} = true)", NOTHING
        )


@dataclass(frozen=True, kw_only=True)
class MotorConfig(_Section):
    """``[motor]``: the motor board driver, its port and the vend timeouts."""

    DESCRIPTION: ClassVar[str] = "motor settings"

    driver: str = field(default="vmc96", metadata=_spec(_Choice(MOTOR_DRIVERS)))
    port: str | None = field(default=None, metadata=_spec(_SerialPort()))
    simulate: bool = field(default=False, metadata=_spec(_Boolean()))
    turn_timeout_s: float = field(default=5.0, metadata=_spec(_Number(0.5, 30)))
    drop_timeout_s: float = field(default=2.0, metadata=_spec(_Number(0.2, 10)))

    def _finish(self, key: str) -> None:
        if not self.simulate:
            _require_port(key, self.port, "a serial device path")


@dataclass(frozen=True, kw_only=True)
class VendConfig(_Section):
    """``[vend]``: credit limits and how long money and bills are held."""

    DESCRIPTION: ClassVar[str] = "vend settings"

    max_credit: int = field(default=2000, metadata=_spec(_Integer(1, 1_000_000)))
    # 0 = never time out; what happens at the timeout is the vend cycle's policy.
    credit_timeout_s: int = field(default=180, metadata=_spec(_Integer(0, 3600)))
    accept_bills: bool = field(default=True, metadata=_spec(_Boolean()))
    escrow_hold_s: int = field(default=30, metadata=_spec(_Integer(1, 300)))


@dataclass(frozen=True, kw_only=True)
class ControlConfig(_Section):
    """``[control]``: the local control socket (defaults to ``<state_dir>/control.sock``)."""

    DESCRIPTION: ClassVar[str] = "control settings"

    socket: Path = field(metadata=_spec(_ControlSocket()))


@dataclass(frozen=True, kw_only=True)
class JournalConfig(_Section):
    """``[journal]``: how long acknowledged records are kept and the free-space reserve."""

    DESCRIPTION: ClassVar[str] = "journal settings"

    retention_days: int = field(default=90, metadata=_spec(_Integer(1, 3650)))
    # Below this much free space the machine stops taking money, before a sale could go
    # unrecorded.
    min_free_mb: int = field(default=20, metadata=_spec(_Integer(1, 10000)))

    @property
    def min_free_bytes(self) -> int:
        """The free-space reserve in bytes (1 MB = 2**20 bytes)."""
        return self.min_free_mb * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class CloudConfig(_Section):
    """``[cloud]``: the MQTT link to the backend. An absent table means no cloud link."""

    DESCRIPTION: ClassVar[str] = "cloud settings"

    enabled: bool = field(default=False, metadata=_spec(_Boolean()))
    host: str = field(
        default="127.0.0.1",
        metadata=_spec(_Pattern(r"[A-Za-z0-9._:-]{1,253}", "a host name or IP address")),
    )
    port: int = field(default=1883, metadata=_spec(_Integer(1, 65535)))
    tls: bool = field(default=False, metadata=_spec(_Boolean()))
    ca_file: Path | None = field(default=None, metadata=_spec(_FilePath(optional=True)))
    cert_file: Path | None = field(default=None, metadata=_spec(_FilePath(optional=True)))
    key_file: Path | None = field(default=None, metadata=_spec(_FilePath(optional=True)))
    username: str = field(default="", metadata=_spec(_Text(256)))
    password: str = field(default="", metadata=_spec(_Text(1024, printable=False), secret=True))
    topic_prefix: str = field(
        default="vmc",
        metadata=_spec(
            _Pattern(
                r"[A-Za-z0-9_-]{1,64}(/[A-Za-z0-9_-]{1,64}){0,3}",
                "1 to 4 MQTT topic levels of letters, digits, '_' or '-' joined by '/'",
            )
        ),
    )
    command_public_key: str = field(default="", metadata=_spec(_Base64Key()))
    qr_url_template: str = field(
        default=(
            "https://pay.example.com/{machine}/{order_id}"
            "?amount={amount}&currency={currency}&slot={slot}"
        ),
        metadata=_spec(_Template(QR_TEMPLATE_FIELDS)),
    )
    static_qr_template: str = field(
        default="https://shop.example.com/{machine}",
        metadata=_spec(_Template(STATIC_QR_TEMPLATE_FIELDS)),
    )
    order_ttl_s: int = field(default=90, metadata=_spec(_Integer(10, 900)))
    command_skew_s: int = field(default=60, metadata=_spec(_Integer(0, 600)))
    # The link itself (vmc/cloud/link.py, docs/cloud.md). MQTT keepalive: a PINGREQ after this
    # long without traffic; 240 s stays below the usual 5-minute NAT timeout of mobile carriers
    # while keeping an idle machine's bytes on a metered SIM low.
    keepalive_s: int = field(default=240, metadata=_spec(_Integer(2, 1200)))
    # TCP connect, TLS handshake and CONNACK together; a 4G link can take seconds.
    connect_timeout_s: float = field(default=15.0, metadata=_spec(_Number(1, 120)))
    # Reconnect waits grow from 1 s, doubling with jitter, up to this cap.
    reconnect_max_s: float = field(default=300.0, metadata=_spec(_Number(0.1, 3600)))
    # How long the broker keeps the session (subscriptions, queued commands) while offline.
    session_expiry_s: int = field(default=7 * 86400, metadata=_spec(_Integer(0, 30 * 86400)))
    # Telemetry heartbeat (contract: at least every 15 minutes).
    heartbeat_s: int = field(default=900, metadata=_spec(_Integer(1, 900)))
    # Journal batches published but not yet acknowledged by the backend, at most. 8 cover the
    # backend's store-and-ack round trip (bench/sync.py: 4 drained at 1.8-2.1x the
    # one-per-message baseline, 8 at 3.0-3.2x); at most 512 KiB outstanding.
    max_in_flight: int = field(default=8, metadata=_spec(_Integer(1, 64)))
    # Records per journal batch (contract: 1 to 500).
    batch_records: int = field(default=500, metadata=_spec(_Integer(1, 500)))
    # No journal/ack for this long while batches are out: resend from the first unacked seq.
    ack_timeout_s: float = field(default=60.0, metadata=_spec(_Number(1, 3600)))

    def _finish(self, key: str) -> None:
        if not self.tls:
            return
        for name in ("ca_file", "cert_file", "key_file"):
            if getattr(self, name) is None:
                raise ConfigError(
                    _join(key, name),
                    f"a file path (required when {_join(key, 'tls')} = true)",
                    'nothing ("" or a missing key)',
                )

    @property
    def command_public_key_bytes(self) -> bytes | None:
        """The decoded Ed25519 public key that signs commands, or None when not configured."""
        if not self.command_public_key:
            return None
        return base64.b64decode(self.command_public_key, validate=True)


@dataclass(frozen=True, kw_only=True)
class ConsoleConfig(_Section):
    """``[console]``: the technician console (docs/console.md). ``port`` absent or ``""``: no
    serial console (``vmc console`` in a terminal still works with ``pin_hash``)."""

    DESCRIPTION: ClassVar[str] = "console settings"

    port: str | None = field(default=None, metadata=_spec(_SerialPort()))
    baud: int = field(default=115200, metadata=_spec(_Integer(1200, 4_000_000)))
    # ``vmc console hash-pin`` prints it; "" = nobody can log in.
    pin_hash: str = field(
        default="",
        metadata=_spec(
            _Pattern(
                r"(scrypt:[0-9]{1,7}:[0-9]{1,2}:[0-9]{1,2}:[0-9a-f]{32}:[0-9a-f]{64})?",
                'the output of "vmc console hash-pin", or "" for no login',
            ),
            secret=True,
        ),
    )
    # The name journaled as the source of what the technician does (source "console").
    user: str = field(
        default="technician",
        metadata=_spec(_Pattern(r"[A-Za-z0-9_.-]{1,32}", "1 to 32 letters, digits, '_.-'")),
    )
    idle_logout_s: float = field(default=300.0, metadata=_spec(_Number(1, 86400)))
    # Wrong PINs in a row before the console locks; each lockout after that doubles, up to
    # lockout_max_s.
    max_failures: int = field(default=3, metadata=_spec(_Integer(1, 20)))
    lockout_s: float = field(default=30.0, metadata=_spec(_Number(0.1, 3600)))
    lockout_max_s: float = field(default=900.0, metadata=_spec(_Number(0.1, 86400)))


@dataclass(frozen=True, kw_only=True)
class DexConfig(_Section):
    """``[dex]``: the EVA-DTS audit port a route technician's handheld reads (docs/dex.md)."""

    DESCRIPTION: ClassVar[str] = "DEX audit settings"

    # Absent: no DEX port (the report is still read with ``vmc dex``, the console, the cloud).
    port: str | None = field(default=None, metadata=_spec(_SerialPort()))
    # The DEX communication id (DXS, the handshakes); "" = made of machine.id.
    comm_id: str = field(
        default="",
        metadata=_spec(_Pattern(r"([A-Z0-9]{10})?", '10 upper-case letters or digits, or ""')),
    )
    # A handheld's read starts the interim counters anew once the transfer completed.
    reset_on_read: bool = field(default=True, metadata=_spec(_Boolean()))


@dataclass(frozen=True, kw_only=True)
class SlotConfig(_Section):
    """``[[slot]]``: one product position in the motor matrix and its initial stock."""

    DESCRIPTION: ClassVar[str] = "slot settings"

    id: str = field(
        metadata=_spec(_Pattern(r"[A-Za-z0-9]{1,8}", "a slot id of 1 to 8 letters or digits")),
    )
    row: int = field(metadata=_spec(_Integer(0, 7)))
    col: int = field(metadata=_spec(_Integer(0, 9)))
    price: int = field(metadata=_spec(_Integer(1, 1_000_000)))
    # Initial stock only: once the journal exists it owns the stock count.
    stock: int = field(default=0, metadata=_spec(_Integer(0, 1000)))
    capacity: int = field(default=10, metadata=_spec(_Integer(1, 1000)))
    enabled: bool = field(default=True, metadata=_spec(_Boolean()))
    name: str = field(default="", metadata=_spec(_Text(40)))

    def _finish(self, key: str) -> None:
        if self.stock > self.capacity:
            raise ConfigError(
                _join(key, "stock"),
                f"an integer from 0 to capacity ({self.capacity})",
                describe(self.stock),
            )


@dataclass(frozen=True, kw_only=True)
class Config(_Section):
    """The whole configuration. Build it with :func:`load_config` or :func:`parse_config`."""

    DESCRIPTION: ClassVar[str] = "vmc settings"

    # machine comes first: its state_dir is the default home of the control socket.
    machine: MachineConfig = field(metadata=_spec(_Table(MachineConfig)))
    log: LogConfig = field(metadata=_spec(_Table(LogConfig, when_absent={})))
    mdb: MdbConfig = field(metadata=_spec(_Table(MdbConfig, when_absent={})))
    motor: MotorConfig = field(metadata=_spec(_Table(MotorConfig, when_absent={})))
    vend: VendConfig = field(metadata=_spec(_Table(VendConfig, when_absent={})))
    control: ControlConfig = field(metadata=_spec(_Table(ControlConfig, when_absent={})))
    journal: JournalConfig = field(metadata=_spec(_Table(JournalConfig, when_absent={})))
    cloud: CloudConfig = field(metadata=_spec(_Table(CloudConfig, when_absent={})))
    console: ConsoleConfig = field(metadata=_spec(_Table(ConsoleConfig, when_absent={})))
    dex: DexConfig = field(metadata=_spec(_Table(DexConfig, when_absent={})))
    slots: tuple[SlotConfig, ...] = field(metadata=_spec(_TableArray(SlotConfig), key="slot"))

    def _finish(self, key: str) -> None:
        ids: dict[str, int] = {}
        positions: dict[tuple[int, int], int] = {}
        for index, slot in enumerate(self.slots):
            here = f"slot[{index}]"
            if slot.id in ids:
                raise ConfigError(
                    f"{here}.id",
                    "a slot id not used by another slot",
                    f"{describe(slot.id)}, already used by slot[{ids[slot.id]}]",
                )
            ids[slot.id] = index
            position = (slot.row, slot.col)
            if position in positions:
                raise ConfigError(
                    here,
                    "a motor position (row, col) not used by another slot",
                    f"row {slot.row}, col {slot.col}, already used by slot[{positions[position]}]",
                )
            positions[position] = index

    def slot(self, slot_id: str) -> SlotConfig | None:
        """The slot with this id, or None."""
        return next((slot for slot in self.slots if slot.id == slot_id), None)

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as plain data (TOML key names, paths as strings, ``""``
        for "none"), with secrets replaced by ``"***"``. A secret that is not set shows as
        ``""`` so an operator can see it is missing without seeing its value."""
        result = _plain(self)
        assert isinstance(result, dict)
        return result


def _plain(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, object] = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if f.metadata.get("secret"):
                out[_toml_key(f)] = "***" if item else ""
            else:
                out[_toml_key(f)] = _plain(item)
        return out
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    if value is None:
        return ""
    return value


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def parse_config(data: Mapping[str, Any], base_dir: Path) -> Config:
    """Validate already-parsed TOML data; relative paths are resolved against ``base_dir``.

    Raises :class:`ConfigError` for the first problem found.
    """
    ctx = _Context(base_dir=Path(os.path.abspath(base_dir)))
    return _read_table(Config, "", data, ctx, {}, "a table of vmc settings")


def load_config(path: Path) -> Config:
    """Read and validate a TOML configuration file.

    Raises :class:`ConfigFileError` (a :class:`ConfigError`) when the file cannot be read or is
    not valid TOML, and :class:`ConfigError` for the first invalid value.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigFileError(path, "a readable file", exc.strerror or str(exc)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigFileError(
            path, "UTF-8 text", f"a non-UTF-8 byte at offset {exc.start}"
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(path, "valid TOML", f"a syntax error: {exc}") from None
    return parse_config(data, Path(os.path.abspath(path)).parent)
