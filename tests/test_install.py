"""scripts/install, scripts/update and scripts/uninstall run for real into a temporary root, with
hil/systemctl.py standing in for systemd (it runs the installed unit's ExecStart under a
NOTIFY_SOCKET and waits for READY=1): the installed ``vmc`` runs, an update keeps the journal
and the configuration, an update whose daemon never reaches READY is rolled back by itself,
and uninstall keeps the journal and the configuration."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hil.harness import journal_backlog, write_config
from vmc.journal.files import database_path, open_readonly

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
#: One script run: a release install (venv from the lock, pip's cache warm) plus a daemon start
#: on a loaded 2-core CI machine.
SCRIPT_TIMEOUT_S = 300.0
#: What a release is made from (scripts/ops-common.sh copies these).
SOURCE_ITEMS = (
    "pyproject.toml",
    "README.md",
    "requirements.lock",
    "requirements-tools.lock",
    "vmc",
    "drivers",
    "hil",
    "config",
    "systemd",
    "docs",
    "scripts",
)
BROKEN_MARK = "broken release for the rollback test"


def script_env(root: Path) -> dict[str, str]:
    return {
        **os.environ,
        "VMC_SYSTEMCTL": f"{sys.executable} -m hil.systemctl --root {root}",
        # No system account in a test: these only create, change and remove the user vmc.
        "VMC_USERADD": "true",
        "VMC_USERMOD": "true",
        "VMC_USERDEL": "true",
        "VMC_CHOWN": "true",
        "VMC_PYTHON": sys.executable,
        "VMC_NO_COMPILE": "1",
        "VMC_SETTLE_S": "1",
    }


def run_script(source: Path, name: str, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(source / "scripts" / name), "--root", str(root), *args],
        env=script_env(root),
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
        check=False,
    )


def systemctl(root: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "hil.systemctl", "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
        check=False,
    )
    return result.stdout.strip()


def running_release(root: Path) -> str:
    """The release folder the running daemon's ``vmc`` was started from."""
    pid = int((root / "run" / "systemctl-standin" / "vmc.pid").read_text())
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return next(part.decode() for part in cmdline if b"/releases/" in part).split("/")[-4]


def journal_facts(state: Path) -> tuple[str, list[int]]:
    conn = open_readonly(database_path(state))
    try:
        seqs = [row[0] for row in conn.execute("SELECT seq FROM records ORDER BY seq")]
    finally:
        conn.close()
    return str(journal_backlog(state)["journal"]), seqs


def broken_source(tmp_path: Path) -> Path:
    """This source tree, with a ``vmc run`` that exits before READY (check-config and
    --version still work, so the update gets as far as the restart)."""
    source = tmp_path / "broken-source"
    source.mkdir()
    for item in SOURCE_ITEMS:
        if (REPO / item).is_dir():
            shutil.copytree(
                REPO / item, source / item, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(REPO / item, source / item)
    cli = source / "vmc" / "cli.py"
    cli.write_text(
        cli.read_text()
        + f"""

_working_main = main


def main(argv: Sequence[str] | None = None) -> int:  # {BROKEN_MARK}
    if (list(sys.argv[1:]) if argv is None else list(argv))[:1] == ["run"]:
        raise SystemExit("{BROKEN_MARK}: exits before READY")
    return _working_main(argv)
"""
    )
    return source


def test_install_update_rollback_uninstall(tmp_path: Path) -> None:
    root = tmp_path / "root"
    state = root / "var" / "lib" / "vmc"
    config = root / "etc" / "vmc" / "vmc.toml"
    try:
        # Install: the example configuration goes in place, as there is none.
        result = run_script(REPO, "install", root, "--release", "r1")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "wrote the example configuration" in result.stdout
        assert config.read_text() == (REPO / "config" / "example-hardware.toml").read_text()
        assert (root / "opt" / "vmc" / "current").resolve().name == "r1"
        version = subprocess.run(
            [str(root / "opt/vmc/current/venv/bin/vmc"), "--version"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert version.stdout.startswith("vmc ")
        unit = root / "etc" / "systemd" / "system" / "vmc.service"
        assert unit.read_text() == (REPO / "systemd" / "vmc.service").read_text()
        assert (root / "run" / "systemctl-standin" / "vmc.enabled").exists()

        # The board's own configuration (here the simulated machine), then the first start.
        write_config(config, state)
        assert systemctl(root, "start", "vmc.service") == ""
        assert systemctl(root, "is-active", "vmc.service") == "active"
        assert running_release(root) == "r1"
        journal_id, seqs = journal_facts(state)
        assert journal_id and seqs
        config_before = config.read_text()

        # Update: a new release beside the old, switched to, restarted, READY.
        result = run_script(REPO, "update", root, "--release", "r2")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "updated: r2 is running" in result.stdout
        assert (root / "opt" / "vmc" / "current").resolve().name == "r2"
        assert running_release(root) == "r2"
        assert config.read_text() == config_before
        journal_id_after, seqs_after = journal_facts(state)
        assert journal_id_after == journal_id
        assert seqs_after[: len(seqs)] == seqs  # every record kept, new boot records after

        # Update to a release that never reaches READY: rolled back by itself.
        result = run_script(broken_source(tmp_path), "update", root, "--release", "r3")
        assert result.returncode == 1, result.stdout + result.stderr
        assert "r3 never reached READY; rolled back, r2 is running again" in result.stderr
        assert (root / "opt" / "vmc" / "current").resolve().name == "r2"
        assert systemctl(root, "is-active", "vmc.service") == "active"
        assert running_release(root) == "r2"
        assert not (root / "opt" / "vmc" / "releases" / "r3").exists()
        assert BROKEN_MARK in (root / "var" / "log" / "vmc.log").read_text()
        assert journal_facts(state)[0] == journal_id

        # Uninstall: code, unit and service gone; the journal and the configuration kept.
        systemctl(root, "stop", "vmc.service")  # its last records (boot, stop) in the file
        kept = journal_facts(state)
        result = run_script(REPO, "uninstall", root)
        assert result.returncode == 0, result.stdout + result.stderr
        assert systemctl(root, "is-active", "vmc.service") == "inactive"
        assert not (root / "opt" / "vmc").exists()
        assert not unit.exists()
        assert journal_facts(state) == kept
        assert config.read_text() == config_before
    finally:
        if (root / "etc" / "systemd" / "system" / "vmc.service").exists():
            systemctl(root, "stop", "vmc.service")
