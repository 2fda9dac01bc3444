"""The ``vmc`` command and the log output, run as real subprocesses."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vmc.config import LOG_LEVELS
from vmc.log import LEVELS, TRACE

REPO = Path(__file__).resolve().parent.parent
# Generous: only a bound so a hung child fails the test instead of the whole run.
SUBPROCESS_TIMEOUT_S = 60.0
RFC3339_MS_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
SECRET = "hunter2-do-not-print"

GOOD = f"""
[machine]
id = "VM-0042"
state_dir = "state"

[mdb]
simulate = true

[mdb.coin]

[motor]
simulate = true

[cloud]
enabled = true
username = "VM-0042"
password = "{SECRET}"
tls = true
ca_file = "tls/ca.pem"
cert_file = "tls/VM-0042.crt"
key_file = "tls/VM-0042.key"

[[slot]]
id = "A1"
row = 0
col = 0
price = 150
"""


def vmc(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmc", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )


def write(tmp_path: Path, text: str, name: str = "vmc.toml") -> Path:
    path = tmp_path / "etc" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# check-config
# ---------------------------------------------------------------------------------------------


def test_check_config_prints_the_effective_config_redacted(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    result = vmc("check-config", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr
    shown = json.loads(result.stdout)
    assert shown["machine"]["id"] == "VM-0042"
    assert shown["machine"]["state_dir"] == str(tmp_path / "etc" / "state")
    assert shown["control"]["socket"] == str(tmp_path / "etc" / "state" / "control.sock")
    assert shown["cloud"]["password"] == "***"
    assert shown["cloud"]["key_file"] == str(tmp_path / "etc" / "tls" / "VM-0042.key")
    assert shown["mdb"]["coin"] == {"enabled": True, "poll_interval_ms": 100}
    assert shown["mdb"]["bill"]["enabled"] is False
    assert shown["vend"]["max_credit"] == 2000  # a default, made explicit
    assert shown["slot"][0]["id"] == "A1"


def test_check_config_bad_value_exits_2_naming_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("[mdb.coin]", '[mdb.coin]\npoll_interval_ms = "fast"'))
    result = vmc("check-config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip() == (
        "config error: mdb.coin.poll_interval_ms: expected an integer from 20 to 1000, "
        'found "fast" (string)'
    )


def test_check_config_unknown_key_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("price = 150", "price = 150\nprize = 1"))
    result = vmc("check-config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("config error: slot[0].prize: expected a key known in")
    assert "found an unknown key" in result.stderr
    assert SECRET not in result.stderr


def test_check_config_cross_field_error(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace('key_file = "tls/VM-0042.key"', ""))
    result = vmc("check-config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(
        "config error: cloud.key_file: expected a file path (required when cloud.tls = true)"
    )


def test_check_config_missing_file_exits_2(tmp_path: Path) -> None:
    result = vmc("check-config", "nowhere.toml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "config error: nowhere.toml: expected a readable file, found No such file or directory"
    )


def test_check_config_invalid_toml_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, '[machine]\nid = "VM-1"\n[mdb\n')
    result = vmc("check-config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"config error: {path}: expected valid TOML, found")
    assert "line 3" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["sim.toml", "example-hardware.toml"])
def test_check_config_on_shipped_configs(name: str, tmp_path: Path) -> None:
    result = vmc("check-config", str(REPO / "config" / name), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    if name == "example-hardware.toml":
        assert shown["cloud"]["password"] == "***"
        assert "change-me" not in result.stdout


# ---------------------------------------------------------------------------------------------
# run (error path only: the daemon itself is tested elsewhere), usage, version
# ---------------------------------------------------------------------------------------------


def test_run_with_bad_config_exits_2_before_starting(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace('id = "VM-0042"', 'id = "VM 42"', 1))
    result = vmc("run", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("config error: machine.id: expected an id of 1 to 64")
    assert not (tmp_path / "etc" / "state").exists()  # nothing was started or created


def test_run_with_missing_config_exits_2(tmp_path: Path) -> None:
    result = vmc("run", "--config", str(tmp_path / "absent.toml"), cwd=tmp_path)
    assert result.returncode == 2
    assert "expected a readable file" in result.stderr


@pytest.mark.parametrize(
    "args",
    [(), ("run",), ("check-config",), ("launch",), ("run", "--config", "x", "--log-level", "loud")],
)
def test_usage_errors_exit_2(args: tuple[str, ...], tmp_path: Path) -> None:
    result = vmc(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert "usage: vmc" in result.stderr


def test_version(tmp_path: Path) -> None:
    result = vmc("--version", cwd=tmp_path)
    assert result.returncode == 0
    assert re.fullmatch(r"vmc \d+\.\d+\.\d+\S*\n", result.stdout)


def test_help_lists_the_commands(tmp_path: Path) -> None:
    result = vmc("--help", cwd=tmp_path)
    assert result.returncode == 0
    for command in ("run", "check-config"):
        assert command in result.stdout
    if importlib.util.find_spec("vmc.journal.cli") is not None:
        assert "journal" in result.stdout


def test_installed_console_script(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "vmc"
    if not script.exists():
        pytest.skip("the vmc console script is not installed next to this interpreter")
    path = write(tmp_path, GOOD)
    result = subprocess.run(
        [str(script), "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["machine"]["id"] == "VM-0042"


# ---------------------------------------------------------------------------------------------
# Logging: structlog and stdlib records through one output
# ---------------------------------------------------------------------------------------------

LOG_SCRIPT = """
import logging, sys
from vmc.log import TRACE, configure_logging, get_logger, trace
configure_logging(sys.argv[1], sys.argv[2])
log = get_logger("vmc.demo")
driver = logging.getLogger("drivers.mdb.link")
log.info("vend started", slot="A1", price=150)
log.debug("debug detail")
log.trace("raw frame", raw=b"\\x08\\x0b")
trace(log, "helper trace", n=1)
log.log(TRACE, "numeric trace")
driver.log(TRACE, "tx %s", "0b 0b", extra={"address": 8})
driver.debug("driver debug")
driver.warning("no response from 0x%02X", 0x08)
try:
    raise ValueError("broken part")
