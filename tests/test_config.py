"""The configuration schema: every check, its message, defaults, paths, redaction, robustness."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from vmc.config import (
    CloudConfig,
    Config,
    ControlConfig,
    JournalConfig,
    LogConfig,
    MachineConfig,
    MdbConfig,
    MdbDeviceConfig,
    MotorConfig,
    SlotConfig,
    VendConfig,
    load_config,
    parse_config,
)
from vmc.errors import ConfigError, ConfigFileError, VmcError

REPO = Path(__file__).resolve().parent.parent
SHIPPED_CONFIGS = sorted((REPO / "config").glob("*.toml"))
BASE = Path("/srv/vmc/etc")  # a base directory for parse_config; never touched on disk
GOOD_KEY = "hDIcRPZaPDDRFxFua4qk1ebFMb6STBGrzxirgC3pyWA="  # 32 bytes, base64


def minimal() -> dict[str, Any]:
    """The smallest valid configuration: everything else takes its default."""
    return {"machine": {"id": "VM-0001"}, "mdb": {"simulate": True}, "motor": {"simulate": True}}


def slot(slot_id: str = "A1", row: int = 0, col: int = 0, **extra: Any) -> dict[str, Any]:
    return {"id": slot_id, "row": row, "col": col, "price": 150, **extra}


def with_value(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``data`` with ``value`` set at ``dotted`` (``slot[0].price`` works)."""
    result = copy.deepcopy(data)
    node: Any = result
    parts = dotted.split(".")
    for part in parts[:-1]:
        match = re.fullmatch(r"(\w+)\[(\d+)\]", part)
        node = node[match[1]][int(match[2])] if match else node.setdefault(part, {})
    node[parts[-1]] = value
    return result


def error_of(data: Any, base_dir: Path = BASE) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data, base_dir)
    error = info.value
    # Every message has the one shape the CLI prints after "config error: ".
    assert str(error) == f"{error.key}: expected {error.expected}, found {error.found}"
    return error


# ---------------------------------------------------------------------------------------------
# Defaults
# ---------------------------------------------------------------------------------------------


def test_minimal_config_takes_documented_defaults() -> None:
    config = parse_config(minimal(), BASE)
    assert config.machine == MachineConfig(
        id="VM-0001",
        currency="EUR",
        currency_numeric=978,
        decimal_places=2,
        state_dir=Path("/var/lib/vmc"),
    )
    assert config.log == LogConfig(level="info", format="auto")
    assert config.mdb.link == "stream"
    assert config.mdb.port is None
    assert config.mdb.sim_timing is False
    assert config.mdb.pcap is None
    assert config.mdb.trace is False
    assert config.mdb.timing_slack_ms == 2.0
    assert config.motor == MotorConfig(
        driver="vmc96", port=None, simulate=True, turn_timeout_s=5.0, drop_timeout_s=2.0
    )
    assert config.vend == VendConfig(
        max_credit=2000, credit_timeout_s=180, accept_bills=True, escrow_hold_s=30
    )
    assert config.control == ControlConfig(socket=Path("/var/lib/vmc/control.sock"))
    assert config.journal == JournalConfig(retention_days=90, min_free_mb=20)
    assert config.journal.min_free_bytes == 20 * 1024 * 1024
    assert config.cloud.enabled is False
    assert config.cloud.host == "127.0.0.1"
    assert config.cloud.port == 1883
    assert config.cloud.topic_prefix == "vmc"
    assert config.cloud.order_ttl_s == 90
    assert config.cloud.command_skew_s == 60
    assert config.cloud.command_public_key_bytes is None
    assert config.slots == ()


def test_absent_mdb_device_table_means_disabled() -> None:
    config = parse_config(minimal(), BASE)
    off = [config.mdb.coin.enabled, config.mdb.bill.enabled, config.mdb.cashless.enabled]
    assert off == [False, False, False]


def test_present_mdb_device_tables_take_per_device_defaults() -> None:
    data = minimal()
    data["mdb"].update(coin={}, bill={}, cashless={})
    mdb = parse_config(data, BASE).mdb
    assert mdb.coin == MdbDeviceConfig(enabled=True, poll_interval_ms=100)
    assert mdb.bill == MdbDeviceConfig(enabled=True, poll_interval_ms=150)
    assert mdb.cashless == MdbDeviceConfig(enabled=False, poll_interval_ms=100)


