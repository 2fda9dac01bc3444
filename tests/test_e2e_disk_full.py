"""End to end: the state disk fills up under the running daemon. The machine must stop taking
money while the journal can still record what is already on its way in, say why, and resume by
itself when space comes back. The state folder is a real size-capped filesystem (tmpfs)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hil.harness import Daemon, write_config

pytestmark = pytest.mark.slow

FS_SIZE_MB = 16
RESERVE_MB = 4


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "statefs"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE_MB}m", "tmpfs", str(mount_point)],
        capture_output=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill_to(path: Path, free_bytes: int) -> Path:
    """Write a filler file until about ``free_bytes`` remain free."""
    filler = path / "filler.bin"
    st = os.statvfs(path)
    to_write = st.f_bavail * st.f_frsize - free_bytes
    with open(filler, "wb") as f:
        chunk = b"\0" * (1 << 20)
        while to_write > 0:
            n = min(to_write, len(chunk))
            f.write(chunk[:n])
            to_write -= n
        f.flush()
        os.fsync(f.fileno())
    return filler


def test_disk_below_reserve_stops_taking_money_and_resumes(small_fs: Path, tmp_path: Path) -> None:
    state = small_fs / "state"
    config = write_config(
        tmp_path / "vmc.toml", state, extra=f"[journal]\nmin_free_mb = {RESERVE_MB}"
    )
    daemon = Daemon(config, state)
    daemon.log_path = tmp_path / "daemon.log"  # not on the small disk
    daemon.start()
    try:
        daemon.insert_coins(4)
        daemon.wait_state(lambda s: s["credit"] == 100, "credit before the disk fills")

        filler = fill_to(small_fs, (RESERVE_MB // 2) << 20)
        state_now = daemon.wait_state(
            lambda s: (
                not s["in_service"]
                and "journal" in s["faults"]
                and s["accepting"]["coin"] is False
                and s["accepting"]["bill"] is False
            ),
            "the machine out of service with its acceptors disabled",
            timeout_s=30,
        )
        assert "reserve" in state_now["faults"]["journal"]
        # A coin offered now is refused by the changer, not taken.
        before = daemon.mdb_ledger()["coin"]["value_in"]
        daemon.mdb_sim("coin", "insert", coin_type=4)
        assert daemon.mdb_ledger()["coin"]["value_in"] == before
        # The credit already taken stays the customer's.
        assert daemon.state()["state"]["credit"] == 100

        filler.unlink()
        daemon.wait_state(lambda s: s["in_service"], "back in service", timeout_s=30)
        daemon.insert_coins(4)
        daemon.wait_state(lambda s: s["credit"] == 200, "coins taken again")
    finally:
        with contextlib.suppress(Exception):
            daemon.stop()
    faults = [
        line["event"]
        for line in daemon.log_lines()
        if line.get("key") == "journal" and line.get("event", "").startswith("machine fault")
    ]
    assert faults == ["machine fault", "machine fault cleared"]