except ValueError:
    log.exception("vend failed")
"""


def run_logging(level: str, fmt: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", LOG_SCRIPT, level, fmt],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines()]


def test_json_lines_carry_ts_level_logger_event(tmp_path: Path) -> None:
    result = run_logging("trace", "json", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    records = json_lines(result.stdout)
    events = [(r["level"], r["logger"], r["event"]) for r in records]
    assert events == [
        ("info", "vmc.demo", "vend started"),
        ("debug", "vmc.demo", "debug detail"),
        ("trace", "vmc.demo", "raw frame"),
        ("trace", "vmc.demo", "helper trace"),
        ("trace", "vmc.demo", "numeric trace"),
        ("trace", "drivers.mdb.link", "tx 0b 0b"),
        ("debug", "drivers.mdb.link", "driver debug"),
        ("warning", "drivers.mdb.link", "no response from 0x08"),
        ("error", "vmc.demo", "vend failed"),
    ]
    for record in records:
        assert list(record)[:4] == ["ts", "level", "logger", "event"]
        assert RFC3339_MS_UTC.fullmatch(str(record["ts"]))
    assert records[0]["slot"] == "A1" and records[0]["price"] == 150
    assert records[2]["raw"] == "08 0b"  # bytes as hex
    assert records[5]["address"] == 8  # stdlib extra= fields come through
    assert "ValueError: broken part" in str(records[-1]["exception"])


@pytest.mark.parametrize(
    ("level", "count"), [("trace", 9), ("debug", 5), ("info", 3), ("warning", 2), ("error", 1)]
)
def test_level_filters_both_kinds_of_logger(level: str, count: int, tmp_path: Path) -> None:
    result = run_logging(level, "json", tmp_path)
    assert result.returncode == 0, result.stderr
    records = json_lines(result.stdout)
    assert len(records) == count
    assert all(LEVELS[str(r["level"])] >= LEVELS[level] for r in records)


def test_auto_format_is_json_when_not_a_terminal(tmp_path: Path) -> None:
    result = run_logging("info", "auto", tmp_path)
    assert result.returncode == 0, result.stderr
    assert [r["event"] for r in json_lines(result.stdout)] == [
        "vend started",
        "no response from 0x08",
        "vend failed",
    ]


def test_console_format_is_readable(tmp_path: Path) -> None:
    result = run_logging("info", "console", tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "vend started" in lines[0] and "slot=A1" in lines[0]
    assert RFC3339_MS_UTC.match(lines[0])
    assert any("drivers.mdb.link" in line and "no response from 0x08" in line for line in lines)
    assert "ValueError: broken part" in result.stdout
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[0])


def test_auto_format_is_console_on_a_terminal(tmp_path: Path) -> None:
    controller, terminal = os.openpty()
    try:
        child = subprocess.Popen(
            [sys.executable, "-c", LOG_SCRIPT, "info", "auto"],
            cwd=tmp_path,
            stdout=terminal,
            stderr=subprocess.DEVNULL,
        )
        os.close(terminal)
        terminal = -1
        output = b""
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 1.0)
            if not ready:
                if child.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the child closed its side of the terminal
                break
            if not chunk:
                break
            output += chunk
        assert child.wait(timeout=SUBPROCESS_TIMEOUT_S) == 0
    finally:
        if terminal >= 0:
            os.close(terminal)
        os.close(controller)
    text = output.decode("utf-8", "replace")
    assert "vend started" in text
    assert not text.lstrip().startswith("{")  # console lines, not JSON


def test_log_levels_agree_with_the_config_schema() -> None:
    assert tuple(LEVELS) == LOG_LEVELS
    assert TRACE == 5 < LEVELS["debug"]


def test_vmc_run_reads_its_configuration_before_any_heavy_import(tmp_path: Path) -> None:
    """``vmc run`` starts its MDB line process right after reading the configuration
    (vmc/cli.py ``_prespawn_line``); nothing heavy may be imported before: not asyncio,
    structlog or the daemon, nor the other sub-commands' modules (bench/footprint.py)."""
    heavy = ("asyncio", "structlog", "vmc.daemon", "vmc.journal.reports", "vmc.dex.service")
    script = (
        "import sys\n"
        "from vmc.cli import main\n"
        f"code = main(['run', '--config', {str(tmp_path / 'missing.toml')!r}])\n"
        f"print(code, [m for m in {heavy!r} if m in sys.modules])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split(maxsplit=1) == ["2", "[]\n"], out.stdout + out.stderr