def test_slot_defaults() -> None:
    data = minimal()
    data["slot"] = [slot()]
    assert parse_config(data, BASE).slots == (
        SlotConfig(id="A1", row=0, col=0, price=150, stock=0, capacity=10, enabled=True, name=""),
    )


def test_config_is_frozen() -> None:
    config = parse_config(minimal(), BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.machine.id = "other"  # type: ignore[misc]


def test_integer_float_for_float_keys_is_accepted_as_float() -> None:
    config = parse_config(with_value(minimal(), "motor.turn_timeout_s", 3), BASE)
    assert config.motor.turn_timeout_s == 3.0
    assert isinstance(config.motor.turn_timeout_s, float)


# ---------------------------------------------------------------------------------------------
# Every value check, table-driven: key, values accepted, values refused with a phrase
# ---------------------------------------------------------------------------------------------

INTEGER_RANGES = [
    ("machine.currency_numeric", 1, 999),
    ("machine.decimal_places", 0, 4),
    ("mdb.coin.poll_interval_ms", 20, 1000),
    ("mdb.bill.poll_interval_ms", 20, 1000),
    ("mdb.cashless.poll_interval_ms", 20, 1000),
    ("vend.max_credit", 1, 1_000_000),
    ("vend.credit_timeout_s", 0, 3600),
    ("vend.escrow_hold_s", 1, 300),
    ("journal.retention_days", 1, 3650),
    ("journal.min_free_mb", 1, 10000),
    ("cloud.port", 1, 65535),
    ("cloud.order_ttl_s", 10, 900),
    ("cloud.command_skew_s", 0, 600),
    ("slot[0].row", 0, 7),
    ("slot[0].col", 0, 9),
    ("slot[0].price", 1, 1_000_000),
    ("slot[0].stock", 0, 1000),
    ("slot[0].capacity", 1, 1000),
]

FLOAT_RANGES = [
    ("mdb.timing_slack_ms", 0.0, 50.0),
    ("motor.turn_timeout_s", 0.5, 30.0),
    ("motor.drop_timeout_s", 0.2, 10.0),
]

BOOLEANS = [
    "mdb.simulate",
    "mdb.sim_timing",
    "mdb.trace",
    "mdb.coin.enabled",
    "mdb.bill.enabled",
    "mdb.cashless.enabled",
    "motor.simulate",
    "vend.accept_bills",
    "cloud.enabled",
    "cloud.tls",
    "slot[0].enabled",
]

CHOICES = [
    ("log.level", ["trace", "debug", "info", "warning", "error"], ["INFO", "verbose", ""]),
    ("log.format", ["auto", "json", "console"], ["text", "JSON"]),
    ("mdb.link", ["stream"], ["serial", "UART"]),
    ("motor.driver", ["vmc96"], ["vmc97", ""]),
]

# Strings with a shape: key, accepted values, refused values.
PATTERNS = [
    ("machine.id", ["VM-0001", "a", "x" * 64, "A_b-9"], ["", "x" * 65, "VM/1", "VM 1", "vm+", "é"]),
    ("machine.currency", ["EUR"], ["eur", "EURO", "E1R", ""]),
    ("slot[0].id", ["A1", "12345678", "b"], ["", "A-1", "123456789", "A 1"]),
    ("slot[0].name", ["", "Cola 0.33 l", "x" * 40, "Café"], ["x" * 41, "tab\there", "new\nline"]),
    ("cloud.host", ["broker", "10.0.0.1", "::1", "mqtt.example.com"], ["", "a b", "host/x"]),
    ("cloud.topic_prefix", ["vmc", "acme/vmc", "a_b-c"], ["", "/vmc", "vmc/", "a/+", "#", "a b"]),
    ("cloud.username", ["", "VM-0001"], ["x" * 257, "a\x00b"]),
    ("cloud.password", ["", "p@ss word!", "\u00e9\t"], ["x" * 1025, "a\x00b"]),
]

WRONG_TYPES: list[Any] = [True, 1, 1.5, "text", [1], {"a": 1}, dt.date(2024, 1, 1)]


def context_for(key: str) -> dict[str, Any]:
    data = minimal()
    if key.startswith("slot[0]"):
        data["slot"] = [slot()]
    return data


def describe_found(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string"}.get(
        type(value), "table" if isinstance(value, dict) else "array"
    )


@pytest.mark.parametrize(("key", "low", "high"), INTEGER_RANGES)
def test_integer_ranges(key: str, low: int, high: int) -> None:
    data = context_for(key)
    if key.startswith("slot[0]"):
        data = with_value(data, "slot[0].capacity", 1000)  # keep stock <= capacity true
    if key == "machine.currency_numeric":
        data = with_value(data, "machine.currency", "XTS")  # not in the known-number table
    for value in (low, high, (low + high) // 2):
        parse_config(with_value(data, key, value), BASE)
    for value in (low - 1, high + 1):
        error = error_of(with_value(data, key, value))
        assert error.key == key
        assert error.expected == f"an integer from {low} to {high}"
        assert error.found == f"{value} (integer)"
    for value in (True, float(low), "10", [low]):
        error = error_of(with_value(data, key, value))
        assert error.key == key
        assert error.expected == f"an integer from {low} to {high}"


def test_integer_message_matches_the_brief_example() -> None:
    data = with_value(minimal(), "mdb.coin.poll_interval_ms", "fast")
    error = error_of(data)
    assert str(error) == (
        'mdb.coin.poll_interval_ms: expected an integer from 20 to 1000, found "fast" (string)'
    )


@pytest.mark.parametrize(("key", "low", "high"), FLOAT_RANGES)
def test_float_ranges(key: str, low: float, high: float) -> None:
    data = minimal()
    for value in (low, high):
        parse_config(with_value(data, key, value), BASE)
    for value in (low - 0.01, high + 0.01, float("nan"), float("inf"), -float("inf")):
        error = error_of(with_value(data, key, value))
        assert error.key == key
        assert error.expected == f"a number from {low:g} to {high:g}"
        assert "(float)" in error.found
    for value in (False, "1.0", [1.0]):
        assert error_of(with_value(data, key, value)).key == key


@pytest.mark.parametrize("key", BOOLEANS)
def test_booleans(key: str) -> None:
    data = context_for(key)
    if key.endswith(".simulate"):
        data = with_value(data, key.replace("simulate", "port"), "/dev/ttyS1")
    for value in (True, False):
        if key == "cloud.tls" and value:
            continue  # needs files; tested below
        parse_config(with_value(data, key, value), BASE)
    for value in (1, 0, "true", "yes"):
        error = error_of(with_value(data, key, value))
        assert error.key == key
        assert error.expected == "true or false"
        assert describe_found(value) in error.found


@pytest.mark.parametrize(("key", "good", "bad"), CHOICES)
def test_choices(key: str, good: list[str], bad: list[Any]) -> None:
    for value in good:
        parse_config(with_value(minimal(), key, value), BASE)
    for value in [*bad, 1, True]:
        error = error_of(with_value(minimal(), key, value))
        assert error.key == key
        assert error.expected.startswith("one of ")
        for option in good:
            assert f'"{option}"' in error.expected


@pytest.mark.parametrize(("key", "good", "bad"), PATTERNS)
def test_patterns(key: str, good: list[str], bad: list[str]) -> None:
    data = context_for(key)
    for value in good:
        parse_config(with_value(data, key, value), BASE)
    for value in [*bad, 12, None]:
        error = error_of(with_value(data, key, value))
        assert error.key == key


@pytest.mark.parametrize(
    "key",
    [
        "machine.state_dir",
        "mdb.port",
        "mdb.pcap",
        "motor.port",
        "control.socket",
        "cloud.ca_file",
        "cloud.cert_file",
        "cloud.key_file",
    ],
)
@pytest.mark.parametrize("value", [1, True, ["a"], {"a": "b"}, "nul\x00byte"])
def test_paths_refuse_non_strings_and_nul(key: str, value: Any) -> None:
    error = error_of(with_value(minimal(), key, value))
    assert error.key == key
    assert "path" in error.expected


def test_state_dir_cannot_be_empty() -> None:
    error = error_of(with_value(minimal(), "machine.state_dir", ""))
    assert error.key == "machine.state_dir"
    assert error.found == '"" (string)'


@pytest.mark.parametrize(
    ("currency", "numeric"), [("USD", 840), ("GBP", 826), ("CHF", 756), ("JPY", 392)]
)
def test_known_currency_needs_its_iso_number(currency: str, numeric: int) -> None:
    data = with_value(minimal(), "machine.currency", currency)
    error = error_of(data)  # the default 978 belongs to EUR
    assert error.key == "machine.currency_numeric"
    assert error.expected == f"{numeric} (the ISO 4217 number of {currency})"
    assert error.found == "978 (integer)"
    config = parse_config(with_value(data, "machine.currency_numeric", numeric), BASE)
    assert (config.machine.currency, config.machine.currency_numeric) == (currency, numeric)


def test_unlisted_currency_accepts_any_number() -> None:
    data = with_value(minimal(), "machine.currency", "XTS")
    assert parse_config(with_value(data, "machine.currency_numeric", 963), BASE)


# ---------------------------------------------------------------------------------------------
# Required keys, unknown keys, wrong table shapes
# ---------------------------------------------------------------------------------------------


def test_machine_table_is_required() -> None:
    data = minimal()
    del data["machine"]
    error = error_of(data)
    assert error.key == "machine"
    assert "missing" in error.found


def test_machine_id_is_required() -> None:
    error = error_of(with_value(minimal(), "machine", {}))
    assert error.key == "machine.id"
    assert "missing" in error.found


@pytest.mark.parametrize("key", ["slot[0].id", "slot[0].row", "slot[0].col", "slot[0].price"])
def test_slot_required_keys(key: str) -> None:
    data = minimal()
    entry = slot()
    del entry[key.rsplit(".", 1)[1]]
    data["slot"] = [entry]
    error = error_of(data)
    assert error.key == key
    assert "missing" in error.found


@pytest.mark.parametrize(
    ("table", "known"),
    [
        ("", "machine"),
        ("machine", "id"),
        ("log", "level"),
        ("mdb", "port"),
        ("mdb.coin", "enabled"),
        ("mdb.bill", "enabled"),
        ("mdb.cashless", "enabled"),
        ("motor", "port"),
        ("vend", "max_credit"),
        ("control", "socket"),
        ("journal", "retention_days"),
        ("cloud", "host"),
        ("slot[0]", "price"),
    ],
)
def test_unknown_key_refused_at_every_level(table: str, known: str) -> None:
    data = context_for(table)
    dotted = f"{table}.surprise" if table else "surprise"
    error = error_of(with_value(data, dotted, 1))
    assert error.key == dotted
    assert error.found == "an unknown key"
    assert known in error.expected


def test_unknown_key_suggests_the_close_one() -> None:
    error = error_of(with_value(minimal(), "mdb.coin.pol_interval_ms", 100))
    assert error.key == "mdb.coin.pol_interval_ms"
    assert "did you mean poll_interval_ms?" in error.expected


@pytest.mark.parametrize(
    "key", ["machine", "log", "mdb", "mdb.coin", "motor", "vend", "control", "journal", "cloud"]
)
def test_table_keys_must_be_tables(key: str) -> None:
    error = error_of(with_value(minimal(), key, "yes"))
    assert error.key == key
    assert error.expected.startswith("a table")
    assert error.found == '"yes" (string)'


def test_slot_must_be_an_array_of_tables() -> None:
    data = minimal()
    data["slot"] = slot()  # [slot] instead of [[slot]]
    error = error_of(data)
    assert error.key == "slot"
    assert "[[slot]]" in error.expected
    data["slot"] = [slot(), "A2"]
    error = error_of(data)
    assert error.key == "slot[1]"
    assert error.found == '"A2" (string)'


def test_top_level_must_be_a_table() -> None:
    assert error_of([1, 2]).found == "an array of 2 items"


def test_non_string_keys_are_refused() -> None:
    data: dict[Any, Any] = minimal()
    data["machine"][3] = "x"
    error = error_of(data)
    assert error.key == "machine"
    assert error.expected == "only string keys"


# ---------------------------------------------------------------------------------------------
# Cross-field checks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("section", ["mdb", "motor"])
def test_port_required_unless_simulating(section: str) -> None:
    data = with_value(minimal(), f"{section}.simulate", False)
    error = error_of(data)
    assert error.key == f"{section}.port"
    assert f"required unless {section}.simulate = true" in error.expected
    assert "missing" in error.found
    assert error_of(with_value(data, f"{section}.port", "")).key == f"{section}.port"
    config = parse_config(with_value(data, f"{section}.port", "/dev/ttyUSB0"), BASE)
    assert getattr(config, section).port == "/dev/ttyUSB0"


def test_port_is_ignored_but_kept_when_simulating() -> None:
    config = parse_config(with_value(minimal(), "mdb.port", "/dev/ttyS1"), BASE)
    assert config.mdb.simulate
    assert config.mdb.port == "/dev/ttyS1"


@pytest.mark.parametrize(
    "port", ["socket://127.0.0.1:5000", "socket://rig.local:1", "socket://[::1]:65535"]
)
def test_socket_url_port_on_stream_link(port: str) -> None:
    data = with_value(with_value(minimal(), "mdb.simulate", False), "mdb.port", port)
    assert parse_config(data, BASE).mdb.port == port


@pytest.mark.parametrize(
    "port",
    ["socket://host", "socket://host:0", "socket://host:65536", "rfc2217://h:1", "socket://:1"],
)
def test_bad_socket_urls_are_refused(port: str) -> None:
    data = with_value(with_value(minimal(), "mdb.simulate", False), "mdb.port", port)
    error = error_of(data)
    assert error.key == "mdb.port"
    assert "socket://host:port" in error.expected


def test_uart_link_needs_a_device_not_a_socket() -> None:
    data = with_value(minimal(), "mdb", {"link": "uart", "port": "socket://127.0.0.1:5000"})
    error = error_of(data)
    assert error.key == "mdb.port"
    assert 'link = "uart"' in error.expected
    data = with_value(minimal(), "mdb", {"link": "uart", "port": "/dev/ttyS1"})
    assert parse_config(data, BASE).mdb.link == "uart"


def test_simulated_mdb_needs_the_stream_link() -> None:
    error = error_of(with_value(minimal(), "mdb.link", "uart"))
    assert error.key == "mdb.link"
    assert error.expected == '"stream" when mdb.simulate = true'
    assert error.found == '"uart" (string)'


@pytest.mark.parametrize("missing", ["ca_file", "cert_file", "key_file"])
def test_tls_needs_all_three_files(missing: str) -> None:
    cloud = {"tls": True, "ca_file": "ca.pem", "cert_file": "c.crt", "key_file": "c.key"}
    assert parse_config(with_value(minimal(), "cloud", cloud), BASE).cloud.tls
    for absent in (None, ""):
        broken = dict(cloud)
        if absent is None:
            del broken[missing]
        else:
            broken[missing] = absent
        error = error_of(with_value(minimal(), "cloud", broken))
        assert error.key == f"cloud.{missing}"
        assert "required when cloud.tls = true" in error.expected


def test_stock_cannot_exceed_capacity() -> None:
    data = minimal()
    data["slot"] = [slot(stock=11, capacity=10)]
    error = error_of(data)
    assert error.key == "slot[0].stock"
    assert error.expected == "an integer from 0 to capacity (10)"
    assert error.found == "11 (integer)"
    data["slot"] = [slot(stock=10, capacity=10)]
    assert parse_config(data, BASE).slots[0].stock == 10


def test_slot_ids_must_be_unique() -> None:
    data = minimal()
    data["slot"] = [slot("A1", 0, 0), slot("A2", 0, 1), slot("A1", 0, 2)]
    error = error_of(data)
    assert error.key == "slot[2].id"
    assert "already used by slot[0]" in error.found


def test_slot_positions_must_be_unique() -> None:
    data = minimal()
    data["slot"] = [slot("A1", 3, 4), slot("A2", 3, 4)]
    error = error_of(data)
    assert error.key == "slot[1]"
    assert "(row, col)" in error.expected
    assert error.found == "row 3, col 4, already used by slot[0]"


def test_slot_lookup_by_id() -> None:
    data = minimal()
    data["slot"] = [slot("A1", 0, 0), slot("B2", 1, 1)]
    config = parse_config(data, BASE)
    found = config.slot("B2")
    assert found is not None and (found.row, found.col) == (1, 1)
    assert config.slot("Z9") is None


# ---------------------------------------------------------------------------------------------
# Cloud strings: templates and the command key
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        "https://pay.example.com/{machine}/{order_id}?a={amount}&c={currency}&s={slot}",
        "pay:{order_id}",
        "{{literal braces}} {machine}",
    ],
)
def test_qr_template_accepts_the_five_fields(template: str) -> None:
    config = parse_config(with_value(minimal(), "cloud.qr_url_template", template), BASE)
    assert config.cloud.qr_url_template == template
    filled = template.format(machine="M", order_id="O", amount=1, currency="EUR", slot="A1")
    assert "{machine}" not in filled


@pytest.mark.parametrize(
    ("template", "shown"),
    [
        ("https://x/{price}", "{price}"),
        ("https://x/{}", "a positional {}"),
        ("https://x/{0}", "{0}"),
        ("https://x/{machine.id}", "{machine.id}"),
        ("https://x/{slot[0]}", "{slot[0]}"),
        ("https://x/{amount:099999999}", "{amount:099999999}"),
        ("https://x/{slot!r}", "{slot!r}"),
    ],
)
def test_qr_template_refuses_other_placeholders(template: str, shown: str) -> None:
    error = error_of(with_value(minimal(), "cloud.qr_url_template", template))
    assert error.key == "cloud.qr_url_template"
    assert "{machine}, {order_id}, {amount}, {currency}, {slot}" in error.expected
    assert error.found.endswith(f"using {shown}")


@pytest.mark.parametrize("template", ["https://x/{", "https://x/}", "", 5])
def test_qr_template_refuses_malformed(template: Any) -> None:
    assert error_of(with_value(minimal(), "cloud.qr_url_template", template)).key == (
        "cloud.qr_url_template"
    )


def test_static_qr_template_knows_only_the_machine() -> None:
    ok = parse_config(
        with_value(minimal(), "cloud.static_qr_template", "https://s/{machine}"), BASE
    )
    assert ok.cloud.static_qr_template == "https://s/{machine}"
    error = error_of(with_value(minimal(), "cloud.static_qr_template", "https://s/{order_id}"))
    assert error.key == "cloud.static_qr_template"
    assert error.found.endswith("using {order_id}")


def test_command_public_key() -> None:
    config = parse_config(with_value(minimal(), "cloud.command_public_key", GOOD_KEY), BASE)
    key_bytes = config.cloud.command_public_key_bytes
    assert key_bytes is not None and len(key_bytes) == 32
    short = "AAAA"
    error = error_of(with_value(minimal(), "cloud.command_public_key", short))
    assert error.key == "cloud.command_public_key"
    assert error.found == '"AAAA" (string), 3 bytes decoded'
    for bad in ("not base64!", GOOD_KEY[:-2], 32):
        assert error_of(with_value(minimal(), "cloud.command_public_key", bad)).key == (
            "cloud.command_public_key"
        )


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_directory() -> None:
    data = minimal()
    data["machine"]["state_dir"] = "../state"
    data["mdb"].update(pcap="captures/mdb.pcap")
    data["cloud"] = {"tls": True, "ca_file": "tls/ca.pem", "cert_file": "/abs/c.crt"}
    data["cloud"]["key_file"] = "./tls/../tls/c.key"
    config = parse_config(data, BASE)
    assert config.machine.state_dir == Path("/srv/vmc/state")
    assert config.control.socket == Path("/srv/vmc/state/control.sock")
    assert config.mdb.pcap == Path("/srv/vmc/etc/captures/mdb.pcap")
    assert config.cloud.ca_file == Path("/srv/vmc/etc/tls/ca.pem")
    assert config.cloud.cert_file == Path("/abs/c.crt")
    assert config.cloud.key_file == Path("/srv/vmc/etc/tls/c.key")


def test_relative_serial_port_resolves_but_socket_url_does_not() -> None:
    data = with_value(minimal(), "motor", {"port": "dev/pty-motor"})
    assert parse_config(data, BASE).motor.port == "/srv/vmc/etc/dev/pty-motor"
    data = with_value(minimal(), "mdb", {"port": "socket://127.0.0.1:7000"})
    assert parse_config(data, BASE).mdb.port == "socket://127.0.0.1:7000"


def test_explicit_control_socket() -> None:
    config = parse_config(with_value(minimal(), "control.socket", "run/ctl.sock"), BASE)
    assert config.control.socket == Path("/srv/vmc/etc/run/ctl.sock")


def test_control_socket_path_must_fit_sockaddr_un() -> None:
    data = with_value(minimal(), "machine.state_dir", "/" + "d" * 93)
    assert len(str(parse_config(data, BASE).control.socket)) == 107
    data = with_value(minimal(), "machine.state_dir", "/" + "d" * 94)
    error = error_of(data)
    assert error.key == "control.socket"
    assert "107 bytes" in error.expected
    assert error.found.endswith("too long")


def test_load_config_resolves_against_the_file_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc" / "vmc.toml"
    path.write_text(
        '[machine]\nid = "VM-9"\nstate_dir = "../var"\n'
        "[mdb]\nsimulate = true\n[motor]\nsimulate = true\n",
        encoding="utf-8",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(Path("../etc/vmc.toml"))  # a relative path to the file, too
    assert config.machine.state_dir == tmp_path / "var"
    assert config.control.socket == tmp_path / "var" / "control.sock"


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError) as info:
        load_config(tmp_path / "nope.toml")
    assert info.value.key == str(tmp_path / "nope.toml")
    assert info.value.expected == "a readable file"
    assert info.value.found == "No such file or directory"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError) as info:
        load_config(tmp_path)
    assert info.value.expected == "a readable file"


def test_invalid_toml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[machine]\nid = "VM-1"\nstate_dir = \n', encoding="utf-8")
    with pytest.raises(ConfigFileError) as info:
        load_config(path)
    assert info.value.expected == "valid TOML"
    assert "line 3" in info.value.found


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[machine]\nid = "caf\xe9"\n')
    with pytest.raises(ConfigFileError) as info:
        load_config(path)
    assert info.value.expected == "UTF-8 text"
    assert "offset 19" in info.value.found


def test_error_hierarchy() -> None:
    assert issubclass(ConfigFileError, ConfigError)
    assert issubclass(ConfigError, VmcError)
    assert issubclass(VmcError, Exception)


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    config = load_config(path)
    assert config.machine.id
    assert config.slots


def test_shipped_configs_are_both_there() -> None:
    assert {p.name for p in SHIPPED_CONFIGS} >= {"sim.toml", "example-hardware.toml"}


def test_sim_config_is_the_simulated_machine() -> None:
    config = load_config(REPO / "config" / "sim.toml")
    assert config.machine.id == "SIM-0001"
    assert config.machine.state_dir == REPO / "state"
    assert config.mdb.simulate and config.motor.simulate
    assert all(d.enabled for d in (config.mdb.coin, config.mdb.bill, config.mdb.cashless))
    assert config.cloud.enabled is False
    assert [s.id for s in config.slots] == ["A1", "A2", "A3", "B1", "B2", "B3"]
    assert [s.row for s in config.slots] == [0, 0, 0, 1, 1, 1]
    assert all(100 <= s.price <= 250 and 5 <= s.stock <= 10 for s in config.slots)


def test_example_hardware_config_is_a_real_machine() -> None:
    config = load_config(REPO / "config" / "example-hardware.toml")
    assert (config.mdb.link, config.mdb.simulate, config.motor.simulate) == ("uart", False, False)
    assert config.mdb.port and config.motor.port
    assert config.cloud.enabled and config.cloud.tls
    assert config.cloud.command_public_key_bytes is not None


# ---------------------------------------------------------------------------------------------
# Redaction
# ---------------------------------------------------------------------------------------------


def full_example() -> dict[str, Any]:
    data = minimal()
    data["machine"]["state_dir"] = "state"
    data["cloud"] = {
        "enabled": True,
        "tls": True,
        "ca_file": "tls/ca.pem",
        "cert_file": "tls/c.crt",
        "key_file": "tls/c.key",
        "username": "VM-0001",
        "password": "hunter2-very-secret",
        "command_public_key": GOOD_KEY,
    }
    data["slot"] = [slot("A1", 0, 0, stock=3), slot("A2", 0, 1, name="Water")]
    return data


def test_redacted_hides_the_password_and_keeps_paths() -> None:
    config = parse_config(full_example(), BASE)
    shown = config.redacted()
    text = json.dumps(shown)
    assert "hunter2-very-secret" not in text
    assert shown["cloud"]["password"] == "***"
    assert shown["cloud"]["key_file"] == "/srv/vmc/etc/tls/c.key"
    assert shown["cloud"]["cert_file"] == "/srv/vmc/etc/tls/c.crt"
    assert shown["cloud"]["username"] == "VM-0001"
    assert shown["machine"]["state_dir"] == "/srv/vmc/etc/state"
    assert shown["control"]["socket"] == "/srv/vmc/etc/state/control.sock"
    assert shown["slot"][1]["name"] == "Water"
    assert shown["mdb"]["port"] == "" and shown["mdb"]["pcap"] == ""
    assert set(shown) == {
        "machine", "log", "mdb", "motor", "vend", "control", "journal", "cloud", "dex", "slot"
    }  # fmt: skip


def test_redacted_shows_an_unset_password_as_empty() -> None:
    assert parse_config(minimal(), BASE).redacted()["cloud"]["password"] == ""


def test_redacted_is_the_effective_config_and_parses_back() -> None:
    config = parse_config(full_example(), BASE)
    shown = config.redacted()
    shown["cloud"]["password"] = config.cloud.password
    again = parse_config(json.loads(json.dumps(shown)), Path("/somewhere/else"))
    assert again == config


# ---------------------------------------------------------------------------------------------
# Property: nothing but ConfigError, whatever the input
# ---------------------------------------------------------------------------------------------

SECTION_CLASSES = {
    "machine": MachineConfig,
    "log": LogConfig,
    "mdb": MdbConfig,
    "motor": MotorConfig,
    "vend": VendConfig,
    "control": ControlConfig,
    "journal": JournalConfig,
    "cloud": CloudConfig,
    "slot": SlotConfig,
}
KNOWN_KEYS = sorted(
    {f.name for cls in SECTION_CLASSES.values() for f in dataclasses.fields(cls)}
    | set(SECTION_CLASSES)
)

toml_scalars = st.one_of(
    st.booleans(),
    st.integers(),
    st.integers(min_value=-2, max_value=1100),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "",
            "VM-1",
            "EUR",
            "USD",
            "uart",
            "stream",
            "vmc96",
            "trace",
            "json",
            "../state",
            "/dev/ttyS1",
            "socket://127.0.0.1:5000",
            "{machine}",
            "{order_id}{x}",
            GOOD_KEY,
            "A1",
        ]
    ),
    st.datetimes(),
    st.dates(),
    st.times(),
)
toml_keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=8))
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(toml_keys, inner, max_size=5)
    ),
    max_leaves=25,
)


def check_outcome(data: Any) -> None:
    try:
        config = parse_config(data, BASE)
    except ConfigError as error:
        assert str(error).startswith(f"{error.key}: expected ")
        event("refused")
        return
    event("accepted")
    assert isinstance(config, Config)
    json.dumps(config.redacted())  # the effective config always renders


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(toml_keys, toml_values, max_size=8))
def test_arbitrary_documents_raise_only_config_error(data: dict[str, Any]) -> None:
    check_outcome(data)


@st.composite
def schema_shaped(draw: st.DrawFn) -> dict[str, Any]:
    """Documents with the right sections and mostly the right keys, values near the limits."""
    data: dict[str, Any] = minimal()
    for section, cls in SECTION_CLASSES.items():
        names = [f.name for f in dataclasses.fields(cls)]
        table = draw(
            st.dictionaries(
                st.one_of(st.sampled_from(names), st.just("bogus")), toml_scalars, max_size=4
            )
        )
        if section == "slot":
            data["slot"] = [
                {**slot(f"S{i}", i % 8, i), **table} for i in range(draw(st.integers(0, 3)))
            ]
        elif draw(st.booleans()):
            data.setdefault(section, {}).update(table)
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema_shaped())
def test_schema_shaped_documents_raise_only_config_error(data: dict[str, Any]) -> None:
    check_outcome(data)


@settings(max_examples=100, deadline=None)
@given(
    poll=st.integers(20, 1000),
    slack=st.floats(0, 50),
    credit=st.integers(1, 1_000_000),
    stock_capacity=st.integers(1, 1000).flatmap(lambda c: st.tuples(st.integers(0, c), st.just(c))),
    level=st.sampled_from(["trace", "debug", "info", "warning", "error"]),
)
def test_every_value_in_range_is_accepted(
    poll: int, slack: float, credit: int, stock_capacity: tuple[int, int], level: str
) -> None:
    stock, capacity = stock_capacity
    data = minimal()
    data["mdb"].update(coin={"poll_interval_ms": poll}, timing_slack_ms=slack)
    data["vend"] = {"max_credit": credit}
    data["log"] = {"level": level}
    data["slot"] = [slot(stock=stock, capacity=capacity)]
    config = parse_config(data, BASE)
    assert config.mdb.coin.poll_interval_ms == poll
    assert config.mdb.timing_slack_ms == slack
    assert config.vend.max_credit == credit
    assert (config.slots[0].stock, config.slots[0].capacity) == (stock, capacity)
    assert config.log.level == level


def test_huge_integer_is_described_without_crashing() -> None:
    error = error_of(with_value(minimal(), "vend.max_credit", 10**5000))
    assert error.key == "vend.max_credit"
    assert error.found.startswith("an integer of ")


def test_env_does_not_leak_into_config(monkeypatch: pytest.MonkeyPatch) -> None:
    # The file is the only source: no environment overrides that a test or unit could forget.
    monkeypatch.setenv("VMC_MACHINE_ID", "FROM-ENV")
    assert parse_config(minimal(), BASE).machine.id == "VM-0001"
    assert os.environ["VMC_MACHINE_ID"] == "FROM-ENV"
